"""CapFilt on built-in pairs with a known share of corrupted captions; speed against a per-pair loop.

1. Fine-tune `cvfm/tiny-blip` as filter (`pretrain --method blip-filter`) and captioner
   (`--method blip-captioner`) on the clean training pairs of `builtin:animal-captions`.
2. Write the test images with their captions, a `--corrupt` share of them corrupted (the class or the
   colour word swapped for another), run `cvfm capfilt`, and report precision / recall of dropping the
   corrupted web captions (at the threshold, and at others on the same scores), the share of true
   captions kept, and how often the synthetic captions name the right class and colour.
3. How well the filter ranks: for every test image, does its true caption score above a corrupted copy
   of it, by ITM and by ITC (cosine of the contrastive embeddings)? And what beam search (3 beams)
   captions get right, next to the nucleus-sampled captions of step 2.
4. Pairs/s of `capfilt` against the loop users write over the same models (one pair at a time: decode,
   generate, score), on the same pairs, alternating round by round (see `speed`).

    python benchmarks/capfilt.py            # about 25 minutes on 2 idle CPU cores (mostly fine-tuning)
    python benchmarks/capfilt.py --quick    # a smoke run
    python benchmarks/capfilt.py --filter runs/filter --captioner runs/captioner   # reuse fine-tuned runs
    python benchmarks/capfilt.py --filter F --captioner C --skip-quality   # the speed part alone
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == HERE:  # run as a script: import the installed cvfm
    sys.path.pop(0)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cvfm.data.builtin import ANIMAL_CLASSES, COLOURS, _captioned, split_indices  # noqa: E402

DATA = "builtin:animal-captions"


def finetune(method: str, out: Path, epochs: int, batch_size: int) -> Path:
    from cvfm.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        data=DATA,
        split="train",
        output=str(out),
        method=method,
        model="cvfm/tiny-blip",
        epochs=epochs,
        batch_size=batch_size,
        overwrite=True,
    )
    t0 = time.perf_counter()
    path = pretrain(cfg)
    print(
        f"fine-tuned {method}: {epochs} epochs in {time.perf_counter() - t0:.0f} s: {path}", file=sys.stderr
    )
    return path


def corrupt(caption: str, rng: np.random.Generator) -> str:
    """Swap the class or the colour word of a built-in caption for another one."""
    words = caption.split()
    classes = [i for i, w in enumerate(words) if w in ANIMAL_CLASSES]
    colours = [i for i, w in enumerate(words) if w in COLOURS]
    i = int(classes[0]) if (rng.random() < 0.5 and classes) or not colours else int(colours[0])
    pool = ANIMAL_CLASSES if words[i] in ANIMAL_CLASSES else list(COLOURS)
    words[i] = str(rng.choice([w for w in pool if w != words[i]]))
    return " ".join(words)


def write_pairs(folder: Path, n: int, share: float, seed: int) -> tuple[Path, dict[str, dict]]:
    """Test images as PNG files and a pairs.jsonl; returns the truth per id (class, colour, corrupted)."""
    pixels, labels, classes, captions = _captioned("animal-captions")
    rng = np.random.default_rng(seed)
    test = rng.permutation(split_indices(labels, "test"))[:n]
    corrupted = set(rng.permutation(len(test))[: round(share * len(test))].tolist())
    truth, lines = {}, []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(test):
        path = folder / "images" / f"{i}.png"
        Image.fromarray(pixels[i]).save(path)
        colour = next(w for w in captions[i].split() if w in COLOURS)
        text = corrupt(captions[i], rng) if k in corrupted else captions[i]
        truth[str(i)] = {
            "class": classes[labels[i]],
            "colour": colour,
            "caption": captions[i],
            "corrupted": k in corrupted,
        }
        lines.append(json.dumps({"id": str(i), "image": f"images/{i}.png", "text": text}))
    manifest = folder / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, truth


def names(caption: str, t: dict) -> tuple[bool, bool]:
    """Does the caption name the image's class, and its colour?"""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return t["class"] in words, t["colour"] in words


def caption_accuracy(captions: list[tuple[str, str]], truth: dict[str, dict]) -> dict:
    """Shares of (id, caption) that name the right class, colour, and both."""
    hits = np.array([names(c, truth[i]) for i, c in captions], dtype=bool).reshape(-1, 2)
    if not len(hits):
        return {"captions": 0, "class": float("nan"), "colour": float("nan"), "both": float("nan")}
    both = hits[:, 0] & hits[:, 1]
    return {
        "captions": len(hits),
        "class": hits[:, 0].mean(),
        "colour": hits[:, 1].mean(),
        "both": both.mean(),
    }


def quality(records: list[dict], truth: dict[str, dict], threshold: float) -> dict:
    dropped = {r["id"] for r in records if r["text"] not in r["captions"]}
    bad = {i for i, t in truth.items() if t["corrupted"]}
    hit = len(dropped & bad)
    synthetic = [(r["id"], s) for r in records for s in r["scores"] if s["source"] == "synthetic"]
    web = {r["id"]: next(x["itm"] for x in r["scores"] if x["source"] == "web") for r in records}
    sweep = {}
    for t in (0.1, 0.2, 0.3, 0.4, 0.5):  # the same scores, other thresholds: how separable they are
        low = {i for i, score in web.items() if score < t}
        sweep[str(t)] = {
            "precision": len(low & bad) / max(len(low), 1),
            "recall": len(low & bad) / max(len(bad), 1),
        }
    clean = [score for i, score in web.items() if i not in bad]
    return {
        "threshold_sweep": sweep,
        "pairs": len(records),
        "corrupted": len(bad),
        "dropped": len(dropped),
        "drop_precision": hit / max(len(dropped), 1),
        "drop_recall": hit / max(len(bad), 1),
        "true_captions_kept": float(np.mean([s >= threshold for s in clean])),
        "synthetic": caption_accuracy([(i, s["caption"]) for i, s in synthetic], truth),
        "kept_synthetic": caption_accuracy([(i, s["caption"]) for i, s in synthetic if s["kept"]], truth),
    }


def load_pixels(manifest: Path, transform, ids: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """The manifest's images (or those of `ids`) decoded and preprocessed, in manifest order."""
    from cvfm.data.decode import decode_image

    recs = [json.loads(line) for line in manifest.read_text().splitlines()]
    recs = [r for r in recs if ids is None or r["id"] in ids]
    pixels = torch.stack([transform(decode_image(manifest.parent / r["image"])) for r in recs])
    return [r["id"] for r in recs], pixels


@torch.inference_mode()
def ranking(matcher, manifest: Path, truth: dict[str, dict], seed: int, batch: int = 64) -> dict:
    """For every image: does its true caption score above a corrupted copy of it (the class or the
    colour word swapped, drawn with `seed`), by the ITM probability and by the ITC cosine?"""
    from cvfm.capfilt import itm_scores

    rng = np.random.default_rng(seed)
    ids, pixels = load_pixels(manifest, matcher.preprocess.transform())
    pairs = [(truth[i]["caption"], corrupt(truth[i]["caption"], rng)) for i in ids]
    itm, itc = [], []
    for s in range(0, len(ids), batch):
        px, texts = pixels[s : s + batch], pairs[s : s + batch]
        itm += [a > b for a, b in itm_scores(matcher, px, [list(p) for p in texts])]
        img = matcher.image_embeddings(px)[1]
        true = matcher.text_embeddings(matcher.tokenize([p[0] for p in texts], px.device))
        fake = matcher.text_embeddings(matcher.tokenize([p[1] for p in texts], px.device))
        itc += ((img * true).sum(-1) > (img * fake).sum(-1)).tolist()
    return {
        "images": len(ids),
        "itm_true_above_corrupted": np.mean(itm),
        "itc_true_above_corrupted": np.mean(itc),
    }


@torch.inference_mode()
def beam_captions(captioner, manifest: Path, truth: dict[str, dict], prompt: str, batch: int = 64) -> dict:
    """What beam search (3 beams, one caption per image) gets right, for comparison with sampling."""
    ids, pixels = load_pixels(manifest, captioner.preprocess.transform())
    captions = []
    for s in range(0, len(ids), batch):
        captions += [c[0] for c in captioner.generate(pixels[s : s + batch], prompt=prompt, num_beams=3)]
    return caption_accuracy(list(zip(ids, captions, strict=True)), truth)


# ----------------------------------------------------------------------------------------------- speed


def per_pair_loop(manifest: Path, captioner, matcher, args, shared: bool) -> float:
    """The loop users write: one pair at a time (open the image, sample captions, score them), same
    models and settings, fp32; pairs/s after the first pair. `shared`: score through
    `cvfm.capfilt.itm_scores` (the image tower once per image), else `Matcher.itm_probs` (once per
    caption, the image repeated)."""
    from cvfm.capfilt import itm_scores

    transform = captioner.preprocess.transform()
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    with torch.no_grad():
        for k, rec in enumerate(lines):
            if k == 1:
                t0 = time.perf_counter()
            image = Image.open(manifest.parent / rec["image"]).convert("RGB")
            x = transform(image)[None]
            torch.manual_seed(args.seed * 1_000_003 + k)
            synthetic = captioner.generate(
                x, prompt=args.prompt, top_p=args.top_p, num_captions=args.num_captions
            )[0]
            texts = [rec["text"], *synthetic]
            if shared:
                itm_scores(matcher, x, [texts])
            else:
                matcher.itm_probs(x.expand(len(texts), -1, -1, -1), texts)
    return (len(lines) - 1) / (time.perf_counter() - t0)


def capfilt_timed(manifest: Path, out: Path, workers: int, settings: dict, batch: int) -> float:
    """pairs/s of `capfilt` from the end of its first batch to the end of its last (model loading and
    worker start-up excluded, as the loop excludes its first pair)."""
    from cvfm.capfilt import capfilt

    stamps: list[float] = []
    summary = capfilt(
        str(manifest),
        str(out),
        num_workers=workers,
        batch_size=batch,
        overwrite=True,
        on_batch=lambda i: stamps.append(time.perf_counter()),
        **settings,
    )
    return (summary["written"] - batch) / (stamps[-1] - stamps[0])


SPEED_ROWS = {
    "capfilt": "capfilt, {w} decoding workers",
    "capfilt-0": "capfilt, decoding in-process (0 workers)",
    "loop-shared": "per-pair loop, itm_scores (image tower once)",
    "loop": "per-pair loop, Matcher.itm_probs",
}
SPEED_RATIOS = {
    "capfilt/loop": "capfilt / per-pair loop",
    "capfilt-0/loop-shared": "batching pairs (capfilt-0 / loop-shared)",
    "loop-shared/loop": "image tower once per image (loop-shared / loop)",
    "capfilt/capfilt-0": "decoding workers (capfilt / capfilt-0)",
}


def speed(manifest: Path, work: Path, cap: Path, filt: Path, settings: dict, args) -> dict:
    """Every contender on the same pairs: round r takes the next `--round-pairs` pairs of the manifest;
    the contenders' order alternates (forward, then backward). Medians over rounds, and their ratios."""
    from cvfm.registry import create_captioner, create_matcher
    from cvfm.runtime.threads import share_cores_with_workers

    threads = share_cores_with_workers(args.num_workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # capfilt keeps this count: every contender runs it
    print(
        f"speed: {args.rounds} rounds of {args.round_pairs} pairs, fp32, {threads} torch thread(s) each; "
        f"capfilt batches {args.capfilt_batch} pairs",
        flush=True,
    )
    lines = manifest.read_text().splitlines()
    if args.rounds * args.round_pairs > len(lines) or args.round_pairs < 3 * args.capfilt_batch:
        raise SystemExit(
            f"--rounds x --round-pairs must be at most {len(lines)} pairs, --round-pairs at least "
            f"{3 * args.capfilt_batch} (3 capfilt batches)"
        )
    torch.manual_seed(0)
    captioner, matcher = create_captioner(str(cap)).eval(), create_matcher(str(filt)).eval()
    run = {
        "capfilt": lambda m, r: capfilt_timed(
            m, work / f"speed_{r}_a.jsonl", args.num_workers, settings, args.capfilt_batch
        ),
        "capfilt-0": lambda m, r: capfilt_timed(
            m, work / f"speed_{r}_b.jsonl", 0, settings, args.capfilt_batch
        ),
        "loop-shared": lambda m, r: per_pair_loop(m, captioner, matcher, args, shared=True),
        "loop": lambda m, r: per_pair_loop(m, captioner, matcher, args, shared=False),
    }
    rounds = []
    for r in range(args.rounds):
        sub = manifest.parent / f"speed_round_{r}.jsonl"
        sub.write_text("\n".join(lines[r * args.round_pairs : (r + 1) * args.round_pairs]) + "\n")
        order = list(run) if r % 2 == 0 else list(run)[::-1]
        rounds.append({c: run[c](sub, r) for c in order})
        print(f"  round {r + 1}: " + ", ".join(f"{c} {v:.1f}" for c, v in rounds[-1].items()), flush=True)
    med = {c: statistics.median(r[c] for r in rounds) for c in run}
    ratios = {k: med[k.split("/")[0]] / med[k.split("/")[1]] for k in SPEED_RATIOS}
    return {"threads": threads, "rounds": rounds, "median_pairs_per_s": med, "ratios": ratios}


# ------------------------------------------------------------------------------------------------ main


def report(results: dict, args) -> None:
    if "quality" in results:
        q = results["quality"]
        print(f"pairs {q['pairs']} (corrupted {q['corrupted']}), dropped {q['dropped']}")
        print(
            f"dropping corrupted captions: precision {q['drop_precision']:.3f} recall {q['drop_recall']:.3f}"
        )
        for t, pr in q["threshold_sweep"].items():
            print(f"  at threshold {t}: precision {pr['precision']:.3f} recall {pr['recall']:.3f}")
        print(f"true web captions kept at threshold {args.threshold}: {q['true_captions_kept']:.3f}")
        rk = results["ranking"]
        print(
            f"true caption above a corrupted copy of it ({rk['images']} images): ITM "
            f"{rk['itm_true_above_corrupted']:.3f}, ITC {rk['itc_true_above_corrupted']:.3f}"
        )
        for name, acc in (
            (f"sampled (top-p {args.top_p})", q["synthetic"]),
            ("sampled, kept by the filter", q["kept_synthetic"]),
            ("beam search (3 beams)", results["beam"]),
        ):
            print(
                f"synthetic captions, {name}: {acc['captions']} captions; right class {acc['class']:.3f}, "
                f"colour {acc['colour']:.3f}, both {acc['both']:.3f}"
            )
    if "speed" in results:
        sp = results["speed"]
        print(f"pairs/s, median of {len(sp['rounds'])} rounds:")
        for c, name in SPEED_ROWS.items():
            print(f"  {name.format(w=args.num_workers):<48}{sp['median_pairs_per_s'][c]:8.1f}")
        for k, name in SPEED_RATIOS.items():
            extra = " (target >= 3x)" if k == "capfilt/loop" else ""
            print(f"  {name:<48}{sp['ratios'][k]:8.2f}x{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 epoch each, 192 pairs, 2 rounds of 96")
    parser.add_argument("--filter-epochs", type=int, default=30, help="ITM leaves its plateau after ~10")
    parser.add_argument("--captioner-epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64, help="fine-tuning batch")
    parser.add_argument("--pairs", type=int, default=2000, help="test pairs (the split has 2,000)")
    parser.add_argument("--corrupt", type=float, default=0.3)
    parser.add_argument("--num-captions", type=int, default=3)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--prompt", default="a picture of")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=4, help="speed: alternating rounds")
    parser.add_argument("--round-pairs", type=int, default=256, help="speed: pairs per round")
    parser.add_argument("--capfilt-batch", type=int, default=32, help="speed: capfilt's --batch-size")
    parser.add_argument("--num-workers", type=int, default=2, help="capfilt's decoding workers")
    parser.add_argument("--filter", help="use this fine-tuned blip-filter run instead of training one")
    parser.add_argument("--captioner", help="use this fine-tuned blip-captioner run instead of training one")
    parser.add_argument("--skip-quality", action="store_true", help="only the speed part")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.filter_epochs, args.captioner_epochs, args.pairs = 1, 1, 192
        args.rounds, args.round_pairs = 2, 96
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cvfm.capfilt import capfilt
    from cvfm.registry import create_captioner, create_matcher

    work = Path(tempfile.mkdtemp(prefix="cvfm-capfilt-bench-"))
    filt = (
        Path(args.filter)
        if args.filter
        else finetune("blip-filter", work / "filter", args.filter_epochs, args.batch_size)
    )
    cap = (
        Path(args.captioner)
        if args.captioner
        else finetune("blip-captioner", work / "captioner", args.captioner_epochs, args.batch_size)
    )
    manifest, truth = write_pairs(work / "pairs", args.pairs, args.corrupt, args.seed)
    settings = {
        "captioner": str(cap),
        "matcher": str(filt),
        "num_captions": args.num_captions,
        "top_p": args.top_p,
        "prompt": args.prompt,
        "threshold": args.threshold,
        "seed": args.seed,
        "precision": "fp32",  # the per-pair loop runs in fp32 too: both do the same arithmetic
    }
    results: dict = {
        "settings": {
            **settings,
            "filter_epochs": None if args.filter else args.filter_epochs,
            "captioner_epochs": None if args.captioner else args.captioner_epochs,
            "pairs": args.pairs,
            "corrupt": args.corrupt,
        }
    }
    if not args.skip_quality:
        out = work / "filtered.jsonl"
        t0 = time.perf_counter()
        capfilt(str(manifest), str(out), **settings)
        results["capfilt_wall_s"] = time.perf_counter() - t0
        records = [json.loads(line) for line in out.read_text().splitlines()]
        results["quality"] = quality(records, truth, args.threshold)
        torch.manual_seed(0)
        results["ranking"] = ranking(create_matcher(str(filt)).eval(), manifest, truth, args.seed + 1)
        results["beam"] = beam_captions(create_captioner(str(cap)).eval(), manifest, truth, args.prompt)
    if not args.skip_speed:
        results["speed"] = speed(manifest, work, cap, filt, settings, args)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
