"""Shared test setup: offline Hugging Face hub, tiny on-disk image fixtures."""

from __future__ import annotations

import json
import os
import signal
import sys

# Before anything imports huggingface_hub (it reads the variable once, at import time).
os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from clitools import Result  # noqa: E402
from PIL import Image  # noqa: E402

CLASS_COLORS = {"cat": (200, 30, 30), "dog": (30, 30, 200)}


def write_image(
    path: Path, color: tuple[int, int, int] | None = (128, 128, 128), size: int = 8, seed: int = 0
) -> Path:
    """Write a small RGB image: one flat `color`, or random noise when `color` is None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        pixels = np.full((size, size, 3), color, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """The `write_image(path, color=..., size=..., seed=...)` helper, as a fixture."""
    return write_image


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """`tmp_path/images/{cat,dog}/{0,1,2}.png`: 8x8 flat-colour PNGs (cat red, dog blue)."""
    root = tmp_path / "images"
    for name, color in CLASS_COLORS.items():
        for i in range(3):
            write_image(root / name / f"{i}.png", color)
    return root


@pytest.fixture
def noise_folder(tmp_path: Path) -> Path:
    """`tmp_path/noise/{a,b}/{0,1}.png`: 24x24 random-noise PNGs (augmentations visibly change them)."""
    root = tmp_path / "noise"
    for c, name in enumerate(("a", "b")):
        for i in range(2):
            write_image(root / name / f"{i}.png", None, size=24, seed=10 * c + i)
    return root


@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory) -> Path:
    """Real images, small: scikit-learn digits 0-3 as PNGs, train/<class>/ (4 x 32) and test/<class>/ (4 x 8).

    Classes are zero, one, two, three (a folder source numbers them in sorted order)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.clip(d.images * 16, 0, 255).astype(np.uint8)
    root = tmp_path_factory.mktemp("digits_folder")
    for label, name in enumerate(("zero", "one", "two", "three")):
        members = np.flatnonzero(d.target == label)
        for i, idx in enumerate(members[:40]):
            split = "train" if i < 32 else "test"
            path = root / split / name / f"{idx:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[idx]).save(path)
    return root


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty model cache, offline: tests of the "not in the local cache" error then run on any machine,
    whatever its own cache holds. huggingface_hub reads the cache paths once, at import: patch those too."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    hub = home / "hub"
    hub.mkdir(parents=True)
    for name, value in (("HF_HOME", home), ("HF_HUB_CACHE", hub), ("TORCH_HOME", tmp_path / "torch")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `cvfm ARGS...` in-process; returns Result(code, stdout, stderr)."""
    from cvfm.cli import app as app_module

    if not any(c.name == "models" for c in app_module.app.registered_commands):
        app_module._register()
    monkeypatch.setattr(app_module, "_register", lambda: None)  # main() registers on every call
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    previous_sigterm = signal.getsignal(signal.SIGTERM)  # main() installs its own handler

    def run(*args) -> Result:
        monkeypatch.setattr(sys, "argv", ["cvfm", *map(str, args)])
        capsys.readouterr()
        code = 0
        try:
            app_module.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            signal.signal(signal.SIGTERM, previous_sigterm)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def classifier_top1(folder: Path, source) -> float:
    """Top-1 of the classifier saved in `folder` on `source`, computed directly: its evaluation transform,
    a plain forward pass, classes matched by name."""
    import torch

    from cvfm.registry import create_classifier

    clf = create_classifier(str(folder)).eval()
    transform = clf.encoder.preprocess.transform()
    x = torch.stack([transform(source.load(i)) for i in range(len(source))])
    labels = torch.tensor([clf.classes.index(source.classes[y]) for y in source.labels])
    with torch.no_grad():
        return int((clf(x).argmax(1) == labels).sum()) / len(labels)


TOY_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (235, 220, 30)}


def write_colour_pairs(root: Path, size: int = 12) -> Path:
    """48 noisy flat-colour images (12 per colour in TOY_COLOURS), each captioned "a <colour> square",
    as a JSONL manifest `root/pairs.jsonl` with labels: a trivially separable image-text set."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for c, (name, rgb) in enumerate(TOY_COLOURS.items()):
        for i in range(12):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"{name}{i}.png")
            lines.append({"image": f"{name}{i}.png", "text": f"a {name} square", "label": c})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root / "pairs.jsonl"
