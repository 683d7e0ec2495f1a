"""`caption(...)`: the library call behind `cvfm caption` (see the package docstring)."""

from __future__ import annotations

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
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Caption every image of `data` with the BLIP captioner `model`; write JSON lines to `output`.

    Beam search (`num_beams`) by default, nucleus sampling when `top_p` is set. `on_batch(k)` is called
    after batch k is written. Returns a summary: images captioned now / already done, skipped items."""
    _check_settings(num_beams, top_p, num_captions, max_length, min_length, batch_size, repetition_penalty)
    follow = data == "-" and output == "-"  # a pipe in and out: caption the lines as they arrive
    source = None if follow else open_source(data, split=split, image_column=image_column, strict=strict)
    dev = torch.device(default_device(device))
    amp = resolve_precision(precision, dev)
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
    if batches != 0:
        if dev.type == "cpu":
            share_cores_with_workers(num_workers)
        captioner.eval().to(dev)
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
                loader = DataLoader(
                    ImageDataset(chunk, captioner.preprocess.transform()),
                    batch_sampler=GridBatches(todo, batch_size, len(chunk)),
                    num_workers=num_workers if todo else 0,
                    collate_fn=collate,
                    pin_memory=dev.type == "cuda",
                )
                for k, batch in zip(todo, loader, strict=True):
                    skips.add(batch["skipped"])  # raises with --strict
                    rejects = [reject(chunk, s.index, s.reason) for s in batch["skipped"]]
                    for r in rejects:
                        log(f"caption: skipped {r['image']}: {r['reason']}")
                    rows = []
                    if batch["index"] is not None:
                        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                            torch.manual_seed(batch_seed(seed, first + k))
                            with torch.inference_mode(), autocast(dev, amp):
                                texts = captioner.generate(batch["image"].to(dev), **kwargs)
                        for i, caps in zip(batch["index"].tolist(), texts, strict=True):
                            rows.append(record(chunk, i, caps, num_captions))
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
