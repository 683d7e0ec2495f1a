"""Segment Anything benchmark: automatic masks per second against transformers' own mask-generation pipeline.

    HF_HUB_OFFLINE=1 python benchmarks/segment.py [--part speed|quality|all] [--size 512] [--images 3]

Speed: the same weights and settings for three contenders, alternating image by image over rounds:
  pipeline  transformers' `pipeline("mask-generation")` (its own preprocessing, point batches, filtering,
            NMS and RLE), as its users run it
  cvfm      `cvfm.segment.generate_masks` (what `cvfm segment auto` runs per image)
  bound     the model alone on the same points: the image encoder once, then the prompt encoder and mask
            decoder on every batch of points; no preprocessing, filtering, upscaling or encoding
on scikit-image's sample photos (odd sizes, not square). Models: a ViT-B-shaped SAM (width 768, 12
layers, global attention at 2, 5, 8, 11) with random weights at a smaller input (default 512 px, to fit
a CPU), and cvfm/tiny-sam. Random weights give near-zero predicted IoUs, so every contender keeps masks
with predicted IoU >= 0 and stability >= 0 (the filters still run); the masks of cvfm and the pipeline are
matched at IoU >= 0.95 to show both find the same ones. Figures are medians of per-image seconds.

Quality (`--part quality`, benchmarks/segment_quality.py): the untrained and trained cvfm/tiny-sam against
non-learned baselines, and the data-engine loop, all through the CLI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This folder holds ssl.py (the SSL benchmark): keep it off the path, where it would shadow the ssl module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cvfm.data.instances import decode_mask  # noqa: E402
from cvfm.models.amg import AutoSettings, generate_masks  # noqa: E402
from cvfm.models.segmenter import Segmenter  # noqa: E402


def _load(name: str):
    """A module of this folder, loaded by path (the folder itself is off sys.path, see above)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


segment_quality = _load("segment_quality")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def photos(n: int):
    import skimage.data
    from PIL import Image

    names = ["coffee", "chelsea", "rocket", "astronaut", "immunohistochemistry", "hubble_deep_field"]
    return [(name, Image.fromarray(getattr(skimage.data, name)()).convert("RGB")) for name in names[:n]]


def vit_b_shaped(size: int) -> Segmenter:
    from transformers import SamConfig, SamModel

    from cvfm.models.tiny_sam import PREPROCESS

    config = SamConfig(
        vision_config={"image_size": size, "global_attn_indexes": [2, 5, 8, 11], "initializer_range": 0.02},
        prompt_encoder_config={"image_size": size},
    )
    torch.manual_seed(0)
    model = SamModel(config).eval()
    pre = PREPROCESS.__class__(**{**PREPROCESS.__dict__, "size": size})
    return Segmenter(model, f"vit-b-shaped-{size}", pre)


def processor(segmenter: Segmenter):
    from transformers import SamImageProcessor

    s = segmenter.input_size
    return SamImageProcessor(size={"longest_edge": s}, pad_size={"height": s, "width": s})


def pipeline_contender(segmenter: Segmenter, settings: AutoSettings):
    from transformers import pipeline

    pipe = pipeline(
        "mask-generation", model=segmenter.model, image_processor=processor(segmenter), device="cpu"
    )
    kwargs = dict(
        points_per_batch=settings.points_per_batch,
        points_per_crop=settings.points_per_side,
        pred_iou_thresh=settings.pred_iou_thresh,
        stability_score_thresh=settings.stability_score_thresh,
        stability_score_offset=settings.stability_score_offset,
        crops_nms_thresh=settings.box_nms_thresh,
    )

    def run(image):
        out = pipe(image, **kwargs)
        return [np.asarray(m, dtype=bool) for m in out["masks"]]

    return run


def cvfm_contender(segmenter: Segmenter, settings: AutoSettings):
    def run(image):
        return [decode_mask(r["segmentation"]) for r in generate_masks(segmenter, image, settings)]

    return run


def bound_contender(segmenter: Segmenter, settings: AutoSettings):
    from cvfm.models.amg.crops import point_grid

    transform = segmenter.preprocess.transform()
    grid = torch.from_numpy(point_grid(settings.points_per_side)).float()

    @torch.no_grad()
    def run(image):
        size = (image.height, image.width)
        emb = segmenter.embed_image(transform(image)[None], [size])
        points = grid * torch.tensor([image.width, image.height])
        for start in range(0, len(points), settings.points_per_batch):
            batch = points[start : start + settings.points_per_batch, None]
            segmenter.decode(emb, points=batch, multimask=True)
        return []

    return run


def matched(a: list[np.ndarray], b: list[np.ndarray], threshold: float = 0.95) -> float:
    """The share of masks in `a` with a mask in `b` at IoU >= threshold."""
    if not a:
        return float("nan")
    hits = 0
    for m in a:
        for n in b:
            if m.shape == n.shape:
                union = np.logical_or(m, n).sum()
                if union and np.logical_and(m, n).sum() / union >= threshold:
                    hits += 1
                    break
    return hits / len(a)


def speed(args) -> dict:
    torch.set_num_threads(args.threads)
    images = photos(args.images)
    settings = AutoSettings(
        points_per_side=args.points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    from cvfm.registry import create_segmenter

    models = {"vit-b-shaped": vit_b_shaped(args.size), "tiny": create_segmenter("cvfm/tiny-sam")}
    results = {}
    for label, segmenter in models.items():
        contenders = {
            "pipeline": pipeline_contender(segmenter, settings),
            "cvfm": cvfm_contender(segmenter, settings),
            "bound": bound_contender(segmenter, settings),
        }
        seconds = {k: [] for k in contenders}
        agreement = []
        for _, image in images[:1]:  # warm-up
            for run in contenders.values():
                run(image)
        for r in range(args.rounds):
            for name, image in images:
                masks = {}
                order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
                for k in order:
                    t0 = time.perf_counter()
                    masks[k] = contenders[k](image)
                    seconds[k].append(time.perf_counter() - t0)
                if r == 0:
                    agreement.append(
                        {
                            "image": name,
                            "cvfm": len(masks["cvfm"]),
                            "pipeline": len(masks["pipeline"]),
                            "cvfm_in_pipeline": matched(masks["cvfm"], masks["pipeline"]),
                            "pipeline_in_cvfm": matched(masks["pipeline"], masks["cvfm"]),
                        }
                    )
            say(
                f"[speed] {label} round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k} {statistics.median(v):.3f} s" for k, v in seconds.items())
            )
        med = {k: statistics.median(v) for k, v in seconds.items()}
        results[label] = {
            "seconds_per_image": med,
            "cvfm_vs_pipeline": med["pipeline"] / med["cvfm"],
            "cvfm_vs_bound": med["bound"] / med["cvfm"],
            "pipeline_vs_bound": med["bound"] / med["pipeline"],
            "agreement": agreement,
        }
    return results


def report(results: dict, args) -> None:
    print(
        f"Automatic masks, seconds per image (median over {args.rounds} rounds x {args.images} photos, "
        f"{args.points_per_side}x{args.points_per_side} points, batches of 64, {args.threads} thread(s)):"
    )
    print(f"{'model':<14}{'pipeline':>10}{'cvfm':>10}{'bound':>10}{'cvfm/pipeline':>15}{'cvfm/bound':>12}")
    for label, r in results.items():
        s = r["seconds_per_image"]
        print(
            f"{label:<14}{s['pipeline']:>10.3f}{s['cvfm']:>10.3f}{s['bound']:>10.3f}"
            f"{r['cvfm_vs_pipeline']:>14.2f}x{r['cvfm_vs_bound']:>11.2f}x"
        )
    print("(cvfm/pipeline: the pipeline's time over cvfm's; cvfm/bound: the model-only time over cvfm's)")
    for label, r in results.items():
        for a in r["agreement"]:
            print(
                f"  {label} {a['image']}: cvfm {a['cvfm']} masks, pipeline {a['pipeline']}; matched at "
                f"IoU >= 0.95: {a['cvfm_in_pipeline']:.3f} of cvfm's, "
                f"{a['pipeline_in_cvfm']:.3f} of the pipeline's"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="input size of the ViT-B-shaped SAM")
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--part", choices=("speed", "quality", "all"), default="all")
    segment_quality.add_arguments(p)
    args = p.parse_args()
    out = {}
    if args.part in ("quality", "all"):
        out["quality"] = segment_quality.quality(args, Path(args.work))
        segment_quality.report(out["quality"])
    if args.part in ("speed", "all"):
        out["speed"] = speed(args)
        report(out["speed"], args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
