"""`cvfm curate` benchmark: dedup and decontamination against an injected ground truth, a curated subset
against a random one after the same self-supervised budget, and curate's speed and memory at 1M rows.

Run from the repository root with the venv active (each part reuses what --work already holds):

    HF_HUB_OFFLINE=1 python benchmarks/curate.py --part pool       # the pool, its ground truth, embeddings
    HF_HUB_OFFLINE=1 python benchmarks/curate.py --part dedup      # dedup P/R per eps, decontamination
    HF_HUB_OFFLINE=1 python benchmarks/curate.py --part subset     # curated vs random subset, k-NN
    HF_HUB_OFFLINE=1 python benchmarks/curate.py --part scale      # 1M random 256-d rows: time, peak RSS
    HF_HUB_OFFLINE=1 python benchmarks/curate.py --part all --json runs/curate-bench.json

**Pool** (`--part pool`; seeded, written as image files + `pool.jsonl` + `truth.json` under --work):
Animal-MNIST's fixed train split (28x28 silhouettes, 10 classes), less every image whose pixels occur
twice in the whole set (Animal-MNIST has 284 such natural exact duplicates, 96 of them across train and
test: left in, they would be duplicates and contamination the ground truth does not name). Of what is
left, --major-classes classes keep all their images, the others 1/--imbalance of theirs (10x fewer):
the originals, PNG files. Injected into it:

  near   --near-fraction of the originals get 1-3 near-duplicates each, one transform per copy: JPEG
         re-encoded at quality 10-30, resized (to 14-21 px or 42-56 px), horizontally flipped, or
         cropped by 1-3 px per side
  exact  --exact-fraction of the originals get a byte-identical copy of their file under another name
  test   --test-copies images of the balanced test split (the k-NN evaluation's test set), each copied
         once with one of the four transforms or byte-for-byte (as a PNG of its pixels)

Every item gets a neutral name (p00000.png, shuffled), so nothing but the pixels tells the kinds apart.

**Embeddings for curation**: there is no model hub here, so the pool's own self-supervised model is used,
as DINOv2's curation does: SimCLR (`cvfm pretrain`, --embed-epochs on the whole raw pool, its
augmentations include flips, resized crops and colour jitter) on cvfm/tiny-resnet, with cvfm's default
crops of 8-100% ("ssl") and with milder crops of 60-100% ("ssl-mild", nearer a copy detector's
invariances), then `cvfm embed` of the pool and of the test split. The raw pixels (`cvfm/pixels`,
3x32x32; not flip-invariant by construction) are scored beside them; they curate the subset
(--curate-embedder).

**Dedup** (`--part dedup`): `cvfm curate dedup` at each --eps, on each embedding. A duplicate group is an
original with its injected copies (near and exact); one of each group must survive. Of a group of g
members with d dropped, min(d, g - 1) drops are correct; dropping the whole group counts one wrong drop;
any drop outside an injected group (an original without copies, a test copy) is wrong.
precision = correct drops / all drops; recall = correct drops / injected copies. Per transform, a copy
counts as found when it or its original was dropped. `cvfm curate decontaminate` of the raw pool against
the test split's embeddings: recall = injected test copies dropped / injected; wrongly dropped = other
items dropped.

**Subset** (`--part subset`): at equal size N (--subset-size), curated = dedup (the command's default
eps) -> decontaminate -> cluster (--levels) -> balanced sample to N; random = N items drawn uniformly
from the raw pool. Each is pre-trained from random init with the same budget (--method, --epochs over N
images, batch 64, one torch thread) for each of --seeds, and scored with `cvfm evaluate knn` (k = 20;
bank: Animal-MNIST's balanced train split, scored: its balanced test split). The target: curated beats
random by >= 3 k-NN points (mean over seeds).

**Scale** (`--part scale`): 1M random 256-d float32 rows written as a valid embed output (cvfm's own
EmbedFolder writer, parts of 100k rows), then `cvfm curate dedup` and `cvfm curate cluster` (2 levels)
through the CLI, each under /usr/bin/time -v: wall time, rows/s, peak RSS of the command.

Subprocesses run with OMP_NUM_THREADS=--threads (default 1; the machine is shared). Nothing here asserts
on timings; the figures and targets are printed, and written to --json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This folder holds ssl.py (the SSL benchmark): keep it off the path, where it would shadow the ssl module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402


def _load(name: str):
    """A module of this folder, loaded by path (the folder itself is off sys.path, see above)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def say(*parts) -> None:
    print(*parts, flush=True)


def fmt_table(*args, **kwargs) -> str:
    return _load("ssl").fmt_table(*args, **kwargs)  # the SSL benchmark's tables (it imports torch)


# ------------------------------------------------------------------------------------------------- pool

TRANSFORMS = ("jpeg", "resize", "flip", "crop")
TEST_KINDS = (*TRANSFORMS, "exact")


@dataclass(frozen=True)
class PoolSpec:
    """What the pool is made of (recorded in truth.json; a different spec is a different pool)."""

    data: str = "animal-mnist"
    major_classes: int = 2
    imbalance: int = 10  # the major classes keep all their images, the others 1 / imbalance
    near_fraction: float = 0.3  # of the originals, each with 1-3 near-duplicates
    exact_fraction: float = 0.1  # of the originals, each with one byte-identical copy
    test_copies: int = 200  # balanced over the test split's classes
    limit_per_class: int | None = None  # cap on the originals per major class (small pools for tests)
    seed: int = 0


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def near_duplicate(pixels: np.ndarray, transform: str, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    """A transformed copy of a grey image: (file bytes, suffix, parameters)."""
    img = Image.fromarray(pixels)
    h, w = pixels.shape[:2]
    if transform == "jpeg":
        quality = int(rng.integers(10, 31))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), ".jpg", {"quality": quality}
    if transform == "resize":
        side = int(rng.choice([*range(14, 22), *range(42, 57)]))
        return _png(np.asarray(img.resize((side, side), Image.Resampling.BILINEAR))), ".png", {"size": side}
    if transform == "flip":
        return _png(np.asarray(ImageOps.mirror(img))), ".png", {}
    if transform == "crop":
        left, top, right, bottom = (int(v) for v in rng.integers(1, 4, size=4))
        box = (left, top, w - right, h - bottom)
        return _png(np.asarray(img.crop(box))), ".png", {"box": list(box)}
    raise ValueError(f"unknown transform {transform!r}")


def unique_pixels(pixels: np.ndarray) -> np.ndarray:
    """Mask of the images whose pixels occur once in the whole set."""
    digests = [hashlib.sha1(p.tobytes()).hexdigest() for p in pixels]
    counts: dict[str, int] = {}
    for d in digests:
        counts[d] = counts.get(d, 0) + 1
    return np.array([counts[d] == 1 for d in digests])


def build_pool(folder: Path, spec: PoolSpec = PoolSpec()) -> dict:
    """Write the pool's image files, `pool.jsonl` (id, image, label) and `truth.json` (the spec and, per
    item, its kind, source and transform) into `folder`; returns the truth. Deterministic in `spec`."""
    from cvfm.data.builtin import BUILTINS, split_indices

    pixels, labels, classes = BUILTINS[spec.data]()
    rng = np.random.default_rng(spec.seed)
    unique = unique_pixels(pixels)
    train = split_indices(labels, "train")
    train = train[unique[train]]
    major = sorted(int(c) for c in rng.choice(len(classes), spec.major_classes, replace=False))
    originals = []
    for c in range(len(classes)):
        members = rng.permutation(train[labels[train] == c])
        n = len(members) if c in major else round(len(members) / spec.imbalance)
        if spec.limit_per_class is not None:
            n = min(n, spec.limit_per_class if c in major else max(1, spec.limit_per_class // spec.imbalance))
        originals.extend(int(i) for i in members[:n])
    originals.sort()

    items = []  # (bytes, suffix, record) before naming
    for i in originals:
        items.append((_png(pixels[i]), ".png", {"kind": "original", "index": i}))
    by_index = {rec["index"]: data for data, _, rec in items}
    near_sources = rng.choice(originals, round(spec.near_fraction * len(originals)), replace=False)
    for i in sorted(int(s) for s in near_sources):
        for _ in range(int(rng.integers(1, 4))):
            t = str(rng.choice(TRANSFORMS))
            data, suffix, params = near_duplicate(pixels[i], t, rng)
            items.append((data, suffix, {"kind": "near", "index": i, "transform": t, "params": params}))
    exact_sources = rng.choice(originals, round(spec.exact_fraction * len(originals)), replace=False)
    for i in sorted(int(s) for s in exact_sources):
        items.append((by_index[i], ".png", {"kind": "exact", "index": i, "transform": "exact"}))
    test = split_indices(labels, "test")
    per_class = spec.test_copies // len(classes)
    chosen = [rng.permutation(test[labels[test] == c])[:per_class] for c in range(len(classes))]
    for i in sorted(int(i) for i in np.concatenate(chosen)):
        t = str(rng.choice(TEST_KINDS))
        if t == "exact":
            data, suffix, params = _png(pixels[i]), ".png", {}
        else:
            data, suffix, params = near_duplicate(pixels[i], t, rng)
        items.append((data, suffix, {"kind": "test", "index": i, "transform": t, "params": params}))

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = {int(k): f"p{n:05d}" for n, k in enumerate(rng.permutation(len(items)))}
    original_id = {rec["index"]: names[k] for k, (_, _, rec) in enumerate(items) if rec["kind"] == "original"}
    records, lines = [], []
    for k in sorted(range(len(items)), key=lambda k: names[k]):
        data, suffix, rec = items[k]
        name = names[k]
        (images / f"{name}{suffix}").write_bytes(data)
        label = classes[labels[rec["index"]]]
        source = None  # a copy's source: its original's pool id, or a test image's id in the built-in set
        if rec["kind"] == "test":
            source = f"{spec.data}/{rec['index']}"
        elif rec["kind"] != "original":
            source = original_id[rec["index"]]
        line = {"id": name, "image": f"images/{name}{suffix}", "label": label}
        records.append({**line, **rec, "source": source})
        lines.append(line)
    truth = {"spec": asdict(spec), "major_classes": [classes[c] for c in major], "items": records}
    (folder / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    (folder / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return truth


def pool_summary(truth: dict) -> dict:
    """Counts per kind, per transform and per class (originals)."""
    items = truth["items"]
    kinds: dict[str, int] = {}
    transforms: dict[str, int] = {}
    per_class: dict[str, int] = {}
    for r in items:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        if r["kind"] != "original":
            key = f"{r['kind']}:{r['transform']}"
            transforms[key] = transforms.get(key, 0) + 1
        else:
            per_class[r["label"]] = per_class.get(r["label"], 0) + 1
    return {"items": len(items), "kinds": kinds, "transforms": transforms, "originals_per_class": per_class}


def pool_table(summary: dict, truth: dict) -> str:
    kinds, transforms = summary["kinds"], summary["transforms"]
    rows = [["original", "-", kinds.get("original", 0)]]
    rows += [
        [k, t, transforms.get(f"{k}:{t}", 0)]
        for k in ("near", "exact", "test")
        for t in TEST_KINDS
        if f"{k}:{t}" in transforms
    ]
    rows.append(["all", "-", summary["items"]])
    per_class = ", ".join(f"{c} {n}" for c, n in sorted(summary["originals_per_class"].items()))
    title = f"Pool ({truth['spec']['data']}; originals per class: {per_class})"
    return fmt_table(["kind", "transform", "items"], rows, title)


# ------------------------------------------------------------------------------------------- running cvfm


def cvfm(args: list, log: Path, threads: int, timed: bool = False) -> dict:
    """Run `python -m cvfm ARGS` (this checkout's code first on the path), stderr to `log`; raise with the
    log's tail when it fails. Returns its stdout, wall time and (with `timed`, under /usr/bin/time -v) peak
    RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    env["MKL_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "cvfm", *map(str, args)]
    if timed:
        command = ["/usr/bin/time", "-v", *command]
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"  $ cvfm {' '.join(map(str, args))}")
    t0 = time.perf_counter()
    with open(log, "w") as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if done.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise RuntimeError(f"cvfm {' '.join(map(str, args))} exited {done.returncode}:\n{tail}")
    result = {"stdout": done.stdout, "wall_s": wall}
    if timed:
        kb = [line for line in text.splitlines() if "Maximum resident set size" in line]
        result["peak_rss_mb"] = int(kb[-1].split(":")[-1]) / 1024 if kb else None
    return result


def last_json(stdout: str) -> dict:
    """The last JSON line a command printed."""
    lines = [line for line in stdout.splitlines() if line.strip().startswith("{")]
    return json.loads(lines[-1]) if lines else {}


# ------------------------------------------------------------------------------------- part: pool, embed


def ensure_pool(work: Path, spec: PoolSpec) -> dict:
    """The pool under work/pool, built unless one of the same spec is there."""
    folder = work / "pool"
    truth_file = folder / "truth.json"
    if truth_file.exists():
        truth = json.loads(truth_file.read_text())
        if truth["spec"] == asdict(spec):
            return truth
        raise SystemExit(f"{folder} holds a pool of another spec: choose another --work or delete it")
    say(f"[pool] building {folder}")
    return build_pool(folder, spec)


# The curation embedders: the pool's own SimCLR (--embed-method, cvfm's defaults, random resized crops of
# 8-100%), the same with crops of 60-100% only ("ssl-mild"), or 4x as long ("ssl-long"); the pool's own
# copy-detection descriptor (SSCD: InfoNCE at temperature 0.05 + its entropy regulariser, on copy edits),
# with its crops of 8-100% or, 3x as long, with crops of 50-100% ("sscd-mild"); and the raw pixels.
# name: (method (None: --embed-method), pretrain options, epochs as a multiple of --embed-epochs), or None
# for a registry model.
EMBEDDERS = {
    "ssl": (None, [], 1),
    "ssl-mild": (None, ["min_scale=0.6"], 1),
    "ssl-long": (None, [], 4),
    "sscd": ("sscd", [], 1),
    "sscd-mild": ("sscd", ["min_scale=0.5"], 3),
    "pixels": None,
}


def pretrain(work: Path, data, out: Path, method: str, epochs: int, seed: int, opts: list, args) -> dict:
    """`cvfm pretrain` of args.model on `data` into `out` (a run cut short is replaced)."""
    command = ["pretrain", "--data", data, "--method", method, "--model", args.model, "--epochs", epochs]
    command += ["--batch-size", args.batch_size, "--num-workers", args.num_workers, "--seed", seed]
    command += [x for o in opts for x in ("--opt", o)] + ["-o", out, "--overwrite"]
    return cvfm(command, work / "logs" / f"pretrain-{out.name}.log", args.threads)


def ensure_embedder(work: Path, name: str, args) -> Path | str:
    """The embedder `name`: a registry model, or a run folder of the pool's own self-supervised model
    (trained unless there)."""
    if EMBEDDERS[name] is None:
        return f"cvfm/{name}"
    method, opts, times = EMBEDDERS[name]
    method = method or args.embed_method
    epochs = times * args.embed_epochs
    run = work / f"embedder-{name}"
    if not (run / "backbone").exists():
        say(f"[embed] {name}: {method} {' '.join(opts)} on the pool, {epochs} epochs")
        pretrain(work, work / "pool" / "pool.jsonl", run, method, epochs, 0, opts, args)
    return run


def ensure_embeddings(work: Path, args) -> dict[str, dict[str, Path]]:
    """{embedder name: {"pool": folder, "test": folder, "model": model}}: `cvfm embed` outputs (a rerun
    resumes)."""
    out = {}
    for name in args.embedders:
        model = ensure_embedder(work, name, args)
        out[name] = {"model": model}
        for what, data in (
            ("pool", ["--data", work / "pool" / "pool.jsonl"]),
            ("test", ["--data", f"builtin:{args.data}", "--split", "test"]),
        ):
            folder = work / "emb" / f"{name}-{what}"
            if not _embed_done(folder):
                command = ["embed", model, *data, "-o", folder, "--num-workers", args.num_workers]
                cvfm(command, work / "logs" / f"embed-{name}-{what}.log", args.threads)
            out[name][what] = folder
    return out


def _embed_done(folder: Path) -> bool:
    from cvfm.curate import EmbeddingPool
    from cvfm.errors import UsageError

    try:
        EmbeddingPool(folder)
    except UsageError:
        return False
    return True


# ----------------------------------------------------------------------------------- part: dedup, scores


def dedup_scores(truth: dict, dropped: set[str]) -> dict:
    """Dedup's drops against the injected duplicate groups (an original and its near and exact copies):
    of a group of g with d dropped, min(d, g - 1) drops are correct (one must survive); a drop beyond
    that, or outside every group, is wrong. precision = correct / dropped, recall = correct / injected
    copies; per transform, the share of copies of which the copy or its original was dropped."""
    groups: dict[str, list[str]] = {}
    for r in truth["items"]:
        if r["kind"] in ("near", "exact"):
            groups.setdefault(r["source"], [r["source"]]).append(r["id"])
    grouped = {i for members in groups.values() for i in members}
    correct = over = 0
    for members in groups.values():
        d = sum(i in dropped for i in members)
        correct += min(d, len(members) - 1)
        over += max(0, d - (len(members) - 1))
    injected = sum(len(m) - 1 for m in groups.values())
    kind = {r["id"]: r["kind"] for r in truth["items"]}
    outside = [i for i in dropped if i not in grouped]
    found: dict[str, list[bool]] = {}
    for r in truth["items"]:
        if r["kind"] in ("near", "exact"):
            found.setdefault(r["transform"], []).append(r["id"] in dropped or r["source"] in dropped)
    return {
        "dropped": len(dropped),
        "injected": injected,
        "correct": correct,
        "whole_group_dropped": over,
        "outside_groups": len(outside),
        "outside_test_copies": sum(kind[i] == "test" for i in outside),
        "precision": correct / len(dropped) if dropped else None,
        "recall": correct / injected if injected else None,
        "found_by_transform": {t: float(np.mean(v)) for t, v in sorted(found.items())},
    }


def decontamination_scores(truth: dict, dropped: set[str]) -> dict:
    """Decontamination's drops against the injected test copies: recall (overall and per transform) and
    the other items it dropped, by kind."""
    tests = [r for r in truth["items"] if r["kind"] == "test"]
    by_transform: dict[str, list[bool]] = {}
    for r in tests:
        by_transform.setdefault(r["transform"], []).append(r["id"] in dropped)
    wrong: dict[str, int] = {}
    for r in truth["items"]:
        if r["kind"] != "test" and r["id"] in dropped:
            wrong[r["kind"]] = wrong.get(r["kind"], 0) + 1
    return {
        "test_copies": len(tests),
        "dropped": len(dropped),
        "recall": sum(r["id"] in dropped for r in tests) / len(tests) if tests else None,
        "recall_by_transform": {t: float(np.mean(v)) for t, v in sorted(by_transform.items())},
        "wrongly_dropped": sum(wrong.values()),
        "wrongly_dropped_by_kind": wrong,
        "clean_items": len(truth["items"]) - len(tests),
    }


def dropped_ids(out: Path, column: str = "kept") -> set[str]:
    """The ids a curate step dropped: `column` false in its decisions.parquet (dedup writes kept_eps<e>
    per eps)."""
    import pyarrow.parquet as pq

    table = pq.read_table(out / "decisions.parquet", columns=["id", column])
    ids, kept = table.column("id").to_pylist(), table.column(column).to_pylist()
    return {i for i, k in zip(ids, kept, strict=True) if not k}


def step(work: Path, name: str, args: list, threads: int, timed: bool = False) -> tuple[Path, dict]:
    """Run `cvfm curate ARGS -o work/NAME` unless its decisions from the same ARGS are there; (output
    folder, run info)."""
    out = work / name
    info_file = out.with_name(f"{out.name}.run.json")
    command = [str(a) for a in args]
    if (out / "decisions.parquet").exists() and info_file.exists():
        info = json.loads(info_file.read_text())
        if info.get("args") == command:
            return out, info
    if out.exists():
        shutil.rmtree(out)  # left by a run cut short, or by other arguments
    log = work / "logs" / f"{name.replace('/', '-')}.log"
    info = {**cvfm(["curate", *args, "-o", out], log, threads, timed=timed), "args": command}
    info_file.write_text(json.dumps(info) + "\n")
    return out, info


def dedup_part(work: Path, truth: dict, embeddings: dict, args) -> dict:
    """Dedup P/R at each eps (one `curate dedup` run per embedder) and decontamination recall at each
    --thresholds, for each embedder."""
    rows = {"dedup": [], "decontaminate": []}
    for name, emb in embeddings.items():
        eps = [x for e in args.eps for x in ("--eps", e)]
        out, info = step(work, f"dedup/{name}", ["dedup", emb["pool"], *eps], args.threads)
        for e in args.eps:
            scores = dedup_scores(truth, dropped_ids(out, f"kept_eps{e}"))
            rows["dedup"].append({"embedder": name, "eps": e, **scores, "wall_s": info["wall_s"]})
        for t in args.thresholds:
            command = ["decontaminate", emb["pool"], "--against", emb["test"], "--threshold", t]
            out, info = step(work, f"decontaminate/{name}-{t}", command, args.threads)
            scores = decontamination_scores(truth, dropped_ids(out))
            rows["decontaminate"].append(
                {"embedder": name, "threshold": t, **scores, "wall_s": info["wall_s"]}
            )
    return rows


ZOOMS = (1.0, 1.08, 1.16, 1.25, 1.35)  # the crop edit takes 1-3 px a side of 28: a zoom of up to 1.3


def _aligned_pixels(images: list[Image.Image], size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Grey `size` px pixels as unit mean-centred rows, and the same for each flip x zoom of every image."""

    def unit(rows: list[np.ndarray]) -> np.ndarray:
        a = np.stack(rows).astype(np.float64)
        a -= a.mean(axis=1, keepdims=True)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    grey = [im.convert("L").resize((size, size), Image.BILINEAR) for im in images]
    plain = unit([np.asarray(g, dtype=np.float64).ravel() for g in grey])
    variants = []
    for flip in (False, True):
        for zoom in ZOOMS:
            m = (size - size / zoom) / 2
            box = (m, m, size - m, size - m)
            edited = [(g.transpose(Image.FLIP_LEFT_RIGHT) if flip else g) for g in grey]
            variants.append(
                unit([np.asarray(e.resize((size, size), Image.BILINEAR, box=box)).ravel() for e in edited])
            )
    return plain, variants


def copy_separability(work: Path, truth: dict, size: int = 28) -> dict:
    """How far the injected edits move an image against how close distinct originals already are, with a
    matcher that knows the edit family: the cosine of grey pixels, maximised over a flip and zooms of
    either image (an upper bound for a pixel-level copy detector). Per transform, quantiles of a near copy's
    similarity to its original; the quantiles of each original's similarity to its nearest other original;
    and per threshold, the share of near copies it finds against the share of originals it pairs with
    another original (a false duplicate)."""
    items = truth["items"]
    images = [Image.open(work / "pool" / r["image"]) for r in items]
    plain, variants = _aligned_pixels(images, size)
    sim = np.max([plain @ v.T for v in variants], axis=0)
    sim = np.maximum(sim, sim.T)
    np.fill_diagonal(sim, -1.0)
    row = {r["id"]: i for i, r in enumerate(items)}
    copies: dict[str, list[float]] = {}
    for r in items:
        if r["kind"] == "near":
            copies.setdefault(r["transform"], []).append(float(sim[row[r["id"]], row[r["source"]]]))
    originals = np.array([i for i, r in enumerate(items) if r["kind"] == "original"])
    nearest = sim[np.ix_(originals, originals)].max(axis=1)
    found = np.concatenate([np.array(v) for v in copies.values()]) if copies else np.zeros(0)
    return {
        "copy_to_original": {
            t: np.percentile(v, [5, 25, 50]).round(3).tolist() for t, v in sorted(copies.items())
        },
        "original_to_nearest_original": np.percentile(nearest, [50, 90, 95, 99]).round(3).tolist(),
        "by_threshold": [
            {
                "threshold": t,
                "copies_found": float(np.mean(found >= t)),
                "originals_paired": float(np.mean(nearest >= t)),
            }
            for t in (0.9, 0.93, 0.95, 0.97, 0.98)
        ],
    }


def separability_table(r: dict) -> str:
    quantiles = ", ".join(
        f"{t} {v[0]:.3f} / {v[1]:.3f} / {v[2]:.3f}" for t, v in r["copy_to_original"].items()
    )
    q = r["original_to_nearest_original"]
    rows = [[x["threshold"], x["copies_found"], x["originals_paired"]] for x in r["by_threshold"]]
    title = (
        "Separability with a matcher that knows the edits (grey pixels, cosine maximised over flip x zoom):"
        f" a near copy's similarity to its original, 5th / 25th / 50th percentile: {quantiles}; an original's"
        " to its nearest other original, 50th / 90th / 95th / 99th: "
        f"{q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} / {q[3]:.3f}"
    )
    return fmt_table(["threshold", "near copies found", "originals paired with another"], rows, title)


def dedup_tables(rows: dict) -> list[str]:
    transforms = list(rows["dedup"][0]["found_by_transform"]) if rows["dedup"] else []
    body = [
        [
            r["embedder"],
            r["eps"],
            r["dropped"],
            r["correct"],
            r["whole_group_dropped"],
            r["outside_groups"],
            r["precision"],
            r["recall"],
            *(r["found_by_transform"][t] for t in transforms),
            "yes" if (r["precision"] or 0) >= 0.95 and (r["recall"] or 0) >= 0.95 else "no",
        ]
        for r in rows["dedup"]
    ]
    injected = rows["dedup"][0]["injected"] if rows["dedup"] else 0
    dedup = fmt_table(
        [
            "embedder",
            "eps",
            "dropped",
            "correct",
            "whole group",
            "outside groups",
            "precision",
            "recall",
            *(f"found {t}" for t in transforms),
            "P, R >= 0.95",
        ],
        body,
        f"Dedup against {injected} injected copies (precision = correct drops / drops; recall = correct drops"
        " / injected copies; one of each group must survive; 'whole group': groups dropped entirely,"
        " 'outside groups': drops of items with no injected copy; found: copies of which the copy or its"
        " original was dropped)",
    )
    transforms = list(rows["decontaminate"][0]["recall_by_transform"]) if rows["decontaminate"] else []
    body = [
        [
            r["embedder"],
            r["threshold"],
            r["test_copies"],
            r["dropped"],
            r["recall"],
            *(r["recall_by_transform"][t] for t in transforms),
            r["wrongly_dropped"],
            100 * r["wrongly_dropped"] / r["clean_items"],
            "yes" if (r["recall"] or 0) >= 0.95 else "no",
        ]
        for r in rows["decontaminate"]
    ]
    decon = fmt_table(
        [
            "embedder",
            "threshold",
            "test copies",
            "dropped",
            "recall",
            *(f"recall {t}" for t in transforms),
            "wrongly dropped",
            "% of clean",
            "recall >= 0.95",
        ],
        body,
        "Decontamination of the raw pool against the test split (recall = injected test copies dropped / "
        "injected; wrongly dropped: other items dropped, of the clean items)",
    )
    return [dedup, decon]


# ------------------------------------------------------------------------------------------ part: subset


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_manifest(path: Path, records: list[dict], base: Path) -> Path:
    """`records` as a JSONL manifest at `path`, image paths made absolute against `base`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{**r, "image": str((base / r["image"]).resolve())} for r in records]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def composition(truth: dict, ids: list[str]) -> dict:
    """What a subset holds: items by kind, distinct originals (an original and its copies count once),
    the major classes' share, test copies, and the class entropy (nats; log 10 = 2.30 is balanced)."""
    by_id = {r["id"]: r for r in truth["items"]}
    chosen = [by_id[i] for i in ids]
    kinds: dict[str, int] = {}
    for r in chosen:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    distinct = {r["source"] or r["id"] for r in chosen if r["kind"] != "test"}
    labels = np.unique([r["label"] for r in chosen], return_counts=True)[1] / len(chosen)
    return {
        "items": len(chosen),
        "kinds": kinds,
        "distinct_pool_images": len(distinct),
        "major_share": float(np.mean([r["label"] in truth["major_classes"] for r in chosen])),
        "class_entropy": float(-(labels * np.log(labels)).sum()),
    }


def random_subset(work: Path, truth: dict, n: int, seed: int) -> Path:
    """`n` items of the raw pool drawn uniformly with `seed`, as a manifest."""
    pool = read_manifest(work / "pool" / "pool.jsonl")
    if n > len(pool):
        raise SystemExit(f"--subset-size {n} is larger than the pool ({len(pool)} items)")
    chosen = np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))
    return write_manifest(
        work / "subset" / f"random-seed{seed}.jsonl", [pool[i] for i in chosen], work / "pool"
    )


def oracle_subset(work: Path, truth: dict, n: int) -> Path:
    """The ceiling of any curation: `n` originals only (no injected or test copies), as class-balanced as
    the pool allows by the true labels (each class up to an equal share, the rest spread over the larger
    classes), drawn with seed 0 within each class."""
    pool = {r["id"]: r for r in read_manifest(work / "pool" / "pool.jsonl")}
    by_class: dict[str, list[str]] = {}
    for r in truth["items"]:
        if r["kind"] == "original":
            by_class.setdefault(r["label"], []).append(r["id"])
    quota, left, open_classes = {c: 0 for c in by_class}, n, sorted(by_class)
    while left and open_classes:  # water-filling: equal shares, capped by what each class holds
        share = max(1, left // len(open_classes))
        for c in list(open_classes):
            take = min(share, len(by_class[c]) - quota[c], left)
            quota[c], left = quota[c] + take, left - take
            if quota[c] == len(by_class[c]):
                open_classes.remove(c)
    rng = np.random.default_rng(0)
    chosen = sorted(i for c, ids in by_class.items() for i in rng.permutation(sorted(ids))[: quota[c]])
    return write_manifest(work / "subset" / "oracle.jsonl", [pool[i] for i in chosen], work / "pool")


def curated_subset(work: Path, copies: dict, semantic: dict, args) -> tuple[Path, dict]:
    """Dedup (the command's default eps) -> decontaminate, with the copy embedder `copies`, then cluster ->
    balanced sample of N with the semantic embedder `semantic` (DINOv2 deduplicates with a copy-detection
    descriptor and clusters with its SSL model), each step on the previous one's kept.jsonl (embedded
    again by the step); the manifest and each step's kept count."""
    base = f"subset/{curated_arm(args)}"
    model = ["--model", copies["model"], "--num-workers", args.num_workers]
    out, _ = step(work, f"{base}/dedup", ["dedup", copies["pool"]], args.threads)
    kept = {"dedup": out / "kept.jsonl"}
    command = ["decontaminate", kept["dedup"], "--against", copies["test"], *model]
    out, _ = step(work, f"{base}/decontaminate", command, args.threads)
    kept["decontaminate"] = out / "kept.jsonl"
    model = ["--model", semantic["model"], "--num-workers", args.num_workers]
    command = ["cluster", kept["decontaminate"], "--levels", args.levels, *model]
    out, _ = step(work, f"{base}/cluster", command, args.threads)
    command = ["sample", out, "--target", args.subset_size]
    out, _ = step(work, f"{base}/sample", command, args.threads)
    kept["sample"] = out / "kept.jsonl"
    counts = {name: len(read_manifest(path)) for name, path in kept.items()}
    return kept["sample"], counts


def curated_arm(args) -> str:
    """The curated arm's name: its copy and semantic embedders (runs of other choices are kept apart)."""
    return f"curated-{args.curate_embedder}-{args.cluster_embedder}"


def pretrain_and_score(work: Path, arm: str, manifest: Path, seed: int, args) -> dict:
    """`cvfm pretrain` on a subset, then `cvfm evaluate knn` on the balanced test split; cached in
    work/subset/runs/ARM-seedS/score.json."""
    run = work / "subset" / "runs" / f"{arm}-seed{seed}"
    score_file = run.parent / f"{run.name}.score.json"
    if score_file.exists():
        return json.loads(score_file.read_text())
    say(f"[subset] {arm}, seed {seed}: {args.method}, {args.epochs} epochs of {args.subset_size}")
    t = pretrain(work, manifest, run, args.method, args.epochs, seed, [], args)
    e = cvfm(
        ["evaluate", "knn", run, "--data", f"builtin:{args.data}", "--num-workers", args.num_workers],
        work / "logs" / f"knn-{arm}-{seed}.log",
        args.threads,
    )
    record = {
        "arm": arm,
        "seed": seed,
        "knn_top1": 100 * last_json(e["stdout"])["metrics"]["knn_top1@20"],
        "pretrain_s": t["wall_s"],
        "evaluate_s": e["wall_s"],
    }
    score_file.write_text(json.dumps(record) + "\n")
    return record


def subset_part(work: Path, truth: dict, embeddings: dict, args) -> dict:
    n = args.subset_size
    runs, compositions = [], {}
    for seed in args.seeds:  # the random arm first: it needs no curation
        rand = random_subset(work, truth, n, seed)
        compositions[f"random-seed{seed}"] = composition(truth, [r["id"] for r in read_manifest(rand)])
        runs.append(pretrain_and_score(work, "random", rand, seed, args))
    copies, semantic = embeddings[args.curate_embedder], embeddings[args.cluster_embedder]
    curated, kept_counts = curated_subset(work, copies, semantic, args)
    curated_ids = [r["id"] for r in read_manifest(curated)]
    compositions["curated"] = composition(truth, curated_ids)
    if len(curated_ids) != n:
        say(f"(the curated sample holds {len(curated_ids)} items, not {n}: the sizes differ)")
    for seed in args.seeds:
        runs.append(pretrain_and_score(work, curated_arm(args), curated, seed, args))
    if args.oracle:
        oracle = oracle_subset(work, truth, n)
        compositions["oracle"] = composition(truth, [r["id"] for r in read_manifest(oracle)])
        for seed in args.seeds:
            runs.append(pretrain_and_score(work, "oracle", oracle, seed, args))
    arms = ("curated", "random", "oracle") if args.oracle else ("curated", "random")
    scores = {arm: [r["knn_top1"] for r in runs if r["arm"].startswith(arm)] for arm in arms}
    gaps = [c - r for c, r in zip(scores["curated"], scores["random"], strict=True)]
    ceiling = [o - r for o, r in zip(scores.get("oracle", []), scores["random"], strict=True)]
    return {
        "size": n,
        "curated_size": len(curated_ids),
        "kept_after_step": kept_counts,
        "compositions": compositions,
        "runs": runs,
        "mean": {arm: float(np.mean(v)) for arm, v in scores.items()},
        "std": {arm: float(np.std(v)) for arm, v in scores.items()},
        "gap_mean": float(np.mean(gaps)),
        "gap_std": float(np.std(gaps)),
        "oracle_gap_mean": float(np.mean(ceiling)) if ceiling else None,
        "target_met": bool(np.mean(gaps) >= 3),
    }


def subset_table(r: dict, args) -> str:
    rows = []
    for name, c in r["compositions"].items():
        arm = name.split("-")[0]
        knn = [
            x["knn_top1"]
            for x in r["runs"]
            if x["arm"].startswith(arm) and (arm != "random" or name.endswith(f"seed{x['seed']}"))
        ]
        rows.append(
            [
                name,
                c["items"],
                c["distinct_pool_images"],
                c["kinds"].get("near", 0) + c["kinds"].get("exact", 0),
                c["kinds"].get("test", 0),
                100 * c["major_share"],
                c["class_entropy"],
                ", ".join(f"{v:.2f}" for v in knn),
            ]
        )
    title = (
        f"Curated vs random subset of N = {r['size']} ({args.method}, {args.epochs} epochs, batch "
        f"{args.batch_size}, {args.model}; k-NN@20 top-1 % on the balanced test split, seeds "
        f"{','.join(map(str, args.seeds))}); curated: kept after "
        + ", ".join(f"{k} {v}" for k, v in r["kept_after_step"].items())
    )
    table = fmt_table(
        [
            "subset",
            "items",
            "distinct pool images",
            "injected copies",
            "test copies",
            "major classes %",
            "class entropy",
            "k-NN top-1 %",
        ],
        rows,
        title,
    )
    m, s = r["mean"], r["std"]
    verdict = "meets" if r["target_met"] else "misses"
    return table + (
        f"\ncurated {m['curated']:.2f} ± {s['curated']:.2f}, random {m['random']:.2f} ± {s['random']:.2f}: "
        f"gap {r['gap_mean']:+.2f} ± {r['gap_std']:.2f} k-NN points ({verdict} the target of +3)"
        + (
            f"\noracle (originals only, balanced by the true labels: the ceiling of curation) "
            f"{m['oracle']:.2f} ± {s['oracle']:.2f}: {r['oracle_gap_mean']:+.2f} over random"
            if r.get("oracle_gap_mean") is not None
            else ""
        )
    )


# ------------------------------------------------------------------------------------------- part: scale


def write_random_embeddings(
    folder: Path, rows: int, dim: int, part_size: int = 100_000, seed: int = 0
) -> None:
    """`rows` random unit `dim`-d float32 rows as a valid `cvfm embed` output (its EmbedFolder writer)."""
    import cvfm as package
    from cvfm.embed.folder import EmbedFolder
    from cvfm.embed.plan import Plan

    plan = Plan(rows, part_size)
    ids = [f"r{i:08d}" for i in range(rows)]
    config = {
        "cvfm_version": package.__version__,
        "model": f"random-{dim}d",
        "random_init": True,
        "data": f"random-{rows}x{dim}",
        "split": None,
        "image_column": "image",
        "label_column": None,
        "text_column": None,
        "modalities": ["image"],
        "num_rows": rows,
        "rows_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "part_size": part_size,
        "num_parts": plan.num_parts,
        "normalize": True,
        "precision": "fp32",
        "dtype": "float32",
    }
    out = EmbedFolder(folder, config, ("image",))
    out.check(overwrite=False)
    out.write_config()
    rng = np.random.default_rng(seed)
    for part in range(plan.num_parts):
        r = plan.rows(part)
        x = rng.standard_normal((len(r), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        part_ids = ids[r.start : r.stop]
        out.write_part(part, {"image": x}, {"id": part_ids, "image": part_ids, "label": [None] * len(r)}, [])


def scale_part(work: Path, args) -> dict:
    emb = work / "scale" / f"emb-{args.scale_rows}x{args.scale_dim}"
    if not _embed_done(emb):
        if emb.exists():
            shutil.rmtree(emb)
        say(f"[scale] writing {args.scale_rows} random {args.scale_dim}-d rows to {emb}")
        write_random_embeddings(emb, args.scale_rows, args.scale_dim)
    rows = []
    # --no-exact: the rows have no image files to hash; SemDeDup alone runs on the embeddings
    steps = {"dedup": ["--no-exact"], "cluster": ["--levels", args.scale_levels]}
    for name in args.scale_steps:
        extra = steps[name]
        _, info = step(work, f"scale/{name}", [name, emb, *extra], args.threads, timed=True)
        summary = last_json(info["stdout"])
        rows.append(
            {
                "step": name,
                "options": " ".join(map(str, extra)),
                "rows": args.scale_rows,
                "dim": args.scale_dim,
                "wall_s": info["wall_s"],
                "rows_per_s": args.scale_rows / info["wall_s"],
                "peak_rss_mb": info["peak_rss_mb"],
                "embeddings_mb": args.scale_rows * args.scale_dim * 4 / 2**20,
                "threads": args.threads,
                "kept": summary.get("kept"),
                "reasons": summary.get("reasons"),
            }
        )
    return {"rows": rows}


def scale_table(r: dict) -> str:
    body = [
        [
            x["step"],
            x["options"] or "-",
            x["rows"],
            x["kept"],
            x["wall_s"],
            x["rows_per_s"],
            x["peak_rss_mb"],
            x["embeddings_mb"],
        ]
        for x in r["rows"]
    ]
    threads = r["rows"][0]["threads"] if r["rows"] else "-"
    return fmt_table(
        ["step", "options", "rows", "kept", "wall s", "rows/s", "peak RSS MB", "embeddings MB"],
        body,
        f"cvfm curate at scale: random unit 256-d float32 rows, OMP_NUM_THREADS={threads}, peak RSS of the"
        " command (/usr/bin/time -v)",
    )


# ------------------------------------------------------------------------------------------------ main

PARTS = ("pool", "dedup", "subset", "scale")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--part", default="all", choices=[*PARTS, "all"])
    p.add_argument("--work", default="runs/curate-bench", help="work folder, reused: stages done are skipped")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every cvfm command (default 1)")
    p.add_argument("--num-workers", type=int, default=1, help="loader workers of pretrain / embed / evaluate")
    g = p.add_argument_group("pool")
    g.add_argument("--data", default="animal-mnist", choices=["animal-mnist", "mnist", "digits"])
    g.add_argument("--major-classes", type=int, default=PoolSpec.major_classes)
    g.add_argument("--imbalance", type=int, default=PoolSpec.imbalance)
    g.add_argument("--near-fraction", type=float, default=PoolSpec.near_fraction)
    g.add_argument("--exact-fraction", type=float, default=PoolSpec.exact_fraction)
    g.add_argument("--test-copies", type=int, default=PoolSpec.test_copies)
    g.add_argument("--pool-seed", type=int, default=PoolSpec.seed)
    g = p.add_argument_group("pre-training (the curation embedder and the subset runs)")
    g.add_argument("--model", default="cvfm/tiny-resnet")
    g.add_argument("--embed-method", default="simclr", help="the curation embedder's method (default simclr)")
    g.add_argument("--embed-epochs", type=int, default=10, help="the curation embedder's epochs (default 10)")
    g.add_argument("--method", default="simclr", help="the subset runs' method (default simclr)")
    g.add_argument("--epochs", type=int, default=20, help="the subset runs' epochs over N (default 20)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument(
        "--embedders",
        default=",".join(EMBEDDERS),
        help=f"curation embedders scored (comma list of {', '.join(EMBEDDERS)}; default all)",
    )
    g = p.add_argument_group("dedup, subset")
    g.add_argument("--thresholds", default="0.99,0.95,0.9", help="decontamination thresholds scored")
    g.add_argument(
        "--curate-embedder",
        default="pixels",
        help="the embedder of the curated subset (default pixels: the only one with dedup precision above 0.9"
        " at some eps in the measured table; the 10-epoch SimCLR embeddings group by class)",
    )
    g.add_argument(
        "--cluster-embedder",
        default="ssl",
        help="the embedder the curated subset is clustered and sampled with (default ssl: the pool's own "
        "SimCLR, whose embeddings group by class; DINOv2 also dedups with a copy descriptor and clusters "
        "with its SSL model)",
    )
    g.add_argument(
        "--eps", default="0.01,0.02,0.05,0.1,0.15", help="dedup thresholds scored (comma-separated)"
    )
    g.add_argument("--subset-size", type=int, default=1000, help="N, the size of both subsets (default 1000)")
    g.add_argument("--levels", default="100,20", help="the curated subset's cluster levels (default 100,20)")
    g.add_argument("--seeds", default="0,1", help="pre-training seeds of each subset (default 0,1)")
    g.add_argument(
        "--no-oracle",
        dest="oracle",
        action="store_false",
        help="skip the oracle arm (originals only, balanced by the true labels: the ceiling of curation)",
    )
    g = p.add_argument_group("scale")
    g.add_argument("--scale-rows", type=int, default=1_000_000)
    g.add_argument("--scale-dim", type=int, default=256)
    g.add_argument("--scale-levels", default="1000,100")
    g.add_argument("--scale-steps", default="dedup,cluster", help="the curate steps timed (comma list)")
    args = p.parse_args(argv)
    args.eps = [float(e) for e in args.eps.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.thresholds = [float(t) for t in args.thresholds.split(",")]
    args.scale_steps = [x for x in args.scale_steps.split(",") if x]
    args.embedders = [e for e in args.embedders.split(",") if e]
    unknown = [
        e for e in {*args.embedders, args.curate_embedder, args.cluster_embedder} if e not in EMBEDDERS
    ]
    if unknown:
        p.error(f"unknown embedder(s) {', '.join(unknown)} (choose from {', '.join(EMBEDDERS)})")
    args.embedders += [e for e in (args.curate_embedder, args.cluster_embedder) if e not in args.embedders]
    args.spec = PoolSpec(
        data=args.data,
        major_classes=args.major_classes,
        imbalance=args.imbalance,
        near_fraction=args.near_fraction,
        exact_fraction=args.exact_fraction,
        test_copies=args.test_copies,
        seed=args.pool_seed,
    )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    parts = PARTS if args.part == "all" else (args.part,)
    results: dict = {"args": {k: v for k, v in vars(args).items() if k != "spec"}}
    t0 = time.perf_counter()
    tables = []
    if {"pool", "dedup", "subset"} & set(parts):
        truth = ensure_pool(work, args.spec)
        results["pool"] = pool_summary(truth)
        tables.append(pool_table(results["pool"], truth))
        say("\n" + tables[-1] + "\n")
        embeddings = ensure_embeddings(work, args)
    if "dedup" in parts:
        results["dedup"] = dedup_part(work, truth, embeddings, args)
        tables += dedup_tables(results["dedup"])
        results["separability"] = copy_separability(work, truth)
        tables.append(separability_table(results["separability"]))
        say("\n" + "\n\n".join(tables[-3:]) + "\n")
    if "subset" in parts:
        results["subset"] = subset_part(work, truth, embeddings, args)
        tables.append(subset_table(results["subset"], args))
        say("\n" + tables[-1] + "\n")
    if "scale" in parts:
        results["scale"] = scale_part(work, args)
        tables.append(scale_table(results["scale"]))
        say("\n" + tables[-1] + "\n")
    results["wall_s"] = time.perf_counter() - t0
    say("=" * 100 + "\n" + "\n\n".join(tables) + f"\n\ntotal wall time {results['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        say(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
