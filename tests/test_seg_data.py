"""Segmentation data: builtin:animal-scenes, COCO instances files (written and read), instance-id PNG
folders, and the errors bad input gets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cvfm.data import builtin, scenes
from cvfm.data.builtin import ANIMAL_CLASSES
from cvfm.data.coco import write_coco
from cvfm.data.instances import decode_masks, encode_mask, mask_target
from cvfm.data.items import DataError
from cvfm.data.loader import ImageDataset, collate
from cvfm.data.masks_source import open_masks
from cvfm.data.sources import open_source, subset
from cvfm.errors import UsageError

pytest.importorskip("animal_mnist")


@pytest.fixture(scope="module")
def test_scenes():
    return open_source("builtin:animal-scenes", split="test")


def test_animal_scenes_test_split(test_scenes):
    assert len(test_scenes) == 500 and test_scenes.classes == ANIMAL_CLASSES
    assert test_scenes.items[3].id == "animal-scenes/test/3"
    counts = []
    for i in range(0, 500, 5):
        item, image = test_scenes.items[i], test_scenes.load(i)
        assert image.mode == "RGB" and image.size == (128, 96)
        masks = decode_masks(item.target)
        counts.append(len(masks))
        assert masks.shape[1:] == (96, 128) and 1 <= len(masks) <= 5
        assert (masks.sum(axis=(1, 2)) >= scenes.MIN_PIXELS).all()
        assert masks.sum(axis=0).max() == 1  # occlusion: a pixel belongs to one instance at most
        assert all(0 <= c < 10 for c in item.target["labels"]) and len(item.target["labels"]) == len(masks)
        assert item.target["boxes"] == mask_target(list(masks))["boxes"]
        background = np.asarray(image)[~masks.any(axis=0)]
        assert len(np.unique(background, axis=0)) > 100 and background.std(axis=0).sum() > 15  # textured
    assert max(counts) > min(counts)


def test_animal_scenes_are_the_same_every_time():
    pixels, labels, _ = builtin._animal_mnist()
    a = scenes.make_scene(np.random.default_rng((0, 1, 7)), pixels[:50], labels[:50])
    b = scenes.make_scene(np.random.default_rng((0, 1, 7)), pixels[:50], labels[:50])
    assert np.array_equal(a[0], b[0]) and a[2] == b[2]
    assert all(np.array_equal(x, y) for x, y in zip(a[1], b[1], strict=True))
    c = scenes.make_scene(np.random.default_rng((0, 1, 8)), pixels[:50], labels[:50])
    assert not np.array_equal(a[0], c[0])


def test_animal_scenes_all_joins_train_and_test(monkeypatch):
    fake = {
        "train": (np.zeros((2, 96, 128, 3), np.uint8), [mask_target([]), mask_target([])]),
        "test": (np.full((1, 96, 128, 3), 9, np.uint8), [mask_target([np.ones((96, 128), bool)], [4])]),
    }
    monkeypatch.setattr(builtin, "_scenes", fake.__getitem__)
    both = open_source("builtin:animal-scenes")
    assert [it.id for it in both.items] == [
        "animal-scenes/train/0",
        "animal-scenes/train/1",
        "animal-scenes/test/0",
    ]
    assert np.asarray(both.load(2)).max() == 9 and both.items[2].target["labels"] == [4]
    with pytest.raises(UsageError, match="splits train, test and all, not 'val'"):
        open_source("builtin:animal-scenes", split="val")


def test_targets_travel_through_the_loader(test_scenes):
    batch = collate([ImageDataset(test_scenes, lambda im: np.array(im))[i] for i in range(2)])
    assert batch["size"].tolist() == [[96, 128], [96, 128]]
    assert batch["target"] == [test_scenes.items[0].target, test_scenes.items[1].target]


def test_coco_export_loads_in_pycocotools_and_reads_back(test_scenes, tmp_path):
    from pycocotools.coco import COCO

    five = subset(test_scenes, range(5))
    folder = write_coco(five, tmp_path / "coco")
    coco = COCO(str(folder / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ANIMAL_CLASSES
    assert len(coco.getImgIds()) == 5
    assert len(coco.getAnnIds()) == sum(len(it.target["masks"]) for it in five.items)
    for k, item in enumerate(five.items):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[k + 1]))
        ours = decode_masks(item.target)
        assert np.array_equal(np.stack([coco.annToMask(a) for a in anns]).astype(bool), ours)
        assert [a["category_id"] - 1 for a in anns] == item.target["labels"]
        assert [a["bbox"] for a in anns] == item.target["boxes"]
        written = Image.open(folder / "images" / coco.imgs[k + 1]["file_name"])
        assert np.array_equal(np.asarray(written), np.asarray(five.load(k)))
    again = open_masks(str(folder / "annotations.json"))
    assert [it.target for it in again.items] == [it.target for it in five.items]
    assert again.classes == ANIMAL_CLASSES and again.skipped == []
    with pytest.raises(UsageError, match="already exists"):
        write_coco(five, folder)


def _coco_file(tmp_path, images, annotations, categories=({"id": 1, "name": "thing"},), name="ann.json"):
    path = tmp_path / name
    text = json.dumps({"images": images, "annotations": annotations, "categories": list(categories)})
    path.write_text("\ufeff" + text, encoding="utf-8")  # with a byte-order mark, as some tools write
    return path


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths down the columns, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(int)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + np.diff(bounds).tolist()}


def test_coco_reader_converts_polygons_and_rles_and_skips_bad_images(tmp_path):
    from pycocotools.coco import COCO

    for name, size in (("a.png", (30, 20)), ("b.png", (30, 20)), ("small.png", (10, 10))):
        Image.new("RGB", size).save(tmp_path / name)
    square = [[2.0, 3.0, 12.0, 3.0, 12.0, 13.0, 2.0, 13.0]]  # a polygon
    block, corner = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
    block[5:8, 10:20], corner[15:, 25:] = True, True
    images = [
        {"id": 1, "file_name": "a.png", "height": 20, "width": 30},
        {"id": 2, "file_name": "b.png", "height": 20, "width": 30},
        {"id": 3, "file_name": "missing.png", "height": 20, "width": 30},
        {"id": 4, "file_name": "small.png", "height": 20, "width": 30},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": square, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": _uncompressed(block), "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 1, "segmentation": encode_mask(corner), "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 1, "segmentation": encode_mask(~block), "iscrowd": 1},
        {"id": 5, "image_id": 2, "category_id": 7, "segmentation": square, "iscrowd": 0},
        {"id": 6, "image_id": 99, "category_id": 1, "segmentation": square, "iscrowd": 0},
    ]
    path = _coco_file(tmp_path, images, anns)
    source = open_masks(str(path))
    assert [it.id for it in source.items] == ["a.png"] and source.classes == ["thing"]
    masks = decode_masks(source.items[0].target)
    assert len(masks) == 3  # the crowd region is no instance
    reference = COCO()
    reference.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 7}]}
    reference.createIndex()
    assert np.array_equal(masks[0], reference.annToMask(anns[0]))  # polygons as pycocotools fills them
    assert 100 <= masks[0].sum() <= 121  # a 10x10 square, give or take its edges
    assert np.array_equal(masks[1], block) and np.array_equal(masks[2], corner)
    reasons = {p["where"]: p["reason"] for p in source.skipped}
    assert reasons[f"{path}: annotation 6"] == "unknown image_id 99"
    assert "unknown category_id 7" in reasons[f"{path}: image 2 (b.png)"]
    assert "missing.png' does not exist" in reasons[f"{path}: image 3 (missing.png)"]
    assert "is 10x10 but its record says 30x20" in reasons[f"{path}: image 4 (small.png)"]
    with pytest.raises(DataError, match="annotation 6: unknown image_id 99"):
        open_masks(str(path), strict=True)


def test_coco_reader_refuses_files_that_are_not_coco(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1,]\n}', encoding="utf-8")
    with pytest.raises(UsageError, match=r"bad.json' is not valid JSON \(line 2"):
        open_masks(str(bad))
    with pytest.raises(UsageError, match='no "annotations" list'):
        open_masks(str(_coco_file(tmp_path, [], None)))
    twice = [{"id": 1, "file_name": "a.png", "height": 1, "width": 1}] * 2
    with pytest.raises(UsageError, match="image ids must be unique"):
        open_masks(str(_coco_file(tmp_path, twice, [])))
    with pytest.raises(UsageError, match="a COCO file has no splits"):
        open_masks(str(_coco_file(tmp_path, [], [])), split="test")
    with pytest.raises(UsageError, match="holds no usable images"):
        open_masks(str(_coco_file(tmp_path, [], [])))


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_mask_folder_of_instance_id_pngs(tmp_path):
    root = tmp_path / "data"
    _png(root / "images" / "a.jpg", np.zeros((23, 37, 3), np.uint8))  # odd, non-square
    ids = np.zeros((23, 37), np.uint8)
    ids[2:6, 3:9], ids[10:20, 20:30], ids[0, :] = 1, 2, 255  # two instances and VOC's void border
    palette = Image.frombytes("P", (37, 23), ids.tobytes())  # VOC and DAVIS masks are palette PNGs
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
    (root / "masks").mkdir(parents=True)
    palette.save(root / "masks" / "a.png")
    _png(root / "images" / "sub" / "b.png", np.zeros((8, 6, 3), np.uint8))
    wide = np.zeros((8, 6), np.uint16)
    wide[1:3, 1:3] = 300  # a 16-bit mask: ids over 255
    _png(root / "masks" / "sub" / "b.png", wide)
    # a photo whose EXIF turns it upright: 40 wide x 20 high stored, 20 x 40 decoded; its mask is upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(root / "images" / "turned.jpg", exif=exif)
    _png(root / "masks" / "turned.png", np.ones((40, 20), np.uint8))
    _png(root / "images" / "no-mask.png", np.zeros((4, 4, 3), np.uint8))
    _png(root / "masks" / "no-image.png", np.zeros((4, 4), np.uint8))
    _png(root / "images" / "wrong-size.png", np.zeros((4, 4, 3), np.uint8))
    _png(root / "masks" / "wrong-size.png", np.zeros((5, 4), np.uint8))
    _png(root / "images" / "colour.png", np.zeros((4, 4, 3), np.uint8))
    _png(root / "masks" / "colour.png", np.zeros((4, 4, 3), np.uint8))

    source = open_masks(str(root))
    assert [it.id for it in source.items] == ["a.jpg", "sub/b.png", "turned.jpg"]
    a = decode_masks(source.items[0].target)
    assert len(a) == 2 and np.array_equal(a[0], ids == 1) and np.array_equal(a[1], ids == 2)
    assert source.items[0].target["boxes"] == [[3.0, 2.0, 6.0, 4.0], [20.0, 10.0, 10.0, 10.0]]
    assert source.items[0].target["labels"] == [-1, -1]
    assert np.array_equal(decode_masks(source.items[1].target)[0], wide == 300)
    assert source.load(2).size == (20, 40)
    reasons = {p["where"]: p["reason"] for p in source.skipped}
    assert reasons == {
        str(root / "masks" / "no-image.png"): "no image 'images/no-image.*' for this mask",
        str(root / "images" / "no-mask.png"): "no mask 'masks/no-mask.png' for this image",
        str(root / "masks" / "wrong-size.png"): "mask is 4x5 but its image is 4x4",
        str(root / "masks" / "colour.png"): "expected one channel of instance ids, not a RGB image",
    }
    with pytest.raises(DataError, match="no-image.png: no image"):
        open_masks(str(root), strict=True)


def test_open_masks_says_what_it_expects(tmp_path):
    with pytest.raises(UsageError, match="builtin:animal-mnist' has no instance masks"):
        open_masks("builtin:animal-mnist", split="test")
    with pytest.raises(UsageError, match="does not exist"):
        open_masks(str(tmp_path / "nothing"))
    (tmp_path / "images").mkdir()
    with pytest.raises(UsageError, match="needs 'images' and 'masks' sub-folders"):
        open_masks(str(tmp_path))
    with pytest.raises(UsageError, match="image root goes with a COCO .json"):
        open_masks(str(tmp_path), image_root=str(tmp_path))
