"""`evaluate segmentation` as a library call: a promptable segmenter on images with instance masks, one
JSON record.

Each image is embedded once; each object is then prompted from its ground-truth mask:
- `center`: one positive click at the object's centre (its point farthest from the boundary), three
  candidate masks, the one of highest predicted IoU chosen (and the best of the three, SAM's "oracle");
- `box`: its tight box, exact and jittered as SAM's training noise (one mask each);
- `clicks`: the interactive protocol (`cvfm.eval.segmentation`): up to 20 simulated clicks, each decode
  given every click so far and, after the first, the previous prediction's low-resolution logits as the
  mask prompt, asking for one mask (three at the first click, the most confident kept), as SAM's paper
  simulates interactive annotation.
Masks are compared with the ground truth at the image's own size.

`auto` prompts nothing from the ground truth: SAM's automatic masks of each image (`generate_masks`, with
`settings`) are scored as object proposals, class-agnostic mask AR@10/100/1000 by COCO's evaluation
(`mask_ar`), ranked by their predicted IoU (the score segment-anything's generator gives them).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

import cvfm
from cvfm.data.instances import decode_masks
from cvfm.data.loader import ImageDataset, SkipLog, Skipped, collate
from cvfm.data.masks_source import open_masks
from cvfm.data.sources import subset
from cvfm.errors import UsageError
from cvfm.eval.segmentation import (
    AR_MAX_DETS,
    BOX_JITTER,
    MAX_CLICKS,
    MIOU_CLICKS,
    NOC_THRESHOLDS,
    Click,
    ClickRun,
    click_metrics,
    iou,
    jitter_box,
    mask_ar,
    mask_box,
    simulate_clicks,
    single_click_metrics,
)
from cvfm.models.amg import AutoSettings, generate_masks
from cvfm.models.segmenter import ImageEmbedding, Segmenter
from cvfm.registry import create_segmenter
from cvfm.runtime.device import default_device
from cvfm.runtime.progress import progress
from cvfm.runtime.threads import share_cores_with_workers

PROMPTS = ("center", "box", "clicks", "auto")
PROMPTED = ("center", "box", "clicks")  # from each object's ground truth, on the image's embedding


class SamClicks:
    """A segmenter as the click protocol's predictor on one image: the first click asks for three masks,
    each later call sends every click with the previous chosen mask's low-res logits and asks for one."""

    def __init__(self, segmenter: Segmenter, embedding: ImageEmbedding):
        self.segmenter, self.embedding, self.previous = segmenter, embedding, None

    def __call__(self, clicks: list[Click]) -> tuple[np.ndarray, np.ndarray]:
        points = torch.tensor([[[c.x, c.y] for c in clicks]], dtype=torch.float32)
        labels = torch.tensor([[int(c.positive) for c in clicks]])
        out = self.segmenter.decode(
            self.embedding, points, labels, mask_input=self.previous, multimask=self.previous is None
        )
        self.previous = out.low_res_logits[0, int(out.iou[0].argmax())][None]
        masks = self.segmenter.upscale(out.low_res_logits, self.embedding)[0] > 0
        return masks.cpu().numpy(), out.iou[0].float().cpu().numpy()


def box_ious(
    segmenter: Segmenter, embedding: ImageEmbedding, gts: np.ndarray, rng: np.random.Generator, jitter: float
) -> tuple[list[float], list[float]]:
    """IoU of the single mask each object's exact box and jittered box give (one decode for all)."""
    size = gts.shape[1:]
    exact = [mask_box(gt) for gt in gts]
    noisy = [jitter_box(b, rng, size, fraction=jitter) for b in exact]
    boxes = torch.tensor(np.array(exact + noisy), dtype=torch.float32)
    out = segmenter.decode(embedding, boxes=boxes, multimask=False)
    masks = (segmenter.upscale(out.low_res_logits, embedding)[:, 0] > 0).cpu().numpy()
    scores = [iou(m, gts[i % len(gts)]) for i, m in enumerate(masks)]
    return scores[: len(gts)], scores[len(gts) :]


@dataclass
class Scores:
    """What each object's prompts gave, gathered over the images."""

    prompts: tuple[str, ...]
    max_clicks: int
    jitter: float
    runs: list[ClickRun] = field(default_factory=list)
    box: list[float] = field(default_factory=list)
    box_jitter: list[float] = field(default_factory=list)
    ground_truth: list[list[dict]] = field(default_factory=list)  # auto: each image's RLEs
    proposals: list[list[dict]] = field(default_factory=list)  # auto: each image's masks and scores
    images: int = 0

    @property
    def instances(self) -> int:
        return max(len(self.runs), len(self.box), sum(map(len, self.ground_truth)))

    def add(self, segmenter: Segmenter, embedding: ImageEmbedding | None, gts: np.ndarray, rng) -> None:
        """Prompt every object of one image (its masks `gts` (N, H, W), empty ones left out)."""
        self.images += 1
        gts = gts[gts.reshape(len(gts), -1).any(axis=1)]
        if not len(gts) or embedding is None:
            return
        if "center" in self.prompts or "clicks" in self.prompts:
            least = min(self.max_clicks, max(MIOU_CLICKS))  # mIoU@5 needs five clicks from everyone
            for gt in gts:
                predict = SamClicks(segmenter, embedding)  # a fresh session per object
                self.runs.append(simulate_clicks(gt, predict, self.max_clicks, min_clicks=least))
        if "box" in self.prompts:
            exact, noisy = box_ious(segmenter, embedding, gts, rng, self.jitter)
            self.box += exact
            self.box_jitter += noisy

    def add_proposals(self, records: list[dict], gts: list[dict]) -> None:
        """One image's automatic masks (`generate_masks` records) and its ground-truth RLEs."""
        self.ground_truth.append(gts)
        ranked = [{"segmentation": r["segmentation"], "score": r["predicted_iou"]} for r in records]
        self.proposals.append(ranked)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if "center" in self.prompts:
            out.update(single_click_metrics(self.runs))
        if "box" in self.prompts:
            out.update(box_miou=float(np.mean(self.box)), box_jitter_miou=float(np.mean(self.box_jitter)))
        if "clicks" in self.prompts:
            out.update(click_metrics(self.runs, self.max_clicks))
        if "auto" in self.prompts:
            out.update(mask_ar(self.ground_truth, self.proposals, AR_MAX_DETS))
            out["auto_masks_per_image"] = float(np.mean([len(p) for p in self.proposals]))
        return out


def evaluate_segmentation(
    model: str | Segmenter,
    data: str,
    *,
    prompts: Sequence[str] = PROMPTED,
    settings: AutoSettings = AutoSettings(),
    split: str | None = None,
    image_root: str | None = None,
    limit: int | None = None,
    max_clicks: int = MAX_CLICKS,
    jitter: float = BOX_JITTER,
    batch_size: int = 4,
    num_workers: int = 0,
    seed: int = 0,
    strict: bool = False,
    pretrained: bool = True,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> dict:
    """Score a promptable segmenter on the instance masks of `data` (`cvfm.data.masks_source.open_masks`:
    builtin:animal-scenes, a COCO .json, a folder of images/ and masks/) with the given prompts.

    `split` defaults to "test" for a built-in set and to none otherwise; `limit` scores the first images
    only; the jittered boxes are seeded by (`seed`, image index); `settings` drive the automatic masks of
    `auto`. Returns `{"task": "segmentation", "metrics": {...}, ...}` with `center_*`, `box_*`, `miou@k`,
    `noc@t`, `nof@t` and (auto) `ar@k` metrics."""
    t0 = time.perf_counter()
    prompts = _check_prompts(prompts)
    if max_clicks < max(MIOU_CLICKS):
        raise UsageError(f"at least {max(MIOU_CLICKS)} clicks are needed for mIoU@{max(MIOU_CLICKS)}")
    if split is None and data.startswith("builtin:"):
        split = "test"
    source = open_masks(data, split=split, image_root=image_root, strict=strict)
    if limit is not None:
        source = subset(source, range(min(limit, len(source))))
    segmenter = model
    if not isinstance(model, Segmenter):
        segmenter = create_segmenter(model, pretrained=pretrained, trust_remote_code=trust_remote_code)
    device = default_device(device)
    if device == "cpu":
        share_cores_with_workers(num_workers)
    segmenter.eval().to(device)
    skips = SkipLog(strict, source.skipped)
    loader = DataLoader(
        ImageDataset(source, segmenter.preprocess.transform()),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
    )
    scores = Scores(prompts, max_clicks if "clicks" in prompts else 1, jitter)
    with torch.no_grad(), progress("segmentation", total=len(loader)) as advance:
        for batch in loader:
            skips.add(batch["skipped"])
            if batch["image"] is not None:
                sizes = [tuple(s) for s in batch["size"].tolist()]
                embeddings = None
                if set(prompts) & set(PROMPTED):
                    embeddings = segmenter.embed_image(batch["image"].to(device), sizes)
                for j, index in enumerate(batch["index"].tolist()):
                    gts = decode_masks(batch["target"][j])
                    if len(gts) and gts.shape[1:] != sizes[j]:
                        (h, w), (mh, mw) = sizes[j], gts.shape[1:]
                        reason = f"masks are {mw}x{mh} but the image is {w}x{h}"
                        skips.add([Skipped(index, str(source.items[index].ref), reason)])
                        continue
                    embedding = None if embeddings is None else embeddings.select(j)
                    scores.add(segmenter, embedding, gts, np.random.default_rng((seed, index)))
                    objects = [r for r, gt in zip(batch["target"][j]["masks"], gts, strict=True) if gt.any()]
                    if "auto" in prompts and objects:  # an image without objects has nothing to recall
                        records = generate_masks(segmenter, source.load(index), settings)
                        scores.add_proposals(records, objects)
            advance()
    if not scores.instances:
        raise UsageError(f"no objects to segment in '{data}' (no readable image with an instance mask)")
    return {
        "task": "segmentation",
        "model": model if isinstance(model, str) else model.name,
        "dataset": data,
        "metrics": scores.metrics(),
        "seed": seed,
        "cvfm_version": cvfm.__version__,
        "wall_s": round(time.perf_counter() - t0, 3),
        "protocol": {
            "prompts": list(prompts),
            "max_clicks": max_clicks if "clicks" in prompts else 1,
            "noc_thresholds": list(NOC_THRESHOLDS),
            "box_jitter": jitter,
            **({"auto": asdict(settings)} if "auto" in prompts else {}),
        },
        "data": {
            "split": split,
            "images": scores.images,
            "instances": scores.instances,
            "skipped": skips.as_list(),
        },
    }


def _check_prompts(prompts: Sequence[str]) -> tuple[str, ...]:
    prompts = tuple(dict.fromkeys(p.strip() for p in prompts if p.strip()))
    unknown = [p for p in prompts if p not in PROMPTS]
    if unknown or not prompts:
        given = ", ".join(unknown) or "(none)"
        raise UsageError(f"unknown prompts {given}: choose from {', '.join(PROMPTS)}")
    return prompts
