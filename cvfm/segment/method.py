"""SAM's training as a method of the shared loop (`cvfm.runtime.loop.Trainer`): the interactive recipe of the
paper (Kirillov et al. 2023, appendix A), on the instance masks that each batch carries as "target".

Per step, each image is embedded once (under no_grad while the image encoder is frozen, the default) and
up to `instances` of its masks are drawn. Each object then gets a simulated annotation session
(`cvfm.segment.simulate`): a first prompt (a point in the mask or a noisy box, even odds), `clicks`
corrective clicks drawn from the error region of the previous prediction, and `refine` iterations with no
new click; every decode after the first is also given the previous low-resolution logits as its mask
prompt (detached: each iteration learns from its own prompts). Where several candidates come back (SAM's
multimask output, for a single point alone) the one of highest predicted IoU is fed back and clicked
on, as in the paper. The loss (`cvfm.segment.losses`) is averaged over the objects and iterations.

Masks are compared at the decoder's low resolution (4x the embedding's side: 256 px for SAM's 1024 px
input), against the object's mask moved into the model's input frame as the image is (resized, padded:
`Segmenter.input_masks`) and averaged down to that resolution (a pixel in the mask when at least half
covered). Clicks are drawn in the input frame from the prediction upsampled to it, as a user sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cvfm.data.instances import decode_masks
from cvfm.data.items import DataError
from cvfm.data.views import MultiView
from cvfm.errors import UsageError
from cvfm.methods.base import Method
from cvfm.models.segmenter import ImageEmbedding, Segmenter
from cvfm.runtime.plan import Budget
from cvfm.segment.losses import LossWeights, prompt_loss
from cvfm.segment.simulate import corrective_clicks, noisy_boxes, sample_points, valid_area

CLICK, REFINE = "click", "refine"


@dataclass
class SamTrainConfig:
    """The recipe's knobs (`--opt key=value`); SAM's own values in the comments."""

    instances: int = 8  # masks drawn per image and step (SAM: up to 64 per GPU)
    clicks: int = 3  # corrective clicks after the first prompt (SAM: 8)
    refine: int = 2  # iterations without a new click (SAM: 2, one among the clicks, one at the end)
    box_share: float = 0.5  # the odds that the first prompt is a box rather than a point (SAM: even)
    focal_weight: float = 20.0  # SAM: focal to dice 20:1, IoU MSE with weight 1
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    train_encoder: bool = False  # also train the image encoder (SAM fine-tunes are usually decoder-only)

    def __post_init__(self):
        if self.instances < 1 or self.clicks < 0 or self.refine < 0:
            raise UsageError("instances must be at least 1; clicks and refine at least 0")
        if not 0.0 <= self.box_share <= 1.0:
            raise UsageError(f"box_share is a probability, not {self.box_share}")


class SamTraining(Method):
    """Fine-tunes a `Segmenter`'s prompt encoder and mask decoder (and its image encoder with
    `train_encoder`) on images with instance masks; exports the whole segmenter as backbone/."""

    model_kind = "segmenter"
    summary_keys = ("iou_first", "iou_last")
    base_lr = 8e-4  # SAM's AdamW lr at 256 images a batch (scaled by sqrt(batch / 256))
    weight_decay = (0.1, 0.1)  # SAM

    def __init__(self, segmenter: Segmenter, cfg: SamTrainConfig, budget: Budget):
        super().__init__(segmenter, cfg, budget)
        self.weights = LossWeights(cfg.focal_weight, cfg.dice_weight, cfg.iou_weight)
        segmenter.train()
        if not cfg.train_encoder:
            segmenter.freeze_image_encoder()
        # the image encoder (a backbone segmenter's neck at least) runs with gradients when any of it trains
        self.encoder_grad = any(p.requires_grad for p in segmenter.model.vision_encoder.parameters())
        self.resolved = {"iterations": 1 + cfg.clicks + cfg.refine}

    def views(self) -> MultiView:
        return MultiView([self.encoder.preprocess.transform()])

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        segmenter: Segmenter = self.encoder
        sizes = [tuple(s) for s in batch["size"].tolist()]
        with torch.set_grad_enabled(self.encoder_grad and torch.is_grad_enabled()):
            embedding = segmenter.embed_image(batch["image"][0], sizes)
        masks, owner = self._instances(batch, embedding)
        if not len(masks):  # every drawn mask vanished at the model's input size
            return _in_graph(torch.zeros((), device=masks.device), self, always=True), {}
        rng = np.random.default_rng(int(torch.randint(2**62, ())))
        boxed = torch.rand(len(masks)) < self.cfg.box_share
        schedule = self._schedule()
        sessions = []
        for box in (False, True):
            index = (boxed == box).nonzero()[:, 0]
            if len(index):
                sessions.append(
                    self._session(embedding, owner[index], masks[index.to(masks.device)], box, schedule, rng)
                )
        losses = torch.cat([loss for loss, _ in sessions])  # (P, iterations)
        parts = {k: torch.cat([part[k] for _, part in sessions]) for k in sessions[0][1]}
        logs = {k: float(parts[k].detach().mean()) for k in ("focal", "dice", "iou_mse")}
        logs.update(iou_first=float(parts["iou"][:, 0].mean()), iou_last=float(parts["iou"][:, -1].mean()))
        return _in_graph(losses.mean(), self), {**logs, "instances": float(len(masks))}

    def _schedule(self) -> list[str]:
        """The iterations after the first prompt: the clicks, one refinement at the end and any others at
        random places among the clicks (the paper's placement)."""
        kinds = [CLICK] * self.cfg.clicks
        for _ in range(self.cfg.refine - 1):
            kinds.insert(int(torch.randint(len(kinds) + 1, ())), REFINE)
        return kinds + [REFINE] * min(self.cfg.refine, 1)

    def _instances(self, batch: dict, embedding: ImageEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to `instances` masks drawn from each image's target, in the model's input frame: (P, S, S)
        bool on the device, and (P,) the image each belongs to. Masks left empty at that size are dropped."""
        segmenter: Segmenter = self.encoder
        device = embedding.device
        found, owner = [], []
        for i, target in enumerate(batch["target"]):
            rles, size = target["masks"], embedding.original_sizes[i]
            if not rles:
                continue
            chosen = torch.randperm(len(rles))[: self.cfg.instances].tolist()
            masks = decode_masks({"masks": [rles[j] for j in chosen]})
            if masks.shape[1:] != size:
                (h, w), (mh, mw) = size, masks.shape[1:]
                raise DataError(
                    f"item {int(batch['index'][i])}: masks are {mw}x{mh} but its image is {w}x{h}"
                )
            moved = segmenter.input_masks(torch.from_numpy(masks).to(device), size)
            moved = moved[moved.flatten(1).any(1)]
            found.append(moved)
            owner += [i] * len(moved)
        if not found:
            return torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long)
        return torch.cat(found), torch.tensor(owner, dtype=torch.long)

    def _session(
        self,
        embedding: ImageEmbedding,
        owner: torch.Tensor,
        masks: torch.Tensor,
        boxed: bool,
        schedule: list[str],
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The simulated annotation of P objects whose first prompt is a box (`boxed`) or a point: their
        (P, iterations) losses and parts (`prompt_loss`'s)."""
        segmenter: Segmenter = self.encoder
        device = masks.device
        mine = embedding.rows(owner)
        shapes = mine.input_sizes
        valid = valid_area(shapes, segmenter.input_size, device)
        points = labels = boxes = previous = target = None
        if boxed:
            boxes = noisy_boxes(masks, shapes, rng)
        else:
            points = sample_points(masks)[0][:, None]
            labels = torch.ones(len(masks), 1, dtype=torch.long, device=device)
        losses, parts = [], []
        for kind in ["first", *schedule]:
            if kind == CLICK:
                xy, label = corrective_clicks(masks, segmenter.input_logits(previous) > 0, valid)
                points = xy[:, None] if points is None else torch.cat([points, xy[:, None]], 1)
                labels = label[:, None] if labels is None else torch.cat([labels, label[:, None]], 1)
            multimask = previous is None and not boxed  # one point alone is ambiguous: 3 candidates
            pred = segmenter.decode_batch(
                mine.features, points, labels, boxes, previous, multimask, mine.intermediate
            )
            logits = pred.low_res_logits.float()
            if target is None:
                target = low_res(masks, logits.shape[-2:])
            loss, part = prompt_loss(logits, pred.iou.float(), target, self.weights)
            losses.append(loss)
            parts.append(part)
            chosen = pred.iou.argmax(1)  # the candidate a user would get is fed back and clicked on
            previous = pred.low_res_logits[torch.arange(len(chosen), device=device), chosen].detach()
        return torch.stack(losses, 1), {k: torch.stack([p[k] for p in parts], 1) for k in parts[0]}


def _in_graph(loss: torch.Tensor, module: torch.nn.Module, always: bool = False) -> torch.Tensor:
    """`loss` with every trainable parameter of `module` added times 0: under DDP (several processes), a step
    whose objects were all boxes, or all points, leaves some prompt embeddings unused, which DDP without
    `find_unused_parameters` refuses. The value is unchanged."""
    if not (always or (dist.is_available() and dist.is_initialized())):
        return loss
    return loss + sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0


def low_res(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(P, S, S) boolean masks of the input frame at the decoder's (h, w): a pixel is in the mask when at
    least half of the input pixels it covers are."""
    return F.interpolate(masks[:, None].float(), size, mode="area")[:, 0] >= 0.5
