"""Self-supervised pre-training: the one loop that every method shares, on CPU, one GPU or many (Accelerate).

Exact resume: the sampler order is seeded by (seed, epoch), each sample's augmentations by
(seed, epoch, index), the global RNG by (seed, step, process), and every schedule is indexed by the
global step; the checkpoint holds the model with its EMA teacher and DINO centre, the optimizer, the
gradient scaler and the running sums of the epoch's metrics. On CPU a resumed run also trains with the
intra-op thread count it started with (run.json "resolved", `cpu_threads`), whatever its number of
decoding workers: the thread count changes the order of floating-point sums. A run stopped (even killed)
and resumed in a new process therefore ends with the same weights as an uninterrupted one: bit for bit on
CPU (tests/test_resume.py), on GPU as far as its CUDA kernels are deterministic.

Methods with `needs_text()` (CLIP, BLIP) train a dual encoder on image-text pairs: the data is opened with its
text column, the DataLoader tokenizes the texts, the method gets `tokens=`, and the whole dual encoder
is saved as the run's backbone/. The dual encoder is `--model` itself, or with `--text-model` a
`PairedEncoder`: the `--model` image encoder, a projection and the text half of `--text-model`.
BLIP's fine-tuning methods (`blip-captioner`, `blip-filter`) train a `Captioner` / `Matcher` built from
`--model` with its weights (they fine-tune), get the batch's raw texts (`texts=`: the BLIP faces
tokenize themselves) and save the fine-tuned face as backbone/ (`create_captioner` / `create_matcher`
load the run folder).
Supervised fine-tuning (`supervised`, what `cvfm finetune` runs) trains a `Classifier` built from `--model`
and a linear head over the training data's classes, on its labels (`labels=`), with the method's own
optimizer (SGD); it is saved as the run's classifier/.

`exclude` / `ledger` leave ids out of the training data (`cvfm.data.exclude`); run.json records how many
and a hash of them, and a resumed run refuses to go on if that set has changed. The training items
themselves are recorded in data_items.jsonl (ids, labels, content hashes: `cvfm.data.digest`), which
`cvfm unlearn` checks before it calls a retraining exact; a resumed run refuses to go on if they changed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from timm.layers import convert_sync_batchnorm
from torch.utils.data import DataLoader

import cvfm
from cvfm.data.digest import compare, digest_items
from cvfm.data.exclude import exclude_from
from cvfm.data.loader import ImageDataset, SkipLog, collate
from cvfm.data.sources import ImageSource, open_source
from cvfm.errors import CvfmError, UsageError
from cvfm.eval.features import extract_features
from cvfm.eval.knn import knn_evaluate
from cvfm.eval.zeroshot import build_zeroshot_classifier, zeroshot_logits
from cvfm.methods import Budget, build_method, method_class
from cvfm.models.classifier import Classifier, LinearHead, labelled_classes
from cvfm.models.dual import DualEncoder, ImageTower
from cvfm.models.paired import PairedEncoder
from cvfm.registry import create_captioner, create_dual_encoder, create_encoder, create_matcher
from cvfm.runtime.batchnorm import GlobalBatchNorm
from cvfm.runtime.checkpoint import apply_checkpoint, read_latest_checkpoint, save_checkpoint
from cvfm.runtime.progress import log, progress
from cvfm.runtime.run_dir import RunDir
from cvfm.runtime.schedules import cosine
from cvfm.runtime.threads import share_cores_with_workers, use_threads
from cvfm.runtime.tracking import JsonlTracker, plot_curves, truncate_metrics

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM arrived; the run stopped after a whole step and saved a checkpoint."""


class _GracefulStop:
    """While training, the first SIGINT / SIGTERM asks the loop to stop after the current step (so the
    checkpoint is consistent); a second one interrupts at once."""

    def __init__(self):
        self.requested, self._previous = False, {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("stopping after this step (Ctrl-C again to abort without a checkpoint)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class PretrainConfig:
    data: str
    output: str
    method: str = "dino"
    model: str | None = None  # registry id; default: the method's (cvfm/tiny-resnet, clip: cvfm/tiny-clip)
    # clip: an image-text model whose text half is paired with the image encoder `model` (PairedEncoder)
    text_model: str | None = None
    pretrained: bool = False  # start from the registry's pretrained weights instead of random init
    split: str | None = None
    image_column: str = "image"
    label_column: str | None = None
    text_column: str | None = None  # text methods only; default "caption" for builtin:*-captions, else "text"
    epochs: int = 10
    batch_size: int = 64  # per process
    lr: float | None = None  # auto: the method's base lr x sqrt(global batch / 256)
    warmup_epochs: float = 1.0  # capped at 10% of the run
    min_lr: float = 1e-6
    grad_accum: int = 1
    precision: str = "fp32"
    seed: int = 0
    num_workers: int | None = 2  # None: 2, or on resume the run's own
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end of each epoch
    keep_checkpoints: int = 2
    # A labelled source evaluated each epoch: zero-shot top-1 on its test split for a dual encoder when
    # it has prompt templates (captioned built-ins), else k-NN (train split = bank, test = queries).
    monitor: str | None = None
    monitor_size: int = 2000
    log: tuple[str, ...] = ("jsonl",)
    strict: bool = False
    overwrite: bool = False
    resume: bool = False
    options: dict = field(default_factory=dict)  # method options (--opt key=value)
    exclude: str | None = None  # a file of ids (one per line, or a .jsonl "id" per line) left out
    ledger: str | None = None  # a deletion ledger (cvfm unlearn): the ids it has forgotten are left out


def versions() -> dict:
    """Library versions recorded in run.json."""
    import accelerate
    import timm
    import transformers

    return {
        "cvfm": cvfm.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }


def cpu_processes() -> bool:
    """Several processes (torchrun / accelerate launch) on a machine without GPUs: they run on the CPU over
    gloo. The first Accelerator or PartialState a process makes must be told so (`cpu=True`); made without,
    it sets up one process on its own, for good."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _make_accelerator(cfg: PretrainConfig, run: RunDir) -> Accelerator:
    if cfg.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{cfg.precision}'")
    trackers: list = [JsonlTracker(run.metrics)]
    for name in cfg.log:
        if name not in ("jsonl", "tensorboard", "wandb"):
            raise UsageError(f"--log must be jsonl, tensorboard or wandb, not '{name}'")
        if name != "jsonl":
            trackers.append(name)
    return Accelerator(
        cpu=cpu_processes(),
        mixed_precision=PRECISIONS[cfg.precision],
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=trackers,
        project_dir=str(run.path),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )


def pretrain(
    cfg: PretrainConfig, on_step: Callable[[int], None] | None = None, *, record: dict | None = None
) -> Path:
    """Pre-train `cfg.model` on `cfg.data` with `cfg.method`; returns the run folder.

    `on_step(step)` is called after each optimizer step. The first Ctrl-C / SIGTERM stops the run after
    the current step and saves a checkpoint (raising `Interrupted`); `resume=True` continues from it.
    `record` adds fields to run.json (`cvfm finetune` stores its own config there).
    """
    if cfg.resume:
        saved = RunDir(cfg.output, resume=True).read()["config"]
        workers = saved["num_workers"] if cfg.num_workers is None else cfg.num_workers
        cfg = PretrainConfig(**{**saved, "log": tuple(saved["log"]), "resume": True, "num_workers": workers})
    elif cfg.num_workers is None:
        cfg = replace(cfg, num_workers=2)
    return _Trainer(cfg, record).fit(on_step)


def resolve_defaults(cfg: PretrainConfig) -> PretrainConfig:
    """Fill in what depends on the method: the model id and, for text methods, the text column."""
    cls = method_class(cfg.method)
    text_column = cfg.text_column
    if cls.needs_text():
        text_column = text_column or default_text_column(cfg.data)
    elif text_column is not None:
        raise UsageError(
            f"--text-column is for methods that train on texts (clip, blip-*), not '{cfg.method}'"
        )
    if cls.model_kind in ("captioner", "matcher") and cfg.monitor:
        raise UsageError(f"--monitor evaluates image or dual encoders; --method {cfg.method} has none")
    if cfg.text_model is not None:
        if cls.model_kind != "dual":
            raise UsageError(f"--text-model is for methods that train on texts (clip), not '{cfg.method}'")
        if cfg.model is None:
            raise UsageError(
                "--text-model pairs its text tower with the image encoder named by --model: "
                "name one (e.g. --model cvfm/tiny-resnet)"
            )
    return replace(cfg, model=cfg.model or cls.default_model, text_column=text_column)


def default_text_column(data: str) -> str:
    """The text column of a data spec: "caption" for builtin:*-captions, else "text" (JSONL, HF)."""
    from cvfm.data.builtin import CAPTIONED

    return "caption" if data.removeprefix("builtin:") in CAPTIONED else "text"


def _build_model(cfg: PretrainConfig, kind: str, classes: list[str] | None = None):
    """The image encoder; for a text method the dual encoder `--model`, or the `--model` image encoder
    paired with the text half of `--text-model`; for BLIP fine-tuning the `--model` captioner or matcher
    with its weights (the registry's pretrained ones, a folder's or a run's; cvfm/tiny-blip has none);
    for a classifier the `--model` encoder and a linear head over `classes` (initialised from the
    seeded global RNG, like the encoder)."""
    if kind == "image":
        return create_encoder(cfg.model, pretrained=cfg.pretrained)
    if kind == "classifier":
        encoder = create_encoder(cfg.model, pretrained=cfg.pretrained)
        head = LinearHead(encoder.num_features, len(classes))
        return Classifier(encoder, head, classes, frozen=False, backbone=cfg.model)
    if kind in ("captioner", "matcher"):
        create = create_captioner if kind == "captioner" else create_matcher
        try:
            return create(cfg.model, pretrained=True)
        except UsageError as e:
            raise UsageError(
                f"--method {cfg.method} fine-tunes a BLIP {kind} (cvfm/tiny-blip, hf/<BLIP repo>, or a "
                f"folder or run holding one), not '{cfg.model}': {e}"
            ) from None
    if cfg.text_model is not None:
        image = create_encoder(cfg.model, pretrained=cfg.pretrained)
        try:
            text = create_dual_encoder(cfg.text_model, pretrained=cfg.pretrained)
        except UsageError as e:
            raise UsageError(f"--text-model must be an image-text model with a text tower: {e}") from None
        return PairedEncoder(image, text, name=f"{cfg.model}+{cfg.text_model}")
    try:
        return create_dual_encoder(cfg.model, pretrained=cfg.pretrained)
    except UsageError as e:
        try:  # does it build as an image-only model? Then say how to give it a text tower.
            image = create_encoder(cfg.model, pretrained=cfg.pretrained)
        except CvfmError:
            image = None
        if image is None or isinstance(image, ImageTower):
            raise UsageError(
                f"--method {cfg.method} trains an image-text model with a text tower: {e}"
            ) from None
        raise UsageError(
            f"--method {cfg.method} trains an image-text model, and '{cfg.model}' is an image encoder with "
            "no text tower: pair it with one, e.g. --text-model cvfm/tiny-clip"
        ) from None


def _open_training_source(cfg: PretrainConfig, needs_text: bool) -> ImageSource:
    """The training data, with one text per image for a text method (refused clearly otherwise)."""
    common = dict(split=cfg.split, image_column=cfg.image_column, label_column=cfg.label_column)
    if not needs_text:
        return open_source(cfg.data, strict=cfg.strict, **common)
    column = cfg.text_column
    try:
        source = open_source(cfg.data, text_column=column, strict=cfg.strict, **common)
    except UsageError as original:
        # A manifest whose lines all lack the text field ends up empty ("holds no images"): say why.
        if not cfg.data.endswith(".jsonl"):
            raise
        try:
            open_source(cfg.data, **common)
        except CvfmError:
            raise original from None
        raise UsageError(_no_texts(cfg, column)) from None
    if not source.has_texts:
        raise UsageError(_no_texts(cfg, column))
    lists = [it.id for it in source.items if not isinstance(it.text, str)]
    if lists:
        raise UsageError(
            f"{len(lists)} record(s) of '{cfg.data}' hold a list of texts in '{column}' (first: {lists[0]}): "
            f"--method {cfg.method} pairs each image with one text; write one record per (image, text) pair"
        )
    return source


def _no_texts(cfg: PretrainConfig, column: str) -> str:
    return (
        f"--method {cfg.method} trains on image-text pairs, but '{cfg.data}' has no text in '{column}' "
        "(name the field or column with --text-column)"
    )


class _Trainer:
    def __init__(self, cfg: PretrainConfig, record: dict | None = None):
        self.cfg = cfg = resolve_defaults(cfg)
        run = RunDir(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume)  # refuse early, create later
        cls = method_class(cfg.method)
        kind = cls.model_kind
        source = _open_training_source(cfg, cls.needs_text())
        classes = labelled_classes(source, cfg.data) if cls.needs_labels else None
        source, excluded = _exclude(cfg, source, run)
        torch.manual_seed(cfg.seed)  # the same initial weights on every process and every resume
        encoder = _build_model(cfg, kind, classes)
        self.run, self.accelerator = run, _make_accelerator(cfg, run)
        cpu_threads = _cpu_threads(cfg, run) if self.accelerator.device.type == "cpu" else None
        world = self.accelerator.num_processes
        if cfg.resume:
            _check_processes(run, world)
        self.steps_per_epoch = len(source) // (cfg.batch_size * world) // cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise UsageError(
                f"{len(source)} images make no full batch of {cfg.batch_size} x {world} processes "
                f"x {cfg.grad_accum} accumulation steps: lower --batch-size"
            )
        self.total_steps = self.steps_per_epoch * cfg.epochs
        budget = Budget(
            len(source), self.steps_per_epoch, self.total_steps, cfg.batch_size * world * cfg.grad_accum
        )
        method = build_method(cfg.method, encoder, cfg.options, budget)
        # BatchNorm over the global batch: SyncBatchNorm on GPUs (timm's converter: torch's drops the
        # activation of timm's BatchNormAct2d), GlobalBatchNorm (in _train_step) on CPUs, where
        # SyncBatchNorm cannot run.
        self.global_batch_norm = world > 1 and self.accelerator.device.type == "cpu"
        if world > 1 and self.accelerator.device.type == "cuda":
            method = convert_sync_batchnorm(method)
        run.create()  # only now that the request is known to be valid
        lr = cfg.lr or method.peak_lr(budget.batch_size)
        warmup = min(int(cfg.warmup_epochs * self.steps_per_epoch), int(0.1 * self.total_steps))
        self.lrs = cosine(lr, cfg.min_lr, self.total_steps, warmup_steps=warmup)
        self.wds = cosine(*method.weight_decay, self.total_steps)
        optimizer = method.make_optimizer(lr)
        self.dataset = ImageDataset(source, method.views(), seed=cfg.seed)
        loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=cfg.num_workers,
            # a dual encoder's texts are tokenized here; the BLIP faces take the raw strings
            collate_fn=functools.partial(collate, tokenizer=encoder.tokenizer) if kind == "dual" else collate,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.method, self.optimizer, self.loader = self.accelerator.prepare(method, optimizer, loader)
        self.core = self.accelerator.unwrap_model(self.method)
        self.skips = SkipLog(cfg.strict, source.skipped)
        self.step = self.epoch = 0
        self.epoch_sums: dict[str, float] = {}  # the running sums of this epoch's step records
        self.epoch_steps = 0
        self.resolved = {
            "config": asdict(cfg),
            "method_config": asdict(self.core.cfg),
            "resolved": {
                "lr": lr,
                "warmup_steps": warmup,
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "global_batch_size": budget.batch_size,
                "num_processes": world,
                "cpu_threads": cpu_threads,
                **getattr(self.core, "resolved", {}),
            },
            "versions": versions(),
            "seed": cfg.seed,
            "data": {"name": source.name, "images": len(source), "classes": classes or source.classes},
            "excluded": excluded,
            **(record or {}),
        }

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def fit(self, on_step: Callable[[int], None] | None) -> Path:
        cfg, acc, run = self.cfg, self.accelerator, self.run
        if self.is_main:
            self._record_data()
        if cfg.resume:
            self._restore()
        if self.is_main:
            run.update(**self.resolved, status="running")
        acc.init_trackers("cvfm")
        self.monitor = _Monitor(cfg, self.core) if cfg.monitor and self.is_main else None
        if self.monitor and self.step == 0:
            acc.log(self.monitor(self.core.encoder, acc.device), step=0)
        t0 = time.perf_counter()
        with _GracefulStop() as stop:
            try:
                while self.epoch < cfg.epochs:
                    self._train_epoch(stop, on_step)
                    self.epoch += 1
            except Interrupted:
                self._checkpoint()
                self._finish("interrupted", t0)
                raise
            except KeyboardInterrupt:  # a second Ctrl-C: the last periodic checkpoint stands
                self._finish("interrupted", t0)
                raise
        acc.wait_for_everyone()
        if self.is_main:
            save_atomically(self.core.encoder, run.path / self.core.export_dir)
        self._finish("finished", t0)
        return run.path

    def _record_data(self) -> None:
        """data_items.jsonl: the items this run trains on. A resumed run must find the same items (a run
        that predates digests stays without one)."""
        if not self.cfg.resume:
            self.run.record_data(self.dataset.source)
            return
        recorded = self.run.read_digest()
        changes = recorded is not None and compare(recorded, digest_items(self.dataset.source))
        if changes:
            raise UsageError(
                f"cannot resume '{self.run.path}': its training data changed since it started "
                f"({changes.describe()}); start a new run instead"
            )

    def _train_epoch(self, stop: _GracefulStop, on_step) -> None:
        """The rest of this epoch (all of it unless the run resumed within it), its summary (`epoch/*`:
        means over all of its steps, resumed or not) and its checkpoint."""
        cfg, acc = self.cfg, self.accelerator
        done = self.step - self.epoch * self.steps_per_epoch
        todo = self.steps_per_epoch - done
        started = time.perf_counter()
        images = self._train_steps(done, todo, stop, on_step) if todo > 0 else 0
        logs = {f"epoch/{k}": v / self.epoch_steps for k, v in self.epoch_sums.items()}
        logs["epoch"] = self.epoch + 1
        if images:  # this process's speed (none when it resumed at the epoch's last step)
            logs["images_per_s"] = images / max(time.perf_counter() - started, 1e-9)
        if self.monitor:
            logs.update(self.monitor(self.core.encoder, acc.device))
        acc.log(logs, step=self.step)
        if self.is_main:
            _summary(self.epoch + 1, cfg.epochs, logs)
            plot_curves(self.run.metrics, self.run.path / "curves.png")
        self.epoch_sums, self.epoch_steps = {}, 0
        self._checkpoint(resume_epoch=self.epoch + 1)

    def _train_steps(self, done: int, todo: int, stop: _GracefulStop, on_step) -> int:
        """Steps `done` + 1 .. `done` + `todo` of this epoch; returns the number of images they took."""
        cfg, acc = self.cfg, self.accelerator
        self.dataset.set_epoch(self.epoch)
        self.loader.set_epoch(self.epoch)
        batches = acc.skip_first_batches(self.loader, done * cfg.grad_accum) if done else self.loader
        images = 0
        with progress(f"epoch {self.epoch + 1}/{cfg.epochs}", total=todo) as advance:
            for i, batch in enumerate(batches):
                if i >= todo * cfg.grad_accum:
                    break  # the tail that does not fill an accumulation cycle
                self.skips.add(batch["skipped"])
                if batch["image"] is None:
                    continue
                images += batch["image"][0].shape[0] * acc.num_processes
                record = self._train_step(batch)
                if record is None:
                    continue  # accumulating gradients
                for k, v in record.items():
                    self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
                self.epoch_steps += 1
                acc.log({f"train/{k}": v for k, v in record.items()}, step=self.step)
                advance()
                end_of_epoch = self.step == (self.epoch + 1) * self.steps_per_epoch  # checkpointed below
                if self.step % cfg.checkpoint_every == 0 and not end_of_epoch:
                    self._checkpoint()
                if on_step:
                    on_step(self.step)
                if stop.requested:
                    acc.set_trigger()
                if acc.check_trigger():  # any process signalled: all stop after this same step
                    raise Interrupted
        return images

    def _train_step(self, batch: dict) -> dict | None:
        """One forward/backward; after the last micro-batch of an accumulation cycle, the update."""
        acc, core, step = self.accelerator, self.core, self.step
        torch.manual_seed((self.cfg.seed * 1_000_003 + step) * 1009 + acc.process_index)
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lrs[step])
            if group.get("apply_wd", True):
                group["weight_decay"] = float(self.wds[step])
        with acc.accumulate(self.method):
            with GlobalBatchNorm() if self.global_batch_norm else contextlib.nullcontext():
                if core.model_kind == "dual":
                    loss, logs = self.method(batch["image"], step, tokens=batch["tokens"])
                elif core.needs_text():
                    loss, logs = self.method(batch["image"], step, texts=batch["text"])
                elif core.needs_labels:
                    loss, logs = self.method(batch["image"], step, labels=batch["label"])
                else:
                    loss, logs = self.method(batch["image"], step)
            acc.backward(loss)
            if acc.sync_gradients:
                if core.clip_grad:
                    acc.clip_grad_norm_(self.method.parameters(), core.clip_grad)
                core.before_optimizer_step(step)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not acc.sync_gradients:
            return None
        core.after_optimizer_step(step)
        loss_value = float(acc.reduce(loss.detach(), "mean"))
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}: lower --lr or use fp32")
        self.step += 1
        return {
            "loss": loss_value,
            "lr": float(self.lrs[step]),
            "weight_decay": float(self.wds[step]),
            **logs,
        }

    def _checkpoint(self, resume_epoch: int | None = None) -> None:
        """Save the state; `resume_epoch` is where a resumed run continues (default: this epoch)."""
        self.accelerator.wait_for_everyone()
        epoch = self.epoch if resume_epoch is None else resume_epoch
        if self.is_main:
            save_checkpoint(
                self.run.checkpoints,
                self.step,
                self.core,
                self.optimizer.optimizer,
                self.accelerator.scaler,
                {
                    "epoch": epoch,
                    "skipped": self.skips.as_list(),
                    "epoch_sums": self.epoch_sums,
                    "epoch_steps": self.epoch_steps,
                },
                keep=self.cfg.keep_checkpoints,
            )

    def _restore(self) -> None:
        found = read_latest_checkpoint(self.run.checkpoints)
        if found is None:
            log(f"no usable checkpoint in {self.run.checkpoints}: starting {self.run.path} from step 0")
            if self.is_main:
                self.run.metrics.unlink(missing_ok=True)
            return
        state = apply_checkpoint(found[1], self.core, self.optimizer.optimizer, self.accelerator.scaler)
        self.step, self.epoch = state["step"], state["epoch"]
        self.skips = SkipLog(self.cfg.strict, state.get("skipped", []))
        self.epoch_sums, self.epoch_steps = state.get("epoch_sums", {}), state.get("epoch_steps", 0)
        if self.is_main:  # what was logged after the checkpoint is logged again
            truncate_metrics(self.run.metrics, self.step, self.epoch)
        log(f"resuming {self.run.path} at step {self.step}/{self.total_steps} ({found[0].name})")

    def _finish(self, status: str, t0: float) -> None:
        if self.is_main:
            plot_curves(self.run.metrics, self.run.path / "curves.png")
            self.run.update(
                status=status,
                step=self.step,
                skipped=self.skips.as_list(),
                wall_s=round(time.perf_counter() - t0, 2),
            )
            if self.skips.entries:
                log(f"skipped {len(self.skips.entries)} unreadable item(s); listed in {self.run.run_json}")
        self.accelerator.end_training()


def _cpu_threads(cfg: PretrainConfig, run: RunDir) -> int:
    """Torch's intra-op threads for a CPU run: a resumed run's own count (its floating-point sums then
    run in the same order), else the cores the decoding workers leave free."""
    saved = (run.read().get("resolved") or {}).get("cpu_threads") if cfg.resume else None
    if saved is None:
        return share_cores_with_workers(cfg.num_workers)
    return use_threads(saved, f"run '{run.path}'")


def _exclude(cfg: PretrainConfig, source: ImageSource, run: RunDir) -> tuple[ImageSource, dict | None]:
    """The training source without the ids of `cfg.exclude` and `cfg.ledger`, and run.json's record of
    them; a resumed run must leave out exactly what it left out before."""
    if not (cfg.exclude or cfg.ledger):
        return source, None
    source, record = exclude_from(source, cfg.exclude, cfg.ledger)
    if cfg.resume:
        before = (run.read().get("excluded") or {}).get("sha256")
        if before is not None and before != record["sha256"]:
            raise UsageError(
                f"cannot resume '{run.path}': the ids left out (--exclude / --ledger) changed since it "
                f"started ({record['count']} now); start a new run instead"
            )
    sources = " and ".join(
        f"{k} '{v}'" for k, v in (("--exclude", cfg.exclude), ("--ledger", cfg.ledger)) if v
    )
    log(f"left out {record['count']} training image(s) ({sources}: {record['requested']} id(s))")
    return source, record


def _check_processes(run: RunDir, world: int) -> None:
    """A run resumes on the number of processes it started on: `--batch-size` is per process, so any
    other number would change the global batch, the step plan and the schedules half-way."""
    before = run.read().get("resolved", {}).get("num_processes", world)
    if before != world:
        raise UsageError(
            f"cannot resume '{run.path}' on {world} process(es): it was trained by {before} "
            f"(the global batch is --batch-size x processes); resume it with {before}"
        )


def save_atomically(model, folder: Path) -> None:
    """Write `model` (anything with `save(folder)`) next to `folder`, then swap it in: a kill never leaves
    half a backbone or classifier."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _summary(epoch: int, epochs: int, logs: dict) -> None:
    keys = (
        "epoch/loss",
        "epoch/feature_std",
        "epoch/teacher_entropy",
        "epoch/logit_scale",
        "epoch/itm_accuracy",
        "epoch/accuracy",
        "monitor/knn_top1@20",
        "monitor/zeroshot_top1",
        "monitor/top1",
        "images_per_s",
    )
    parts = [f"{k.split('/')[-1]}={logs[k]:.4g}" for k in keys if isinstance(logs.get(k), float)]
    log(f"epoch {epoch}/{epochs} " + " ".join(parts))


class _Monitor:
    """Online evaluation on a labelled source, once before training and after each epoch.

    A classifier gets its own top-1 on the test split (classes matched by name). A dual encoder on data
    with prompt templates (the captioned built-ins) gets zero-shot top-1 on the test split: the quantity
    CLIP training is for, and it needs no bank. Otherwise k-NN top-1@20 on the (image tower's) features: a
    fixed random subset of the train split as the bank, the test split as queries.
    """

    def __init__(self, cfg: PretrainConfig, core):
        from cvfm.data.sources import relabel, subset

        rng = np.random.default_rng(cfg.seed)
        queries = open_source(cfg.monitor, split="test")
        self.classifier = core.model_kind == "classifier"
        self.zero_shot = core.model_kind == "dual" and queries.templates is not None and bool(queries.classes)
        bank = None if self.zero_shot or self.classifier else open_source(cfg.monitor, split="train")
        if not queries.has_labels or (bank is not None and not bank.has_labels):
            raise UsageError(f"--monitor '{cfg.monitor}' needs labels on its train and test splits")
        if bank is not None:
            self.bank = subset(bank, np.sort(rng.permutation(len(bank))[: cfg.monitor_size]))
        self.queries = subset(queries, np.sort(rng.permutation(len(queries))[: cfg.monitor_size // 2]))
        if self.classifier:  # the classifier's class numbering, matched by name
            self.queries = relabel(
                self.queries, core.encoder.classes, what=f"classifier (--monitor '{cfg.monitor}')"
            )

    def __call__(self, model, device) -> dict:
        if self.classifier:  # extract_features gives the classifier's output: its logits
            logits, labels, _ = extract_features(model, self.queries, device=device, desc="monitor top-1")
            return {"monitor/top1": float((logits.argmax(1) == labels).mean())}
        if self.zero_shot:
            return {"monitor/zeroshot_top1": _zero_shot_top1(model, self.queries, device)}
        encoder = model.image_encoder() if isinstance(model, DualEncoder) else model
        xb, yb, _ = extract_features(encoder, self.bank, device=device, desc="monitor bank")
        xq, yq, _ = extract_features(encoder, self.queries, device=device, desc="monitor queries")
        return {f"monitor/{k}": v for k, v in knn_evaluate(xb, yb, xq, yq, ks=(20,)).items() if "top1" in k}


def _zero_shot_top1(dual: DualEncoder, source: ImageSource, device) -> float:
    """Top-1 of the cosine argmax over the class prompt-ensemble embeddings (`build_zeroshot_classifier`,
    the classifier of `cvfm evaluate zeroshot`)."""
    feats, labels, _ = extract_features(dual.image_encoder(), source, device=device, desc="monitor zero-shot")
    classifier = build_zeroshot_classifier(dual, source.classes, source.templates, device=device)
    return float((zeroshot_logits(feats, classifier).argmax(1) == labels).mean())
