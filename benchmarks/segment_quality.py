"""The quality part of benchmarks/segment.py: promptable masks on builtin:animal-scenes' test split.

Contenders, scored by `cvfm evaluate segmentation`'s protocol (1 click at the point farthest from the
boundary, further clicks at the centre of the largest error region, the object's tight box):
  untrained   cvfm/tiny-sam as the registry builds it (seeded random weights)
  trained     the same model after `cvfm segment train` on the train split
  otsu/flood  non-learned baselines: Otsu's threshold on the grey levels inside the box (the side that
              touches the box's border less is the object); OpenCV's flood fill from each click (a
              positive click adds the region it floods, a negative one removes it), its colour tolerance
              the best of a few on train images
and the data-engine loop: train on 10% of the train images' masks; label the other 90% with
`cvfm segment auto`; train again on the 10% plus those pseudo-labels, against the 10% alone for the same
number of steps. Every model goes through the CLI, as a user runs it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from cvfm.data.coco import write_coco
from cvfm.data.instances import decode_masks
from cvfm.data.masks_source import open_masks
from cvfm.data.sources import subset
from cvfm.eval.segmentation import Click, iou, mask_box, simulate_clicks

DATA = "builtin:animal-scenes"
FLOOD_TOLERANCES = (4, 8, 16, 32)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def otsu_in_box(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The object inside `box` (x0, y0, x1, y1, inclusive) of an RGB image by Otsu's threshold on grey."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    grey = cv2.cvtColor(np.ascontiguousarray(image[y0 : y1 + 1, x0 : x1 + 1]), cv2.COLOR_RGB2GRAY)
    _, fg = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
    if border.mean() > 0.5:  # the background touches the box: the object is the other side
        fg = 1 - fg
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[y0 : y1 + 1, x0 : x1 + 1] = fg.astype(bool)
    return mask


def flood(image: np.ndarray, click: Click, tolerance: int) -> np.ndarray:
    """The 8-connected region of `image` reached from the click in steps of at most `tolerance` a channel."""
    h, w = image.shape[:2]
    region = np.zeros((h + 2, w + 2), dtype=np.uint8)
    flags = 8 | cv2.FLOODFILL_MASK_ONLY | (1 << 8)
    cv2.floodFill(image.copy(), region, (click.x, click.y), 0, (tolerance,) * 3, (tolerance,) * 3, flags)
    return region[1:-1, 1:-1].astype(bool)


class FloodClicks:
    """Flood fill as the click protocol's predictor: positive clicks add their region, negative ones cut."""

    def __init__(self, image: np.ndarray, tolerance: int):
        self.image, self.tolerance = image, tolerance

    def __call__(self, clicks: list[Click]) -> tuple[np.ndarray, np.ndarray]:
        mask = np.zeros(self.image.shape[:2], dtype=bool)
        for c in clicks:
            region = flood(self.image, c, self.tolerance)
            mask = mask | region if c.positive else mask & ~region
        return mask[None], np.ones(1)


def objects(split: str, limit: int):
    """(RGB image, its non-empty masks (N, H, W)) for the first `limit` images of a split."""
    source = open_masks(DATA, split=split)
    for k in range(min(limit, len(source))):
        masks = decode_masks(source.items[k].target)
        masks = masks[masks.reshape(len(masks), -1).any(axis=1)]
        if len(masks):
            yield np.asarray(source.load(k).convert("RGB")), masks


def baselines(images: int, tune_images: int = 50) -> dict:
    """1-click, 5-click and box mIoU of the non-learned baselines on the test split."""
    tuned = {}
    for tol in FLOOD_TOLERANCES:
        runs = [
            simulate_clicks(gt, FloodClicks(img, tol), 1, min_clicks=1)
            for img, gts in objects("train", tune_images)
            for gt in gts
        ]
        tuned[tol] = float(np.mean([r.ious[0] for r in runs]))
    tolerance = max(tuned, key=tuned.get)
    one, five, box = [], [], []
    for img, gts in objects("test", images):
        for gt in gts:
            run = simulate_clicks(gt, FloodClicks(img, tolerance), 5, min_clicks=5)
            one.append(run.ious[0])
            five.append(run.ious[4])
            box.append(iou(otsu_in_box(img, mask_box(gt)), gt))
    return {
        "miou@1": float(np.mean(one)),
        "miou@5": float(np.mean(five)),
        "box_miou": float(np.mean(box)),
        "flood_tolerance": tolerance,
        "flood_tolerance_train_miou@1": tuned,
        "instances": len(box),
    }


def train(run: Path, *args: str) -> None:
    """`cvfm segment train ... -o run`, unless an earlier benchmark run finished it (backbone/ is there)."""
    if not (run / "backbone").exists():
        cvfm("segment", "train", *args, "--overwrite", "-o", str(run))


def cvfm(*args: str) -> None:
    """Run the cvfm CLI as a user does (stdout to stderr: the benchmark's own stdout is its report)."""
    cmd = [sys.executable, "-m", "cvfm", *args]
    say("$ cvfm " + " ".join(args))
    subprocess.run(cmd, check=True, stdout=sys.stderr, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def evaluate(model: str, images: int, work: Path, name: str) -> dict:
    out = work / f"eval-{name}.jsonl"
    cvfm(
        "evaluate", "segmentation", model, "--data", DATA, "--prompts", "center,box,clicks",
        "--max-clicks", "5", "--limit", str(images), "--output", str(out),
    )  # fmt: skip
    return json.loads(out.read_text().splitlines()[-1])["metrics"]


def quality(args, work: Path) -> dict:
    """Every figure of the quality part; `work` holds the runs."""
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    t0 = time.perf_counter()
    results["baselines"] = baselines(args.eval_images)
    say(f"[quality] baselines in {time.perf_counter() - t0:.0f} s: {results['baselines']}")
    results["untrained"] = evaluate("cvfm/tiny-sam", args.eval_images, work, "untrained")
    flags = ["--data", DATA, "--split", "train", *shlex.split(args.train_flags)]
    train(work / "trained", "--model", "cvfm/tiny-sam", *flags)
    results["train_seconds"] = json.loads((work / "trained" / "run.json").read_text())["wall_s"]
    results["trained"] = evaluate(str(work / "trained"), args.eval_images, work, "trained")
    results["loop"] = engine_loop(args, work)
    return results


def engine_loop(args, work: Path) -> dict:
    """10% labelled -> auto-label the 90% -> retrain on both, against the 10% alone at the same steps."""
    source = open_masks(DATA, split="train")
    n = len(source)
    labelled_n = n // 10
    labelled, unlabelled = work / "labelled-10", work / "unlabelled-90"
    if not labelled.exists():
        write_coco(subset(source, range(labelled_n)), labelled)
    if not unlabelled.exists():
        write_coco(subset(source, range(labelled_n, n)), unlabelled)
    epochs = args.loop_epochs
    ten = ["--data", str(labelled / "annotations.json"), *shlex.split(args.loop_flags)]
    # The 10% alone, as many steps as the retraining on 10% + 90% will take (10x the epochs).
    train(work / "ten", "--model", "cvfm/tiny-sam", *ten, "--epochs", str(10 * epochs))
    auto = work / "auto-90"
    cvfm(
        "segment", "auto", str(work / "ten"), "--data", str(unlabelled / "images"), "--format", "coco-rle",
        "--points-per-side", str(args.loop_points), "--pred-iou-thresh", str(args.auto_iou),
        "--stability-score-thresh", str(args.auto_stability), "-o", str(auto),
    )  # fmt: skip
    train(
        work / "ten-plus-auto", "--model", "cvfm/tiny-sam", *ten, "--epochs", str(epochs),
        "--pseudo", str(auto), "--pseudo-images", str(unlabelled / "images"),
    )  # fmt: skip
    run = json.loads((work / "ten-plus-auto" / "run.json").read_text())
    return {
        "pseudo": run["data"]["pseudo"],
        "labelled_images": labelled_n,
        "unlabelled_images": n - labelled_n,
        "ten": evaluate(str(work / "ten"), args.eval_images, work, "ten"),
        "ten_plus_auto": evaluate(str(work / "ten-plus-auto"), args.eval_images, work, "ten-plus-auto"),
    }


def add_arguments(p) -> None:
    p.add_argument("--eval-images", type=int, default=100, help="test images scored (all their objects)")
    p.add_argument(
        "--train-flags",
        default="--epochs 2 --train-encoder --lr 3e-3 --opt focal_weight=1",
        help="segment train's flags for the trained contender",
    )
    p.add_argument(
        "--loop-flags",
        default="--train-encoder --lr 3e-3 --opt focal_weight=1",
        help="segment train's flags in the data-engine loop (its epochs come from --loop-epochs)",
    )
    p.add_argument("--loop-epochs", type=int, default=2, help="epochs over 10%% + 90%% (the 10%% alone: 10x)")
    p.add_argument("--loop-points", type=int, default=16, help="segment auto's points per side")
    p.add_argument("--auto-iou", type=float, default=0.4, help="segment auto's --pred-iou-thresh")
    p.add_argument("--auto-stability", type=float, default=0.8, help="auto's --stability-score-thresh")
    p.add_argument("--work", default="bench-segment", help="folder for the runs (kept; reruns reuse it)")


def report(results: dict) -> None:
    keys = ("miou@1", "miou@5", "box_miou")
    print("Promptable masks on builtin:animal-scenes test (mIoU over every object of the scored images):")
    print(f"{'contender':<34}{'1 click':>9}{'5 clicks':>10}{'box':>8}")
    rows = [
        ("cvfm/tiny-sam, untrained", results["untrained"]),
        (f"trained ({results['train_seconds']:.0f} s)", results["trained"]),
        (f"otsu in box / flood fill (tol {results['baselines']['flood_tolerance']})", results["baselines"]),
        (f"loop: 10% alone ({results['loop']['labelled_images']} images)", results["loop"]["ten"]),
        ("loop: 10% + auto-labelled 90%", results["loop"]["ten_plus_auto"]),
    ]
    for name, m in rows:
        print(f"{name:<34}" + "".join(f"{m[k]:>{w}.3f}" for k, w in zip(keys, (9, 10, 8), strict=True)))
    p = results["loop"]["pseudo"]
    print(f"(pseudo-labels kept: {p['masks']} masks on {p['images']} of {p['images_labelled']} images)")
