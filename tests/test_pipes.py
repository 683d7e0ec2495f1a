"""Unix pipes, the way a shell runs cvfm: a reader that stops early (`| head -1`) ends a streaming
command quietly with status 0, and records flow while the writer of stdin is still writing (`find |`).
Every test runs `cvfm` in a new process on real pipes."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cvfm.unlearn.ledger import Ledger

CVFM = [sys.executable, "-m", "cvfm"]
ROOT = Path(__file__).resolve().parents[1]
FIRST_LINE_S = 240  # a cold start on a loaded 2-core machine (imports, model) is slow; data then flows


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def _quiet(stderr: str) -> None:
    """Normal logs only: no traceback, no 'Exception ignored' from a last flush."""
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def cvfm(command: str, *paths: Path) -> list[str]:
    """The command line of `cvfm COMMAND PATHS...`."""
    return [*CVFM, *command.split(), *map(str, paths)]


class Running:
    """`cvfm COMMAND` with pipes on stdin and stdout; its output lines are read as they come."""

    def __init__(self, command: str, cwd: Path = ROOT):
        self.p = subprocess.Popen(
            cvfm(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=cwd,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def write(self, lines: list[str]) -> None:
        self.p.stdin.write("".join(f"{line}\n" for line in lines))
        self.p.stdin.flush()

    def records(self, n: int, timeout: float = FIRST_LINE_S) -> list[dict]:
        """The next `n` output records; fails if they do not come within `timeout` seconds."""
        out = []
        for _ in range(n):
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                self.p.kill()
                pytest.fail(f"no output within {timeout} s after {len(out)} records: {self.p.stderr.read()}")
            assert line is not None, f"output ended after {len(out)} records: {self.p.stderr.read()}"
            out.append(json.loads(line))
        return out

    def finish(self) -> tuple[list[dict], str]:
        """Close stdin; the remaining records and stderr, after a 0 exit."""
        self.p.stdin.close()
        rest = []
        while (line := self.lines.get(timeout=FIRST_LINE_S)) is not None:
            rest.append(json.loads(line))
        err = self.p.stderr.read()
        assert self.p.wait(timeout=60) == 0, err
        return rest, err


# ------------------------------------------------------------------------------ a reader that stops early


@pytest.fixture(scope="module")
def paths(digit_folder) -> list[str]:
    return sorted(str(p) for p in digit_folder.rglob("*.png"))  # 160 images


def test_head_1_under_pipefail_exits_0(paths):
    """The issue's command: `find ... | cvfm embed MODEL --data - -o - | head -1` under `set -o pipefail`
    (160 records of ~2.7 kB: far more than a pipe holds, so cvfm writes after head has gone)."""
    script = "cvfm embed cvfm/tiny-resnet --data - -o - --batch-size 4 --num-workers 1 | head -1"
    r = subprocess.run(
        ["bash", "-o", "pipefail", "-c", script.replace("cvfm", " ".join(CVFM), 1)],
        input="".join(f"{p}\n" for p in paths),
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["image"] == paths[0]  # exactly one whole record
    _quiet(r.stderr)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory) -> Path:
    """A ledger of 1500 entries: its --json listing (~150 kB) overflows a pipe."""
    path = tmp_path_factory.mktemp("ledger") / "ledger.jsonl"
    lines = [json.dumps({"request_id": f"q{i}", "method": "ft", "forget_ids": ["x"]}) for i in range(1500)]
    path.write_text("\n".join(lines) + "\n")
    assert len(Ledger(path).entries()) == 1500
    return path


@pytest.fixture(scope="module")
def pairs(digit_folder, tmp_path_factory) -> Path:
    """A capfilt input: 6 image-text pairs."""
    images = sorted((digit_folder / "test").rglob("*.png"))[:6]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text(
        "".join(json.dumps({"image": str(p), "text": f"digit {i}"}) + "\n" for i, p in enumerate(images))
    )
    return path


STREAMING = {  # what each streaming subcommand prints to stdout, from {folder}, {ledger} and {pairs}
    "models": "models --json",
    "unlearn ledger": "unlearn ledger {ledger} --json",
    "embed": "embed cvfm/tiny-resnet --data {folder}/test -o - -b 4 --num-workers 1",
    "caption": "caption cvfm/tiny-blip --data {folder}/test -o - -b 4 --num-workers 1 --num-beams 1 "
    "--max-length 5 --min-length 1",
    "capfilt": "capfilt --in {pairs} --out - -b 2 --num-workers 1 --max-length 5 --min-length 1",
    "evaluate": "evaluate knn cvfm/pixels --data {folder} --num-workers 0 --k 3",
}


CHEAP = ("models", "unlearn ledger")  # no model to load; the others run with -m slow (~10 s each)


@pytest.mark.parametrize(
    "command", [c if c in CHEAP else pytest.param(c, marks=pytest.mark.slow) for c in STREAMING]
)
def test_a_reader_that_closes_stdout_early_is_not_a_failure(command, digit_folder, ledger, pairs):
    """The reader of stdout is gone before the first record: every write meets a broken pipe, and each
    streaming subcommand still ends with 0 and no traceback."""
    command = STREAMING[command].format(folder=digit_folder, ledger=ledger, pairs=pairs)
    p = subprocess.Popen(cvfm(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
    p.stdout.close()  # before cvfm has started: nothing it writes can be read
    err = p.stderr.read().decode()
    assert p.wait(timeout=600) == 0, err
    _quiet(err)


# -------------------------------------------------------------------------- records flow while stdin is open


def test_embed_prints_records_before_stdin_ends_and_matches_the_folder_output(paths, digit_folder, tmp_path):
    """`--data - -o -` embeds whole batches as their lines arrive; its records carry the parquet
    metadata's fields (id = the path as given, the image path, a null label) and the same embeddings as
    the folder output, which reads the whole input first."""
    given = [os.path.relpath(p, digit_folder) for p in paths[:7]]  # relative, as `find .` gives them
    command = "embed cvfm/tiny-resnet --data - -b 2 --num-workers 1 --precision fp32 -o"
    run = Running(f"{command} -", cwd=digit_folder)
    run.write(given[:4])
    early = run.records(4)  # two whole batches, while stdin is still open
    run.write(given[4:])
    rest, err = run.finish()
    streamed = early + rest
    assert [r["id"] for r in streamed] == given
    assert [r["image"] for r in streamed] == paths[:7]
    assert all(r["label"] is None for r in streamed)
    _quiet(err)

    folder = tmp_path / "emb"
    listed = "".join(f"{p}\n" for p in given)
    r = subprocess.run(
        cvfm(command, folder), input=listed, capture_output=True, text=True, env=_env(), cwd=digit_folder
    )
    assert r.returncode == 0, r.stderr
    meta = pq.read_table(folder / "metadata" / "metadata_0.parquet")
    assert meta.column_names == [k for k in streamed[0] if k != "image_embedding"]
    assert meta.to_pylist() == [{k: v for k, v in s.items() if k != "image_embedding"} for s in streamed]
    assert str(meta.schema.field("label").type) == "int64"  # nullable: every label is null here
    embeddings = np.load(folder / "img_emb" / "img_emb_0.npy")
    np.testing.assert_allclose(embeddings, [s["image_embedding"] for s in streamed], atol=1e-6)


@pytest.mark.slow
def test_caption_prints_before_stdin_ends_with_the_captions_of_a_file_run(paths, tmp_path):
    """Sampled captions depend on the batch grid (one seed per batch): a pipe is cut into whole batches
    of the grid, so it gets the captions of a run that read the whole list."""
    given = paths[:5]
    opts = "-b 2 --top-p 0.9 --max-length 6 --min-length 1 --precision fp32"
    run = Running(f"caption cvfm/tiny-blip --data - -o - --num-workers 1 {opts}")
    run.write(given[:2])
    early = run.records(2)
    run.write(given[2:])
    rest, err = run.finish()
    _quiet(err)

    manifest = tmp_path / "list.jsonl"
    manifest.write_text("".join(json.dumps({"id": p, "image": p}) + "\n" for p in given))
    out = tmp_path / "captions.jsonl"
    command = f"caption cvfm/tiny-blip --num-workers 0 {opts} --data"
    r = subprocess.run(cvfm(command, manifest, "-o", out), capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert early + rest == [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.slow
def test_capfilt_prints_before_stdin_ends(pairs):
    lines = pairs.read_text().splitlines()
    run = Running(
        "capfilt --in - --out - -b 2 --num-workers 1 --max-length 5 --min-length 1 --precision fp32"
    )
    run.write(lines[:2])
    early = run.records(2)
    run.write(lines[2:])
    rest, err = run.finish()
    assert [r["line"] for r in early + rest] == [1, 2, 3, 4, 5, 6]
    assert [r["id"] for r in early] == ["<stdin>:1", "<stdin>:2"]
    _quiet(err)


# ---------------------------------------------------------------------------------------------- exit codes


@pytest.fixture
def piped_stdin(monkeypatch):
    """`feed(text)`: standard input becomes a real pipe holding `text`, then its end."""

    def feed(text: str) -> None:
        read, write = os.pipe()
        os.write(write, text.encode())
        os.close(write)
        monkeypatch.setattr(sys, "stdin", os.fdopen(read))

    return feed


@pytest.mark.parametrize("command", ["embed cvfm/tiny-resnet", "caption cvfm/tiny-blip"])
def test_followed_stdin_exit_codes_usage_2_runtime_1(cli, piped_stdin, command, tmp_path):
    """Through the followed path: an input without images is a usage error (2), an unreadable image
    with --strict a runtime failure (1): nothing on stdout, one error line (after the logs), no traceback."""
    args = [*command.split(), "--data", "-", "-o", "-", "--num-workers", "0", "--precision", "fp32"]
    piped_stdin("\n\n")
    empty = cli(*args)
    piped_stdin(f"{tmp_path / 'gone.png'}\n")
    missing = cli(*args, "--strict")
    for r, code, needle in ((empty, 2, "data source '-' holds no images"), (missing, 1, "gone.png")):
        errors = [line for line in r.err.splitlines() if line.startswith("cvfm: error:")]
        assert (r.code, r.out, len(errors)) == (code, "", 1) and needle in errors[0], r.err
        assert "Traceback" not in r.err
