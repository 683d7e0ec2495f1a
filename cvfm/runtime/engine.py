"""Where batch inference runs: `local` (this process; a DataLoader's workers decode) or `ray` (a Ray Data
pipeline: decoding and preprocessing as CPU tasks, the model in a pool of actors, one per GPU).

A command describes its work as ordered units (a batch of rows), a picklable `prepare(unit)` (decode and
preprocess, what its DataLoader's dataset and collate do) and a picklable `build()` that loads the model
once per actor and returns `step(payload) -> result`. `RaySession.map` hands back `(unit, result)` in
unit order, so the command's own writers write the same files and resume markers as the local engine.
Ray is imported only here, and only when asked for (`pip install 'cvfm[ray]'`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cvfm.errors import UsageError
from cvfm.runtime.progress import log

ENGINES = ("local", "ray")
INSTALL = "pip install 'cvfm[ray]'"
T = TypeVar("T")


@dataclass(frozen=True)
class Engine:
    """The engine options: `kind` (local or ray); `address` of a Ray cluster to join (None: start an
    embedded one); `actors`, the model replicas (None: one per GPU of the cluster, else 1)."""

    kind: str = "local"
    address: str | None = None
    actors: int | None = None

    def __post_init__(self):
        if self.kind not in ENGINES:
            raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, not '{self.kind}'")
        if self.kind != "ray" and (self.address is not None or self.actors is not None):
            raise UsageError("--address and --actors need --engine ray")
        if self.actors is not None and self.actors < 1:
            raise UsageError(f"--actors must be at least 1, not {self.actors}")

    @classmethod
    def of(cls, engine: Engine | str | None) -> Engine:
        return engine if isinstance(engine, Engine) else cls(engine or "local")

    @property
    def is_ray(self) -> bool:
        return self.kind == "ray"

    def check_single_process(self, world: int) -> None:
        if self.is_ray and world > 1:
            raise UsageError(
                "--engine ray runs one driver: launch it as one process (not under accelerate launch / "
                "torchrun); Ray spreads the model over the GPUs"
            )


def with_engine(run: Callable[..., T], args: dict, follows: str | None = None) -> T:
    """`run(**args, session=...)`, `args` a command's arguments (its `locals()`) with the engine in
    `args["engine"]`: the session is a RaySession for `--engine ray` (stopped after), None for the local
    engine. `follows` names the options with which the local engine follows standard input as it arrives
    (e.g. "--data - -o -"): Ray works on a whole input, so it refuses them."""
    args = dict(args)
    engine = Engine.of(args.pop("engine"))
    if engine.is_ray and follows:
        raise UsageError(
            f"--engine ray works on a whole input: {follows} follows standard input as it arrives, which "
            "the local engine does (or write to a file or folder: Ray then reads all of standard input first)"
        )
    with RaySession(engine) if engine.is_ray else contextlib.nullcontext() as session:
        return run(**args, session=session)


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(f"--engine ray needs Ray: {INSTALL}") from None
    return ray


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class RaySession:
    """Ray for one command (`with RaySession(engine) as ray:`): joins the cluster at `engine.address`, or
    starts an embedded one (this machine's cores, no dashboard, logs in Ray's session folder, none on
    stdout) and stops it on exit. Nothing starts before there is work (`map`)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.ray = import_ray()
        self.started = False
        self.gpus = 0
        self.actors = 1

    def start(self) -> RaySession:
        """Start or join Ray (once; the session is only started when there is work for it)."""
        if self.started:
            return self
        ray = self.ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        quiet = {"log_to_driver": False, "logging_level": "WARNING", "configure_logging": True}
        if self.engine.address is None:
            ray.init(address="local", num_cpus=_cores(), include_dashboard=False, **quiet)
        else:
            try:
                ray.init(address=self.engine.address, **quiet)
            except ConnectionError as e:
                raise UsageError(f"--address {self.engine.address}: no Ray cluster there ({e})") from None
        self.started = True
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        self.actors = self.engine.actors or max(1, self.gpus)
        if self.gpus and self.actors > self.gpus:
            raise UsageError(f"--actors {self.actors}: the Ray cluster has {self.gpus} GPU(s), one per actor")
        where = "embedded Ray" if self.engine.address is None else f"Ray cluster at {self.engine.address}"
        log(
            f"engine: {where} ({int(resources.get('CPU', 0))} CPUs, {self.gpus} GPUs), {self.actors} model "
            f"actor(s) on {'GPU' if self.gpus else 'CPU'}"
        )
        return self

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False

    def _actor_resources(self) -> dict:
        # A CPU actor reserves no CPU, so that it never starves the decoding tasks (and is not fused with
        # them into one process); it sets its own torch threads (`_Model`).
        return {"num_gpus": 1, "num_cpus": 1} if self.gpus else {"num_cpus": 0}

    def precision(self, name: str):
        """`--precision name` resolved where the actors run (auto: bf16 on a GPU that has it, ...): every
        actor then uses this one precision, and the output records it."""
        from cvfm.runtime.precision import DTYPES

        if self.engine.address is None:  # the embedded Ray runs on this machine, with its GPUs
            return DTYPES[_resolve_here(name)]
        self.start()
        task = self.ray.remote(**self._actor_resources())(_call)
        kind, value = self.ray.get(task.remote(_resolve_here, name))
        if kind == "usage":
            raise UsageError(value)
        return DTYPES[value]

    def map(self, units: Sequence, prepare: Callable, build: Callable) -> Iterator[tuple[Any, Any]]:
        """`(unit, build()(prepare(unit)))` for every unit, in order: `prepare` as Ray tasks, the model in
        `self.actors` actors (each calls `build()` once), results streamed back to this process."""
        ray = self.start().ray
        from ray.data import ActorPoolStrategy, DataContext

        ctx = DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ds = ray.data.from_items(
            [{"k": k} for k in range(len(units))], override_num_blocks=max(1, len(units))
        )
        ds = ds.map(_Prepare(units, prepare))
        ds = ds.map_batches(
            _Model,
            fn_constructor_args=(
                build,
                None if self.gpus or "OMP_NUM_THREADS" in os.environ else self.actors,
            ),
            batch_size=1,
            compute=ActorPoolStrategy(size=self.actors),
            **self._actor_resources(),
        )
        expected = 0
        try:
            for row in ds.iter_rows():
                k = int(row["k"])
                if k != expected:  # preserve_order guarantees this; never write a part out of order
                    raise RuntimeError(f"Ray returned unit {k} where unit {expected} was due")
                expected += 1
                yield units[k], pickle.loads(row["result"])
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None


def _resolve_here(name: str) -> str:
    from cvfm.runtime.device import default_device
    from cvfm.runtime.precision import precision_name, resolve_precision

    return precision_name(resolve_precision(name, default_device()))


def _call(fn: Callable, *args) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except UsageError as e:
        return "usage", str(e)


class _Prepare:
    """The CPU task: one unit's payload, pickled (any Python object travels through Ray Data this way)."""

    def __init__(self, units: Sequence, prepare: Callable):
        self.units, self.prepare = units, prepare

    def __call__(self, row: dict) -> dict:
        k = int(row["k"])
        return {"k": k, "payload": pickle.dumps(self.prepare(self.units[k]), protocol=5)}


class _Model:
    """The actor: the model built once, then one payload per call."""

    def __init__(self, build: Callable, share: int | None):
        if share is not None:  # a CPU actor: its share of the node's cores (Ray would give it one thread)
            import torch

            torch.set_num_threads(max(1, _cores() // share))
        self.step = build()

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        results = [pickle.dumps(self.step(pickle.loads(p)), protocol=5) for p in batch["payload"]]
        return {"k": batch["k"], "result": np.array(results, dtype=object)}
