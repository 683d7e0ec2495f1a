"""`cvfm finetune`'s configuration, as run.json["finetune"] keeps it: `finetune(FinetuneConfig(**recipe))`
with another output (and exclusions) reruns the same recipe (`cvfm unlearn --method retrain`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cvfm.errors import UsageError
from cvfm.methods.supervised import SupervisedConfig
from cvfm.pretrain.config import PretrainConfig
from cvfm.runtime.precision import training_precision
from cvfm.runtime.run_dir import RunDir

HEADS = ("linear", "knn")


@dataclass
class FinetuneConfig:
    data: str
    output: str
    model: str = "cvfm/tiny-resnet"
    pretrained: bool = False  # the registry's pretrained weights; a folder's own weights are always loaded
    split: str | None = "train"
    image_column: str = "image"
    label_column: str | None = None
    head: str = "linear"  # "linear" | "knn" (knn implies freeze)
    freeze: bool = False  # frozen backbone: features once (eval transform), head fitted on them
    epochs: int = 30
    batch_size: int = 128
    lr: float | None = None  # full: the optimizer's recipe (SGD 0.1 x batch / 256); frozen: the probe's sweep
    weight_decay: float | None = None  # full: the optimizer's recipe (SGD 5e-4); frozen with --lr: 5e-4
    optimizer: str = "sgd"  # full fine-tuning: "sgd" (Jia et al. 2023 / SalUn) | "adamw" (MAE's recipe)
    layer_decay: float = 1.0  # full fine-tuning, a timm backbone: layer-wise lr decay (MAE's ViT-B: 0.65)
    augment: bool = True  # full fine-tuning: RandomResizedCrop(0.8, 1) + flip
    precision: str = "fp32"
    seed: int = 0
    num_workers: int | None = 2  # None: 2, or on resume the run's own
    k: int = 20  # k-NN head: DINO's k-NN evaluation
    temperature: float = 0.07
    exclude: str | None = None  # a file of ids (text: one per line; JSONL: "id" field) left out of training
    ledger: str | None = None  # ids forgotten in this ledger are left out too
    overwrite: bool = False
    resume: bool = False
    strict: bool = False

    @property
    def frozen(self) -> bool:
        return self.freeze or self.head == "knn"

    @property
    def load_weights(self) -> bool:
        """Start from trained weights: the registry's when asked, a folder's (a pre-training run) always."""
        return self.pretrained or Path(self.model).is_dir()


def recipe(cfg: FinetuneConfig) -> dict:
    """The config as run.json stores it: rerunnable as is (no overwrite / resume flags)."""
    return asdict(replace(cfg, overwrite=False, resume=False))


def saved_config(cfg: FinetuneConfig) -> FinetuneConfig:
    saved = RunDir(cfg.output, resume=True).read()
    if "finetune" not in saved:
        raise UsageError(
            f"cannot resume: '{cfg.output}' is not a cvfm finetune run (no \"finetune\" in run.json)"
        )
    workers = saved["finetune"]["num_workers"] if cfg.num_workers is None else cfg.num_workers
    resumed = FinetuneConfig(
        **{**saved["finetune"], "output": cfg.output, "resume": True, "num_workers": workers}
    )
    if resumed.frozen:
        raise UsageError(
            f"'{cfg.output}' is a frozen-backbone run: it has no checkpoints to resume; "
            "rerun it with --overwrite"
        )
    return resumed


def check(cfg: FinetuneConfig) -> None:
    if cfg.head not in HEADS:
        raise UsageError(f"--head must be linear or knn, not '{cfg.head}'")
    training_precision(cfg.precision)  # refuses an unknown one
    if not cfg.data:
        raise UsageError("--data is required (unless --resume continues an existing run)")
    SupervisedConfig(optimizer=cfg.optimizer, layer_decay=cfg.layer_decay)  # refuses an unknown one
    if cfg.frozen and (cfg.optimizer != "sgd" or cfg.layer_decay != 1.0):
        raise UsageError("--optimizer and --layer-decay are for full fine-tuning, not a frozen backbone")
    if cfg.head == "knn" and cfg.k < 1:
        raise UsageError(f"--k must be at least 1, got {cfg.k}")


def pretrain_config(cfg: FinetuneConfig) -> PretrainConfig:
    """Full fine-tuning as a `cvfm pretrain` run of the `supervised` method (its data opened the same way)."""
    return PretrainConfig(
        data=cfg.data,
        output=cfg.output,
        method="supervised",
        model=cfg.model,
        pretrained=cfg.load_weights,
        split=cfg.split,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        precision=cfg.precision,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        strict=cfg.strict,
        overwrite=cfg.overwrite,
        resume=cfg.resume,
        exclude=cfg.exclude,
        ledger=cfg.ledger,
        options={
            "augment": cfg.augment,
            "optimizer": cfg.optimizer,
            "weight_decay": cfg.weight_decay,
            "layer_decay": cfg.layer_decay,
        },
    )
