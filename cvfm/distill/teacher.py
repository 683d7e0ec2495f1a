"""The frozen teacher: an encoder (a classifier's or a DINO run's, with its head), fed the student's views
(re-sized and re-normalised to its own preprocessing), under bf16 autocast on a GPU that has it, and
optionally read at an intermediate layer (`--teacher-layer`, a forward hook)."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from cvfm.data.preprocess import Preprocess, adapt
from cvfm.errors import CvfmError, UsageError
from cvfm.methods.dino import DINOHead
from cvfm.models.encoder import Encoder, token_grid
from cvfm.registry import create_classifier, create_encoder, create_segmenter
from cvfm.runtime.checkpoint import latest_checkpoint


@dataclass
class TeacherOutput:
    pooled: torch.Tensor  # (B, D): the final pooled embedding, or the mean of the hooked layer's tokens
    tokens: torch.Tensor | None  # (B, N, D) patch tokens (of the hooked layer with --teacher-layer)
    grid: tuple[int, int] | None  # the tokens' (rows, columns)
    logits: torch.Tensor | None  # a classifier teacher's class logits
    dino: torch.Tensor | None  # a DINO teacher's head output
    embedding: torch.Tensor | None = None  # a SAM teacher's image embedding (B, C, h, w)


class Teacher(nn.Module):
    """`Teacher(encoder, student_preprocess, head=..., dino_head=..., layer=...)(x)` -> `TeacherOutput` for
    views `x` made with the student's preprocessing."""

    def __init__(
        self,
        encoder: Encoder,
        student: Preprocess,
        *,
        head: nn.Module | None = None,
        dino_head: nn.Module | None = None,
        layer: str | None = None,
        classes: list[str] | None = None,
    ):
        super().__init__()
        self.classes = classes  # a classifier teacher's, in the order of its logits
        self.encoder, self.head, self.dino_head, self.student = encoder, head, dino_head, student
        self.layer, self._hooked = layer, None
        if layer:
            hook_module(encoder, layer).register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self._hooked = output[0] if isinstance(output, (tuple, list)) else output

    @property
    def views(self) -> Preprocess:
        """The preprocessing the views are made with: the student's."""
        return self.student

    @property
    def width(self) -> int:
        return self.encoder.num_features

    @property
    def name(self) -> str:
        return self.encoder.name

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        return adapt(x, self.student, self.encoder.preprocess)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> TeacherOutput:
        x = self.adapt(x)
        with bf16(x.device):
            out = self.encoder.encode(x)
            logits = self.head(out.pooled) if self.head is not None else None
            dino = self.dino_head(out.pooled) if self.dino_head is not None else None
        tokens = out.patch_tokens
        pooled = out.pooled
        if self.layer:
            tokens = layer_tokens(self._hooked, getattr(self.encoder, "model", None))
            pooled = tokens.mean(1)
        grid = token_grid(self.encoder, x.shape[-2:], tokens.shape[1]) if tokens is not None else None
        f = lambda v: None if v is None else v.float()  # noqa: E731
        return TeacherOutput(f(pooled), f(tokens), grid, f(logits), f(dino))


class SamTeacher(nn.Module):
    """A SAM (or SAM-HQ) image encoder as the teacher of `--loss sam-embedding`. The views are SAM's own
    input (`views`: its preprocessing, resize and padding), and the student sees them re-sized to its
    input, as it will as a segmenter's image encoder (`cvfm.models.backbone_sam`; MobileSAM's student
    sees the teacher's image too)."""

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        if segmenter.family == "sam2":
            raise UsageError(
                f"--loss sam-embedding distils a SAM or SAM-HQ image encoder; {segmenter.name} is SAM 2"
            )
        self.segmenter = segmenter

    @property
    def views(self) -> Preprocess:
        return self.segmenter.preprocess

    @property
    def width(self) -> int:
        return self.segmenter.model.config.vision_config.output_channels

    @property
    def name(self) -> str:
        return self.segmenter.name

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> TeacherOutput:
        with bf16(x.device):
            features = self.segmenter.embed_image(x, [tuple(x.shape[-2:])] * x.shape[0]).features
        return TeacherOutput(None, None, None, None, None, features.float())


def bf16(device: torch.device):
    """bf16 autocast on a GPU that has it; full precision elsewhere."""
    on = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)


def hook_module(encoder: Encoder, path: str) -> nn.Module:
    """The module at `path` inside the encoder's network (a timm model's own paths, e.g. blocks.11); a wrong
    path is a usage error naming the closest ones."""
    root = getattr(encoder, "model", encoder)
    modules = dict(root.named_modules())
    if path in modules and path:
        return modules[path]
    close = difflib.get_close_matches(path, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise UsageError(f"--teacher-layer '{path}' is not a module of the teacher {encoder.name}{hint}")


def layer_tokens(out: torch.Tensor, model: nn.Module | None) -> torch.Tensor:
    """A hooked layer's output as (B, N, D) patch tokens: a feature map flattened, prefix tokens dropped."""
    if out.ndim == 4:
        return out.flatten(2).transpose(1, 2)
    if out.ndim == 3:
        return out[:, getattr(model, "num_prefix_tokens", 0) :]
    raise UsageError(f"--teacher-layer gives a {out.ndim}-d output; pick a layer of tokens or feature maps")


def load_teacher(
    teacher: str, losses: tuple[str, ...], student: Preprocess, layer: str | None
) -> Teacher | SamTeacher:
    """The teacher for `losses`: a classifier for "logit", a DINO pre-training run (with its head) for
    "dino", a SAM segmenter for "sam-embedding", else any image encoder the registry builds (a run
    folder's backbone too)."""
    if "sam-embedding" in losses:
        try:
            return SamTeacher(create_segmenter(teacher))
        except CvfmError as e:
            raise UsageError(f"--loss sam-embedding needs a SAM teacher (e.g. cvfm/tiny-sam): {e}") from None
    head = dino_head = classes = None
    if "logit" in losses:
        try:
            classifier = create_classifier(teacher)
        except CvfmError as e:
            raise UsageError(
                f"--loss logit needs a classifier teacher (a cvfm finetune run or a classifier folder): {e}"
            ) from None
        encoder, head, classes = classifier.encoder, classifier.head, classifier.classes
    else:
        encoder = create_encoder(teacher)
    if "dino" in losses:
        dino_head = load_dino_head(Path(teacher), encoder.num_features)
    return Teacher(encoder, student, head=head, dino_head=dino_head, layer=layer, classes=classes)


def load_dino_head(run: Path, in_dim: int) -> DINOHead:
    """The DINO head of a `cvfm pretrain --method dino` run (its last checkpoint's `head.*`: the head
    trained with the exported backbone). The export keeps the backbone only, so the run folder is needed."""
    info = run / "run.json"
    config = json.loads(info.read_text()) if info.is_file() else {}
    ckpt = latest_checkpoint(run / "checkpoints") if run.is_dir() else None
    if config.get("config", {}).get("method") != "dino" or ckpt is None:
        raise UsageError(
            f"--loss dino needs the teacher's DINO head: the teacher must be a `cvfm pretrain --method dino` "
            f"run folder with its checkpoints, and '{run}' is not one (use --loss feature for other teachers)"
        )
    c = config["method_config"]
    dims = (c["out_dim"], c["hidden_dim"], c["bottleneck_dim"])
    head = DINOHead(in_dim, *dims, c["head_bn"], c["norm_last_layer"])
    weights = {k.removeprefix("head."): v for k, v in load_file(ckpt / "model.safetensors").items()}
    head.load_state_dict({k: v for k, v in weights.items() if k in head.state_dict()}, strict=True)
    head.teacher_temp = c["teacher_temp"]
    return head
