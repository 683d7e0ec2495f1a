"""`embed(...)`: the library call behind `cvfm embed`.

One DataLoader decodes (and tokenizes) in worker processes while the model runs; its batch sampler walks
this process's parts one after another, so at most one part's embeddings are held in memory and each
part is written as soon as it is complete.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import cvfm
from cvfm.data.digest import rows_digest
from cvfm.data.loader import ImageDataset, SkipLog, collate
from cvfm.data.sources import ImageSource, follow_stdin, open_source
from cvfm.embed.folder import EmbedFolder
from cvfm.embed.plan import PartBatchSampler, Plan, check_shard
from cvfm.embed.processes import Processes
from cvfm.embed.towers import Towers, load_towers
from cvfm.embed.writers import JsonLinesWriter, PartWriter
from cvfm.errors import UsageError
from cvfm.runtime.device import default_device
from cvfm.runtime.engine import Engine, RaySession, with_engine
from cvfm.runtime.precision import autocast, precision_name, resolve_precision
from cvfm.runtime.progress import log, progress
from cvfm.runtime.threads import share_cores_with_workers

DTYPES = ("float32", "float16")


def embed(
    model: str,
    data: str,
    output: str = "-",
    *,
    split: str | None = None,
    text_column: str | None = None,
    images: bool = True,
    image_column: str = "image",
    label_column: str | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    precision: str = "auto",
    dtype: str = "float32",
    normalize: bool = True,
    part_size: int = 10_000,
    shard_id: int = 0,
    num_shards: int = 1,
    rank: int | None = None,
    world_size: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    pretrained: bool = True,
    trust_remote_code: bool = False,
    device: str | None = None,
    engine: Engine | str | None = None,
    on_part=None,
) -> dict:
    """Embed the images (and/or the texts of `text_column`) of `data` with `model`.

    `output` is a folder (clip-retrieval layout, one file set per part, resumable) or "-" for JSON lines
    on stdout. This process computes the parts it owns: shard `shard_id` of `num_shards`, and within it
    process `rank` of `world_size` (default: the launcher's environment). `on_part(p)` is called after
    part p is written. Returns a summary: rows, dims, parts written / already done, skipped items.

    `engine` "ray" (or an `Engine` with a cluster address and an actor count) runs the batches on Ray:
    the same files, rows and resume markers as the local engine (see `cvfm.runtime.engine`).
    """
    return with_engine(
        _embed, locals(), "--data - -o -" if data == output == "-" and num_shards == 1 else None
    )


def _embed(
    model: str,
    data: str,
    output: str,
    *,
    split: str | None,
    text_column: str | None,
    images: bool,
    image_column: str,
    label_column: str | None,
    batch_size: int,
    num_workers: int,
    precision: str,
    dtype: str,
    normalize: bool,
    part_size: int,
    shard_id: int,
    num_shards: int,
    rank: int | None,
    world_size: int | None,
    overwrite: bool,
    strict: bool,
    pretrained: bool,
    trust_remote_code: bool,
    device: str | None,
    on_part,
    session: RaySession | None,
) -> dict:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    check_shard(shard_id, num_shards)
    texts = text_column is not None
    if not images and not texts:
        raise UsageError("nothing to embed: --no-images needs --text-column")
    to_stdout = output == "-"
    procs = Processes.detect(rank, world_size)
    if procs.world > 1 and to_stdout:
        raise UsageError("-o - under several processes would interleave their lines: write to a folder")
    if procs.world > 1 and data == "-":
        raise UsageError("--data - (stdin) reaches one process only: use a manifest file with several")
    if session is not None:
        session.engine.check_single_process(procs.world)
        dev, amp = None, session.precision(precision)
    else:
        dev = torch.device(device) if device else (procs.device or torch.device(default_device()))
        amp = resolve_precision(precision, dev)
    loop = {"num_workers": num_workers, "normalize": normalize}
    summary = {
        "model": model,
        "data": data,
        "split": split,
        "output": output,
        "precision": precision_name(amp),
    }
    opened = {"split": split, "text_column": text_column, "images": images, "strict": strict}
    if data == "-" and to_stdout and num_shards == 1:
        towers = load_towers(
            model, images=images, texts=texts, pretrained=pretrained, trust_remote_code=trust_remote_code
        )
        chunks = follow_stdin(batch_size, **opened)
        return _embed_followed(
            towers, chunks, text_column, dev, amp, strict, on_part, summary, batch_size=batch_size, **loop
        )
    source = open_source(data, image_column=image_column, label_column=label_column, **opened)
    if texts:
        _check_one_text_per_row(source, text_column)
    plan = Plan(len(source), part_size)
    owned = plan.owned(shard_id, num_shards, procs.rank, procs.world)
    modalities = ("image",) * images + ("text",) * texts
    folder = None
    if not to_stdout:
        config = {
            "cvfm_version": cvfm.__version__,
            "model": model,
            "random_init": not pretrained,
            "data": data,
            "split": split,
            "image_column": image_column if images else None,
            "label_column": label_column,
            "text_column": text_column,
            "modalities": list(modalities),
            "num_rows": len(source),
            "rows_sha256": rows_digest(source, images),
            "part_size": part_size,
            "num_parts": plan.num_parts,
            "normalize": normalize,
            "precision": precision_name(amp),
            "dtype": dtype,
        }
        folder = EmbedFolder(output, config, modalities)
    state = folder.check(overwrite) if folder else "stdout"
    procs.barrier()  # every process has looked at the folder before any writes to it
    done = {}
    if folder is not None and state == "resume":
        done = {p: info for p in owned if (info := folder.part_info(p)) is not None}
    todo = [p for p in owned if p not in done]
    towers = None
    if todo:
        towers = load_towers(
            model, images=images, texts=texts, pretrained=pretrained, trust_remote_code=trust_remote_code
        )
    log(
        f"embed: {len(source)} rows, {plan.num_parts} parts of {part_size}; process {procs.rank} of shard "
        f"{shard_id} owns {len(owned)}" + (f", {len(done)} already done" if done else "")
    )
    if folder is not None:
        if state != "resume":
            folder.write_config()
        if state == "overwrite" and procs.rank == 0 and shard_id == 0:
            folder.remove_parts_from(plan.num_parts)
    if towers is None:
        why = f"all {len(owned)} parts of this process are already done" if owned else "it owns no part"
        log(f"embed: {why}: nothing to do")
        dims = folder.dims(owned[0]) if folder is not None and owned else {}
        written = []
    else:
        dims = towers.dims
        if folder is not None:
            writer = PartWriter(folder, source, dims, plan, dtype, on_part)
        else:
            writer = JsonLinesWriter(source, on_part=on_part)
        log(f"embed: {len(todo)} parts to compute on {dev or 'Ray'} ({precision_name(amp)})")
        skips = SkipLog(strict, source.skipped)
        sampler = PartBatchSampler(plan, todo, batch_size)
        try:
            if session is None:
                if dev.type == "cpu":
                    share_cores_with_workers(num_workers, procs.world)
                _embed_parts(towers, source, sampler, writer, dev, amp, skips, **loop)
            else:
                load = functools.partial(
                    load_towers,
                    model,
                    images=images,
                    texts=texts,
                    pretrained=pretrained,
                    trust_remote_code=trust_remote_code,
                )
                units = [((part, last), rows) for part, rows, last in sampler.batches()]
                results = session.map(
                    units,
                    _Decode(source, towers),
                    functools.partial(_Step.load, load, precision_name(amp), normalize),
                )
                _write_batches(((u[0], r) for u, r in results), writer, skips, len(units))
        except KeyboardInterrupt:
            if folder is not None:
                n = len(writer.written)
                log(f"embed: interrupted after {n} of {len(todo)} parts; the same command finishes the rest")
            raise
        written = writer.written
    summary = {
        **summary,
        "rows": sum(r["rows"] for r in [*done.values(), *written]),
        "dims": dims,
        "parts": {
            "total": plan.num_parts,
            "owned": len(owned),
            "written": len(written),
            "already_done": len(done),
        },
        "skipped": _unique(source.skipped + [s for r in [*done.values(), *written] for s in r["skipped"]]),
    }
    summaries = procs.gather(summary)
    procs.close()
    return merge_summaries(summaries)


def _embed_followed(
    towers: Towers,
    chunks: Iterator[ImageSource],
    text_column: str | None,
    device: torch.device,
    amp: torch.dtype | None,
    strict: bool,
    on_part,
    summary: dict,
    *,
    batch_size: int,
    **loop,
) -> dict:
    """Embed standard input as it arrives (`follow_stdin`) to JSON lines: each chunk of whole batches
    is a part, embedded as soon as it is there."""
    if device.type == "cpu":
        share_cores_with_workers(loop["num_workers"])
    log(f"embed: reading standard input, batches of {batch_size}, on {device} ({precision_name(amp)})")
    skips, lines_skipped, rows, parts = SkipLog(strict), [], 0, 0
    for part, source in enumerate(chunks):
        lines_skipped += source.skipped
        if len(source) == 0:  # the end of the input: nothing but skipped lines since the last part
            continue
        if text_column is not None:
            _check_one_text_per_row(source, text_column)
        sampler = PartBatchSampler(Plan(len(source), len(source)), [0], batch_size)
        writer = JsonLinesWriter(source)
        _embed_parts(towers, source, sampler, writer, device, amp, skips, **loop)
        rows, parts = rows + writer.written[0]["rows"], parts + 1
        if on_part is not None:
            on_part(part)
    counts = {"total": parts, "owned": parts, "written": parts, "already_done": 0}
    skipped = _unique(lines_skipped + skips.as_list())
    return {**summary, "rows": rows, "dims": towers.dims, "parts": counts, "skipped": skipped}


def merge_summaries(summaries: list[dict]) -> dict:
    """One summary for all processes of a launch (rows and parts added up)."""
    first = dict(summaries[0])
    if len(summaries) == 1:
        return first
    first["rows"] = sum(s["rows"] for s in summaries)
    first["dims"] = next((s["dims"] for s in summaries if s["dims"]), {})
    first["parts"] = {k: sum(s["parts"][k] for s in summaries) for k in ("owned", "written", "already_done")}
    first["parts"]["total"] = summaries[0]["parts"]["total"]
    first["skipped"] = _unique([e for s in summaries for e in s["skipped"]])
    first["processes"] = len(summaries)
    return first


def _embed_parts(
    towers: Towers,
    source: ImageSource,
    sampler: PartBatchSampler,
    writer: PartWriter | JsonLinesWriter,
    device: torch.device,
    amp: torch.dtype | None,
    skips: SkipLog,
    *,
    num_workers: int,
    normalize: bool,
) -> None:
    """Run the model over the sampler's batches (one DataLoader for all parts) and feed the writer."""
    loader = DataLoader(
        ImageDataset(source, towers.preprocess.transform() if towers.image is not None else None),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=functools.partial(collate, tokenizer=towers.tokenizer),
        pin_memory=device.type == "cuda",
    )
    step = _Step(towers, device, amp, normalize)
    results = ((at, step(batch)) for at, batch in zip(sampler.steps(), loader, strict=True))
    _write_batches(results, writer, skips, len(sampler))


def _write_batches(results, writer: PartWriter | JsonLinesWriter, skips: SkipLog, total: int) -> None:
    """Feed the writer the `((part, is_last_batch_of_part), step result)` of each batch, in order;
    `writer.finish(part, skipped)` follows the last batch of each part."""
    part_skipped: list[dict] = []
    with progress("embed", total=total) as advance:
        for (part, last), out in results:
            skips.add(out["skipped"])  # raises with --strict
            part_skipped += [{"where": s.where, "reason": s.reason} for s in out["skipped"]]
            if out["index"]:
                writer.add(part, out["index"], out["arrays"])
            if last:
                writer.finish(part, part_skipped)
                part_skipped = []
            advance()


class _Step:
    """The model half of a batch: {"index": rows that decoded, "skipped", "arrays": modality -> numpy}."""

    def __init__(self, towers: Towers, device: torch.device, amp: torch.dtype | None, normalize: bool):
        self.towers, self.device, self.amp, self.normalize = towers, device, amp, normalize
        towers.module.eval().to(device)

    @classmethod
    def load(cls, load, precision: str, normalize: bool) -> _Step:
        """On a Ray actor: the towers on the actor's device, at the driver's resolved precision."""
        device = torch.device(default_device())
        return cls(load(), device, resolve_precision(precision, device), normalize)

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        towers, device = self.towers, self.device
        out = {"index": [], "skipped": batch["skipped"], "arrays": {}}
        if batch["index"] is None:
            return out
        with autocast(device, self.amp):
            if towers.image is not None:
                out["arrays"]["image"] = towers.image(batch["image"].to(device, non_blocking=True))
            if towers.text is not None:
                out["arrays"]["text"] = towers.text({k: v.to(device) for k, v in batch["tokens"].items()})
        out["arrays"] = {m: _to_numpy(e, self.normalize) for m, e in out["arrays"].items()}
        out["index"] = batch["index"].tolist()
        return out


class _Decode:
    """A Ray task's share of the DataLoader's work: decode, preprocess and collate one batch of rows."""

    def __init__(self, source: ImageSource, towers: Towers):
        transform = towers.preprocess.transform() if towers.image is not None else None
        self.dataset, self.tokenizer = ImageDataset(source, transform), towers.tokenizer

    def __call__(self, unit: tuple) -> dict:
        return collate([self.dataset[i] for i in unit[1]], tokenizer=self.tokenizer)


def _to_numpy(e: torch.Tensor, normalize: bool) -> np.ndarray:
    e = e.float()
    if normalize:
        e = F.normalize(e, dim=-1, eps=1e-12)
    return e.cpu().numpy()


def _check_one_text_per_row(source: ImageSource, column: str) -> None:
    bad = next((it for it in source.items if isinstance(it.text, tuple)), None)
    if bad is not None:
        raise UsageError(
            f"row '{bad.id}' has {len(bad.text)} texts in '{column}': embed takes one text per row "
            "(write one row per caption)"
        )


def _unique(entries: list[dict]) -> list[dict]:
    return list({e["where"]: e for e in entries}.values())
