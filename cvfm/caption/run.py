"""`caption(...)`: the library call behind `cvfm caption` (see the package docstring)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

import cvfm
from cvfm.caption.grid import GridBatches, batch_seed, todo_batches
from cvfm.caption.output import CaptionFile, record, reject, stdout_writer
from cvfm.data.digest import rows_digest
from cvfm.data.loader import ImageDataset, SkipLog, collate
from cvfm.data.sources import ImageSource, follow_stdin, open_source
from cvfm.errors import UsageError
from cvfm.runtime.device import default_device
from cvfm.runtime.engine import Engine, RaySession, with_engine
from cvfm.runtime.precision import autocast, precision_name, resolve_precision
from cvfm.runtime.progress import log, progress
from cvfm.runtime.threads import share_cores_with_workers


def caption(
    model: str,
    data: str,
    output: str = "-",
    *,
    split: str | None = None,
    prompt: str | None = None,
    num_beams: int = 3,
    top_p: float | None = None,
    num_captions: int = 1,
    max_length: int = 30,
    min_length: int = 5,
    repetition_penalty: float = 1.0,
    batch_size: int = 32,
    num_workers: int = 2,
    seed: int = 0,
    precision: str = "auto",
    strict: bool = False,
    overwrite: bool = False,
    image_column: str = "image",
    pretrained: bool = True,
    trust_remote_code: bool = False,
    device: str | None = None,
    engine: Engine | str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Caption every image of `data` with the BLIP captioner `model`; write JSON lines to `output`.

    Beam search (`num_beams`) by default, nucleus sampling when `top_p` is set. `on_batch(k)` is called
    after batch k is written. `engine` "ray" captions the batches on Ray (see `cvfm.runtime.engine`): the
    same lines. Returns a summary: images captioned now / already done, skipped items."""
    return with_engine(_caption, locals(), "--data - -o -" if data == output == "-" else None)


def _caption(
    model: str,
    data: str,
    output: str,
    *,
    split: str | None,
    prompt: str | None,
    num_beams: int,
    top_p: float | None,
    num_captions: int,
    max_length: int,
    min_length: int,
    repetition_penalty: float,
    batch_size: int,
    num_workers: int,
    seed: int,
    precision: str,
    strict: bool,
    overwrite: bool,
    image_column: str,
    pretrained: bool,
    trust_remote_code: bool,
    device: str | None,
    on_batch: Callable[[int], None] | None,
    session: RaySession | None,
) -> dict:
    _check_settings(num_beams, top_p, num_captions, max_length, min_length, batch_size, repetition_penalty)
    follow = data == "-" and output == "-"  # a pipe in and out: caption the lines as they arrive
    source = None if follow else open_source(data, split=split, image_column=image_column, strict=strict)
    dev = torch.device(default_device(device))
    amp = session.precision(precision) if session is not None else resolve_precision(precision, dev)
    sampling = top_p is not None
    settings = {
        "cvfm_version": cvfm.__version__,
        "model": model,
        "random_init": not pretrained,
        "data": data,
        "split": split,
        "image_column": image_column,
        "rows": None if follow else len(source),
        "rows_sha256": None if follow else rows_digest(source, True),
        "prompt": prompt or None,
        "num_beams": 1 if sampling else num_beams,
        "top_p": top_p,
        "num_captions": num_captions,
        "max_length": max_length,
        "min_length": min_length,
        "repetition_penalty": repetition_penalty,
        "precision": precision_name(amp),
        # Sampled captions depend on the seed and on which images share a batch (one RNG per batch).
        "seed": seed if sampling else None,
        "batch_size": batch_size if sampling else None,
    }
    captioner = _load(model, pretrained, trust_remote_code)  # a bad id fails before any file is touched
    file = None if output == "-" else CaptionFile(output, settings)
    done: set[str] = set()
    earlier_rejects: list[dict] = []
    if file is not None:
        _check_unique_ids(source)
        done = file.open(overwrite)
        earlier_rejects = [{"where": r["image"], "reason": r["reason"]} for r in file.rejects]
    already = len(done) - len(earlier_rejects)
    batches = None if follow else len(todo_batches(source, batch_size, done))  # unknown for a pipe
    if follow:
        log(f"caption: reading standard input, batches of {batch_size}")
    else:
        log(
            f"caption: {len(source)} images, {batches} batches of {batch_size} to compute"
            + (f", {already} images already done" if already else "")
        )
    skips = SkipLog(strict, earlier_rejects)
    written = images = first = 0
    if batches != 0 and session is None and dev.type == "cpu":
        share_cores_with_workers(num_workers)
    kwargs = {
        "prompt": prompt or None,
        "num_beams": num_beams,
        "top_p": top_p,
        "num_captions": num_captions,
        "max_length": max_length,
        "min_length": min_length,
        "repetition_penalty": repetition_penalty,
    }
    write = file.write if file is not None else stdout_writer()
    # Standard input comes in chunks of whole batches of the grid, the data's other sources in one.
    chunks = follow_stdin(batch_size, split=split, strict=strict) if follow else [source]
    try:
        with progress("caption", total=batches) as advance:
            for chunk in chunks:  # grid batches `first`, `first + 1`, ...
                skips.add_entries(chunk.skipped)
                for s in chunk.skipped:
                    log(f"caption: skipped {s['where']}: {s['reason']}")
                todo = todo_batches(chunk, batch_size, done)
                if session is None:
                    loader = DataLoader(
                        ImageDataset(chunk, captioner.preprocess.transform()),
                        batch_sampler=GridBatches(todo, batch_size, len(chunk)),
                        num_workers=num_workers if todo else 0,
                        collate_fn=collate,
                        pin_memory=dev.type == "cuda",
                    )
                    step = _Step(captioner, dev, amp, seed, kwargs)
                    results = ((k, step((first + k, batch))) for k, batch in zip(todo, loader, strict=True))
                else:
                    build = functools.partial(
                        _Step.load, model, pretrained, trust_remote_code, precision_name(amp), seed, kwargs
                    )
                    decode = _Decode(chunk, captioner.preprocess.transform(), batch_size, first)
                    results = session.map(todo, decode, build)
                for k, out in results:
                    skips.add(out["skipped"])  # raises with --strict
                    rejects = [reject(chunk, s.index, s.reason) for s in out["skipped"]]
                    for r in rejects:
                        log(f"caption: skipped {r['image']}: {r['reason']}")
                    rows = [
                        record(chunk, i, caps, num_captions)
                        for i, caps in zip(out["index"], out["texts"], strict=True)
                    ]
                    written += write([r for r in rows if r["id"] not in done], rejects, done)
                    advance()
                    if on_batch is not None:
                        on_batch(first + k)
                images += len(chunk)
                first += -(-len(chunk) // batch_size)
    except KeyboardInterrupt:
        if file is not None:
            log(f"caption: interrupted after {written} new captions; the same command finishes the rest")
        raise
    summary = {
        "model": model,
        "data": data,
        "split": split,
        "output": output,
        "precision": precision_name(amp),
        "images": images,
        "captioned": written,
        "already_done": already,
        "skipped": skips.as_list(),
    }
    log(f"caption: {written} images captioned, {already} already done, {len(summary['skipped'])} skipped")
    return summary


class _Step:
    """The model half of batch k: {"index": rows that decoded, "texts": their captions, "skipped"}. Sampling
    is seeded by the batch's place in the grid, so any process captions a batch alike."""

    def __init__(self, captioner, device: torch.device, amp: torch.dtype | None, seed: int, kwargs: dict):
        self.captioner, self.device, self.amp, self.seed, self.kwargs = captioner, device, amp, seed, kwargs
        captioner.eval().to(device)

    @classmethod
    def load(cls, model, pretrained, trust_remote_code, precision: str, seed: int, kwargs: dict) -> _Step:
        """On a Ray actor: the captioner on the actor's device, at the driver's resolved precision."""
        device = torch.device(default_device())
        captioner = _load(model, pretrained, trust_remote_code)
        return cls(captioner, device, resolve_precision(precision, device), seed, kwargs)

    def __call__(self, payload: tuple[int, dict]) -> dict:
        k, batch = payload
        out = {"index": [], "texts": [], "skipped": batch["skipped"]}
        if batch["index"] is None:
            return out
        dev = self.device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(batch_seed(self.seed, k))
            with torch.inference_mode(), autocast(dev, self.amp):
                out["texts"] = self.captioner.generate(batch["image"].to(dev), **self.kwargs)
        out["index"] = batch["index"].tolist()
        return out


class _Decode:
    """A Ray task's share of the DataLoader's work: batch k of the grid, decoded and collated."""

    def __init__(self, source: ImageSource, transform, batch_size: int, first: int):
        self.dataset, self.batch_size, self.first = ImageDataset(source, transform), batch_size, first

    def __call__(self, k: int) -> tuple[int, dict]:
        rows = range(k * self.batch_size, min(len(self.dataset), (k + 1) * self.batch_size))
        return self.first + k, collate([self.dataset[i] for i in rows])


def _check_unique_ids(source: ImageSource) -> None:
    seen: set[str] = set()
    for it in source.items:
        if it.id in seen:
            raise UsageError(
                f"id '{it.id}' appears twice in the data: a resumable caption file needs unique ids"
            )
        seen.add(it.id)


def _check_settings(
    num_beams: int,
    top_p: float | None,
    num_captions: int,
    max_length: int,
    min_length: int,
    batch_size: int,
    repetition_penalty: float,
) -> None:
    if num_beams < 1:
        raise UsageError(f"--num-beams must be at least 1, not {num_beams}")
    if num_captions < 1:
        raise UsageError(f"--num-captions must be at least 1, not {num_captions}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], not {top_p}")
    if top_p is None and num_captions > num_beams:
        raise UsageError(
            f"--num-captions {num_captions} > --num-beams {num_beams}: beam search returns at most num_beams "
            "captions (raise --num-beams, or sample with --top-p)"
        )
    if max_length < 1:
        raise UsageError(f"--max-length must be at least 1, not {max_length}")
    if not 0 <= min_length <= max_length:
        raise UsageError(f"--min-length must be between 0 and --max-length {max_length}, not {min_length}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
    if repetition_penalty <= 0:
        raise UsageError(f"--repetition-penalty must be positive, not {repetition_penalty}")


def _load(model: str, pretrained: bool, trust_remote_code: bool):
    from cvfm.registry import create_captioner

    return create_captioner(model, pretrained=pretrained, trust_remote_code=trust_remote_code)
