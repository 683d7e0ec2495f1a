"""Data layer, texts: JSONL and HF text columns, text-only records, stdin manifests, captioned built-ins,
and `collate` with a tokenizer."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch

from cvfm.data.builtin import ANIMAL_CLASSES, COLOURS, DIGIT_CLASSES, TEMPLATES
from cvfm.data.loader import ImageDataset, collate
from cvfm.data.sources import DataError, open_source
from cvfm.data.views import Preprocess
from cvfm.errors import UsageError


def _write_jsonl(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------- JSONL texts


def test_jsonl_text_column_strings_and_lists(tmp_path, make_image):
    make_image(tmp_path / "a.png", (200, 10, 10))
    make_image(tmp_path / "b.png", (10, 10, 200))
    manifest = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "a", "image": "a.png", "label": "cat", "caption": "a red cat"},
            {"id": "b", "image": "b.png", "label": "dog", "caption": ["a blue dog", "a dog, blue"]},
        ],
    )
    src = open_source(str(manifest), text_column="caption")
    assert [it.text for it in src.items] == ["a red cat", ("a blue dog", "a dog, blue")]
    assert src.has_texts and src.has_images
    assert src.classes == ["cat", "dog"] and src.labels.tolist() == [0, 1]
    assert src.load(1).getpixel((0, 0)) == (10, 10, 200)
    # Without a text column the same manifest is a plain image source.
    plain = open_source(str(manifest))
    assert [it.text for it in plain.items] == [None, None] and not plain.has_texts


def test_jsonl_malformed_text_cells_are_skipped_and_listed(tmp_path, make_image):
    make_image(tmp_path / "x.png")
    manifest = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "x.png", "text": "fine"},
            {"image": "x.png"},  # 2: no text
            {"image": "x.png", "text": 3},  # 3: not a string
            {"image": "x.png", "text": []},  # 4: an empty list
            {"image": "x.png", "text": ["ok", 5]},  # 5: a list with a non-string
            {"image": "x.png", "text": None},  # 6
            {"image": "x.png", "text": ["also", "fine"]},
        ],
    )
    src = open_source(str(manifest), text_column="text")
    assert [it.text for it in src.items] == ["fine", ("also", "fine")]
    assert [s["where"] for s in src.skipped] == [f"{manifest}:{n}" for n in (2, 3, 4, 5, 6)]
    reasons = [s["reason"] for s in src.skipped]
    assert reasons[0] == 'malformed JSONL line: "text" must be a string or a list of strings, not NoneType'
    assert (
        reasons[1].endswith("not int") and reasons[2].endswith("not list") and reasons[3].endswith("not list")
    )
    with pytest.raises(DataError, match=r"m\.jsonl:2: malformed JSONL line: \"text\" must be a string"):
        open_source(str(manifest), text_column="text", strict=True)


def test_text_only_records(tmp_path):
    manifest = _write_jsonl(
        tmp_path / "texts.jsonl",
        [
            {"id": "t1", "text": "a cat", "label": "cat"},
            {"id": "t2", "text": ["a dog", "the dog"], "label": "dog"},
            {"id": "t3", "image": 7, "text": "images are not read"},  # a bad image field does not matter
            {"label": "cat"},  # 4: no text
        ],
    )
    src = open_source(str(manifest), text_column="text", images=False)
    assert not src.has_images and src.has_texts
    assert [it.id for it in src.items] == ["t1", "t2", "t3"]
    assert [it.ref for it in src.items] == [None, None, None]
    assert src.labels.tolist() == [0, 1, -1]
    assert [s["where"] for s in src.skipped] == [f"{manifest}:4"]

    ds = ImageDataset(src, transform=None)
    assert ds[1] == {"label": 1, "index": 1, "text": ("a dog", "the dog")}
    batch = collate([ds[0], ds[2]])
    assert "image" not in batch
    assert batch["text"] == ["a cat", "images are not read"]
    assert batch["label"].tolist() == [0, -1] and batch["index"].tolist() == [0, 2]

    with pytest.raises(UsageError, match="without images needs a text column"):
        open_source(str(manifest), images=False)


def test_folder_with_a_text_column_is_refused(image_folder):
    with pytest.raises(
        UsageError, match="holds images only: texts come from a .jsonl manifest or hf: dataset"
    ):
        open_source(str(image_folder), text_column="caption")


# --------------------------------------------------------------------------------------------- stdin


def test_stdin_bare_paths(tmp_path, make_image, monkeypatch):
    make_image(tmp_path / "imgs" / "a.png", (1, 2, 3))
    absolute = make_image(tmp_path / "b.png", (4, 5, 6))
    monkeypatch.chdir(tmp_path)  # bare paths are relative to the working directory
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"imgs/a.png\n\n{absolute}\n"))
    src = open_source("-")
    assert src.name == "<stdin>"
    assert [it.ref for it in src.items] == [str(tmp_path / "imgs" / "a.png"), str(absolute)]
    assert [it.id for it in src.items] == ["imgs/a.png", str(absolute)]  # a path is its own id
    assert [src.label_of(it) for it in src.items] == [None, None]
    assert src.load(0).getpixel((0, 0)) == (1, 2, 3)
    assert src.load(1).getpixel((0, 0)) == (4, 5, 6)


def test_stdin_json_lines_with_texts(tmp_path, make_image, monkeypatch):
    make_image(tmp_path / "a.png", (1, 2, 3))
    monkeypatch.chdir(tmp_path)
    lines = [
        json.dumps({"id": "one", "image": "a.png", "label": "cat", "caption": "a cat"}),
        "a.png",  # a bare path has no caption: skipped when texts are asked for
        json.dumps({"id": "two", "image": "a.png", "label": "dog", "caption": ["a dog"]}),
        "{broken",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    src = open_source("-", text_column="caption")
    assert [(it.id, it.label, it.text) for it in src.items] == [("one", 0, "a cat"), ("two", 1, ("a dog",))]
    assert src.classes == ["cat", "dog"]
    assert [s["where"] for s in src.skipped] == ["<stdin>:2", "<stdin>:4"]
    assert src.skipped[0]["reason"] == 'malformed JSONL line: expected a JSON object with a "caption" field'

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    with pytest.raises(DataError, match=r"<stdin>:2: malformed JSONL line"):
        open_source("-", text_column="caption", strict=True)


def test_empty_stdin_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(UsageError, match="data source '-' holds no images"):
        open_source("-")


# --------------------------------------------------------------------------------------------- HF datasets


@pytest.fixture(scope="module")
def hf_text_dirs(tmp_path_factory):
    import datasets
    from PIL import Image

    root = tmp_path_factory.mktemp("hf_text")
    images = [Image.new("RGB", (4, 4), (i * 40, 0, 0)) for i in range(3)]
    datasets.Dataset.from_dict(
        {"img": images, "caption": ["a", "b c", "d"], "label": ["cat", "dog", "cat"]}
    ).save_to_disk(root / "single")
    datasets.Dataset.from_dict({"caption": [["x", "y"], ["z"]]}).save_to_disk(root / "lists")
    datasets.Dataset.from_dict({"caption": ["fine", None]}).save_to_disk(root / "holes")
    return root


def test_hf_text_column(hf_text_dirs):
    src = open_source(f"hf:{hf_text_dirs / 'single'}", image_column="img", text_column="caption")
    assert [it.text for it in src.items] == ["a", "b c", "d"]
    assert src.classes == ["cat", "dog"] and src.labels.tolist() == [0, 1, 0]
    assert src.has_images and src.load(2).getpixel((0, 0)) == (80, 0, 0)


def test_hf_text_only_and_caption_lists(hf_text_dirs):
    src = open_source(f"hf:{hf_text_dirs / 'lists'}", text_column="caption", images=False)
    assert not src.has_images
    assert [it.text for it in src.items] == [("x", "y"), ("z",)]
    ds = ImageDataset(src, transform=None)
    assert ds[0] == {"label": -1, "index": 0, "text": ("x", "y")}


def test_hf_missing_text_column_names_the_columns(hf_text_dirs):
    with pytest.raises(UsageError, match=r"has no text column 'text' \(columns: img, caption, label\)"):
        open_source(f"hf:{hf_text_dirs / 'single'}", image_column="img", text_column="text")


def test_hf_bad_text_cell_is_a_usage_error(hf_text_dirs):
    with pytest.raises(UsageError, match=r"\"caption\" must be a string or a list of strings, not NoneType"):
        open_source(f"hf:{hf_text_dirs / 'holes'}", text_column="caption", images=False)


# ------------------------------------------------------------------------------------- captioned built-ins


def _dominant_colour(img) -> str:
    """The palette colour whose direction in RGB is closest to the image's brightest pixels."""
    pixels = np.asarray(img, dtype=np.float64).reshape(-1, 3)
    bright = pixels[pixels.sum(1) >= 0.5 * pixels.sum(1).max()].mean(0)
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float64)
    cos = palette @ bright / (np.linalg.norm(palette, axis=1) * np.linalg.norm(bright))
    return names[int(cos.argmax())]


@pytest.mark.parametrize(
    ("name", "package", "classes", "size"),
    [
        ("digits-captions", "sklearn", DIGIT_CLASSES, 8),
        ("animal-captions", "animal_mnist", ANIMAL_CLASSES, 28),
    ],
)
def test_captions_name_the_class_and_the_tint(name, package, classes, size):
    pytest.importorskip(package)
    src = open_source(f"builtin:{name}", split="test", text_column="caption")
    assert src.classes == classes and src.has_texts
    assert src.templates == TEMPLATES["digit" if "digit" in name else "animal"]
    seen_colours = set()
    for i in range(0, len(src), max(1, len(src) // 40)):  # ~40 images across the split
        item, img = src.items[i], src.load(i)
        assert img.mode == "RGB" and img.size == (size, size)
        words = item.text.split()
        colour = _dominant_colour(img)
        assert colour in words, (item.text, colour)
        assert [w for w in words if w in COLOURS] == [colour]  # exactly one colour word
        assert classes[item.label] in words
        seen_colours.add(colour)
    assert len(seen_colours) >= 6  # the tints really vary


def test_captioned_builtin_text_column_and_plain_sets():
    plain = open_source("builtin:digits-captions", split="test")  # no text column: images only
    assert not plain.has_texts
    captioned = open_source("builtin:digits-captions", split="test", text_column="caption")
    assert [it.id for it in plain.items] == [it.id for it in captioned.items]
    # The split is the base set's split: same images, same labels.
    base = open_source("builtin:digits", split="test")
    assert captioned.labels.tolist() == base.labels.tolist()
    with pytest.raises(UsageError, match="has the text column 'caption', not 'text'"):
        open_source("builtin:digits-captions", text_column="text")
    with pytest.raises(
        UsageError, match=r"builtin:digits has no texts \(image-text pairs: builtin:digits-captions\)"
    ):
        open_source("builtin:digits", text_column="caption")


def test_captioned_images_are_the_base_images_tinted():
    base = open_source("builtin:digits", split="test")
    tinted = open_source("builtin:digits-captions", split="test", text_column="caption")
    for i in (0, 7, 100):
        grey = np.asarray(base.load(i), dtype=np.float64)[..., 0] / 255.0
        rgb = np.asarray(tinted.load(i), dtype=np.float64)
        colour = np.array(COLOURS[_dominant_colour(tinted.load(i))], dtype=np.float64)
        assert np.abs(rgb - grey[..., None] * colour).max() <= 1.0  # rounding only


# --------------------------------------------------------------------------------------------- collate


def _toy_tokenizer(texts: list[str]) -> dict[str, torch.Tensor]:
    """Word lengths, padded with 0 (enough to check what collate hands the tokenizer)."""
    lengths = [[len(w) for w in t.split()] for t in texts]
    width = max(map(len, lengths))
    return {"input_ids": torch.tensor([row + [0] * (width - len(row)) for row in lengths])}


def test_collate_tokenizes_texts_in_batch_order(tmp_path, make_image):
    import functools

    make_image(tmp_path / "a.png", (1, 2, 3), size=8)
    make_image(tmp_path / "c.png", (7, 8, 9), size=8)
    manifest = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "a.png", "label": 0, "caption": "a cat"},
            {"image": "gone.png", "label": 1, "caption": "lost"},
            {"image": "c.png", "label": 1, "caption": "three word caption"},
        ],
    )
    src = open_source(str(manifest), text_column="caption")
    ds = ImageDataset(src, Preprocess(size=8).transform())
    batch = collate([ds[i] for i in range(3)], tokenizer=_toy_tokenizer)
    assert batch["image"].shape == (2, 3, 8, 8)
    assert batch["text"] == ["a cat", "three word caption"]  # the skipped item's text is dropped too
    assert batch["tokens"]["input_ids"].tolist() == [[1, 3, 0], [5, 4, 7]]
    assert batch["index"].tolist() == [0, 2] and [s.index for s in batch["skipped"]] == [1]

    # As a DataLoader collate_fn (functools.partial, as the trainer uses it).
    loader = torch.utils.data.DataLoader(
        ds, batch_size=3, collate_fn=functools.partial(collate, tokenizer=_toy_tokenizer)
    )
    (only,) = list(loader)
    assert torch.equal(only["tokens"]["input_ids"], batch["tokens"]["input_ids"])

    plain = collate([ds[0], ds[2]])  # no tokenizer: texts only
    assert plain["text"] == ["a cat", "three word caption"] and "tokens" not in plain


def test_collate_with_the_tiny_clip_tokenizer():
    from cvfm.models.tiny_clip import build_tokenizer

    tok = build_tokenizer(16)
    src = open_source("builtin:digits-captions", split="test", text_column="caption")
    ds = ImageDataset(src, Preprocess(size=8).transform())
    batch = collate(
        [ds[i] for i in range(4)], tokenizer=lambda t: dict(tok(t, padding=True, return_tensors="pt"))
    )
    ids = batch["tokens"]["input_ids"]
    assert ids.shape[0] == 4
    assert [tok.decode(row, skip_special_tokens=True) for row in ids] == [src.items[i].text for i in range(4)]
