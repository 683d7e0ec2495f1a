"""`cvfm embed` benchmark: images/s against the loop users write and the model alone, cause by cause;
peak memory against the part size.

Run from the repository root with the venv active:

    HF_HUB_OFFLINE=1 python benchmarks/embed.py --quick          # smoke test, about 2 minutes on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/embed.py                  # default: about 10 minutes on 2 idle cores
    HF_HUB_OFFLINE=1 python benchmarks/embed.py --skip-memory --rounds 5 --json /tmp/embed.json
    HF_HUB_OFFLINE=1 python benchmarks/embed.py --skip-speed --skip-memory --images 96   # Ray vs local

Part 1 (speed). One ViT-B/32-sized CLIPModel with random weights (transformers, built in code: vision
width 768, 12 layers, patch 32 at 224 px; projection 512) is saved to a temporary folder with a
CLIPImageProcessor configured in code, and N real photos (crops of scikit-learn's two sample photos,
320x240 JPEGs) are written to another. Every contender runs in this process with the same torch thread
count (the one `cvfm embed` picks: the cores its decoding workers leave, at least 1; OMP_NUM_THREADS=k
sets it instead), at fp32 and at bf16 (bf16 only on a CPU with avx512_bf16/amx, unless --precisions):

  naive       the loop users write with transformers: per batch of 32, PIL open + CLIPImageProcessor +
              `model.get_image_features` (under `torch.autocast` for bf16), then L2 normalisation.
  cvfm-0      `cvfm.embed.embed(..., num_workers=0)`: cvfm's pipeline with decoding in this process,
              one image after the other between batches, like the naive loop.
  cvfm        `cvfm.embed.embed(..., num_workers=W)` (default W=2): W worker processes decode while the
              model runs. These are extra processes beside the torch threads: cvfm / cvfm-0 is what the
              parallel decoding is worth, cvfm-0 / naive what cvfm's pipeline is worth without it.
  bound       `model.get_image_features` alone on tensors decoded and preprocessed beforehand: what
              embedding could reach if decoding were free.

cvfm's images/s is measured from the end of its first part to the end of its last (parts of one batch),
so model loading and worker start-up are excluded, as the others exclude model building and a warm-up
batch. Rounds alternate the order of the contenders (forward, then backward); medians over rounds are
reported, with the ratios at the same precision and the mixed one (cvfm at `--precision auto` against
the naive loop in fp32). The cosine between cvfm's and the naive loop's embeddings at each precision
checks that both computed the same thing, next to the mean cosine between different images' embeddings
for scale. CPU time per image (process time, which other work on the machine disturbs less than wall
time) separates the stages: decoding + preprocessing of the naive loop and of cvfm, and the forward.

Part 2 (memory). A fresh process per part size runs `embed(...)` into a folder with wide (1024-d)
embeddings: a CLIPModel with a tiny random vision tower (32 px) and a 1024-d projection, over a manifest
of --rss-rows small PNGs (repeated, ids unique), and reads its peak RSS (VmHWM) after every part. At
most one part's embeddings are held, so the peak should grow with the part size, not with the number of
parts: the growth per part (last part's peak less the first's, over the parts between) is printed next
to the size of one part's embeddings (part size x 1024 float32), and the two part sizes are compared at
the same rows.

Part 3 (Ray). The same photos and ViT-B/32-sized CLIP through `embed(..., engine=...)`: the local engine
(W decoding workers) against `--engine ray` with 2 model actors on an embedded Ray on this machine
(decoding as Ray tasks), both in fp32 with parts of one batch. Wall times are compared, Ray's start-up
included (its parts arrive in a burst: there is no steady rate to read); on one small machine Ray's
overhead is expected: the point is the same output and the path to a cluster. The two outputs must hold
the same rows in the same order (asserted); the largest absolute difference of their embeddings is
printed. Nothing here asserts on timings or memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/ holds ssl.py: run as a script, this folder heads sys.path and would shadow the standard
# library's `ssl` (which torch imports through asyncio). Drop that entry before importing anything else.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

TARGETS = {"cvfm/naive": 1.5, "cvfm/bound": 0.8}
MB = 2**20


def say(*parts) -> None:
    print(*parts, flush=True)


# ------------------------------------------------------------------------------------------------ setup


def write_photos(folder: Path, n: int, size: tuple[int, int] = (320, 240), seed: int = 0) -> list[Path]:
    """`n` distinct JPEG crops (size w x h) of scikit-learn's sample photos (china.jpg, flower.jpg)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        y = int(rng.integers(0, photo.shape[0] - size[1]))
        x = int(rng.integers(0, photo.shape[1] - size[0]))
        crop = photo[y : y + size[1], x : x + size[0]]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.ascontiguousarray(crop)).save(path, quality=90)
        paths.append(path)
    return paths


# A ViT-B/32-sized CLIP (the speed part) and one with a tiny vision tower and wide embeddings (memory).
VIT_B32 = {
    "vision": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 32,
    },
    "text": {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
    },
    "projection_dim": 512,
}
_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
WIDE_TINY = {
    "vision": {**_SMALL, "image_size": 32, "patch_size": 16},
    "text": _SMALL,
    "projection_dim": 1024,
}


def build_clip(folder: Path, arch: dict = VIT_B32):
    """A CLIPModel of `arch` (random weights, seed 0) and its processor (bicubic resize of the short
    side, centre crop, OpenAI CLIP's mean/std), saved to `folder` with a tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from cvfm.models.tiny_clip import build_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=arch["vision"], text_config=arch["text"], projection_dim=arch["projection_dim"]
    )
    model = CLIPModel(config).eval()
    side = arch["vision"]["image_size"]
    processor = CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        do_center_crop=True,
        resample=3,  # bicubic
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    build_tokenizer(77).save_pretrained(folder)  # cvfm loads image-text models with their tokenizer
    return model, processor


# ------------------------------------------------------------------------------------------ contenders


def _features(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def naive_loop(model, processor, paths: list[Path], batch: int, amp: torch.dtype | None) -> dict:
    """images/s of the transformers loop (first batch = warm-up, not timed), its embeddings, and the CPU
    time per image of its decoding + preprocessing."""
    import contextlib

    from PIL import Image

    feats, t0, timed, prep = [], None, 0, 0.0
    for i in range(0, len(paths), batch):
        if i == batch:
            t0 = time.perf_counter()
        c0 = time.process_time()
        images = [Image.open(p).convert("RGB") for p in paths[i : i + batch]]
        inputs = processor(images=images, return_tensors="pt")
        prep += time.process_time() - c0 if i >= batch else 0.0
        with torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext():
            f = _features(model.get_image_features(**inputs)).float()
        feats.append((f / f.norm(dim=-1, keepdim=True)).numpy())
        timed += len(images) if i >= batch else 0
    return {
        "images_per_s": timed / (time.perf_counter() - t0),
        "emb": np.concatenate(feats),
        "prep_cpu_ms": 1000 * prep / timed,
    }


@torch.inference_mode()
def bound(model, pixels: torch.Tensor, batch: int, amp: torch.dtype | None) -> dict:
    """images/s of the forward alone on pre-decoded tensors (first batch = warm-up), and its CPU time
    per image."""
    from cvfm.runtime.precision import autocast

    t0, c0, timed = None, None, 0
    for i in range(0, len(pixels), batch):
        if i == batch:
            t0, c0 = time.perf_counter(), time.process_time()
        with autocast("cpu", amp):
            _features(model.get_image_features(pixel_values=pixels[i : i + batch])).float()
        timed += len(pixels[i : i + batch]) if i >= batch else 0
    return {
        "images_per_s": timed / (time.perf_counter() - t0),
        "cpu_ms": 1000 * (time.process_time() - c0) / timed,
    }


def cvfm_embed(model_dir: Path, image_dir: Path, out: Path, batch: int, workers: int, precision: str) -> dict:
    """images/s of `cvfm.embed.embed` after its first part (parts of one batch), its total wall time
    (model loading included), and its embeddings."""
    from cvfm.embed import embed

    stamps: list[float] = []
    t0 = time.perf_counter()
    summary = embed(
        str(model_dir),
        str(image_dir),
        str(out),
        batch_size=batch,
        num_workers=workers,
        precision=precision,
        part_size=batch,
        overwrite=True,
        on_part=lambda p: stamps.append(time.perf_counter()),
    )
    total = time.perf_counter() - t0
    parts = sorted(out.glob("img_emb/img_emb_*.npy"), key=lambda p: int(p.stem.split("_")[-1]))
    return {
        "images_per_s": (summary["rows"] - batch) / (stamps[-1] - stamps[0]),
        "wall_s": total,
        "precision": summary["precision"],
        "emb": np.concatenate([np.load(p) for p in parts]),
    }


def cosines(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-image cosine of two runs' (normalised) embeddings, and, for scale, between different images."""
    cos = (a * b).sum(1)
    between = b @ b.T
    return {
        "min": float(cos.min()),
        "mean": float(cos.mean()),
        "between_images": float(between[~np.eye(len(between), dtype=bool)].mean()),
    }


# ----------------------------------------------------------------------------------------------- speed

ROWS = {  # contender -> what the table calls it
    "naive": "naive transformers loop",
    "cvfm-0": "cvfm embed, decoding in-process (0 workers)",
    "cvfm": "cvfm embed, {w} decoding workers",
    "bound": "forward only on decoded tensors (bound)",
}


def speed(tmp: Path, n: int, rounds: int, batch: int, workers: int, precisions: list[str]) -> dict:
    """Alternating rounds of every contender at every precision; medians, ratios, cosines."""
    from cvfm.data.decode import decode_image
    from cvfm.registry import create_encoder
    from cvfm.runtime.precision import resolve_precision

    say(f"setup: {n} photos (320x240 JPEG), ViT-B/32-sized CLIP with random weights")
    paths = write_photos(tmp / "photos", n)
    model, processor = build_clip(tmp / "clip")
    transform = create_encoder(str(tmp / "clip")).preprocess.transform()
    c0 = time.process_time()
    pixels = torch.stack([transform(decode_image(p)) for p in paths])
    cpu_ms = {"cvfm preprocessing": 1000 * (time.process_time() - c0) / n}
    runs = {
        "naive": lambda p: naive_loop(model, processor, paths, batch, resolve_precision(p, "cpu")),
        "cvfm-0": lambda p: cvfm_embed(tmp / "clip", tmp / "photos", tmp / "out", batch, 0, p),
        "cvfm": lambda p: cvfm_embed(tmp / "clip", tmp / "photos", tmp / "out", batch, workers, p),
        "bound": lambda p: bound(model, pixels, batch, resolve_precision(p, "cpu")),
    }
    order = [(c, p) for p in precisions for c in runs]
    per_round: list[dict] = []
    for r in range(rounds):
        row, emb = {}, {}
        for c, p in order if r % 2 == 0 else order[::-1]:
            res = runs[c](p)
            row[f"{c} {p}"] = res["images_per_s"]
            if c == "naive":
                row[f"cpu naive preprocessing {p}"] = res["prep_cpu_ms"]
            if c == "bound":
                row[f"cpu forward {p}"] = res["cpu_ms"]
            if "emb" in res:
                emb[c, p] = res["emb"]
        for p in precisions:
            row[f"cosine cvfm vs naive {p}"] = cosines(emb["cvfm", p], emb["naive", p])
        per_round.append(row)
        shown = [f"{k} {v:.1f}" for k, v in row.items() if not k.startswith(("cos", "cpu"))]
        say(f"round {r + 1}/{rounds}: " + ", ".join(shown))
    keys = [f"{c} {p}" for c, p in order]
    med = {k: statistics.median(r[k] for r in per_round) for k in keys}
    cos = {p: min(r[f"cosine cvfm vs naive {p}"]["min"] for r in per_round) for p in precisions}
    between = per_round[-1][f"cosine cvfm vs naive {precisions[0]}"]["between_images"]
    cpu_ms["naive preprocessing"] = statistics.median(
        r[f"cpu naive preprocessing {p}"] for r in per_round for p in precisions
    )
    for p in precisions:
        cpu_ms[f"forward {p}"] = statistics.median(r[f"cpu forward {p}"] for r in per_round)
    ratios = {}
    for p in precisions:
        ratios[f"cvfm/naive {p}"] = med[f"cvfm {p}"] / med[f"naive {p}"]
        ratios[f"cvfm-0/naive {p}"] = med[f"cvfm-0 {p}"] / med[f"naive {p}"]
        ratios[f"cvfm/cvfm-0 {p}"] = med[f"cvfm {p}"] / med[f"cvfm-0 {p}"]
        ratios[f"cvfm/bound {p}"] = med[f"cvfm {p}"] / med[f"bound {p}"]
    return {
        "rounds": per_round,
        "median_images_per_s": med,
        "ratios": ratios,
        "cosine_min": cos,
        "cosine_between_images": between,
        "cpu_ms_per_image": cpu_ms,
    }


def report_speed(res: dict, precisions: list[str], auto: str, rounds: int, workers: int) -> None:
    med, ratios = res["median_images_per_s"], res["ratios"]
    say("")
    say(f"images/s, median of {rounds} rounds:")
    say(f"  {'':<52}" + "".join(f"{p:>10}" for p in precisions))
    for c, name in ROWS.items():
        say(f"  {name.format(w=workers):<52}" + "".join(f"{med[f'{c} {p}']:>10.1f}" for p in precisions))
    say("ratios at the same precision:")
    what = {
        "cvfm/naive": "cvfm / naive",
        "cvfm-0/naive": "cvfm-0 / naive (the pipeline, no parallel decoding)",
        "cvfm/cvfm-0": "cvfm / cvfm-0 (parallel decoding)",
        "cvfm/bound": "cvfm / bound",
    }
    for k, name in what.items():
        line = f"  {name:<52}" + "".join(f"{ratios[f'{k} {p}']:>9.2f}x" for p in precisions)
        if k in TARGETS and auto in precisions:
            verdict = "meets" if ratios[f"{k} {auto}"] >= TARGETS[k] else "MISSES"
            line += f"   target >= {TARGETS[k]}x at {auto}: {verdict}"
        say(line)
    if auto != "fp32" and "fp32" in precisions:
        mixed = med[f"cvfm {auto}"] / med["naive fp32"]
        res["ratios"]["mixed cvfm auto/naive fp32"] = mixed
        say(f"mixed: cvfm --precision auto ({auto}) / naive fp32: {mixed:.2f}x (precision and pipeline)")
    cpu = res["cpu_ms_per_image"]
    say(
        "CPU time per image (ms; less sensitive to other work on the machine than images/s): decoding + "
        f"preprocessing: naive (PIL + CLIPImageProcessor) {cpu['naive preprocessing']:.1f}, cvfm "
        f"(decode_image + torchvision) {cpu['cvfm preprocessing']:.1f}; forward: "
        + ", ".join(f"{p} {cpu[f'forward {p}']:.1f}" for p in precisions)
    )
    say(
        "cosine cvfm vs naive, min over images and rounds: "
        + ", ".join(f"{p} {c:.5f}" for p, c in res["cosine_min"].items())
        + f" (different images: {res['cosine_between_images']:.2f})"
    )


# ---------------------------------------------------------------------------------------------- memory

# The main process's peak is VmHWM (reset by exec; ru_maxrss is not, and would count the benchmark's own
# pages at fork time), read after each part. A worker's ru_maxrss counts the pages it shares with the
# main process (fork).
_RSS_CHILD = """
import json, resource, sys, time
def rss(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
from cvfm.embed import embed
before, t, trace = rss("VmRSS:"), time.perf_counter(), []
s = embed(
    sys.argv[2], sys.argv[1], sys.argv[3], num_workers=2, batch_size=256, part_size=int(sys.argv[4]),
    on_part=lambda p: trace.append(rss("VmHWM:")),
)
print(json.dumps({
    "rows": s["rows"], "dim": s["dims"]["image"], "parts": s["parts"]["written"], "peak_after_part": trace,
    "seconds": time.perf_counter() - t, "import_mb": before, "main_mb": rss("VmHWM:"),
    "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def peak_rss(tmp: Path, part_sizes: list[int], rows: int, distinct: int = 200) -> list[dict]:
    """Peak RSS after each part of embedding `rows` rows (1024-d) at each part size, a fresh process each."""
    from PIL import Image
    from sklearn.datasets import load_digits

    build_clip(tmp / "wide", WIDE_TINY)
    digits = np.clip(load_digits().images * 16, 0, 255).astype(np.uint8)
    (tmp / "rss_images").mkdir()
    files = []
    for i in range(distinct):
        path = tmp / "rss_images" / f"{i:04d}.png"
        Image.fromarray(digits[i]).resize((32, 32)).save(path)
        files.append(str(path))
    manifest = tmp / "rss.jsonl"
    with open(manifest, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "image": files[i % distinct]}) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    runs = []
    for size in part_sizes:
        args = [str(manifest), str(tmp / "wide"), str(tmp / f"rss_out_{size}"), str(size)]
        out = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, *args], capture_output=True, text=True, env=env, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        r = {"part_size": size, **json.loads(out.stdout.strip().splitlines()[-1])}
        r["part_mb"] = size * r["dim"] * 4 / MB
        trace, n = r["peak_after_part"], r["parts"]
        r["growth_per_part_mb"] = (trace[-1] - trace[0]) / max(n - 1, 1)
        r["growth_per_part_mb_from_part_2"] = (trace[-1] - trace[1]) / max(n - 2, 1) if n > 2 else None
        runs.append(r)
        shown = {k: trace[k - 1] for k in sorted({1, 2, (n + 1) // 2, n})}
        say(
            f"  part size {size:>6} ({n} parts of {r['dim']}-d, {r['part_mb']:.1f} MB each): peak after part "
            + ", ".join(f"{k}: {v:.0f}" for k, v in shown.items())
            + f" MB ({trace[-1] - r['import_mb']:.0f} MB above the imports; largest worker "
            f"{r['worker_mb']:.0f} MB; {r['seconds']:.0f} s)"
        )
        steady = r["growth_per_part_mb_from_part_2"]
        say(
            f"    growth per part {r['growth_per_part_mb']:.2f} MB"
            + (f" ({steady:.2f} MB from part 2 on)" if steady is not None else "")
            + f" against {r['part_mb']:.1f} MB of embeddings in one part"
        )
    if len(runs) > 1:
        a, b = runs[0], runs[-1]
        dp, dpart = b["main_mb"] - a["main_mb"], b["part_mb"] - a["part_mb"]
        say(
            f"  part size {b['part_size']} vs {a['part_size']}, same rows: peak {dp:+.0f} MB for "
            f"{dpart:+.0f} MB of embeddings per part ({dp / dpart:.2f} MB of peak per MB of part)"
        )
    return runs


# ------------------------------------------------------------------------------------------------- ray


def ray_vs_local(tmp: Path, n: int, batch: int, workers: int, actors: int) -> dict:
    """The local engine and the Ray engine (`actors` model actors) on the same photos and model."""
    import pyarrow.parquet as pq

    from cvfm.embed import embed
    from cvfm.runtime.engine import Engine

    if not (tmp / "photos").exists():
        write_photos(tmp / "photos", n)
    if not (tmp / "clip").exists():
        build_clip(tmp / "clip")
    runs = {}
    for name, engine in (("local", Engine()), ("ray", Engine("ray", actors=actors))):
        out, stamps = tmp / f"out_{name}", []
        t0 = time.perf_counter()
        summary = embed(
            str(tmp / "clip"),
            str(tmp / "photos"),
            str(out),
            batch_size=batch,
            num_workers=workers,
            precision="fp32",
            part_size=batch,
            overwrite=True,
            engine=engine,
            on_part=lambda p, stamps=stamps: stamps.append(time.perf_counter()),
        )
        parts, wall = range(summary["parts"]["total"]), time.perf_counter() - t0
        runs[name] = {
            "wall_s": wall,
            "images_per_s": summary["rows"] / wall,
            "first_part_s": stamps[0] - t0,
            "meta": [pq.read_table(out / "metadata" / f"metadata_{p}.parquet") for p in parts],
            "emb": np.concatenate([np.load(out / "img_emb" / f"img_emb_{p}.npy") for p in parts]),
        }
        r = runs[name]
        say(f"  {name}: {r['wall_s']:.1f} s wall ({r['first_part_s']:.1f} s to the first part)")
    local, ray = runs["local"], runs["ray"]
    assert all(a.equals(b) for a, b in zip(local["meta"], ray["meta"], strict=True)), "rows differ"
    res = {
        "actors": actors,
        "wall_s": {k: r["wall_s"] for k, r in runs.items()},
        "images_per_s": {k: r["images_per_s"] for k, r in runs.items()},
        "first_part_s": {k: r["first_part_s"] for k, r in runs.items()},
        "ratio_wall_ray_over_local": ray["wall_s"] / local["wall_s"],
        "max_abs_diff": float(np.abs(local["emb"] - ray["emb"]).max()),
        "rows": len(local["emb"]),
    }
    say(
        f"  ray / local: wall time {res['ratio_wall_ray_over_local']:.2f}x; same {res['rows']} rows in the "
        f"same order, max |difference| of the embeddings {res['max_abs_diff']:.2e}"
    )
    return res


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="96 images, 1 round; memory over 8k rows")
    ap.add_argument("--images", type=int, default=None, help="photos for the speed part (default 256)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2, help="cvfm's decoding workers")
    ap.add_argument("--precisions", default=None, help="default: fp32, and bf16 where the CPU has it")
    ap.add_argument("--part-sizes", default=None, help="memory: comma-separated (default 1000,8000)")
    ap.add_argument("--rss-rows", type=int, default=None, help="memory: rows of the many-part runs (24000)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--actors", type=int, default=2, help="ray: model actors")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    n = args.images or (96 if args.quick else 256)
    rounds = args.rounds or (1 if args.quick else 3)
    part_sizes = [
        int(s) for s in (args.part_sizes or ("1000,4000" if args.quick else "1000,8000")).split(",")
    ]
    rss_rows = args.rss_rows or (8000 if args.quick else 24000)
    batch = args.batch_size
    if n < 3 * batch:
        raise SystemExit(f"--images must be at least {3 * batch} (3 parts of one batch)")

    import cvfm
    from cvfm.runtime.precision import cpu_has_bf16, precision_name, resolve_precision
    from cvfm.runtime.threads import share_cores_with_workers

    threads = share_cores_with_workers(args.num_workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # every contender, cvfm-0 included, keeps this count
    auto = precision_name(resolve_precision("auto", "cpu"))
    precisions = (args.precisions or ("fp32,bf16" if cpu_has_bf16() else "fp32")).split(",")
    results: dict = {
        "cvfm": cvfm.__version__,
        "torch": torch.__version__,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": threads,
        "cpu_bf16": cpu_has_bf16(),
        "precision_auto": auto,
        "images": n,
        "batch_size": batch,
        "num_workers": args.num_workers,
    }
    say(
        f"cvfm {cvfm.__version__}, torch {torch.__version__}: {results['cores']} cores; every contender runs "
        f"{threads} torch thread(s); cvfm adds {args.num_workers} decoding worker processes; "
        f"--precision auto = {auto}"
    )
    with tempfile.TemporaryDirectory(prefix="cvfm_embed_bench_") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_speed:
            res = speed(tmp, n, rounds, batch, args.num_workers, precisions)
            report_speed(res, precisions, auto, rounds, args.num_workers)
            results["speed"] = res
        if not args.skip_memory:
            say("")
            say(
                f"peak RSS of the embedding process (MB), {rss_rows} rows of 1024-d embeddings (tiny CLIP, "
                f"32 px), 2 workers, batch 256, at part sizes {part_sizes}, a fresh process each"
            )
            results["memory"] = peak_rss(tmp, part_sizes, rss_rows)
        if not args.skip_ray:
            say("")
            say(
                f"Ray engine ({args.actors} actors, embedded Ray) against the local engine "
                f"({args.num_workers} workers): {n} photos, ViT-B/32-sized CLIP, fp32, batch {batch}"
            )
            results["ray"] = ray_vs_local(tmp, n, batch, args.num_workers, args.actors)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
