"""`caption(...)`: the library call behind `cvfm caption` (BLIP captions for every image of a source).

Images stream through a DataLoader (decoded in worker processes) in a fixed grid of batches: batch k
holds source rows [k * batch_size, (k + 1) * batch_size). Each batch's sampling randomness is seeded by
(seed, k), so a caption depends only on the settings, never on where a run was interrupted.

Output: one JSON line per image, `{"id", "image", "caption"}` (`"captions": [...]` with
`num_captions > 1`), in source order, to stdout (`"-"`) or a file. From stdin to stdout the lines are
followed as they arrive (`follow_stdin`), in whole batches of the same grid. A file output is resumable:

    out.jsonl            the captions, appended batch by batch (flushed and fsynced after each batch)
    out.jsonl.json       the settings it was produced with (written first, atomically)
    out.jsonl.rejects    one JSON line per unreadable image `{"id", "image", "reason"}` (when any)

A rerun with the same settings drops a truncated last line (a kill in mid-write), keeps every complete
line and computes only the batches that still miss an id (captions or rejects), writing just the missing
rows, so the final file equals an uninterrupted run's. Other settings are a usage error unless
`overwrite=True`; a file without its settings sidecar is never overwritten silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

import cvfm
from cvfm.data.loader import ImageDataset, SkipLog, collate
from cvfm.data.sources import ImageSource, follow_stdin, open_source
from cvfm.embed.run import compute_threads, rows_digest
from cvfm.errors import UsageError
from cvfm.runtime.files import write_json
from cvfm.runtime.precision import autocast, precision_name, resolve_precision
from cvfm.runtime.progress import log, progress

SETTINGS_SUFFIX = ".json"
REJECTS_SUFFIX = ".rejects"
UNCOMPARED = ("cvfm_version",)


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
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    batches = None if follow else len(_todo(source, batch_size, done))  # unknown for a pipe
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
            compute_threads(num_workers)
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
    write = file.write if file is not None else _stdout_writer()
    # Standard input comes in chunks of whole batches of the grid, the data's other sources in one.
    chunks = follow_stdin(batch_size, split=split, strict=strict) if follow else [source]
    try:
        with progress("caption", total=batches) as advance:
            for chunk in chunks:  # grid batches `first`, `first + 1`, ...
                skips.add_entries(chunk.skipped)
                for s in chunk.skipped:
                    log(f"caption: skipped {s['where']}: {s['reason']}")
                todo = _todo(chunk, batch_size, done)
                loader = DataLoader(
                    ImageDataset(chunk, captioner.preprocess.transform()),
                    batch_sampler=GridBatches(todo, batch_size, len(chunk)),
                    num_workers=num_workers if todo else 0,
                    collate_fn=collate,
                    pin_memory=dev.type == "cuda",
                )
                for k, batch in zip(todo, loader, strict=True):
                    skips.add(batch["skipped"])  # raises with --strict
                    rejects = [_reject(chunk, s.index, s.reason) for s in batch["skipped"]]
                    for r in rejects:
                        log(f"caption: skipped {r['image']}: {r['reason']}")
                    rows = []
                    if batch["index"] is not None:
                        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                            torch.manual_seed(batch_seed(seed, first + k))
                            with torch.inference_mode(), autocast(dev, amp):
                                texts = captioner.generate(batch["image"].to(dev), **kwargs)
                        for i, caps in zip(batch["index"].tolist(), texts, strict=True):
                            rows.append(_record(chunk, i, caps, num_captions))
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


def _todo(source: ImageSource, batch_size: int, done: set[str]) -> list[int]:
    """The batches of the grid over `source` that still hold an image not done."""
    return [
        k
        for k in range(-(-len(source) // batch_size))
        if any(it.id not in done for it in source.items[k * batch_size : (k + 1) * batch_size])
    ]


def batch_seed(seed: int, k: int) -> int:
    """The torch seed of batch k (sampling): a function of the run's seed and the batch's position."""
    return (seed * 1_000_003 + k) % (2**63)


class GridBatches(Sampler[list[int]]):
    """The source rows of the listed batches of a fixed grid of `batch_size` rows."""

    def __init__(self, batches: list[int], batch_size: int, n: int):
        self.batches, self.batch_size, self.n = batches, batch_size, n

    def __iter__(self) -> Iterator[list[int]]:
        for k in self.batches:
            yield list(range(k * self.batch_size, min(self.n, (k + 1) * self.batch_size)))

    def __len__(self) -> int:
        return len(self.batches)


class CaptionFile:
    """A caption file `path`, its settings sidecar and its rejects file (see the module docstring)."""

    def __init__(self, path: str | Path, settings: dict):
        self.path = Path(path)
        self.settings_path = Path(f"{path}{SETTINGS_SUFFIX}")
        self.rejects_path = Path(f"{path}{REJECTS_SUFFIX}")
        self.settings = settings
        self.rejects: list[dict] = []  # those found by earlier runs (on resume)

    def open(self, overwrite: bool) -> set[str]:
        """Check what is there and make the files ready to append; return the ids already done."""
        if self.path.is_dir():
            raise UsageError(
                f"output '{self.path}' is a folder: captions go to a .jsonl file (or - for stdout)"
            )
        if self.path.exists() and self.path.stat().st_size > 0 and not overwrite:
            saved = _read_json(self.settings_path)
            if saved is None:
                raise UsageError(
                    f"output '{self.path}' exists and was not written by cvfm caption (no "
                    f"{self.settings_path.name}): use --overwrite to replace it"
                )
            diff = [k for k in self.settings if k not in UNCOMPARED and saved.get(k) != self.settings[k]]
            if diff:
                shown = "; ".join(f"{k}: {saved.get(k)!r} there, {self.settings[k]!r} now" for k in diff[:3])
                raise UsageError(
                    f"output '{self.path}' holds captions made with other settings ({shown}): use the "
                    "same settings to resume, --overwrite to replace it, or another -o"
                )
            return self._resume()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.settings_path, self.settings)
        self.path.write_text("", encoding="utf-8")
        self.rejects_path.unlink(missing_ok=True)
        return set()

    def _resume(self) -> set[str]:
        done = {r["id"] for r in self._repair(self.path)}
        if self.rejects_path.exists():
            self.rejects = self._repair(self.rejects_path)
        return done | {r["id"] for r in self.rejects}

    @staticmethod
    def _repair(path: Path) -> list[dict]:
        """The complete records of a JSON-lines file; a truncated or unreadable tail is cut off."""
        data = path.read_bytes()
        records, keep = [], 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not isinstance(record, dict) or "id" not in record:
                break
            records.append(record)
            keep += len(line)
        if keep < len(data):
            log(f"caption: dropping {len(data) - keep} bytes of an incomplete last line of '{path}'")
            with open(path, "r+b") as f:
                f.truncate(keep)
        return records

    def write(self, rows: list[dict], rejects: list[dict], done: set[str]) -> int:
        """Append this batch's rejects then its captions (each file flushed and fsynced)."""
        new_rejects = [r for r in rejects if r["id"] not in done]
        if new_rejects:
            _append(self.rejects_path, new_rejects)
        if rows:
            _append(self.path, rows)
        done.update(r["id"] for r in [*rows, *new_rejects])
        return len(rows)


def _append(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _stdout_writer() -> Callable[[list[dict], list[dict], set[str]], int]:
    import sys

    def write(rows: list[dict], rejects: list[dict], done: set[str]) -> int:
        for r in rows:
            sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return len(rows)

    return write


def _record(source: ImageSource, i: int, caps: list[str], num_captions: int) -> dict:
    item = source.items[i]
    record = {"id": item.id, "image": item.ref if isinstance(item.ref, str) else item.id}
    if num_captions == 1:
        record["caption"] = caps[0]
    else:
        record["captions"] = list(caps)
    return record


def _reject(source: ImageSource, i: int, reason: str) -> dict:
    item = source.items[i]
    return {"id": item.id, "image": item.ref if isinstance(item.ref, str) else item.id, "reason": reason}


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


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
