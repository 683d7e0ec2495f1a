"""`cvfm embed` benchmark: images/s against the loop users write, and against the model alone; peak memory.

Run from the repository root with the venv active:

    HF_HUB_OFFLINE=1 python benchmarks/embed.py --quick          # smoke test, about 1 minute on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/embed.py                  # default: about 5 minutes on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/embed.py --images 640 --rounds 5 --json /tmp/embed.json

Part 1 (speed). One ViT-B/32-sized CLIPModel with random weights (transformers, built in code: vision
width 768, 12 layers, patch 32 at 224 px; projection 512) is saved to a temporary folder with a
CLIPImageProcessor configured in code, and N real photos (crops of scikit-learn's two sample photos,
320x240 JPEGs) are written to another. In one process, with the same torch thread count for everyone
(the one `cvfm embed` picks: the cores its 2 decoding workers leave), rounds alternate:

  cvfm    `cvfm.embed.embed(model_folder, image_folder, out, precision="auto", batch_size=32)`: the
          library call behind the command (workers decode while the model runs). Images/s is measured
          from the end of the first part to the end of the last (parts of one batch), so model loading
          and worker start-up are excluded, as the others exclude model building and a warm-up batch.
  naive   the loop users write with transformers, fp32: per batch of 32, PIL open + CLIPImageProcessor
          + `model.get_image_features`, then L2 normalisation.
  bound   `model.get_image_features` alone on tensors decoded and preprocessed beforehand, at the
          precision cvfm used (`--precision auto`: bf16 autocast on a CPU with avx512_bf16/amx, else
          fp32): what embedding could reach if decoding were free.

OMP_NUM_THREADS=k sets every contender's torch threads instead (cvfm keeps it). Targets: cvfm / naive
>= 1.5, cvfm / bound >= 0.8. The median over rounds is reported; the cosine between cvfm's and the naive
loop's embeddings checks that both computed the same thing (bf16 vs fp32 and torchvision vs transformers
resizing differ slightly), next to the mean cosine between different images' embeddings for scale.

Part 2 (memory). Peak RSS of `embed(...)` with cvfm/tiny-resnet over manifests of 1k and 20k rows (the
same small PNGs repeated, ids unique), each in a fresh subprocess: the main process's peak (VmHWM) and
the largest decoding worker's (ru_maxrss: it counts the pages a forked worker shares with the main
process). Embeddings are held one part (--part-size, default 10k rows) at a time, so beyond one part
the peak should not grow with the dataset. Nothing here asserts on timings.

Measured on a 2-core AMD EPYC (avx512_bf16) shared with other work, default run (320 photos, 3 rounds,
4.5 minutes): cvfm 36.2 img/s (bf16, 1 torch thread + 2 workers), naive 10.4 img/s (fp32), bound
37.6 img/s (bf16): cvfm/naive 3.48x, cvfm/bound 0.96x; cosine cvfm vs naive >= 0.99999. Peak RSS of
the main process 830 MB at 1k images, 875 MB at 20k (1.05x; 517 MB of it is importing torch).
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


def build_clip(folder: Path):
    """A ViT-B/32-sized CLIPModel (random weights, seed 0) and its processor, saved to `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from cvfm.models.tiny_clip import build_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 32,
        },
        text_config={
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
        },
        projection_dim=512,
    )
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
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
def naive_loop(model, processor, paths: list[Path], batch: int) -> tuple[float, np.ndarray]:
    """images/s of the transformers loop (first batch = warm-up, not timed), and its embeddings."""
    from PIL import Image

    feats, t0, timed = [], None, 0
    for i in range(0, len(paths), batch):
        if i == batch:
            t0 = time.perf_counter()
        images = [Image.open(p).convert("RGB") for p in paths[i : i + batch]]
        inputs = processor(images=images, return_tensors="pt")
        f = _features(model.get_image_features(**inputs))
        feats.append((f / f.norm(dim=-1, keepdim=True)).numpy())
        timed += len(images) if i >= batch else 0
    return timed / (time.perf_counter() - t0), np.concatenate(feats)


@torch.inference_mode()
def bound(model, pixels: torch.Tensor, batch: int, amp: torch.dtype | None) -> float:
    """images/s of the forward alone on pre-decoded tensors (first batch = warm-up)."""
    from cvfm.runtime.precision import autocast

    t0, timed = None, 0
    for i in range(0, len(pixels), batch):
        if i == batch:
            t0 = time.perf_counter()
        with autocast("cpu", amp):
            _features(model.get_image_features(pixel_values=pixels[i : i + batch])).float()
        timed += len(pixels[i : i + batch]) if i >= batch else 0
    return timed / (time.perf_counter() - t0)


def cvfm_embed(model_dir: Path, image_dir: Path, out: Path, batch: int, workers: int, part: int) -> dict:
    """images/s of `cvfm.embed.embed` after its first part, its total wall time, and its embeddings."""
    from cvfm.embed import embed

    stamps: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    summary = embed(
        str(model_dir),
        str(image_dir),
        str(out),
        batch_size=batch,
        num_workers=workers,
        precision="auto",
        part_size=part,
        overwrite=True,
        on_part=lambda p: stamps.append((p, time.perf_counter())),
    )
    total = time.perf_counter() - t0
    t_first, t_last = stamps[0][1], stamps[-1][1]
    rows = summary["rows"] - part  # parts 1..last
    parts = sorted(out.glob("img_emb/img_emb_*.npy"), key=lambda p: int(p.stem.split("_")[-1]))
    emb = np.concatenate([np.load(p) for p in parts])
    return {
        "images_per_s": rows / (t_last - t_first),
        "wall_s": total,
        "precision": summary["precision"],
        "emb": emb,
    }


# ---------------------------------------------------------------------------------------------- memory

# The main process's peak is VmHWM (reset by exec; ru_maxrss is not, and would count the benchmark's own
# pages at fork time). A worker's ru_maxrss counts the pages it shares with the main process (fork).
_RSS_CHILD = """
import json, resource, sys, time
from cvfm.embed import embed
t = time.perf_counter()
s = embed("cvfm/tiny-resnet", sys.argv[1], sys.argv[2], num_workers=2, batch_size=256)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({
    "rows": s["rows"], "parts": s["parts"]["written"], "seconds": time.perf_counter() - t,
    "main_mb": int(status["VmHWM"].split()[0]) / 1024,
    "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def peak_rss(tmp: Path, sizes: list[int], distinct: int = 200) -> list[dict]:
    """Peak RSS of embedding manifests of `sizes` rows (small PNGs repeated), one subprocess each."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = np.clip(load_digits().images * 16, 0, 255).astype(np.uint8)
    folder = tmp / "rss_images"
    folder.mkdir()
    files = []
    for i in range(distinct):
        path = folder / f"{i:04d}.png"
        Image.fromarray(digits[i]).resize((64, 64)).save(path)
        files.append(str(path))
    rows = []
    for n in sizes:
        manifest = tmp / f"rss_{n}.jsonl"
        with open(manifest, "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"r{i}", "image": files[i % distinct]}) + "\n")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        out = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, str(manifest), str(tmp / f"rss_out_{n}")],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        rows.append({"images": n, **json.loads(out.stdout.strip().splitlines()[-1])})
        r = rows[-1]
        say(
            f"  {n:>6} images: main {r['main_mb']:.0f} MB, largest worker {r['worker_mb']:.0f} MB, "
            f"{r['seconds']:.0f} s"
        )
    return rows


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="96 images, 1 round, memory at 1k vs 4k")
    ap.add_argument("--images", type=int, default=None, help="photos for the speed part (default 320)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--rss-sizes", default=None, help="comma-separated manifest sizes (default 1000,20000)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    n = args.images or (96 if args.quick else 320)
    rounds = args.rounds or (1 if args.quick else 3)
    sizes = [int(s) for s in (args.rss_sizes or ("1000,4000" if args.quick else "1000,20000")).split(",")]
    batch, part = args.batch_size, args.batch_size
    if n < 3 * part:
        raise SystemExit(f"--images must be at least {3 * part} (3 parts of one batch)")

    import cvfm
    from cvfm.data.decode import decode_image
    from cvfm.embed.run import compute_threads
    from cvfm.registry import create_encoder
    from cvfm.runtime.precision import cpu_has_bf16, precision_name, resolve_precision

    threads = compute_threads(args.num_workers)
    amp = resolve_precision("auto", "cpu")
    results: dict = {
        "cvfm": cvfm.__version__,
        "torch": torch.__version__,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": threads,
        "cpu_bf16": cpu_has_bf16(),
        "precision_auto": precision_name(amp),
        "images": n,
        "batch_size": batch,
        "num_workers": args.num_workers,
        "rounds": [],
    }
    say(
        f"cvfm {cvfm.__version__}, torch {torch.__version__}: {results['cores']} cores, {threads} torch "
        f"thread(s), {args.num_workers} workers, --precision auto = {precision_name(amp)}"
    )
    with tempfile.TemporaryDirectory(prefix="cvfm_embed_bench_") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_speed:
            say(f"setup: {n} photos (320x240 JPEG), ViT-B/32-sized CLIP with random weights")
            paths = write_photos(tmp / "photos", n)
            model, processor = build_clip(tmp / "clip")
            transform = create_encoder(str(tmp / "clip")).preprocess.transform()
            pixels = torch.stack([transform(decode_image(p)) for p in paths])
            for r in range(rounds):
                row = {"bound": bound(model, pixels, batch, amp)}
                naive, naive_emb = naive_loop(model, processor, paths, batch)
                row["naive"] = naive
                c = cvfm_embed(tmp / "clip", tmp / "photos", tmp / "out", batch, args.num_workers, part)
                row["cvfm"], row["cvfm_wall_s"] = c["images_per_s"], c["wall_s"]
                cos = (c["emb"] * naive_emb).sum(1)
                row["cosine_min"], row["cosine_mean"] = float(cos.min()), float(cos.mean())
                between = naive_emb @ naive_emb.T  # for scale: how alike different images' embeddings are
                row["cosine_between_images"] = float(between[~np.eye(len(between), dtype=bool)].mean())
                results["rounds"].append(row)
                say(
                    f"round {r + 1}/{rounds}: cvfm {row['cvfm']:.1f} img/s ({c['precision']}; "
                    f"{row['cvfm_wall_s']:.0f} s end to end incl. model load), "
                    f"naive {naive:.1f} img/s (fp32), "
                    f"bound {row['bound']:.1f} img/s ({precision_name(amp)}); cosine cvfm vs naive "
                    f"min {row['cosine_min']:.5f} (different images: {row['cosine_between_images']:.2f})"
                )
            med = {k: statistics.median(r[k] for r in results["rounds"]) for k in ("cvfm", "naive", "bound")}
            ratios = {"cvfm/naive": med["cvfm"] / med["naive"], "cvfm/bound": med["cvfm"] / med["bound"]}
            results["median_images_per_s"], results["ratios"] = med, ratios
            say("")
            say(
                f"images/s (median of {rounds}): cvfm {med['cvfm']:.1f}, naive {med['naive']:.1f}, "
                f"bound {med['bound']:.1f}"
            )
            for k, v in ratios.items():
                verdict = "meets" if v >= TARGETS[k] else "MISSES"
                say(f"  {k:<11} {v:5.2f}x   target >= {TARGETS[k]}x: {verdict}")
            del model, pixels
        if not args.skip_memory:
            say("")
            say(f"peak RSS, cvfm/tiny-resnet, 2 workers, default --part-size (fresh process each): {sizes}")
            results["memory"] = peak_rss(tmp, sizes)
            first, last = results["memory"][0], results["memory"][-1]
            growth = last["main_mb"] / first["main_mb"]
            results["memory_growth"] = growth
            say(f"  main-process peak {last['images']} vs {first['images']} images: {growth:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
