"""`capfilt(...)`: the library call behind `cvfm capfilt` (BLIP's CapFilt over a JSONL of pairs).

A file's lines go in one fixed grid of batches, so a resumed run batches each pair as before; a pipe's
(`--in -`) are read as they arrive (`arrived`), so records flow while its writer still writes. Batches
of parsed lines go to a DataLoader whose workers decode and preprocess the images; the models then
caption a whole batch at once and score all of its captions in one ITM pass. Results are written batch
by batch (output records, then rejects).

`engine="ray"` reads the whole input first (its lines are small records; all of standard input for
`--in -`), makes the same batches, decodes them as Ray tasks and runs the models in Ray actors; this
process writes the results as the local engine does: the same files, byte for byte.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

import cvfm
from cvfm.capfilt import io
from cvfm.capfilt.models import itm_scores, sample_captions
from cvfm.capfilt.rules import Tally, filter_captions
from cvfm.data.decode import DecodeError, decode_image
from cvfm.data.stream import arrived
from cvfm.data.text import own_stdin
from cvfm.errors import UsageError
from cvfm.runtime.device import default_device
from cvfm.runtime.engine import Engine, RaySession, with_engine
from cvfm.runtime.precision import autocast, precision_name, resolve_precision
from cvfm.runtime.progress import log
from cvfm.runtime.threads import share_cores_with_workers


def _chunks(stream, follow: bool, batch_size: int) -> Iterator[Iterator[tuple[int, str]]]:
    """The input's numbered lines: a file's in one lazy run (one grid of batches, as a resumed run has
    it); a pipe's in runs of what has arrived, so that records flow while its writer still writes."""
    lines = io.read_lines(stream)
    if not follow:
        yield lines
        return
    for chunk in arrived(lines, limit=64 * batch_size):
        yield iter(chunk)


class _Batches:
    """The batch sampler: `Job`s read lazily from the input in a fixed grid of batches (every `size`
    non-blank lines), so that a resumed run batches (and pads) each pair as an uninterrupted run does and
    writes the same scores, bit for bit. A batch whose lines are all done is skipped; one done in part
    (a kill mid-write) is computed whole, and only its missing lines are written."""

    def __init__(self, lines: Iterator[tuple[int, str]], parse: Callable, done: dict, out: str, size: int):
        self.lines, self.parse, self.done, self.out, self.size = lines, parse, done, out, size

    def __iter__(self) -> Iterator[list[io.Job]]:
        batch: list[io.Job] = []
        for n, raw in self.lines:
            job = self.parse(n, raw)
            if n in self.done:
                io.check_same_pair(*self.done[n], job, self.out)
            batch.append(job)
            if len(batch) == self.size:
                yield from self._unless_done(batch)
                batch = []
        yield from self._unless_done(batch)

    def _unless_done(self, batch: list[io.Job]) -> Iterator[list[io.Job]]:
        if any(job.line not in self.done for job in batch):
            yield batch


class _Images(Dataset):
    """Decodes one job's image into the captioner's and the matcher's inputs (one tensor when both
    models preprocess alike); an unreadable image turns the job into an "image" reject."""

    def __init__(self, cap_transform, itm_transform):
        self.cap, self.itm = cap_transform, itm_transform

    def __getitem__(self, job: io.Job):
        if job.error is not None:
            return job, None, None
        try:
            img = decode_image(job.image)
        except DecodeError as e:
            job.error, job.kind = f"image '{job.record.get('image', job.image)}': {e}", "image"
            return job, None, None
        cap = self.cap(img)
        return job, cap, cap if self.itm is None else self.itm(img)


def _collate(samples: list) -> tuple[list[io.Job], torch.Tensor | None, torch.Tensor | None]:
    jobs = [s[0] for s in samples]
    good = [s for s in samples if s[1] is not None]
    if not good:
        return jobs, None, None
    return jobs, torch.stack([s[1] for s in good]), torch.stack([s[2] for s in good])


def _decode(images: _Images, jobs: list[io.Job]) -> tuple:
    """A Ray task's share of the DataLoader's work: one batch decoded and collated."""
    return _collate([images[job] for job in jobs])


def _check(num_captions: int, top_p: float | None, threshold: float, batch_size: int, lengths) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold is a probability in [0, 1], not {threshold}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], not {top_p}")
    if num_captions < 0:
        raise UsageError(f"--num-captions must be at least 0, not {num_captions}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
    if not 0 <= lengths[1] < lengths[0]:
        raise UsageError(f"need 0 <= --min-length < --max-length, got {lengths[1]} and {lengths[0]}")


def capfilt(
    data: str,
    output: str = "-",
    *,
    captioner: str = "cvfm/tiny-blip",
    matcher: str | None = None,
    rejects: str | None = None,
    num_captions: int = 1,
    top_p: float | None = 0.9,
    prompt: str = "a picture of",
    threshold: float = 0.5,
    max_length: int = 30,
    min_length: int = 5,
    batch_size: int = 32,
    num_workers: int = 2,
    seed: int = 0,
    precision: str = "auto",
    text_column: str = "text",
    image_column: str = "image",
    overwrite: bool = False,
    pretrained: bool = True,
    trust_remote_code: bool = False,
    device: str | None = None,
    engine: Engine | str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Filter the captions of the image-text pairs in `data` (a JSONL file, or "-" for stdin).

    Writes one record per pair to `output` (a .jsonl file, or "-" for stdout) and one reject per unusable
    line to `rejects` (default: `<output stem>.rejects.jsonl` next to a file output; with `output="-"`, JSON
    lines on stderr unless a file is given). A file output resumes: a rerun with the same settings skips
    the lines already in `output` or `rejects`, and (with the same `batch_size`) ends with the lines of an
    uninterrupted run. `on_batch(i)` is called after batch i is written. Returns the summary (over the
    whole output, resumed lines included).

    `engine` "ray" filters the batches on Ray (see `cvfm.runtime.engine`): the same lines, after reading
    the whole input (`data="-"` to a file: all of stdin first; to `output="-"` it is refused).
    """
    return with_engine(_capfilt, locals(), "--in - --out -" if data == output == "-" else None)


def _capfilt(
    data: str,
    output: str,
    *,
    captioner: str,
    matcher: str | None,
    rejects: str | None,
    num_captions: int,
    top_p: float | None,
    prompt: str,
    threshold: float,
    max_length: int,
    min_length: int,
    batch_size: int,
    num_workers: int,
    seed: int,
    precision: str,
    text_column: str,
    image_column: str,
    overwrite: bool,
    pretrained: bool,
    trust_remote_code: bool,
    device: str | None,
    on_batch: Callable[[int], None] | None,
    session: RaySession | None,
) -> dict:
    _check(num_captions, top_p, threshold, batch_size, (max_length, min_length))
    matcher = matcher or captioner
    to_stdout = output == "-"
    if rejects is None and not to_stdout:
        rejects = io.default_rejects(output)
    if rejects == "-":
        raise UsageError("--rejects - is not allowed: stdout carries the output records only")
    if not to_stdout and rejects is not None and Path(rejects).resolve() == Path(output).resolve():
        raise UsageError("--rejects must be another file than --out")
    # The models are loaded here too (a bad id fails before any file is touched; their preprocessing),
    # on the CPU under Ray, whose actors run them on their own device.
    dev = torch.device("cpu" if session is not None else default_device(device))
    amp = session.precision(precision) if session is not None else resolve_precision(precision, dev)
    settings = {
        "cvfm_version": cvfm.__version__,
        "input": data,
        "captioner": captioner,
        "matcher": matcher,
        "pretrained": pretrained,
        "num_captions": num_captions,
        "top_p": top_p,
        "prompt": prompt,
        "threshold": threshold,
        "max_length": max_length,
        "min_length": min_length,
        "seed": seed,
        "precision": precision_name(amp),
        "text_column": text_column,
        "image_column": image_column,
        "rejects": rejects,
    }
    if data != "-" and not Path(data).is_file():
        raise UsageError(f"--in '{data}' is not a file (give a .jsonl of pairs, or - for stdin)")
    done: dict[int, tuple[dict, bool]] = {}
    tally = Tally()
    if to_stdout:
        if rejects and Path(rejects).exists() and Path(rejects).stat().st_size > 0:
            if not overwrite:
                raise UsageError(
                    f"rejects file '{rejects}' exists (a stream does not resume): pass --overwrite"
                )
            Path(rejects).write_bytes(b"")
    else:
        state = io.check_settings(output, rejects, settings, overwrite)
        if state == "resume":
            for rec in io.read_done(output).values():
                done[rec["line"]] = (rec, False)
                try:
                    tally.add_record(rec)
                except (KeyError, TypeError, AttributeError):
                    raise UsageError(
                        f"'{output}' line for input line {rec['line']} is not a capfilt record (no valid "
                        '"scores"): the file is damaged; pass --overwrite to replace it'
                    ) from None
            for rec in io.read_done(rejects).values():
                done[rec["line"]] = (rec, True)
                tally.add_reject(rec)
    cap_model, itm_model = _load(captioner, matcher, pretrained, trust_remote_code, dev)
    if not to_stdout:
        io.start_files(output, rejects, settings, state)
    if session is None and dev.type == "cpu":
        share_cores_with_workers(num_workers)
    cap_pre, itm_pre = cap_model.preprocess, itm_model.preprocess
    images = _Images(cap_pre.transform(), None if itm_pre == cap_pre else itm_pre.transform())
    written = 0
    with ExitStack() as stack:
        if data == "-":
            stream, base, name = own_stdin(binary=True), Path.cwd(), "<stdin>"
        else:
            stream, base, name = stack.enter_context(open(data, "rb")), Path(data).parent, Path(data).name

        def parse(n: int, raw: str) -> io.Job:
            return io.parse(n, raw, base, name, image_column, text_column)

        sink = io.Sink(None, sys.stdout) if to_stdout else io.Sink(output)
        bad = io.Sink(rejects) if rejects else io.Sink(None, sys.stderr)
        stack.callback(sink.close)
        stack.callback(bad.close)
        log(
            f"capfilt: {captioner} captions ({num_captions} per pair, top-p {top_p}), {matcher} scores, "
            f"threshold {threshold}, on {'Ray' if session is not None else dev} ({precision_name(amp)})"
            + (f"; {len(done)} lines already done" if done else "")
        )
        gen = dict(
            seed=seed,
            num_captions=num_captions,
            top_p=top_p,
            prompt=prompt,
            max_length=max_length,
            min_length=min_length,
        )
        if session is None:
            step = _Filter(cap_model, itm_model, dev, amp, threshold, gen)
            loaders = (
                DataLoader(
                    images,
                    batch_sampler=_Batches(chunk, parse, done, output, batch_size),
                    num_workers=num_workers,
                    collate_fn=_collate,
                    pin_memory=dev.type == "cuda",
                )
                for chunk in _chunks(stream, data == "-", batch_size)
            )
            results = (step(batch) for loader in loaders for batch in loader)
        else:
            if data == "-":
                log("capfilt: --engine ray reads all of standard input first")
            units = list(_Batches(io.read_lines(stream), parse, done, output, batch_size))
            spec = (captioner, matcher, pretrained, trust_remote_code, precision_name(amp), threshold, gen)
            build = functools.partial(_Filter.load, *spec)
            results = (out for _, out in session.map(units, functools.partial(_decode, images), build))
        try:
            for batch, (records, failed) in enumerate(results):
                records = [r for r in records if r["line"] not in done]
                failed = [r for r in failed if r["line"] not in done]
                sink.write(records)
                bad.write(failed)
                for r in records:
                    tally.add_record(r)
                for r in failed:
                    tally.add_reject(r)
                written += len(records) + len(failed)
                if on_batch is not None:
                    on_batch(batch)
        except KeyboardInterrupt:
            if not to_stdout:
                log(f"capfilt: interrupted after {written} new lines; the same command finishes the rest")
            raise
    summary = {"input": data, "output": output, "rejects_file": rejects, **tally.as_dict()}
    summary.update(
        written=written,
        already_done=len(done),
        captioner=captioner,
        matcher=matcher,
        threshold=threshold,
        num_captions=num_captions,
        precision=precision_name(amp),
    )
    return summary


def _load(captioner: str, matcher: str, pretrained: bool, trust_remote_code: bool, dev: torch.device):
    """Both models, in eval mode on `dev`; random inits are seeded, so every run builds the same ones."""
    from cvfm.registry import create_captioner, create_matcher

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(0)
        cap = create_captioner(captioner, pretrained=pretrained, trust_remote_code=trust_remote_code)
        torch.manual_seed(0)
        itm = create_matcher(matcher, pretrained=pretrained, trust_remote_code=trust_remote_code)
    return cap.eval().to(dev), itm.eval().to(dev)


@dataclass
class _Filter:
    """The models' half of a batch: output records of its good jobs and rejects of the others, in input
    order each."""

    cap: object
    itm: object
    dev: torch.device
    amp: torch.dtype | None
    threshold: float
    gen: dict

    @classmethod
    def load(
        cls, captioner, matcher, pretrained, trust_remote_code, precision: str, threshold, gen
    ) -> _Filter:
        """On a Ray actor: both models on the actor's device, at the driver's resolved precision."""
        dev = torch.device(default_device())
        models = _load(captioner, matcher, pretrained, trust_remote_code, dev)
        return cls(*models, dev, resolve_precision(precision, dev), threshold, gen)

    @torch.inference_mode()
    def __call__(self, batch: tuple) -> tuple[list, list]:
        jobs, cap_px, itm_px = batch
        good = [j for j in jobs if j.error is None]
        failed = [j.reject() for j in jobs if j.error is not None]
        if not good:
            return [], failed
        dev = self.dev
        with autocast(dev, self.amp):
            cap_px = cap_px.to(dev, non_blocking=True)
            itm_px = cap_px if itm_px is None else itm_px.to(dev, non_blocking=True)
            synthetic = sample_captions(self.cap, cap_px, [j.id for j in good], **self.gen)
            texts = [[j.text, *s] for j, s in zip(good, synthetic, strict=True)]
            scores = itm_scores(self.itm, itm_px, texts)
        records = [
            io.output_record(j, filter_captions(j.text, syn, sc[0], sc[1:], self.threshold))
            for j, syn, sc in zip(good, synthetic, scores, strict=True)
        ]
        return records, failed
