"""`segment_prompts`: masks for prompts on images, one image embedding per image reused for all its prompts
(and kept between runs with a cache).

Output `-`: one JSON line per (image, prompt) on stdout: `id`, `image`, `prompt`, and `masks`, each with
`segmentation` (COCO RLE, counts a string), `area`, `bbox` (XYWH), `predicted_iou`, `stability_score`,
best predicted first. Output folder: per image a folder named by its id with `prompt<k>_mask<j>.png`
(0/255), `masks.jsonl` (those records) and `overlay.png` (the image with each prompt's best mask tinted
and its points and box drawn); a finished image's folder is complete (written under a temporary name,
then renamed), so a rerun skips it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cvfm.data.decode import DecodeError
from cvfm.data.items import ImageSource, Item
from cvfm.data.loader import SkipLog, Skipped
from cvfm.data.sources import open_source
from cvfm.errors import UsageError
from cvfm.models.amg.masks import mask_record
from cvfm.models.segmenter import ImageEmbedding, Segmenter
from cvfm.runtime.device import default_device
from cvfm.runtime.precision import autocast, precision_name, resolve_precision
from cvfm.runtime.progress import log, progress
from cvfm.segment.cache import EmbeddingCache
from cvfm.segment.prompts import Prompt, flag_prompts, read_prompts

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def segment_prompts(
    model: str,
    data: str | None,
    output: str = "-",
    *,
    points: list[str] = (),
    boxes: list[str] = (),
    prompts: str | None = None,
    multimask: bool | None = None,
    cache: str | None = None,
    split: str | None = None,
    image_column: str = "image",
    precision: str = "auto",
    strict: bool = False,
    overwrite: bool = False,
    pretrained: bool = True,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> dict:
    """Run the prompts (flags for every image of `data`, or a prompts file) and write the masks to
    `output` (see the module docstring); returns a summary."""
    from cvfm.registry import create_segmenter

    jobs = _jobs(
        data, points, boxes, prompts, multimask, split=split, image_column=image_column, strict=strict
    )
    folder = None if output == "-" else _output_folder(output, overwrite)
    segmenter = create_segmenter(model, pretrained=pretrained, trust_remote_code=trust_remote_code)
    dev = torch.device(default_device(device))
    amp = resolve_precision(precision, dev)
    segmenter.eval().to(dev)
    store = EmbeddingCache(cache, segmenter, precision_name(amp)) if cache else None
    transform = segmenter.preprocess.transform()
    done = skipped = masks = 0
    skips = SkipLog(strict)
    with progress("segment prompt", total=len(jobs)) as advance:
        for source, i, image_prompts in jobs:
            item = source.items[i]
            target = None if folder is None else folder / _folder_name(item.id)
            if target is not None and target.is_dir():
                skipped += 1
                continue
            try:
                image = source.load(i)
            except DecodeError as e:  # missing, corrupt or too large: named and counted (--strict: stop)
                where = str(item.ref) if isinstance(item.ref, str) else item.id
                skips.add([Skipped(i, where, str(e))])
                continue
            with torch.no_grad(), autocast(dev, amp):
                embedding = _embedding(segmenter, image, transform, dev, store, source, i)
                records = [_predict(segmenter, embedding, p, item) for p in image_prompts]
            masks += sum(len(r["masks"]) for r, _ in records)
            if target is None:
                for record, _ in records:
                    sys.stdout.write(json.dumps(record) + "\n")
                sys.stdout.flush()
            else:
                _write_image_folder(target, image, records)
            done += 1
            advance(1)
    if store is not None:
        log(f"segment prompt: {store.hits} embedding(s) from the cache, {store.misses} computed")
    problems = skips.as_list()
    if problems:
        log(f"segment prompt: skipped {len(problems)} unreadable image(s), first: {problems[0]['where']}")
    return {
        "model": model,
        "data": data or prompts,
        "output": output,
        "precision": precision_name(amp),
        "images": done,
        "already_done": skipped,
        "masks": masks,
        "skipped": problems,
        "cache": None if store is None else {"hits": store.hits, "misses": store.misses},
    }


def _jobs(data, points, boxes, prompts, multimask, **open_kw) -> list[tuple[ImageSource, int, list[Prompt]]]:
    """(source, item index, its prompts) for every image that has prompts."""
    if bool(points or boxes) == bool(prompts):
        raise UsageError("give prompts either as --point / --box flags or as --prompts FILE")
    if prompts is None:
        if data is None:
            raise UsageError("--data is required with --point / --box")
        source = open_source(data, **open_kw)
        common = flag_prompts(list(points), list(boxes), multimask)
        return [(source, i, common) for i in range(len(source))]
    lines = read_prompts(prompts, multimask)
    if data is None:  # the images the prompts file names, relative to its folder
        base = Path(prompts).resolve().parent if prompts != "-" else Path.cwd()
        names = list(dict.fromkeys(name for name, _ in lines))
        items = [Item(id=n, label=-1, ref=str(base / n)) for n in names]
        source = ImageSource(prompts, items)
    else:
        source = open_source(data, **open_kw)
    index = {}
    for i, it in enumerate(source.items):
        index.setdefault(it.id, i)
        if isinstance(it.ref, str):
            index.setdefault(it.ref, i)
    grouped: dict[int, list[Prompt]] = {}
    for name, prompt in lines:
        if name not in index:
            raise UsageError(f"prompts name image '{name}', which is not in '{data}' (by id or path)")
        grouped.setdefault(index[name], []).append(prompt)
    return [(source, i, ps) for i, ps in grouped.items()]


def _embedding(segmenter, image, transform, device, store, source, i) -> ImageEmbedding:
    size = (image.height, image.width)
    content = source.content(i) if store is not None else None
    if content is not None:
        found = store.get(content)
        if found is not None:
            return ImageEmbedding(
                found.features.to(device),
                found.original_sizes,
                found.input_sizes,
                None if found.intermediate is None else [t.to(device) for t in found.intermediate],
            )
    embedding = segmenter.embed_image(transform(image)[None].to(device), [size])
    if content is not None:
        store.put(content, embedding)
    return embedding


def _predict(
    segmenter: Segmenter, embedding: ImageEmbedding, prompt: Prompt, item: Item
) -> tuple[dict, np.ndarray]:
    """The record of one prompt and its masks (M, H, W), best predicted IoU first."""
    pred = segmenter.decode(
        embedding,
        points=torch.tensor([prompt.points]) if prompt.points else None,
        labels=torch.tensor([prompt.labels]) if prompt.points else None,
        boxes=torch.tensor([prompt.box]) if prompt.box is not None else None,
        multimask=prompt.wants_multimask(),
    )
    logits = segmenter.upscale(pred.low_res_logits.float(), embedding)[0]  # (M, H, W)
    order = pred.iou[0].float().argsort(descending=True)
    logits, iou = logits[order], pred.iou[0].float()[order]
    binary = (logits > 0).cpu().numpy()
    masks = [mask_record(logits[k].cpu(), binary[k], float(iou[k])) for k in range(len(order))]
    record = {
        "id": item.id,
        "image": item.ref if isinstance(item.ref, str) else item.id,
        "prompt": prompt.as_dict(),
        "masks": masks,
    }
    return record, binary


def _output_folder(output: str, overwrite: bool) -> Path:
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output '{output}' is a file: masks go to a folder (or - for JSON lines on stdout)")
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _folder_name(item_id: str) -> str:
    """A file-system-safe folder name for an image id (its hash keeps distinct ids apart)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id).strip("._")[-80:] or "image"
    return f"{stem}-{hashlib.sha256(item_id.encode()).hexdigest()[:8]}"


def _write_image_folder(target: Path, image: Image.Image, records: list[tuple[dict, np.ndarray]]) -> None:
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    lines = []
    for k, (record, binary) in enumerate(records):
        for j, mask in enumerate(binary):
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp / f"prompt{k}_mask{j}.png")
        lines.append(json.dumps(record) + "\n")
    (tmp / "masks.jsonl").write_text("".join(lines), encoding="utf-8")
    overlay(image, records).save(tmp / "overlay.png")
    tmp.rename(target)


def overlay(image: Image.Image, records: list[tuple[dict, np.ndarray]]) -> Image.Image:
    """The image with each prompt's best mask tinted (half opacity) and its points (green: foreground,
    red: background) and box drawn."""
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for k, (_, binary) in enumerate(records):
        if len(binary):
            colour = np.array(COLOURS[k % len(COLOURS)], dtype=np.float32)
            canvas[binary[0]] = 0.5 * canvas[binary[0]] + 0.5 * colour
    out = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    r = max(2, round(min(out.size) / 100))
    for k, (record, _) in enumerate(records):
        prompt = record["prompt"]
        for (x, y), label in zip(prompt.get("points", []), prompt.get("labels", []), strict=True):
            draw.ellipse(
                [x - r, y - r, x + r, y + r], fill=(0, 200, 0) if label else (220, 0, 0), outline="white"
            )
        if "box" in prompt:
            draw.rectangle(prompt["box"], outline=COLOURS[k % len(COLOURS)], width=max(1, r // 2))
    return out
