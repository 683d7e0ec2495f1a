"""`builtin:animal-scenes`: a small instance-segmentation set made in memory from Animal-MNIST silhouettes.

Each 128x96 image holds 2 to 5 animals, each pasted at a random place and size (24 to 56 px, aspect
0.8 to 1.25, maybe mirrored) in a random colour onto a textured background (smooth colour noise and
stripes), so that a mask cannot be read off a flat background. A later animal covers the earlier ones:
their masks lose the covered pixels, and an animal left with fewer than 40 pixels is dropped (its
fragments stay in the picture, unannotated). Every image is drawn from its own seed (split, index), so the
set is the same on every machine and any image can be remade alone; the train images use the animals
of Animal-MNIST's train split, the test images those of its test split.
"""

from __future__ import annotations

import cv2
import numpy as np

from cvfm.data.instances import mask_target

WIDTH, HEIGHT = 128, 96
SIZES = {"train": 2000, "test": 500}
INSTANCES = (2, 5)  # animals per image, inclusive
SIDE = (24, 56)  # pasted width in pixels, inclusive
ASPECT = (0.8, 1.25)  # pasted height / width
MIN_PIXELS = 40  # an animal with fewer visible pixels is dropped
MIN_CONTRAST = 90.0  # RGB distance between the background's two colours, and from them to an animal's
SEED = 0
SPLIT_CODES = {"train": 0, "test": 1}


def background(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A (HEIGHT, WIDTH, 3) float texture (two colours blended by smooth noise plus oriented stripes) and
    its two colours (2, 3)."""
    coarse = cv2.resize(rng.random((4, 5)), (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
    fine = cv2.resize(rng.random((12, 16)), (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    angle, period, phase = rng.uniform(0, np.pi), rng.uniform(5, 16), rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
    weight = rng.uniform(0.2, 0.5)
    t = np.clip((1 - weight) * (0.7 * coarse + 0.3 * fine) + weight * stripes, 0, 1)
    first = rng.uniform(0, 255, (1, 3))
    colours = np.concatenate([first, distinct_colour(rng, first)[None]])
    return colours[0] * (1 - t[..., None]) + colours[1] * t[..., None], colours


def distinct_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A random RGB colour at least MIN_CONTRAST from each colour of `avoid` (the best of 20 draws)."""
    draws = rng.uniform(0, 255, (20, 3))
    distance = np.linalg.norm(draws[:, None] - avoid[None], axis=-1).min(axis=1)
    ok = np.flatnonzero(distance >= MIN_CONTRAST)
    return draws[ok[0] if len(ok) else distance.argmax()]


def make_scene(
    rng: np.random.Generator, silhouettes: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """One image (HEIGHT, WIDTH, 3) uint8 with its visible instance masks and their labels, drawing the
    animals from `silhouettes` (N, 28, 28) uint8 with `labels` (N,)."""
    canvas, colours = background(rng)
    masks, classes = [], []
    for _ in range(rng.integers(INSTANCES[0], INSTANCES[1] + 1)):
        k = rng.integers(len(silhouettes))
        w = int(rng.integers(SIDE[0], SIDE[1] + 1))
        h = min(HEIGHT, round(w * rng.uniform(*ASPECT)))
        gray = cv2.resize(silhouettes[k], (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float64)
        if rng.random() < 0.5:
            gray = gray[:, ::-1]
        x0, y0 = int(rng.integers(0, WIDTH - w + 1)), int(rng.integers(0, HEIGHT - h + 1))
        mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
        mask[y0 : y0 + h, x0 : x0 + w] = gray > 127
        shade = 0.7 + 0.3 * gray[gray > 127] / 255.0  # the silhouette's own strokes stay visible
        canvas[mask] = distinct_colour(rng, colours) * shade[:, None]
        for earlier in masks:
            earlier &= ~mask
        masks.append(mask)
        classes.append(int(labels[k]))
    kept = [i for i, m in enumerate(masks) if m.sum() >= MIN_PIXELS]
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return image, [masks[i] for i in kept], [classes[i] for i in kept]


def scenes(split: str, silhouettes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """The images (N, HEIGHT, WIDTH, 3) and targets of a split ("train" or "test"), drawn from the given
    animals (that split's Animal-MNIST images). Image i depends on (SEED, split, i) only."""
    code = SPLIT_CODES[split]
    images, targets = np.zeros((SIZES[split], HEIGHT, WIDTH, 3), dtype=np.uint8), []
    for i in range(SIZES[split]):
        images[i], masks, classes = make_scene(np.random.default_rng((SEED, code, i)), silhouettes, labels)
        targets.append(mask_target(masks, classes))
    return images, targets
