"""`--engine ray`: the Ray engine writes what the local engine writes (same files, rows, order, resume
markers), a killed Ray run resumes, and the engine options are checked before anything starts.

Each Ray run starts (and stops) a real embedded Ray, about 15-20 s on two cores: the default suite has
two of them, a killed run and its resume (which also checks what a fresh run does: the same files as the
local engine); the slow tests the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from clitools import assert_usage_error

ROOT = Path(__file__).resolve().parents[1]
PART_SIZE = 5
N_FILES = 13  # 12 images and one corrupt file: 3 parts of 5 rows (the last short)
OPTS = ["--part-size", str(PART_SIZE), "--batch-size", "2", "--num-workers", "0", "--precision", "fp32"]

pytest.importorskip("ray")


def _env() -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Odd-sized, non-square PNG and JPEG photos (random pixels) and one file that is not an image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(N_FILES - 1):
        w, h = int(rng.integers(17, 90)), int(rng.integers(17, 90))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    (root / "06_broken.jpg").write_bytes(b"\xff\xd8 not a JPEG after all")
    return root


def _embed_cli(photos: Path, out: Path, *extra: str) -> list[str]:
    return ["embed", "cvfm/tiny-clip", "--data", str(photos), "-o", str(out), *OPTS, *extra]


def _read(out: Path) -> dict:
    """Every file of an output folder: arrays, metadata tables (with their resume markers), embed.json."""
    import pyarrow.parquet as pq

    parts = sorted(int(p.stem.split("_")[1]) for p in (out / "metadata").glob("metadata_*.parquet"))
    return {
        "parts": parts,
        "config": json.loads((out / "embed.json").read_text()),
        "meta": [pq.read_table(out / "metadata" / f"metadata_{p}.parquet") for p in parts],
        "image": [np.load(out / "img_emb" / f"img_emb_{p}.npy") for p in parts],
    }


def _assert_same_output(got: dict, want: dict) -> None:
    assert got["parts"] == want["parts"] == [0, 1, 2]
    assert got["config"] == want["config"]  # either engine resumes the other's folder
    for a, b in zip(got["meta"], want["meta"], strict=True):
        assert a.equals(b) and a.schema.metadata == b.schema.metadata  # rows, order, resume marker
    for a, b in zip(got["image"], want["image"], strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.fixture(scope="module")
def local_run(photos, tmp_path_factory) -> dict:
    """The local engine's output and summary on the photos."""
    from cvfm.embed import embed

    out = tmp_path_factory.mktemp("local") / "emb"
    opts = {"part_size": PART_SIZE, "batch_size": 2, "num_workers": 0, "precision": "fp32"}
    summary = embed("cvfm/tiny-clip", str(photos), str(out), **opts)
    assert summary["rows"] == N_FILES - 1 and len(summary["skipped"]) == 1
    return {"summary": summary, **_read(out)}


def test_a_killed_ray_run_resumes(cli, photos, local_run, tmp_path, monkeypatch):
    """`cvfm embed --engine ray` in its own process, frozen once its first part is on disk and killed
    (SIGKILL): whole parts stay. The same command, run again here (another process, a real embedded Ray
    that it starts and stops), computes only the missing parts and ends with the local engine's files:
    the same parts, rows in the same order, embeddings within fp tolerance, the same resume markers and
    the same summary (the corrupt file skipped and named)."""
    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "cvfm", *_embed_cli(photos, out, "--engine", "ray")]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = out / "metadata" / "metadata_0.parquet"
    deadline = time.monotonic() + 180
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)  # frozen right after its first part
    assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
    proc.kill()
    proc.communicate(timeout=60)
    done = sorted(int(p.stem.split("_")[1]) for p in (out / "metadata").glob("metadata_*.parquet"))
    assert 1 <= len(done) < 3, done
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob(f"*_{done[0]}.*")}
    assert len(kept) == 2  # the first part's embeddings and its metadata (with the resume marker)

    for name, value in _env().items():
        if name in ("OMP_NUM_THREADS", "RAY_USAGE_STATS_ENABLED"):
            monkeypatch.setenv(name, value)
    r = cli(*_embed_cli(photos, out, "--engine", "ray"))
    assert r.code == 0, r.err
    assert kept == {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept}  # left as they were
    summary = json.loads(r.out)
    assert summary["parts"] == {"total": 3, "owned": 3, "written": 3 - len(done), "already_done": len(done)}
    want = {k: v for k, v in local_run["summary"].items() if k not in ("output", "parts")}
    assert {k: v for k, v in summary.items() if k not in ("output", "parts")} == want
    assert [s["where"] for s in summary["skipped"]] == [str(photos / "06_broken.jpg")]
    _assert_same_output(_read(out), local_run)

    import ray

    assert not ray.is_initialized()  # the embedded Ray was shut down


@pytest.mark.slow
def test_ray_engine_writes_what_the_local_engine_writes(cli, photos, local_run, tmp_path, monkeypatch):
    """A fresh run, in this process: the same files and summary as the local engine (the resume test
    above checks the same of a killed and resumed run, in the default suite)."""
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "emb"
    r = cli(*_embed_cli(photos, out, "--engine", "ray"))
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert {**summary, "output": None} == {**local_run["summary"], "output": None}
    _assert_same_output(_read(out), local_run)


# ---------------------------------------------------------------------------- refused before Ray starts


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--address", "auto"], "need --engine ray"),
        (["--actors", "2"], "need --engine ray"),
        (["--engine", "spark"], "--engine must be one of local, ray"),
    ],
)
def test_engine_options_are_checked(cli, photos, tmp_path, extra, needle):
    out = tmp_path / "emb"
    assert_usage_error(cli(*_embed_cli(photos, out, *extra)), needle)
    assert not out.exists()


def test_ray_missing_is_a_usage_error_naming_the_extra(cli, photos, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "emb"
    assert_usage_error(cli(*_embed_cli(photos, out, "--engine", "ray")), "pip install 'cvfm[ray]'")
    assert not out.exists()


def test_ray_refuses_what_it_cannot_do(cli, photos, tmp_path):
    """Following stdin to stdout, and several launcher processes (Ray is one driver)."""
    from cvfm.embed import embed
    from cvfm.errors import UsageError

    r = cli("embed", "cvfm/tiny-clip", "--data", "-", "-o", "-", "--engine", "ray")
    assert_usage_error(r, "--engine ray", "local")
    with pytest.raises(UsageError, match="one driver"):
        embed("cvfm/tiny-clip", str(photos), str(tmp_path / "emb"), rank=0, world_size=2, engine="ray")
    assert not (tmp_path / "emb").exists()


def test_ray_is_not_imported_by_cvfm():
    """`cvfm --help` and the library stay fast: Ray is imported only when --engine ray runs."""
    code = (
        "import sys; import cvfm.cli.app as a; a._register(); import cvfm.runtime.engine; "
        "sys.exit('ray' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT).returncode == 0


# ------------------------------------------------------------------------------------------ the others


@pytest.mark.slow
def test_ray_captions_equal_the_local_engines(photos, tmp_path, monkeypatch):
    """`caption --engine ray` with nucleus sampling (seeded per batch of the grid): the same lines, the
    same rejects and the same settings sidecar as the local engine."""
    from cvfm.caption import caption

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    opts = {"batch_size": 3, "num_workers": 0, "precision": "fp32", "max_length": 10, "min_length": 2}
    opts.update(top_p=0.9, num_captions=2, seed=3)
    outs = {e: tmp_path / f"{e}.jsonl" for e in ("local", "ray")}
    sums = {e: caption("cvfm/tiny-blip", str(photos), str(outs[e]), engine=e, **opts) for e in outs}
    assert sums["ray"] == {**sums["local"], "output": str(outs["ray"])}
    for suffix in ("", ".rejects", ".json"):
        local, ray = (Path(f"{outs[e]}{suffix}").read_text() for e in ("local", "ray"))
        assert local == ray and local, suffix
    assert len(outs["ray"].read_text().splitlines()) == N_FILES - 1


@pytest.mark.slow
def test_ray_segment_auto_equals_the_local_engines(cli, photos, tmp_path, monkeypatch):
    """`segment auto --engine ray` (amg format, 2 images a batch): the same files, byte for byte, and the
    same summary (the corrupt file skipped and named)."""
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    knobs = ["--points-per-side", "6", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
    base = ["segment", "auto", "cvfm/tiny-sam", "--data", str(photos), "--images-per-batch", "2", *knobs]
    results = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        r = cli(*base, "-o", str(out), "--engine", engine)
        assert r.code == 0, r.err
        files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        results[engine] = ({k: v for k, v in json.loads(r.out).items() if k != "output"}, files)
    assert results["ray"] == results["local"]
    summary, files = results["ray"]
    assert summary["images"] == N_FILES - 1 and len(summary["skipped"]) == 1 and summary["masks"] > 0
    assert len(files) > N_FILES  # a metadata.csv per image, and masks
