"""The training loop every method shares, on CPU, one GPU or many (Accelerate). It knows methods only by
`TrainingMethod`: the method turns a batch into a loss; the loop owns the rest.

Exact resume: the sampler order is seeded by (seed, epoch), each sample's augmentations by
(seed, epoch, index), the global RNG by (seed, step, process), and every schedule is indexed by the
global step; the checkpoint holds the method's state (its EMA targets and buffers too, never its
`frozen_teacher`), the optimizer, the gradient scaler and the running sums of the epoch's metrics. On CPU a
resumed run also trains with the intra-op thread count it started with (run.json "resolved",
`cpu_threads`), whatever its number of decoding workers: the thread count changes the order of
floating-point sums. A run stopped (even killed) and resumed in a new process therefore ends with the same
weights as an uninterrupted one: bit for bit on CPU (tests/test_resume.py), on GPU as far as its CUDA
kernels are deterministic. The items trained on are recorded in data_items.jsonl (`cvfm.data.digest`); a
resumed run refuses to go on if they changed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timm.layers import convert_sync_batchnorm
from torch.utils.data import DataLoader

from cvfm.data.digest import compare, digest_items
from cvfm.data.loader import ImageDataset, SkipLog
from cvfm.data.sources import ImageSource
from cvfm.errors import UsageError
from cvfm.runtime.accelerator import check_processes, make_accelerator, run_threads
from cvfm.runtime.batchnorm import GlobalBatchNorm
from cvfm.runtime.checkpoint import apply_checkpoint, read_latest_checkpoint, save_checkpoint
from cvfm.runtime.files import save_atomically
from cvfm.runtime.plan import Budget, TrainSettings, plan_steps
from cvfm.runtime.progress import log, progress
from cvfm.runtime.protocol import TrainingMethod
from cvfm.runtime.run_dir import RunDir, versions
from cvfm.runtime.schedules import cosine
from cvfm.runtime.stop import GracefulStop, Interrupted
from cvfm.runtime.tracking import plot_curves, truncate_metrics

Evaluate = Callable[[torch.nn.Module, torch.device], dict]


class Trainer:
    """`Trainer(settings, run)` sets up Accelerate; `plan(n)` gives the step plan a method is sized from;
    `fit(method, source, budget)` trains, checkpoints, exports `method.encoder` and returns the run folder.

    `run` is a `RunDir` checked but not yet created: `fit` creates it.
    """

    def __init__(self, settings: TrainSettings, run: RunDir):
        self.settings, self.run = settings, run
        self.accelerator = make_accelerator(settings, run)
        self.cpu_threads = run_threads(settings, run) if self.accelerator.device.type == "cpu" else None
        if settings.resume:
            check_processes(run, self.accelerator.num_processes)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def plan(self, num_images: int) -> Budget:
        return plan_steps(self.settings, num_images, self.accelerator.num_processes)

    def fit(
        self,
        method: TrainingMethod,
        source: ImageSource,
        budget: Budget,
        *,
        record: dict | None = None,
        evaluate: Evaluate | None = None,
        on_step: Callable[[int], None] | None = None,
        on_end: Callable[[Path], None] | None = None,
    ) -> Path:
        """Train `method` on `source`; `record` goes into run.json beside the resolved settings.

        `evaluate(model, device)` (main process only) scores `method.encoder` before training and after
        each epoch; its dict is logged. `on_step(step)` is called after each optimizer step; `on_end(folder)`
        (main process) once the export is written, before the run is marked finished. The first Ctrl-C /
        SIGTERM stops the run after the current step and saves a checkpoint (raising `Interrupted`); a run
        created with `resume=True` continues from it.
        """
        self._prepare(method, source, budget)
        settings, acc, run = self.settings, self.accelerator, self.run
        if self.is_main:
            self._record_data()
        if settings.resume:
            self._restore()
        if self.is_main:
            run.update(**self.resolved, **(record or {}), status="running")
        acc.init_trackers("cvfm")
        self.evaluate = evaluate if self.is_main else None
        if self.evaluate and self.step == 0:
            acc.log(self.evaluate(self.core.encoder, acc.device), step=0)
        t0 = time.perf_counter()
        with GracefulStop() as stop:
            try:
                while self.epoch < settings.epochs:
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
            if on_end:
                on_end(run.path)
        self._finish("finished", t0)
        return run.path

    def _prepare(self, method: TrainingMethod, source: ImageSource, budget: Budget) -> None:
        """Schedules, optimizer and data loader; everything wrapped by Accelerate."""
        settings, acc = self.settings, self.accelerator
        world = acc.num_processes
        # BatchNorm over the global batch: SyncBatchNorm on GPUs (timm's converter: torch's drops the
        # activation of timm's BatchNormAct2d), GlobalBatchNorm (in _train_step) on CPUs, where
        # SyncBatchNorm cannot run. The frozen teacher is not in the module tree: neither applies to it.
        self.global_batch_norm = world > 1 and acc.device.type == "cpu"
        if world > 1 and acc.device.type == "cuda":
            method = convert_sync_batchnorm(method)
        self.budget = budget
        lr = settings.lr or method.peak_lr(budget.batch_size)
        warmup = min(int(settings.warmup_epochs * budget.steps_per_epoch), int(0.1 * budget.total_steps))
        self.lrs = cosine(lr, settings.min_lr, budget.total_steps, warmup_steps=warmup)
        self.wds = cosine(*method.weight_decay, budget.total_steps)
        optimizer = method.make_optimizer(lr)  # may refuse the request (a layer decay without layers)
        self.run.create()  # only now that the request is known to be valid
        self.dataset = ImageDataset(source, method.views(), seed=settings.seed)
        loader = DataLoader(
            self.dataset,
            batch_size=settings.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=settings.num_workers,
            collate_fn=method.collate_fn(),
            generator=torch.Generator().manual_seed(settings.seed),
        )
        self.method, self.optimizer, self.loader = acc.prepare(method, optimizer, loader)
        self.core = acc.unwrap_model(self.method)
        if self.core.frozen_teacher is not None:
            self.core.frozen_teacher.to(acc.device).eval().requires_grad_(False)
        self.skips = SkipLog(settings.strict, source.skipped)
        self.step = self.epoch = 0
        self.epoch_sums: dict[str, float] = {}  # the running sums of this epoch's step records
        self.epoch_steps = 0
        self.resolved = {
            "resolved": {
                "lr": lr,
                "warmup_steps": warmup,
                "steps_per_epoch": budget.steps_per_epoch,
                "total_steps": budget.total_steps,
                "global_batch_size": budget.batch_size,
                "num_processes": world,
                "cpu_threads": self.cpu_threads,
                **self.core.resolved,
            },
            "versions": versions(),
            "seed": settings.seed,
        }

    def _record_data(self) -> None:
        """data_items.jsonl: the items this run trains on. A resumed run must find the same items (a run
        that predates digests stays without one)."""
        if not self.settings.resume:
            self.run.record_data(self.dataset.source)
            return
        recorded = self.run.read_digest()
        changes = recorded is not None and compare(recorded, digest_items(self.dataset.source))
        if changes:
            raise UsageError(
                f"cannot resume '{self.run.path}': its training data changed since it started "
                f"({changes.describe()}); start a new run instead"
            )

    def _train_epoch(self, stop: GracefulStop, on_step) -> None:
        """The rest of this epoch (all of it unless the run resumed within it), its summary (`epoch/*`:
        means over all of its steps, resumed or not) and its checkpoint."""
        acc, per_epoch = self.accelerator, self.budget.steps_per_epoch
        done = self.step - self.epoch * per_epoch
        todo = per_epoch - done
        started = time.perf_counter()
        images = self._train_steps(done, todo, stop, on_step) if todo > 0 else 0
        logs = {f"epoch/{k}": v / self.epoch_steps for k, v in self.epoch_sums.items()}
        logs["epoch"] = self.epoch + 1
        if images:  # this process's speed (none when it resumed at the epoch's last step)
            logs["images_per_s"] = images / max(time.perf_counter() - started, 1e-9)
        evaluated = self.evaluate(self.core.encoder, acc.device) if self.evaluate else {}
        logs.update(evaluated)
        acc.log(logs, step=self.step)
        if self.is_main:
            self._summary(logs, evaluated)
            self._plot()
        self.epoch_sums, self.epoch_steps = {}, 0
        self._checkpoint(resume_epoch=self.epoch + 1)

    def _train_steps(self, done: int, todo: int, stop: GracefulStop, on_step) -> int:
        """Steps `done` + 1 .. `done` + `todo` of this epoch; returns the number of images they took."""
        settings, acc = self.settings, self.accelerator
        self.dataset.set_epoch(self.epoch)
        self.loader.set_epoch(self.epoch)
        batches = acc.skip_first_batches(self.loader, done * settings.grad_accum) if done else self.loader
        images = 0
        with progress(f"epoch {self.epoch + 1}/{settings.epochs}", total=todo) as advance:
            for i, batch in enumerate(batches):
                if i >= todo * settings.grad_accum:
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
                end_of_epoch = self.step == (self.epoch + 1) * self.budget.steps_per_epoch  # checkpointed
                if self.step % settings.checkpoint_every == 0 and not end_of_epoch:
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
        torch.manual_seed((self.settings.seed * 1_000_003 + step) * 1009 + acc.process_index)
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lrs[step]) * group.get("lr_scale", 1.0)  # layer-wise decay
            if group.get("apply_wd", True):
                group["weight_decay"] = float(self.wds[step])
        with acc.accumulate(self.method):
            with GlobalBatchNorm() if self.global_batch_norm else contextlib.nullcontext():
                loss, logs = self.method(batch, step)
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
                keep=self.settings.keep_checkpoints,
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
        self.skips = SkipLog(self.settings.strict, state.get("skipped", []))
        self.epoch_sums, self.epoch_steps = state.get("epoch_sums", {}), state.get("epoch_steps", 0)
        if self.is_main:  # what was logged after the checkpoint is logged again
            truncate_metrics(self.run.metrics, self.step, self.epoch)
        log(f"resuming {self.run.path} at step {self.step}/{self.budget.total_steps} ({found[0].name})")

    def _finish(self, status: str, t0: float) -> None:
        if self.is_main:
            self._plot()
            self.run.update(
                status=status,
                step=self.step,
                skipped=self.skips.as_list(),
                wall_s=round(time.perf_counter() - t0, 2),
            )
            if self.skips.entries:
                log(f"skipped {len(self.skips.entries)} unreadable item(s); listed in {self.run.run_json}")
        self.accelerator.end_training()

    def _plot(self) -> None:
        plot_curves(self.run.metrics, self.run.path / "curves.png")

    def _summary(self, logs: dict, evaluated: dict) -> None:
        """One line per epoch: the loss, the method's `summary_keys`, the evaluation, the speed."""
        keys = ["epoch/loss", *(f"epoch/{k}" for k in self.core.summary_keys), *evaluated, "images_per_s"]
        parts = [f"{k.split('/')[-1]}={logs[k]:.4g}" for k in keys if isinstance(logs.get(k), float)]
        log(f"epoch {self.epoch + 1}/{self.settings.epochs} " + " ".join(parts))
