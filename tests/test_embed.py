"""`cvfm embed`: the part layout and its row alignment, sharding and multi-process splits, resume after an
interrupted run, refusals, stdin -> stdout, texts, unreadable images, precision resolution.

Values are compared in fp32 (`precision="fp32"`): the model called directly on the same preprocessed
input must give the same embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import assert_usage_error

from cvfm.data.decode import decode_image
from cvfm.data.sources import open_source
from cvfm.embed import embed
from cvfm.embed.plan import PartBatchSampler, Plan
from cvfm.errors import UsageError
from cvfm.registry import create_dual_encoder, create_encoder
from cvfm.runtime import precision as precision_module
from cvfm.runtime.precision import resolve_precision

ROOT = Path(__file__).resolve().parents[1]
N_PAIRS = 23  # 3 parts of 10 (the last one short)


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """One intra-op thread (OMP_NUM_THREADS makes `embed` keep it): on a small shared CPU, a second
    thread waiting for a busy core made these tiny models up to 8x slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def _tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _read(out: Path, modalities=("image", "text")) -> dict:
    """All parts of an output folder, concatenated in part order."""
    import pyarrow.parquet as pq

    parts = sorted(int(p.stem.split("_")[1]) for p in (out / "metadata").glob("metadata_*.parquet"))
    meta = [pq.read_table(out / "metadata" / f"metadata_{p}.parquet").to_pydict() for p in parts]
    result = {"parts": parts, "meta": {k: [v for m in meta for v in m[k]] for k in meta[0]} if meta else {}}
    folders = {"image": ("img_emb", "img_emb"), "text": ("text_emb", "text_emb")}
    for m in modalities:
        sub, stem = folders[m]
        result[m] = np.concatenate([np.load(out / sub / f"{stem}_{p}.npy") for p in parts])
    return result


def _part_info(out: Path, part: int) -> dict:
    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(out / "metadata" / f"metadata_{part}.parquet").metadata[b"cvfm"])


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> Path:
    """`pairs.jsonl`: 23 image-caption pairs (tinted digits as PNG files) with ids, labels, captions."""
    from PIL import Image

    src = open_source("builtin:digits-captions", split="test", text_column="caption")
    root = tmp_path_factory.mktemp("pairs")
    lines = []
    for j in range(N_PAIRS):
        item = src.items[j]
        path = root / "img" / f"{j:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(src.pixels[item.ref]).save(path)
        rec = {"id": f"pair-{j:03d}", "image": f"img/{j:03d}.png", "label": item.label, "caption": item.text}
        lines.append(json.dumps(rec))
    manifest = root / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _embed_pairs(pairs: Path, out, **kw) -> dict:
    args = {"text_column": "caption", "part_size": 10, "batch_size": 4, "num_workers": 0, "precision": "fp32"}
    return embed("cvfm/tiny-clip", str(pairs), str(out), **{**args, **kw})


@pytest.fixture(scope="session")
def reference(pairs, tmp_path_factory) -> dict:
    """One uninterrupted single-process run over the pairs (images and texts, fp32, parts of 10)."""
    out = tmp_path_factory.mktemp("reference") / "emb"
    summary = _embed_pairs(pairs, out)
    return {"summary": summary, "out": out, **_read(out)}


# ------------------------------------------------------------------------------------ layout, values


def test_layout_rows_align_with_the_source_and_equal_the_model(pairs, reference):
    out, summary = reference["out"], reference["summary"]
    assert summary["rows"] == N_PAIRS and summary["dims"] == {"image": 64, "text": 64}
    assert summary["parts"] == {"total": 3, "owned": 3, "written": 3, "already_done": 0}
    assert summary["skipped"] == [] and summary["precision"] == "fp32"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "embed.json",
        *[f"img_emb/img_emb_{p}.npy" for p in range(3)],
        *[f"metadata/metadata_{p}.parquet" for p in range(3)],
        *[f"text_emb/text_emb_{p}.npy" for p in range(3)],
    ]
    # Part p holds rows [10p, 10p + 10); row i of every file describes source row i.
    assert [len(np.load(out / "img_emb" / f"img_emb_{p}.npy")) for p in range(3)] == [10, 10, 3]
    assert [len(np.load(out / "text_emb" / f"text_emb_{p}.npy")) for p in range(3)] == [10, 10, 3]
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    meta = reference["meta"]
    assert list(meta) == ["id", "image", "label", "caption"]
    assert meta["id"] == [r["id"] for r in records]
    assert meta["caption"] == [r["caption"] for r in records]
    assert meta["label"] == [r["label"] for r in records]
    assert meta["image"] == [str(pairs.parent / r["image"]) for r in records]
    assert reference["image"].dtype == np.float32 and reference["image"].shape == (N_PAIRS, 64)

    # The same numbers as the model called directly (same seed-0 weights, same preprocessing).
    torch.manual_seed(0)
    dual = create_dual_encoder("cvfm/tiny-clip").eval()
    pixels = torch.stack([dual.preprocess.transform()(decode_image(p)) for p in meta["image"]])
    with torch.no_grad():
        img = torch.nn.functional.normalize(dual.encode_image(pixels), dim=-1).numpy()
        txt = torch.nn.functional.normalize(dual.encode_text(dual.tokenizer(meta["caption"])), dim=-1).numpy()
    np.testing.assert_allclose(reference["image"], img, atol=2e-5)
    np.testing.assert_allclose(reference["text"], txt, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(reference["text"], axis=1), 1.0, atol=1e-5)

    config = json.loads((out / "embed.json").read_text())
    assert config["format"] == "cvfm-embed" and config["model"] == "cvfm/tiny-clip"
    assert config["num_rows"] == N_PAIRS and config["num_parts"] == 3 and config["part_size"] == 10
    assert config["modalities"] == ["image", "text"] and config["text_column"] == "caption"
    assert config["precision"] == "fp32" and config["normalize"] is True


def test_json_lines_carry_the_same_rows_and_values(pairs, reference, capsys):
    capsys.readouterr()
    summary = _embed_pairs(pairs, "-", batch_size=5)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert summary["rows"] == N_PAIRS and summary["parts"]["written"] == 3
    assert [r["id"] for r in rows] == reference["meta"]["id"]
    meta = reference["meta"]  # each line carries the parquet metadata of its row
    assert list(rows[0]) == [*meta, "image_embedding", "text_embedding"]
    assert [[r[k] for k in meta] for r in rows] == [list(row) for row in zip(*meta.values(), strict=True)]
    np.testing.assert_allclose([r["image_embedding"] for r in rows], reference["image"], atol=1e-6)
    np.testing.assert_allclose([r["text_embedding"] for r in rows], reference["text"], atol=1e-6)


# ------------------------------------------------------------------------------ shards and processes


def test_plan_owners_partition_the_parts():
    plan = Plan(num_rows=95, part_size=10)
    assert plan.num_parts == 10 and plan.rows(9) == range(90, 95)
    for shards, world in ((1, 1), (2, 1), (3, 1), (2, 2), (3, 2)):
        owned = [plan.owned(k, shards, r, world) for k in range(shards) for r in range(world)]
        flat = sorted(p for o in owned for p in o)
        assert flat == list(range(10)), (shards, world)
    assert plan.owned(1, 2, 1, 2) == [3, 7]  # shard 1, process 1 of 2: p % 4 == 1 * 2 + 1
    sampler = PartBatchSampler(plan, [3, 9], batch_size=4)
    assert list(sampler) == [[30, 31, 32, 33], [34, 35, 36, 37], [38, 39], [90, 91, 92, 93], [94]]
    assert list(sampler.steps()) == [(3, False), (3, False), (3, True), (9, False), (9, True)]
    assert len(sampler) == 5
    with pytest.raises(UsageError, match="--shard-id"):
        plan.owned(2, 2)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_part_is_held_once_in_the_output_dtype(tmp_path, dtype):
    """numpy reports its buffers to tracemalloc: while 1,000 rows of 1024-d embeddings arrive in batches
    of 100 and are written, the peak is one part's array in the output dtype plus a batch or two (not the
    batches, their concatenation and a dtype copy: 3x a float32 part)."""
    import tracemalloc

    from cvfm.data.sources import ImageSource, Item
    from cvfm.embed.folder import EmbedFolder
    from cvfm.embed.writers import PartWriter

    rows, dim, batch = 1000, 1024, 100
    source = ImageSource("mem", [Item(f"r{i}", -1, f"r{i}.png") for i in range(rows)])
    folder = EmbedFolder(tmp_path / "emb", {"dtype": dtype}, ("image",))
    writer = PartWriter(folder, source, {"image": dim}, Plan(rows, rows), dtype)
    warm_up = PartWriter(folder, source, {"image": dim}, Plan(rows, 1), dtype)  # lazy imports, not traced
    warm_up.add(1, [1], {"image": np.zeros((1, dim), np.float32)})
    warm_up.finish(1, [])
    rng = np.random.default_rng(0)
    tracemalloc.start()
    for start in range(0, rows, batch):
        writer.add(0, list(range(start, start + batch)), {"image": rng.random((batch, dim), np.float32)})
    writer.finish(0, [])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    part_bytes = rows * dim * np.dtype(dtype).itemsize
    assert peak < part_bytes + 3 * batch * dim * 4
    written = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy")
    expected = np.random.default_rng(0)
    want = np.concatenate([expected.random((batch, dim), np.float32) for _ in range(rows // batch)])
    assert written.dtype == np.dtype(dtype) and written.shape == (rows, dim)
    np.testing.assert_array_equal(written, want.astype(dtype))


@pytest.mark.parametrize("num_shards", [2, 3])
def test_shards_together_cover_every_row_once(pairs, reference, tmp_path, num_shards):
    out = tmp_path / "emb"
    for k in range(num_shards):
        summary = _embed_pairs(pairs, out, shard_id=k, num_shards=num_shards)
        mine = [p for p in range(3) if p % num_shards == k]
        assert summary["parts"]["owned"] == summary["parts"]["written"] == len(mine)
        if k == 0:  # each shard writes only the parts it owns
            assert sorted(_read(out)["parts"]) == mine
    got = _read(out)
    assert got["parts"] == [0, 1, 2]
    assert (
        got["meta"]["id"] == reference["meta"]["id"]
    )  # the whole source, in order: none missing, none twice
    assert len(set(got["meta"]["id"])) == N_PAIRS
    np.testing.assert_array_equal(got["image"], reference["image"])
    np.testing.assert_array_equal(got["text"], reference["text"])


def test_processes_of_shards_split_the_parts(pairs, reference, tmp_path):
    """2 shards x 2 processes (rank/world given explicitly, as a launcher would): 4 owners of 3 parts."""
    out = tmp_path / "emb"
    owned = {}
    for k in range(2):
        for r in range(2):
            s = _embed_pairs(pairs, out, shard_id=k, num_shards=2, rank=r, world_size=2)
            owned[k, r] = s["parts"]["written"]
    assert owned == {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 0}  # part p -> p % 4
    got = _read(out)
    assert got["meta"]["id"] == reference["meta"]["id"]
    np.testing.assert_array_equal(got["image"], reference["image"])


def test_torchrun_two_processes_split_the_rows(pairs, reference, tmp_path):
    """Two real processes under torchrun (gloo on CPU): one summary line, every row once."""
    out = tmp_path / "emb"
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    cmd += ["-m", "cvfm", "embed", "cvfm/tiny-clip", "--data", pairs, "--text-column", "caption", "-o", out]
    cmd += ["--part-size", "10", "--batch-size", "4", "--num-workers", "0", "--precision", "fp32"]
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, p.stdout
    assert lines[0]["rows"] == N_PAIRS and lines[0]["processes"] == 2
    assert lines[0]["parts"] == {"total": 3, "owned": 3, "written": 3, "already_done": 0}
    got = _read(out)
    assert got["meta"]["id"] == reference["meta"]["id"]
    np.testing.assert_allclose(got["image"], reference["image"], atol=1e-6)


# ------------------------------------------------------------------------------------------- resume


class Killed(Exception):
    pass


def test_resume_after_an_interrupted_run_computes_only_the_missing_parts(pairs, reference, tmp_path, capsys):
    out = tmp_path / "emb"

    def die_after_first(part):
        raise Killed(part)

    with pytest.raises(Killed):
        _embed_pairs(pairs, out, on_part=die_after_first)
    assert _read(out)["parts"] == [0]  # part 0 complete, nothing of parts 1-2
    assert not (out / "img_emb" / "img_emb_1.npy").exists()

    computed = []
    summary = _embed_pairs(pairs, out, on_part=computed.append)
    assert computed == [1, 2]
    assert summary["parts"] == {"total": 3, "owned": 3, "written": 2, "already_done": 1}
    assert summary["rows"] == N_PAIRS
    assert "1 already done" in capsys.readouterr().err
    got = _read(out)
    assert got["meta"] == reference["meta"]
    np.testing.assert_array_equal(got["image"], reference["image"])
    np.testing.assert_array_equal(got["text"], reference["text"])

    # A finished run does nothing on rerun, and says so.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = _embed_pairs(pairs, out, on_part=computed.append)
    assert computed == [1, 2]
    assert again["parts"]["already_done"] == 3 and again["parts"]["written"] == 0
    assert again["rows"] == N_PAIRS and again["dims"] == {"image": 64, "text": 64}
    assert "nothing to do" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.slow
def test_sigterm_leaves_whole_parts_and_a_rerun_finishes(tmp_path):
    """A real process stopped by SIGTERM after its first part (of 18, one image a batch): it says so, exits
    130, leaves only complete parts on disk, and rerunning the same command finishes with the same arrays
    as an uninterrupted run."""
    out = tmp_path / "emb"
    opts = {"split": "test", "part_size": 20, "batch_size": 1, "num_workers": 0, "precision": "fp32"}
    cmd = [sys.executable, "-m", "cvfm", "embed", "cvfm/tiny-resnet", "--data", "builtin:digits", "-o", out]
    cmd += [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = out / "metadata" / "metadata_0.parquet"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)  # frozen right after its first part: it cannot finish before SIGTERM
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()  # stopped early, not finished before the signal landed
    done = _read(out, ("image",))["parts"]
    assert b"interrupted after" in err and 1 <= len(done) < 18
    for p in done:  # whatever is on disk is whole: 359 rows in 17 parts of 20 and one of 19
        assert len(np.load(out / "img_emb" / f"img_emb_{p}.npy")) == (20 if p < 17 else 19)
    summary = embed("cvfm/tiny-resnet", "builtin:digits", str(out), **opts)  # the same command again
    assert summary["parts"]["already_done"] == len(done) and summary["rows"] == 359
    assert summary["parts"]["written"] == 18 - len(done)
    embed("cvfm/tiny-resnet", "builtin:digits", str(tmp_path / "ref"), **opts)
    a, b = _read(out, ("image",)), _read(tmp_path / "ref", ("image",))
    assert a["meta"] == b["meta"] and a["parts"] == list(range(18))
    np.testing.assert_array_equal(a["image"], b["image"])


# ------------------------------------------------------------------------------------------ refusals


def test_another_configuration_or_a_foreign_folder_is_refused_unless_overwrite(cli, pairs, tmp_path):
    out = tmp_path / "emb"
    base = (
        "embed",
        "cvfm/tiny-clip",
        "--data",
        pairs,
        "-o",
        out,
        "--num-workers",
        "0",
        "--precision",
        "fp32",
    )
    assert cli(*base, "--part-size", "5").code == 0
    assert _read(out, ("image",))["parts"] == [0, 1, 2, 3, 4]
    before = _tree(out)
    assert_usage_error(cli(*base, "--part-size", "10"), str(out), "part_size", "--overwrite")
    assert_usage_error(cli(*base, "--part-size", "5", "--no-normalize"), "normalize", "--overwrite")
    assert _tree(out) == before

    # --overwrite replaces it: parts of the old layout that the new one lacks are removed.
    r = cli(*base, "--part-size", "10", "--overwrite")
    assert r.code == 0, r.err
    assert json.loads(r.out)["parts"]["written"] == 3
    assert _read(out, ("image",))["parts"] == [0, 1, 2]
    assert json.loads((out / "embed.json").read_text())["part_size"] == 10

    # A folder holding something else is not touched without --overwrite.
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert_usage_error(cli(*base[:5], foreign, *base[6:]), str(foreign), "not a cvfm embed output")
    assert _tree(foreign) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}
    r = cli(*base[:5], foreign, *base[6:], "--overwrite")
    assert r.code == 0, r.err
    assert (foreign / "keep.txt").read_text() == "mine" and (foreign / "img_emb" / "img_emb_0.npy").exists()


def test_changed_source_rows_are_not_resumed(pairs, tmp_path):
    out = tmp_path / "emb"
    _embed_pairs(pairs, out)
    grown = tmp_path / "grown.jsonl"
    lines = [json.loads(line) for line in pairs.read_text().splitlines()]
    lines.insert(0, {**lines[5], "id": "new"})  # one row more, every later row shifted
    grown.write_text(
        "".join(json.dumps({**r, "image": str(pairs.parent / r["image"])}) + "\n" for r in lines)
    )
    with pytest.raises(UsageError, match="num_rows"):
        _embed_pairs(grown, out)


def test_overwrite_by_shards_never_keeps_a_part_of_the_old_configuration(pairs, tmp_path):
    """Shard 0 overwrites a normalised output with --no-normalize; shard 1, run later without
    --overwrite, finds the new embed.json and must recompute its parts, which are still the old ones."""
    out = tmp_path / "emb"
    _embed_pairs(pairs, out, part_size=5)
    first = _embed_pairs(pairs, out, part_size=5, normalize=False, overwrite=True, shard_id=0, num_shards=2)
    assert first["parts"]["written"] == 3  # parts 0, 2, 4
    second = _embed_pairs(pairs, out, part_size=5, normalize=False, shard_id=1, num_shards=2)
    assert second["parts"] == {"total": 5, "owned": 2, "written": 2, "already_done": 0}
    norms = np.linalg.norm(_read(out)["image"], axis=1)
    assert len(norms) == N_PAIRS and (np.abs(norms - 1.0) > 1e-3).all()  # no row left normalised


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["cvfm/tiny-resnet", "--text-column", "caption"], "image-text model"),
        (["cvfm/tiny-clip", "--precision", "fp16"], "fp16"),
        (["cvfm/tiny-clip", "--precision", "fp64"], "fp64"),
        (["cvfm/tiny-clip", "--shard-id", "2", "--num-shards", "2"], "--shard-id"),
        (["cvfm/tiny-clip", "--dtype", "int8"], "--dtype"),
        (["cvfm/tiny-clip", "--no-images"], "--text-column"),
    ],
    ids=["image-only-model", "fp16-on-cpu", "bad-precision", "bad-shard", "bad-dtype", "nothing"],
)
def test_usage_errors_write_nothing(cli, pairs, tmp_path, args, needle):
    out = tmp_path / "emb"
    r = cli("embed", *args, "--data", pairs, "-o", out, "--num-workers", "0")
    assert_usage_error(r, needle)
    assert not out.exists()


def test_several_captions_per_row_are_refused(cli, tmp_path):
    manifest = tmp_path / "multi.jsonl"
    manifest.write_text(json.dumps({"id": "a", "caption": ["one", "two"]}) + "\n")
    r = cli(
        "embed", "cvfm/tiny-clip", "--data", manifest, "--text-column", "caption", "--no-images", "-o", "-"
    )
    assert_usage_error(r, "'a'", "one text per row")


# ------------------------------------------------------------------------------------- texts, stdin


def test_texts_only(cli, tmp_path):
    captions = ["a red seven", "the digit two written in blue", "a photo of a dog"]
    manifest = tmp_path / "texts.jsonl"
    manifest.write_text(
        "".join(json.dumps({"id": f"t{i}", "text": c}) + "\n" for i, c in enumerate(captions))
    )
    out = tmp_path / "emb"
    r = cli("embed", "cvfm/tiny-clip", "--data", manifest, "--text-column", "text", "--no-images", "-o", out)
    summary = json.loads(r.out)
    assert r.code == 0 and summary["rows"] == 3 and summary["dims"] == {"text": 64}
    assert not (out / "img_emb").exists()
    got = _read(out, ("text",))
    assert got["meta"] == {"id": ["t0", "t1", "t2"], "label": [None, None, None], "caption": captions}
    torch.manual_seed(0)
    dual = create_dual_encoder("cvfm/tiny-clip").eval()
    with torch.no_grad():
        want = torch.nn.functional.normalize(dual.encode_text(dual.tokenizer(captions)), dim=-1).numpy()
    # precision auto may be bf16 on this CPU: close, not equal
    assert np.abs(got["text"] - want).max() < 0.05
    cos = (got["text"] * want).sum(1)
    assert cos.min() > 0.99


@pytest.mark.slow
def test_stdin_paths_to_stdout_json_lines(digit_folder):
    """`find ... | cvfm embed MODEL --data - -o -`: one JSON line per image on stdout, logs on stderr."""
    paths = sorted(str(p) for p in (digit_folder / "test").rglob("*.png"))
    cmd = [sys.executable, "-m", "cvfm", "embed", "cvfm/tiny-resnet", "--data", "-", "-o", "-"]
    cmd += ["--num-workers", "1", "--batch-size", "7", "--part-size", "10", "--precision", "fp32"]
    p = subprocess.run(
        cmd, input="\n".join(paths) + "\n", capture_output=True, text=True, env=_env(), cwd=ROOT
    )
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]  # every stdout line is data
    assert len(rows) == len(paths) == 32
    assert [r["id"] for r in rows] == [r["image"] for r in rows] == paths  # a path is its own id
    for row in rows:
        assert set(row) == {"id", "image", "label", "image_embedding"} and row["label"] is None
        assert len(row["image_embedding"]) == 128
        assert np.linalg.norm(row["image_embedding"]) == pytest.approx(1.0, abs=1e-5)
    assert "embed:" in p.stderr and "{" not in p.stderr

    # Sharding flags apply to stdout too: shard 1 of 2 gets parts 1 and 3 (rows 10-19, 30-31).
    shard = subprocess.run(
        [*cmd, "--shard-id", "1", "--num-shards", "2"],
        input="\n".join(paths) + "\n",
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    ids = [json.loads(line)["id"] for line in shard.stdout.splitlines()]
    assert ids == [paths[i] for i in [*range(10, 20), 30, 31]]
    by_id = {r["id"]: r["image_embedding"] for r in rows}
    for line in shard.stdout.splitlines():
        r = json.loads(line)
        np.testing.assert_allclose(r["image_embedding"], by_id[r["id"]], atol=1e-6)


# ------------------------------------------------------------------------------------------ bad images


@pytest.fixture
def pairs_with_bad_images(pairs, tmp_path) -> tuple[Path, list[str]]:
    """The pairs manifest with row 3 pointing at a missing file and row 12 at a corrupt one."""
    lines = pairs.read_text().splitlines()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png" * 20)
    bad = {3: str(tmp_path / "missing.png"), 12: str(corrupt)}
    for i, line in enumerate(lines):
        rec = json.loads(line)
        rec["image"] = bad.get(i, str(pairs.parent / rec["image"]))
        lines[i] = json.dumps(rec)
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, list(bad.values())


def test_unreadable_images_are_dropped_from_every_file_and_listed(pairs_with_bad_images, reference, tmp_path):
    manifest, bad = pairs_with_bad_images
    out = tmp_path / "emb"
    summary = _embed_pairs(manifest, out)
    assert summary["rows"] == N_PAIRS - 2
    assert [s["where"] for s in summary["skipped"]] == bad
    assert all(s["reason"] for s in summary["skipped"])
    got = _read(out)
    keep = [i for i in range(N_PAIRS) if i not in (3, 12)]
    assert got["meta"]["id"] == [reference["meta"]["id"][i] for i in keep]
    assert got["meta"]["caption"] == [reference["meta"]["caption"][i] for i in keep]
    np.testing.assert_allclose(got["image"], reference["image"][keep], atol=1e-6)
    np.testing.assert_allclose(got["text"], reference["text"][keep], atol=1e-6)
    assert [s["where"] for s in _part_info(out, 0)["skipped"]] == [bad[0]]
    assert [s["where"] for s in _part_info(out, 1)["skipped"]] == [bad[1]]
    assert _part_info(out, 2)["skipped"] == [] and _part_info(out, 1)["rows"] == 9

    # On rerun (nothing to do) the summary still lists them, read back from the parts.
    assert [s["where"] for s in _embed_pairs(manifest, out)["skipped"]] == bad


def test_strict_stops_at_the_first_unreadable_image(cli, pairs_with_bad_images, tmp_path):
    manifest, bad = pairs_with_bad_images
    out = tmp_path / "emb"
    r = cli(
        "embed",
        "cvfm/tiny-clip",
        "--data",
        manifest,
        "--text-column",
        "caption",
        "-o",
        out,
        "--num-workers",
        "0",
        "--part-size",
        "2",
        "--batch-size",
        "2",
        "--strict",
    )
    assert r.code == 1 and r.out == ""
    error = r.err[r.err.index("cvfm: error: ") :].replace("\n", "")
    assert bad[0] in error and "Traceback" not in r.err
    assert _read(out)["parts"] == [0]  # rows 0-1 were done before row 3 failed; part 1 was not written


# --------------------------------------------------------------------------- moved from test_cli.py


def test_embed_folder_writes_aligned_npy_and_parquet(cli, digit_folder, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "emb"
    args = ("embed", "cvfm/tiny-resnet", "--data", digit_folder, "--split", "test", "-o", out)
    r = cli(*args, "--num-workers", "0", "--batch-size", "10", "--precision", "fp32")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["rows"] == 32 and summary["dims"] == {"image": 128} and summary["skipped"] == []
    emb = np.load(out / "img_emb" / "img_emb_0.npy")
    table = pq.read_table(out / "metadata" / "metadata_0.parquet").to_pydict()
    assert emb.shape == (32, 128) and emb.dtype == np.float32 and list(table) == ["id", "image", "label"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), np.ones(32), atol=1e-5)
    # Row i of the metadata describes row i of the embeddings: the folder's sorted order, labels by class.
    assert table["id"] == sorted(table["id"])
    assert table["label"] == [image_id.split("/")[0] for image_id in table["id"]]  # the class folder
    assert all(Path(p).is_file() for p in table["image"])
    # ... and is the embedding of that image: the model called directly.
    torch.manual_seed(0)
    encoder = create_encoder("cvfm/tiny-resnet").eval()
    with torch.no_grad():
        direct = encoder(
            torch.stack([encoder.preprocess.transform()(decode_image(p)) for p in table["image"]])
        )
    np.testing.assert_allclose(emb, torch.nn.functional.normalize(direct, dim=-1).numpy(), atol=2e-5)

    # Another model into the same folder is refused and leaves it as it was; --overwrite replaces it.
    before = _tree(out)
    other = (
        "embed",
        "cvfm/pixels",
        "--data",
        digit_folder,
        "--split",
        "test",
        "-o",
        out,
        "--num-workers",
        "0",
    )
    assert_usage_error(cli(*other), str(out), "--overwrite")
    assert _tree(out) == before
    r = cli(*other, "--overwrite", "--no-normalize", "--dtype", "float16")
    assert r.code == 0, r.err
    emb = np.load(out / "img_emb" / "img_emb_0.npy")
    assert emb.shape == (32, 3 * 32 * 32) and emb.dtype == np.float16


def test_embed_folder_to_stdout_as_json_lines(cli, digit_folder):
    r = cli(
        "embed",
        "cvfm/tiny-resnet",
        "--data",
        digit_folder,
        "--split",
        "test",
        "-o",
        "-",
        "--num-workers",
        "0",
    )
    assert r.code == 0, r.err
    rows = [json.loads(line) for line in r.lines]
    assert len(rows) == 32  # the embeddings only: no summary line mixed in
    for row in rows:
        assert set(row) == {"id", "image", "label", "image_embedding"}
        assert row["label"] == row["id"].split("/")[0]  # the class name
        assert len(row["image_embedding"]) == 128
        assert np.linalg.norm(row["image_embedding"]) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------- precision


def test_precision_auto_follows_the_hardware(tmp_path, monkeypatch):
    with_bf16, without = tmp_path / "bf16", tmp_path / "plain"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert precision_module.cpu_has_bf16(str(with_bf16)) is True
    assert precision_module.cpu_has_bf16(str(without)) is False
    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") is None
    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    with pytest.raises(UsageError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(UsageError, match="fp8"):
        resolve_precision("fp8", "cpu")
    assert precision_module.precision_name(torch.bfloat16) == "bf16"
