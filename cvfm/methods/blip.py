"""BLIP fine-tuning (Li et al. 2022, §3.2 and §4): the captioner and the filter of CapFilt, fine-tuned on
clean image-text pairs before they caption and filter a noisy set.

`blip-captioner` fine-tunes a `Captioner` (BlipForConditionalGeneration) with the language-modelling loss:
BLIP's prompt "a picture of " is prepended to every caption and its tokens are not predicted
(`--opt prompt=...`), and the decoder's cross-entropy uses label smoothing 0.1 as BLIP's `BertLMHeadModel`
does (transformers exposes it as `text_config.label_smoothing`; the method sets it, so the saved
backbone/config.json records 0.1 too: it changes the loss only, never generation).

`blip-filter` fine-tunes a `Matcher` (BlipForImageTextRetrieval) with ITC + ITM, as BLIP's
`blip_retrieval.py`:
  * ITC: symmetric InfoNCE between the normalised `vision_proj` / `text_proj` CLS embeddings at a
    learnable temperature (init 0.07, clamped to [0.001, 0.5]). transformers' retrieval model has no
    temperature, so the method holds it: it is in the checkpoints (exact resume) but NOT in the saved
    `Matcher` (backbone/), which needs none (ITM and cosine ranking are temperature-free); its last value
    is logged as `temp`. Pairs with identical captions are positives of each other (soft targets spread
    over them), as BLIP's targets spread over pairs of the same image id.
  * ITM: the text encoder cross-attends to the image tokens and `itm_head` classifies its CLS state as
    match / no match, over the B positives, one hard negative text per image and one hard negative image
    per text, each drawn with `torch.multinomial` from the softmax of the in-batch ITC similarities with
    the positive (and any identical caption) masked out. The text keeps its [CLS] first token, as
    transformers' retrieval model (and so `Matcher.itm_probs`) scores it; BLIP's own code swaps in [ENC].
  * loss = ITC + ITM. With several processes ITC contrasts against every process's features
    (`gather_with_grad`); hard negatives are mined within the local batch.
Not implemented (the paper's fine-tuning uses them, a small-data fine-tune does without): the momentum
encoders, the feature queue and the momentum distillation (soft ITC targets) with alpha 0.4; mining
across processes (`negative_all_rank`). Known limit: only identical captions are masked, so a differently
worded caption of the same content ("a red cat" / "a cat in red") can be mined as a "negative" (BLIP masks
by image id, which JSONL pairs lack). From random weights ITM first sits at its majority-class plateau
(accuracy 2/3, always "no match") until the features separate the mined negatives.

Defaults, from BLIP's COCO fine-tuning configs (`configs/retrieval_coco.yaml`, `caption_coco.yaml`):
AdamW, weight decay 0.05 (not on biases, norms and the temperature, as every cvfm method), one
RandomResizedCrop of area (0.5, 1) at the model's size, bicubic. Their flip and RandAugment are left
out: colour is in the captions, and a mirrored digit is not that digit.
Their `init_lr: 1e-5` (ViT-B; batch 32 per GPU on 8 GPUs, cosine to 0) suits fine-tuning a pretrained
model; `cvfm/tiny-blip` starts from random weights, so the default here is 2e-3 at batch 256 as for cvfm's
CLIP from scratch (sqrt-scaled to the batch, as every method: 1e-3 at batch 64). For a pretrained
hf/Salesforce/blip-* model pass --lr 1e-5.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cvfm.data.views import MultiView
from cvfm.errors import UsageError
from cvfm.methods.base import Method, gather_with_grad, need
from cvfm.methods.clip import light_view

BLIP_PROMPT = "a picture of "  # BLIP's captioning prompt (configs/caption_coco.yaml)
TEMP_INIT, TEMP_MIN, TEMP_MAX = 0.07, 0.001, 0.5  # blip_retrieval.py: temp 0.07, clamp_(0.001, 0.5)


@dataclass
class BLIPCaptionerConfig:
    prompt: str = BLIP_PROMPT  # prepended, not predicted; "" for none
    label_smoothing: float = 0.1  # BLIP's decoder (BertLMHeadModel)
    min_scale: float = 0.5  # RandomResizedCrop area, BLIP's fine-tuning transform


@dataclass
class BLIPFilterConfig:
    temp: float = TEMP_INIT  # initial ITC temperature (learnable, clamped to [0.001, 0.5])
    min_scale: float = 0.5


def text_ids(texts: list[str], device=None) -> torch.Tensor:
    """An id per text (crc32 of its UTF-8 bytes): equal for equal texts, on every process."""
    return torch.tensor([zlib.crc32(t.encode()) for t in texts], dtype=torch.long, device=device)


def _gather_ids(ids: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids
    out = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(out, ids)
    return torch.cat(out)


def itc_loss(
    image_feats: torch.Tensor, text_feats: torch.Tensor, temp: torch.Tensor, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """BLIP's image-text contrastive loss: (CE(image->text) + CE(text->image)) / 2 at logits sim / temp.

    Features are L2-normalised here. Targets: pair i is the positive of row i; with `ids` (one per pair,
    e.g. `text_ids`), every pair with the same id is a positive too and the target mass is spread evenly
    over them (blip_retrieval.py's `sim_targets = pos_idx / pos_idx.sum(1)`). With several processes the
    local rows are scored against the gathered features, as `clip_loss`.
    """
    img = F.normalize(image_feats, dim=-1)
    txt = F.normalize(text_feats, dim=-1)
    all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)
    n = img.shape[0]
    offset = dist.get_rank() * n if all_img.shape[0] != n else 0
    if ids is None:
        targets = torch.zeros(n, all_img.shape[0], device=img.device)
        targets[torch.arange(n), torch.arange(n) + offset] = 1.0
    else:
        same = (ids[:, None] == _gather_ids(ids)[None, :]).float()
        targets = same / same.sum(1, keepdim=True)
    i2t = -(F.log_softmax(img @ all_txt.T / temp, dim=1) * targets).sum(1).mean()
    t2i = -(F.log_softmax(txt @ all_img.T / temp, dim=1) * targets).sum(1).mean()
    return (i2t + t2i) / 2


@torch.no_grad()
def mine_hard_negatives(sim: torch.Tensor, same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a negative text, for each text a negative image, from local similarities.

    `sim` (B, B): image i vs text j logits (ITC similarity / temp); `same` (B, B): True where text j is a
    positive of image i (the diagonal, identical captions). Row i's negative is drawn with
    `torch.multinomial` from softmax(sim[i]) over the non-positives (BLIP: `weights_i2t =
    softmax(sim_i2t); weights_i2t.masked_fill_(mask, 0)`), so a dominant negative is almost always
    chosen; a row whose only candidates are positives (all captions equal) draws uniformly among the
    other rows. Returns (negative text index per image, negative image index per text).
    """
    n = sim.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    same = same | eye

    def draw(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(logits.float().masked_fill(mask, -math.inf), dim=1)
        empty = mask.all(1)
        if empty.any():  # nothing but positives: any other row
            weights[empty] = (~eye[empty]).float()
        weights = torch.nan_to_num(weights, nan=0.0)
        return torch.multinomial(weights, 1).squeeze(1)

    return draw(sim, same), draw(sim.T, same.T)


def itm_loss(logits: torch.Tensor, num_pos: int) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the (3B, 2) ITM logits against [1] * B + [0] * 2B (positives first, then the
    hard negatives), and the accuracy of their argmax."""
    labels = torch.cat(
        [torch.ones(num_pos, dtype=torch.long), torch.zeros(logits.shape[0] - num_pos, dtype=torch.long)]
    ).to(logits.device)
    accuracy = float((logits.detach().argmax(1) == labels).float().mean())
    return F.cross_entropy(logits, labels), accuracy


class BLIPCaptioner(Method):
    """`self.encoder` is a `Captioner`; `forward` is its LM loss on the batch's captions (raw strings)."""

    model_kind = "captioner"
    default_model = "cvfm/tiny-blip"
    base_lr = 2e-3  # at batch 256; BLIP's 1e-5 is for a pretrained ViT-B (module docstring)
    weight_decay = (0.05, 0.05)  # BLIP's fine-tuning configs
    summary_keys = ()

    def __init__(self, encoder, cfg, budget):
        super().__init__(encoder, cfg, budget)
        decoder = encoder.model.text_decoder
        decoder.label_smoothing = cfg.label_smoothing  # read by its loss at every call
        encoder.model.config.text_config.label_smoothing = cfg.label_smoothing  # and saved with it

    def views(self) -> MultiView:
        return MultiView([light_view(self.encoder.preprocess, self.cfg.min_scale)])

    def forward(self, batch, step):
        texts = need(batch, "text", "the BLIP captioner needs the batch's captions")
        loss = self.encoder.loss(batch["image"][0], list(texts), prompt=self.cfg.prompt or None)
        return loss, {"lm_loss": float(loss.detach())}


class BLIPFilter(Method):
    """`self.encoder` is a `Matcher`; `forward` is ITC + ITM with hard negatives on the batch's captions."""

    model_kind = "matcher"
    default_model = "cvfm/tiny-blip"
    base_lr = 2e-3
    weight_decay = (0.05, 0.05)
    summary_keys = ("itm_accuracy",)

    def __init__(self, encoder, cfg, budget):
        super().__init__(encoder, cfg, budget)
        if not TEMP_MIN <= cfg.temp <= TEMP_MAX:
            raise UsageError(f"option temp={cfg.temp}: BLIP clamps it to [{TEMP_MIN}, {TEMP_MAX}]")
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))

    def views(self) -> MultiView:
        return MultiView([light_view(self.encoder.preprocess, self.cfg.min_scale)])

    def forward(self, batch, step):
        texts = need(batch, "text", "the BLIP filter needs the batch's captions")
        matcher, pixels = self.encoder, batch["image"][0]
        tokens = matcher.tokenize(list(texts), pixels.device)
        image_tokens, image_feat = matcher.image_embeddings(pixels)
        text_feat = matcher.text_embeddings(tokens)
        ids = text_ids(list(texts), pixels.device)
        itc = itc_loss(image_feat, text_feat, self.temp, ids)

        n = pixels.shape[0]
        with torch.no_grad():
            sim = image_feat @ text_feat.T / self.temp
        neg_text, neg_image = mine_hard_negatives(sim, ids[:, None] == ids[None, :])
        input_ids, attention = tokens["input_ids"], tokens["attention_mask"]
        # positives, (image i, its hard negative text), (text j's hard negative image, text j): one pass
        ids_all = torch.cat([input_ids, input_ids[neg_text], input_ids])
        att_all = torch.cat([attention, attention[neg_text], attention])
        # index_select, not image_tokens[neg_image]: the backward of advanced indexing (index_put_ with
        # accumulate) sums in a thread-dependent order on CPU, which broke bitwise-exact resume
        img_all = torch.cat([image_tokens, image_tokens, image_tokens.index_select(0, neg_image)])
        hidden = matcher.model.text_encoder(
            input_ids=ids_all,
            attention_mask=att_all,
            encoder_hidden_states=img_all,
            encoder_attention_mask=torch.ones(img_all.shape[:-1], dtype=torch.long, device=pixels.device),
        ).last_hidden_state
        itm, accuracy = itm_loss(matcher.model.itm_head(hidden[:, 0]), n)
        return itc + itm, {
            "itc_loss": float(itc.detach()),
            "itm_loss": float(itm.detach()),
            "itm_accuracy": accuracy,
            "temp": float(self.temp.detach()),
        }

    @torch.no_grad()
    def after_optimizer_step(self, step):
        self.temp.clamp_(TEMP_MIN, TEMP_MAX)
