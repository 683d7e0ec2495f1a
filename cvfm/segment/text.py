"""`segment_text`: masks for a text ("a red giraffe") in every image of a source, SAM guided by an image-text
model or by an open-vocabulary detector.

- clip-rerank: SAM's automatic masks (`generate_masks`), each scored against the text by any registry
  image-text model (CLIP, SigLIP, open_clip). A mask is shown to it as its box cropped from the image with
  the pixels outside the mask set to the model's mean colour (zero once normalised: the object alone on a
  neutral grey, as OVSeg's mask prompts), padded to a square with that colour so the centre crop of its
  preprocessing keeps the whole box. `score` is the cosine similarity of crop and text; `probability`
  the softmax over the image's masks of the similarities times the model's logit scale (CLIP's zero-shot
  softmax, over masks instead of classes). Kept: masks scoring at least `threshold`, at most `top_k`
  (default 1 without a threshold), best first.
- detector: an open-vocabulary detector (OWL-ViT, OWLv2, Grounding DINO) finds the text's boxes scored
  above `box_threshold`; each box, clipped to the image, prompts SAM for one mask (a box wholly outside
  the image, in OWLv2's padding, is dropped). `score` is the detector's, `box` the prompt; at most
  `top_k` (default all), best first.

One record per (image, text): `id`, `image`, `text`, `strategy`, and `masks`, each with `segmentation`
(COCO RLE), `area`, `bbox` (XYWH), `predicted_iou`, `stability_score` and `score`; written as JSON lines
on stdout or in a folder per image (per_image.py), whose overlay.png tints every kept mask.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cvfm.data.instances import decode_mask
from cvfm.data.sources import open_source
from cvfm.errors import UsageError
from cvfm.models.amg import AutoSettings, generate_masks
from cvfm.models.amg.masks import mask_record
from cvfm.models.detector import Detector
from cvfm.models.dual import DualEncoder
from cvfm.models.segmenter import Segmenter
from cvfm.runtime.device import default_device
from cvfm.runtime.precision import autocast, precision_name, resolve_precision
from cvfm.segment.per_image import Job, image_fields, output_folder, segment_images

STRATEGIES = ("clip-rerank", "detector")
MASK_KEYS = ("segmentation", "area", "bbox", "predicted_iou", "stability_score")
CROPS_PER_BATCH = 64


def segment_text(
    model: str,
    data: str,
    output: str = "-",
    *,
    texts: list[str],
    strategy: str = "clip-rerank",
    clip: str = "cvfm/tiny-clip",
    detector: str = "cvfm/tiny-owlv2",
    top_k: int | None = None,
    threshold: float | None = None,
    box_threshold: float | None = None,
    settings: AutoSettings = AutoSettings(),
    split: str | None = None,
    image_column: str = "image",
    precision: str = "auto",
    strict: bool = False,
    overwrite: bool = False,
    pretrained: bool = True,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> dict:
    """Masks of `texts` in every image of `data` with SAM `model`, written to `output` (see the module
    docstring); `pretrained` and `trust_remote_code` apply to every model. Returns a summary."""
    from cvfm.registry import create_detector, create_dual_encoder, create_segmenter

    texts = _check(texts, strategy, top_k, threshold, box_threshold)
    source = open_source(data, split=split, image_column=image_column, strict=strict)
    folder = output_folder(output, overwrite)
    kw = {"pretrained": pretrained, "trust_remote_code": trust_remote_code}
    segmenter = create_segmenter(model, **kw)
    guide = create_dual_encoder(clip, **kw) if strategy == "clip-rerank" else create_detector(detector, **kw)
    dev = torch.device(default_device(device))
    amp = resolve_precision(precision, dev)
    segmenter.eval().to(dev)
    guide.eval().to(dev)
    scorer = MaskScorer(guide, texts) if strategy == "clip-rerank" else None

    def predict(job: Job, image: Image.Image) -> list[dict]:
        with torch.no_grad(), autocast(dev, amp):
            if scorer is not None:
                found = ranked_masks(segmenter, scorer, image, settings, top_k, threshold)
            else:
                found = detected_masks(segmenter, guide, image, texts, box_threshold, top_k)
        head = {**image_fields(job[0].items[job[1]]), "strategy": strategy}
        return [{**head, "text": t, "masks": m} for t, m in zip(texts, found, strict=True)]

    jobs = [(source, i, None) for i in range(len(source))]
    counts = segment_images("segment text", jobs, folder, predict, _layers, strict)
    return {
        "model": model,
        "data": data,
        "output": output,
        "texts": texts,
        "strategy": strategy,
        "guide": clip if strategy == "clip-rerank" else detector,
        "precision": precision_name(amp),
        **counts,
        **({"settings": asdict(settings)} if strategy == "clip-rerank" else {}),
    }


class MaskScorer:
    """An image-text model scoring masks of an image against fixed texts (see the module docstring)."""

    @torch.no_grad()
    def __init__(self, dual: DualEncoder, texts: list[str]):
        self.dual = dual
        device = next(dual.parameters()).device
        tokens = {k: v.to(device) for k, v in dual.tokenizer(texts).items()}
        self.texts = F.normalize(dual.encode_text(tokens).float(), dim=-1)  # (T, D)
        self.transform = dual.preprocess.transform()
        self.fill = tuple(round(255 * m) for m in dual.preprocess.mean)

    def __call__(self, image: Image.Image, masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (T, N) cosine similarities of the texts and the masks' crops, and their softmax over masks."""
        device = self.texts.device
        features = []
        for start in range(0, len(masks), CROPS_PER_BATCH):
            crops = [mask_crop(image, m, self.fill) for m in masks[start : start + CROPS_PER_BATCH]]
            pixels = torch.stack([self.transform(c) for c in crops]).to(device)
            features.append(F.normalize(self.dual.encode_image(pixels).float(), dim=-1))
        if not features:
            empty = torch.zeros(len(self.texts), 0, device=device)
            return empty, empty
        cosine = self.texts @ torch.cat(features).T
        return cosine, (self.dual.logit_scale.exp().float() * cosine).softmax(dim=1)


def mask_crop(image: Image.Image, mask: np.ndarray, fill: tuple[int, int, int]) -> Image.Image:
    """The mask's box cut from the image, pixels outside the mask set to `fill`, padded to a centred
    square with `fill` (an empty mask gives one `fill` pixel)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return Image.new("RGB", (1, 1), fill)
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    pixels = np.asarray(image.convert("RGB"))[y0:y1, x0:x1].copy()
    pixels[~mask[y0:y1, x0:x1]] = fill
    h, w = pixels.shape[:2]
    square = Image.new("RGB", (max(h, w), max(h, w)), fill)
    square.paste(Image.fromarray(pixels), ((max(h, w) - w) // 2, (max(h, w) - h) // 2))
    return square


def ranked_masks(
    segmenter: Segmenter,
    scorer: MaskScorer,
    image: Image.Image,
    settings: AutoSettings,
    top_k: int | None,
    threshold: float | None,
) -> list[list[dict]]:
    """For each text, the automatic masks of `image` ranked by `scorer` and kept by `threshold` / `top_k`."""
    records = generate_masks(segmenter, image, settings)
    cosine, probability = scorer(image, [decode_mask(r["segmentation"]) for r in records])
    limit = top_k if top_k is not None else (None if threshold is not None else 1)
    out = []
    for scores, probs in zip(cosine.tolist(), probability.tolist(), strict=True):
        order = sorted(range(len(records)), key=lambda j: -scores[j])
        if threshold is not None:
            order = [j for j in order if scores[j] >= threshold]
        picked = order[:limit]
        out.append([_mask(records[j], score=scores[j], probability=probs[j]) for j in picked])
    return out


def detected_masks(
    segmenter: Segmenter,
    detector: Detector,
    image: Image.Image,
    texts: list[str],
    box_threshold: float | None,
    top_k: int | None,
) -> list[list[dict]]:
    """For each text, a SAM mask for each of the detector's boxes clipped to the image (those left empty
    dropped), best box first."""
    found = detector.detect(image, texts, box_threshold)
    h, w = image.height, image.width
    boxes = found.boxes.clamp(min=0).minimum(torch.tensor([w, h, w, h], dtype=found.boxes.dtype))
    inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # OWLv2 also sees the padding
    device = next(segmenter.parameters()).device
    pixels = segmenter.preprocess.transform()(image.convert("RGB"))[None].to(device)
    embedding = segmenter.embed_image(pixels, [(h, w)])
    out = []
    for t in range(len(texts)):
        index = torch.nonzero((found.labels == t) & inside).flatten()[:top_k]
        if not len(index):
            out.append([])
            continue
        pred = segmenter.decode(embedding, boxes=boxes[index], multimask=False)
        logits = segmenter.upscale(pred.low_res_logits.float(), embedding)[:, 0].cpu()  # (P, H, W)
        iou = pred.iou[:, 0].float().tolist()
        binary = (logits > 0).numpy()
        out.append(
            [
                {
                    **mask_record(logits[k], binary[k], iou[k]),
                    "score": float(found.scores[i]),
                    "box": boxes[i].tolist(),
                }
                for k, i in enumerate(index.tolist())
            ]
        )
    return out


def _mask(record: dict, **extra) -> dict:
    return {**{k: record[k] for k in MASK_KEYS}, **extra}


def _layers(records: list[dict]) -> list[dict]:
    """What the overlay shows: every kept mask (and its detector box)."""
    return [{"mask": m["segmentation"], "box": m.get("box")} for r in records for m in r["masks"]]


def _check(texts, strategy, top_k, threshold, box_threshold) -> list[str]:
    texts = [t.strip() for t in texts or []]
    if not texts or not all(texts):
        raise UsageError("give the text to segment: --text 'a red giraffe' (non-empty; repeat for several)")
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, not '{strategy}'")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    if threshold is not None and strategy != "clip-rerank":
        raise UsageError("--threshold is for clip-rerank's similarity; the detector's is --box-threshold")
    if box_threshold is not None and strategy != "detector":
        raise UsageError("--box-threshold is for --strategy detector; clip-rerank's is --threshold")
    return texts
