"""CapFilt on built-in pairs with a known share of corrupted captions; speed against a per-pair loop.

1. Fine-tune `cvfm/tiny-blip` as filter (`pretrain --method blip-filter`) and captioner
   (`--method blip-captioner`) on the clean training pairs of `builtin:animal-captions`.
2. Write the test images with their captions, a `--corrupt` share of them corrupted (the class or the
   colour word swapped for another), run `cvfm capfilt`, and report precision / recall of dropping the
   corrupted web captions, and how often the synthetic captions name the right class and colour.
3. Pairs/s of `capfilt` against the loop users write over the same models (one pair at a time: decode,
   generate, score), measured in the same run on the same pairs.

    python benchmarks/capfilt.py            # about 20 minutes on 2 CPU cores (mostly fine-tuning)
    python benchmarks/capfilt.py --quick    # a smoke run
    python benchmarks/capfilt.py --filter runs/filter --captioner runs/captioner   # reuse fine-tuned runs
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
    from cvfm.runtime.trainer import PretrainConfig, pretrain

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
    print(f"fine-tuned {method}: {epochs} epochs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
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
        truth[str(i)] = {"class": classes[labels[i]], "colour": colour, "corrupted": k in corrupted}
        lines.append(json.dumps({"id": str(i), "image": f"images/{i}.png", "text": text}))
    manifest = folder / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, truth


def quality(records: list[dict], truth: dict[str, dict]) -> dict:
    dropped = {r["id"] for r in records if r["text"] not in r["captions"]}
    bad = {i for i, t in truth.items() if t["corrupted"]}
    hit = len(dropped & bad)
    synthetic = [(r["id"], s["caption"]) for r in records for s in r["scores"] if s["source"] == "synthetic"]

    def names(caption: str, t: dict) -> bool:
        words = set(re.findall(r"[a-z]+", caption.lower()))
        return t["class"] in words and t["colour"] in words

    right = [names(c, truth[i]) for i, c in synthetic]
    kept_synthetic = [
        names(s["caption"], truth[r["id"]])
        for r in records
        for s in r["scores"]
        if s["source"] == "synthetic" and s["kept"]
    ]
    web = {r["id"]: next(x["itm"] for x in r["scores"] if x["source"] == "web") for r in records}
    sweep = {}
    for t in (0.1, 0.2, 0.3, 0.4, 0.5):  # the same scores, other thresholds: how separable they are
        low = {i for i, score in web.items() if score < t}
        sweep[str(t)] = {
            "precision": len(low & bad) / max(len(low), 1),
            "recall": len(low & bad) / max(len(bad), 1),
        }
    return {
        "threshold_sweep": sweep,
        "pairs": len(records),
        "corrupted": len(bad),
        "dropped": len(dropped),
        "drop_precision": hit / max(len(dropped), 1),
        "drop_recall": hit / max(len(bad), 1),
        "synthetic_right_class_and_colour": float(np.mean(right)) if right else float("nan"),
        "kept_synthetic_right": float(np.mean(kept_synthetic)) if kept_synthetic else float("nan"),
        "kept_synthetic": len(kept_synthetic),
    }


def per_pair_loop(manifest: Path, captioner, matcher, n: int, args) -> float:
    """The loop users write: one pair at a time, same models and settings; returns pairs/s."""
    transform = captioner.preprocess.transform()
    lines = [json.loads(line) for line in manifest.read_text().splitlines()[:n]]
    t0 = time.perf_counter()
    with torch.no_grad():
        for k, rec in enumerate(lines):
            image = Image.open(manifest.parent / rec["image"]).convert("RGB")
            x = transform(image)[None]
            torch.manual_seed(args.seed * 1_000_003 + k)
            synthetic = captioner.generate(
                x, prompt=args.prompt, top_p=args.top_p, num_captions=args.num_captions
            )[0]
            texts = [rec["text"], *synthetic]
            matcher.itm_probs(x.expand(len(texts), -1, -1, -1), texts)
    return len(lines) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 epoch each, 128 pairs")
    parser.add_argument("--filter-epochs", type=int, default=30, help="ITM leaves its plateau after ~10")
    parser.add_argument("--captioner-epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=2000, help="test pairs (the split has 2,000)")
    parser.add_argument("--loop-pairs", type=int, default=128, help="pairs timed in the per-pair loop")
    parser.add_argument("--corrupt", type=float, default=0.3)
    parser.add_argument("--num-captions", type=int, default=3)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--prompt", default="a picture of")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--filter", help="use this fine-tuned blip-filter run instead of training one")
    parser.add_argument("--captioner", help="use this fine-tuned blip-captioner run instead of training one")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.filter_epochs, args.captioner_epochs, args.pairs, args.loop_pairs = 1, 1, 128, 32
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

    out = work / "filtered.jsonl"
    settings = {
        "num_captions": args.num_captions,
        "top_p": args.top_p,
        "prompt": args.prompt,
        "seed": args.seed,
        "precision": "fp32",  # the per-pair loop runs in fp32 too: both do the same arithmetic
    }
    t0 = time.perf_counter()
    capfilt(str(manifest), str(out), captioner=str(cap), matcher=str(filt), **settings)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    results = {"quality": quality(records, truth), "capfilt_pairs_per_s": len(records) / wall}

    captioner, matcher = create_captioner(str(cap)).eval(), create_matcher(str(filt)).eval()
    loop = per_pair_loop(manifest, captioner, matcher, args.loop_pairs, args)
    results.update(loop_pairs_per_s=loop, speedup=results["capfilt_pairs_per_s"] / loop)
    results["settings"] = {
        **settings,
        "filter_epochs": args.filter_epochs,
        "captioner_epochs": args.captioner_epochs,
        "pairs": args.pairs,
        "corrupt": args.corrupt,
        "filter": str(filt),
        "captioner": str(cap),
    }
    q = results["quality"]
    print(f"pairs {q['pairs']} (corrupted {q['corrupted']}), dropped {q['dropped']}")
    print(f"dropping corrupted captions: precision {q['drop_precision']:.3f} recall {q['drop_recall']:.3f}")
    for t, pr in q["threshold_sweep"].items():
        print(f"  at threshold {t}: precision {pr['precision']:.3f} recall {pr['recall']:.3f}")
    print(
        f"synthetic captions naming the right class and colour: {q['synthetic_right_class_and_colour']:.3f}"
        f" (of those kept: {q['kept_synthetic_right']:.3f}, {q['kept_synthetic']} kept)"
    )
    print(
        f"capfilt {results['capfilt_pairs_per_s']:.1f} pairs/s, per-pair loop {loop:.1f} pairs/s: "
        f"{results['speedup']:.2f}x (target >= 3x)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
