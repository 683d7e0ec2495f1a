"""`cvfm distill`'s configuration: the loop's settings plus teacher, student, data and losses, as run.json
keeps them ("config")."""

from __future__ import annotations

from dataclasses import dataclass

from cvfm.errors import UsageError
from cvfm.runtime.plan import TrainSettings

LOSSES = ("feature", "dino", "logit", "sam-embedding")
DISTANCES = ("cosine", "mse")


@dataclass(kw_only=True)
class DistillConfig(TrainSettings):
    data: str
    output: str
    teacher: str  # registry id or run folder
    student: str = "cvfm/tiny-resnet"  # registry id or timm architecture (timm/<arch>)
    pretrained: bool = False  # start the student from the registry's pretrained weights
    losses: tuple[str, ...] = ("feature",)
    teacher_layer: str | None = None  # feature loss: a module path inside the teacher (forward hook)
    distance: str = "cosine"  # feature loss: cosine or mse
    standardise: bool = True  # feature loss: the teacher's targets standardised per dimension (running stats)
    token_weight: float = 1.0  # feature loss: weight of the patch-token term (0: pooled embedding only)
    temperature: float = 4.0  # logit loss: KL(teacher || student) at T, times T^2 (Hinton et al. 2015)
    augment: bool = True  # random resized crop + flip (MAE's); off: the evaluation transform
    cache_teacher: str | None = None  # a folder of the teacher's outputs, reused across epochs (no augment)
    split: str | None = None
    image_column: str = "image"
    overwrite: bool = False

    def check(self) -> DistillConfig:
        """Refuse unknown or repeated losses and distances, with the valid choices."""
        bad = [x for x in self.losses if x not in LOSSES]
        if bad or not self.losses:
            raise UsageError(
                f"unknown --loss {', '.join(bad) or '(none)'} (choose from: {', '.join(LOSSES)})"
            )
        if len(set(self.losses)) != len(self.losses):
            raise UsageError(f"--loss repeated: {', '.join(self.losses)}")
        if "sam-embedding" in self.losses and len(self.losses) > 1:
            raise UsageError(
                "--loss sam-embedding distils a SAM image encoder and combines with no other loss"
            )
        if self.cache_teacher and self.augment:
            raise UsageError("--cache-teacher reuses the teacher's outputs of fixed views: add --no-augment")
        if self.distance not in DISTANCES:
            raise UsageError(f"unknown --distance '{self.distance}' (choose from: {', '.join(DISTANCES)})")
        if self.teacher_layer and "feature" not in self.losses:
            raise UsageError("--teacher-layer selects the features of --loss feature; add --loss feature")
        return self
