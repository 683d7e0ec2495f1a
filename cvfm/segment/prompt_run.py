"""`segment_prompts`: masks for prompts on images, one image embedding per image reused for all its prompts
(and kept between runs with a cache).

One record per (image, prompt): `id`, `image`, `prompt`, and `masks`, each with `segmentation` (COCO RLE,
counts a string), `area`, `bbox` (XYWH), `predicted_iou`, `stability_score`, best predicted first; as JSON
lines on stdout (`-`) or in a folder per image (see per_image.py), whose overlay.png tints each prompt's
best mask and draws its points and box.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from cvfm.data.items import ImageSource, Item
from cvfm.data.sources import open_source
from cvfm.errors import UsageError
from cvfm.models.amg.masks import mask_record
from cvfm.models.segmenter import ImageEmbedding, Segmenter
from cvfm.runtime.device import default_device
from cvfm.runtime.precision import autocast, precision_name, resolve_precision
from cvfm.runtime.progress import log
from cvfm.segment.cache import EmbeddingCache
from cvfm.segment.per_image import Job, image_fields, output_folder, segment_images
from cvfm.segment.prompts import Prompt, flag_prompts, read_prompts


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
    folder = output_folder(output, overwrite)
    segmenter = create_segmenter(model, pretrained=pretrained, trust_remote_code=trust_remote_code)
    dev = torch.device(default_device(device))
    amp = resolve_precision(precision, dev)
    segmenter.eval().to(dev)
    store = EmbeddingCache(cache, segmenter, precision_name(amp)) if cache else None
    transform = segmenter.preprocess.transform()

    def predict(job: Job, image: Image.Image) -> list[dict]:
        source, i, image_prompts = job
        with torch.no_grad(), autocast(dev, amp):
            embedding = _embedding(segmenter, image, transform, dev, store, source, i)
            return [_predict(segmenter, embedding, p, source.items[i]) for p in image_prompts]

    counts = segment_images("segment prompt", jobs, folder, predict, _layers, strict)
    if store is not None:
        log(f"segment prompt: {store.hits} embedding(s) from the cache, {store.misses} computed")
    return {
        "model": model,
        "data": data or prompts,
        "output": output,
        "precision": precision_name(amp),
        **counts,
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
            return found.to(device)
    embedding = segmenter.embed_image(transform(image)[None].to(device), [size])
    if content is not None:
        store.put(content, embedding)
    return embedding


def _predict(segmenter: Segmenter, embedding: ImageEmbedding, prompt: Prompt, item: Item) -> dict:
    """The record of one prompt, its masks best predicted IoU first."""
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
    return {**image_fields(item), "prompt": prompt.as_dict(), "masks": masks}


def _layers(records: list[dict]) -> list[dict]:
    """What the overlay shows: each prompt's best mask, its points and its box."""
    return [{"mask": r["masks"][0]["segmentation"] if r["masks"] else None, **r["prompt"]} for r in records]
