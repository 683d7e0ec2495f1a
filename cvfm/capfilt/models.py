"""Batched BLIP calls for CapFilt whose results do not depend on the batch.

Nucleus sampling draws each caption from its own generator, seeded by (seed, pair key, caption index):
a caption is the same whether its image is captioned alone, in any batch, or in a resumed run. The draw
is Gumbel-max (argmax of the nucleus-filtered log-probabilities plus row noise), an exact sample of the
nucleus distribution; the chosen token is handed to `generate` as a one-hot distribution, so its own
sampler (global RNG) always picks it. ITM scores run the image tower once per image and the text
encoder once for all captions of a batch.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from cvfm.models.blip import Captioner, Matcher, strip_prompt


def row_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit seed for caption `index` of the pair `key`."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{index}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RowNucleusSampler:
    """A transformers logits processor: per row, keep the top-p nucleus, draw one token with the row's
    own generator, and return a one-hot distribution on it."""

    def __init__(self, generators: list[torch.Generator], top_p: float | None):
        from transformers import TopPLogitsWarper

        self.generators = generators
        self.top_p = TopPLogitsWarper(top_p) if top_p is not None and top_p < 1.0 else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"{scores.shape[0]} rows to sample but {len(self.generators)} generators")
        scores = scores.float()
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        logp = F.log_softmax(scores, dim=-1)
        noise = torch.stack(
            [
                torch.empty(scores.shape[1], device=scores.device).exponential_(generator=g)
                for g in self.generators
            ]
        )
        choice = (logp - noise.log()).argmax(dim=-1, keepdim=True)
        onehot = torch.full_like(scores, float("-inf"))
        return onehot.scatter_(1, choice, 0.0)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@torch.no_grad()
def sample_captions(
    captioner: Captioner,
    pixels: torch.Tensor,
    keys: list[str],
    *,
    seed: int = 0,
    num_captions: int = 1,
    top_p: float | None = 0.9,
    prompt: str | None = "a picture of",
    max_length: int = 30,
    min_length: int = 5,
) -> list[list[str]]:
    """`num_captions` nucleus-sampled captions per image of `pixels` (B, 3, H, W); caption k of image i
    depends only on (the image, `seed`, `keys[i]`, k), never on the rest of the batch."""
    if len(keys) != pixels.shape[0]:
        raise ValueError(f"{len(keys)} keys for {pixels.shape[0]} images")
    if num_captions < 1:
        return [[] for _ in keys]
    gens = [_generator(pixels.device, row_seed(seed, key, k)) for key in keys for k in range(num_captions)]
    kwargs = captioner.prompt_inputs(prompt, len(keys), pixels.device)
    ids = captioner.model.generate(
        pixel_values=pixels,
        **kwargs,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        num_beams=1,
        num_return_sequences=num_captions,
        max_length=max_length,
        min_length=min_length,
        repetition_penalty=1.0,
        logits_processor=[RowNucleusSampler(gens, top_p)],
    )
    texts = captioner.tokenizer.batch_decode(ids, skip_special_tokens=True)
    texts = [strip_prompt(t, prompt) for t in texts]
    return [texts[i * num_captions : (i + 1) * num_captions] for i in range(len(keys))]


@torch.no_grad()
def itm_scores(matcher: Matcher, pixels: torch.Tensor, texts: list[list[str]]) -> list[list[float]]:
    """P(match) of every caption in `texts[i]` with image i: one image-tower pass per image, one
    text-encoder pass for all captions (the same computation as `Matcher.itm_probs`, without repeating
    the images)."""
    model = matcher.model
    flat = [t for row in texts for t in row]
    if not flat:
        return [[] for _ in texts]
    owner = torch.tensor([i for i, row in enumerate(texts) for _ in row], device=pixels.device)
    image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state[owner]
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=pixels.device)
    tokens = matcher.tokenize(flat, pixels.device)
    hidden = model.text_encoder(
        **tokens, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask
    ).last_hidden_state
    probs = F.softmax(model.itm_head(hidden[:, 0, :]).float(), dim=-1)[:, 1].tolist()
    out, start = [], 0
    for row in texts:
        out.append(probs[start : start + len(row)])
        start += len(row)
    return out
