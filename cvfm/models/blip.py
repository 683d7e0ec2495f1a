"""BLIP's two roles (Li et al. 2022) behind small faces: a captioner and an image-text matcher.

`Captioner` wraps transformers' `BlipForConditionalGeneration` (image -> caption, language-modelling
loss for fine-tuning); `Matcher` wraps `BlipForImageTextRetrieval` (ITM head: the probability that a
caption matches an image; ITC: projected, normalised image and text embeddings). Both use the model's
own tokenizer and cvfm's `Preprocess`, and save to a folder that loads back through the registry
(`create_captioner`, `create_matcher`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cvfm.data.views import Preprocess
from cvfm.models.encoder import PREPROCESS_FILE


def _save(model: nn.Module, tokenizer, preprocess: Preprocess, folder: str | Path) -> Path:
    import json
    from dataclasses import asdict

    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / PREPROCESS_FILE).write_text(json.dumps(asdict(preprocess), indent=2) + "\n")
    return folder


class Captioner(nn.Module):
    """`generate(pixels, ...)` returns captions per image; `loss(pixels, texts)` is the LM loss."""

    def __init__(self, model: nn.Module, tokenizer, name: str, preprocess: Preprocess, max_length: int = 40):
        super().__init__()
        self.model, self.tokenizer, self.name, self.preprocess = model, tokenizer, name, preprocess
        self.max_length = max_length

    def prompt_inputs(self, prompt: str | None, batch: int, device) -> dict:
        """The prompt's `input_ids` / `attention_mask` for `batch` images (empty without a prompt)."""
        if not prompt:
            return {}
        enc = self.tokenizer([prompt] * batch, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    @torch.no_grad()
    def generate(
        self,
        pixels: torch.Tensor,
        *,
        prompt: str | None = None,
        num_beams: int = 3,
        top_p: float | None = None,
        num_captions: int = 1,
        max_length: int = 30,
        min_length: int = 5,
        repetition_penalty: float = 1.0,
    ) -> list[list[str]]:
        """Beam search (`num_beams`), or nucleus sampling when `top_p` is set (seed torch for
        reproducibility). Returns `num_captions` captions per image, the prompt stripped (as LAVIS)."""
        kwargs: dict = {"max_length": max_length, "min_length": min_length}
        kwargs["repetition_penalty"] = repetition_penalty
        if top_p is not None:
            kwargs.update(do_sample=True, top_p=top_p, num_beams=1, num_return_sequences=num_captions)
        else:
            if num_captions > num_beams:
                raise ValueError(f"beam search returns at most num_beams={num_beams} captions")
            kwargs.update(num_beams=num_beams, num_return_sequences=num_captions)
        prompt_inputs = self.prompt_inputs(prompt, pixels.shape[0], pixels.device)
        ids = self.model.generate(pixel_values=pixels, **prompt_inputs, **kwargs)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        texts = [strip_prompt(t, prompt) for t in texts]
        return [texts[i * num_captions : (i + 1) * num_captions] for i in range(pixels.shape[0])]

    def loss(self, pixels: torch.Tensor, texts: list[str], prompt: str | None = None) -> torch.Tensor:
        """Language-modelling loss of `texts` given the images (BLIP's captioner objective); the prompt
        tokens, when given, are not predicted."""
        full = [f"{prompt} {t}" if prompt else t for t in texts]
        enc = self.tokenizer(
            full, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        input_ids = enc["input_ids"].to(pixels.device)
        attention = enc["attention_mask"].to(pixels.device)
        input_ids[:, 0] = self.model.config.text_config.bos_token_id
        labels = input_ids.masked_fill(attention == 0, -100)
        if prompt:
            n = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1  # + the bos token
            labels[:, :n] = -100
        out = self.model(pixel_values=pixels, input_ids=input_ids, attention_mask=attention, labels=labels)
        return out.loss

    def save(self, folder: str | Path) -> Path:
        return _save(self.model, self.tokenizer, self.preprocess, folder)


def strip_prompt(text: str, prompt: str | None) -> str:
    """The caption without its prompt, as LAVIS returns it."""
    p = (prompt or "").strip().lower()
    return (text[len(p) :] if p and text.lower().startswith(p) else text).strip()


class Matcher(nn.Module):
    """`itm_probs(pixels, texts)`: P(match) from the ITM head, one per (image, text) row;
    `itc_embeddings` gives the normalised projected image / text embeddings (contrastive space)."""

    def __init__(self, model: nn.Module, tokenizer, name: str, preprocess: Preprocess, max_length: int = 35):
        super().__init__()
        self.model, self.tokenizer, self.name, self.preprocess = model, tokenizer, name, preprocess
        self.max_length = max_length

    def tokenize(self, texts: list[str], device=None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def itm_logits(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B, 2) ITM logits for B (image, text) pairs (column 1 = match)."""
        tokens = self.tokenize(texts, pixels.device)
        return self.model(pixel_values=pixels, use_itm_head=True, **tokens).itm_score

    @torch.no_grad()
    def itm_probs(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return F.softmax(self.itm_logits(pixels, texts).float(), dim=-1)[:, 1]

    def image_embeddings(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the vision tokens (B, N, W), the normalised ITC embedding (B, D))."""
        tokens = self.model.vision_model(pixel_values=pixels).last_hidden_state
        return tokens, F.normalize(self.model.vision_proj(tokens[:, 0]), dim=-1)

    def text_embeddings(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model.text_encoder(**tokens).last_hidden_state
        return F.normalize(self.model.text_proj(hidden[:, 0]), dim=-1)

    def itc_embeddings(self, pixels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_embeddings(pixels)[1], self.text_embeddings(self.tokenize(texts, pixels.device))

    def save(self, folder: str | Path) -> Path:
        return _save(self.model, self.tokenizer, self.preprocess, folder)
