"""Why the Segment Anything quality targets are out of reach of a tiny SAM trained for minutes on a CPU.

    HF_HUB_OFFLINE=1 python benchmarks/segment_probe.py ceiling [--images 100]
    HF_HUB_OFFLINE=1 python benchmarks/segment_probe.py shapes [--seconds 240] [--only base,...]

ceiling  the mIoU of an ideal predictor at each low-res mask size on builtin:animal-scenes test: each
         low-res logit is the ground truth's covered fraction of that pixel minus 0.5, upscaled to the
         image as `Segmenter.upscale` does (SamProcessor's resize, then the padding cropped)
shapes   tiny SAM variants trained for a fixed wall time on box prompts only (one decoder pass a step, the
         cheapest recipe: `SamTraining` with no clicks or refinements), 1 thread, lr 3e-3; then held-out
         box IoU on the test split at the masks' resolution, exact boxes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This folder holds ssl.py (the SSL benchmark): keep it off the path, where it would shadow the ssl module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cvfm.data.instances import decode_masks  # noqa: E402
from cvfm.data.loader import ImageDataset, collate  # noqa: E402
from cvfm.data.masks_source import open_masks  # noqa: E402
from cvfm.models import tiny_sam  # noqa: E402
from cvfm.models.segmenter import Segmenter  # noqa: E402
from cvfm.segment.method import SamTrainConfig, SamTraining, low_res  # noqa: E402

DATA = "builtin:animal-scenes"
SHAPES = {  # name: overrides of cvfm/tiny-sam's config ("part.key": value)
    "base": {},
    "wide-decoder": {
        "vision.output_channels": 64,
        "vision.num_pos_feats": 32,
        "decoder.mlp_dim": 128,
        "decoder.iou_head_hidden_dim": 64,
    },
    "deep-encoder": {
        "vision.num_hidden_layers": 4,
        "vision.global_attn_indexes": [1, 3],
        "vision.hidden_size": 64,
    },
    "patch-4": {"vision.patch_size": 4, "vision.window_size": 8},
}


def ceiling(images: int, sides: tuple[int, ...] = (64, 128)) -> dict[int, float]:
    """{low-res side: mIoU of the ideal predictor} over every object of the first `images` test images."""
    source, size = open_masks(DATA, split="test"), tiny_sam.SIZE
    found: dict[int, list[float]] = {side: [] for side in sides}
    for k in range(min(images, len(source))):
        masks = decode_masks(source.items[k].target)
        truth = torch.from_numpy(masks[masks.reshape(len(masks), -1).any(1)])
        h, w = truth.shape[1:]
        if max(h, w) != size:
            raise ValueError(f"the probe assumes {size} px scenes, got {w}x{h}")
        frame = F.pad(truth[:, None].float(), (0, size - w, 0, size - h))
        for side in sides:
            low = F.interpolate(frame, (side, side), mode="area") - 0.5
            up = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)[:, 0, :h, :w] > 0
            inter, union = (up & truth).flatten(1).sum(1), (up | truth).flatten(1).sum(1)
            found[side] += (inter / union).tolist()
    return {side: float(np.mean(v)) for side, v in found.items()}


def build(overrides: dict) -> Segmenter:
    from transformers import SamModel

    config = tiny_sam.tiny_sam_config()
    for key, value in overrides.items():
        part, name = key.split(".")
        target = {"vision": config.vision_config, "decoder": config.mask_decoder_config}[part]
        setattr(target, name, value)
    prompt = config.prompt_encoder_config
    prompt.hidden_size = config.mask_decoder_config.hidden_size = config.vision_config.output_channels
    prompt.patch_size = config.vision_config.patch_size
    prompt.image_embedding_size = tiny_sam.SIZE // prompt.patch_size
    torch.manual_seed(0)
    return Segmenter(SamModel(config), "probe", tiny_sam.PREPROCESS)


def train_boxes(segmenter: Segmenter, seconds: float, lr: float = 3e-3, eval_images: int = 60) -> dict:
    """Box-only SAM training for `seconds` of wall time, then held-out box IoU (low-res, exact boxes)."""
    recipe = SamTrainConfig(train_encoder=True, clicks=0, refine=0, box_share=1.0, focal_weight=1.0)
    method = SamTraining(segmenter, recipe, None)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    transform = segmenter.preprocess.transform()
    train = ImageDataset(open_masks(DATA, split="train"), transform)
    order, start, step = torch.Generator().manual_seed(0), time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step += 1
        batch = collate([train[i] for i in torch.randint(len(train), (8,), generator=order).tolist()])
        batch["image"] = [batch["image"]]
        torch.manual_seed(step)
        loss, _ = method.forward(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    return {"steps": step, "seconds": seconds, "box_iou": held_out_box_iou(method, eval_images)}


@torch.no_grad()
def held_out_box_iou(method: SamTraining, images: int = 60) -> float:
    from torchvision.ops import masks_to_boxes

    segmenter = method.encoder.eval()
    test = ImageDataset(open_masks(DATA, split="test"), segmenter.preprocess.transform())
    method.cfg = SamTrainConfig(instances=10**6)  # every object of an image
    ious = []
    for start in range(0, images, 10):
        batch = collate([test[i] for i in range(start, start + 10)])
        batch["image"] = [batch["image"]]
        emb = segmenter.embed_image(batch["image"][0], [tuple(s) for s in batch["size"].tolist()])
        masks, owner = method._instances(batch, emb)
        boxes = masks_to_boxes(masks).float()
        pred = segmenter.decode_batch(emb.rows(owner).features, boxes=boxes, multimask=False)
        logits = pred.low_res_logits[:, 0]
        truth, mask = low_res(masks, logits.shape[-2:]), logits > 0
        ious += ((mask & truth).flatten(1).sum(1) / (mask | truth).flatten(1).sum(1).clamp(min=1)).tolist()
    return float(np.mean(ious))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("ceiling", "shapes"))
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--seconds", type=float, default=240)
    p.add_argument("--only", default=",".join(SHAPES), help="shapes to train, comma-separated")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.part == "ceiling":
        print(json.dumps({"ideal_miou_by_low_res_side": ceiling(args.images)}))
        return
    for name in args.only.split(","):
        print(json.dumps({"shape": name, **train_boxes(build(SHAPES[name]), args.seconds)}), flush=True)


if __name__ == "__main__":
    main()
