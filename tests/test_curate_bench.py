"""benchmarks/curate.py's pool: it injects what its ground truth says (a benchmark's ground truth must be
right; running curate on it is the benchmark's job, not the suite's)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "curate.py"
_spec = importlib.util.spec_from_file_location("curate_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["curate_bench"] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)

# builtin:digits (8x8) loads in a fraction of a second; the builder is the same for Animal-MNIST (28x28).
SPEC = bench.PoolSpec(
    data="digits", limit_per_class=40, near_fraction=0.5, exact_fraction=0.25, test_copies=30, seed=3
)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    return folder, bench.build_pool(folder, SPEC)


def _pixels(folder: Path, record: dict) -> np.ndarray:
    return np.asarray(Image.open(folder / record["image"]).convert("L"))


def _source_pixels(record: dict) -> np.ndarray:
    from cvfm.data.builtin import BUILTINS

    return BUILTINS[SPEC.data]()[0][record["index"]]


def test_counts_match_the_spec_and_the_manifest(pool):
    folder, truth = pool
    items = truth["items"]
    kinds = Counter(r["kind"] for r in items)
    originals = kinds["original"]
    assert kinds["exact"] == round(SPEC.exact_fraction * originals)
    assert kinds["test"] == SPEC.test_copies
    near_sources = Counter(r["source"] for r in items if r["kind"] == "near")
    assert len(near_sources) == round(SPEC.near_fraction * originals)
    assert set(near_sources.values()) <= {1, 2, 3}
    per_class = Counter(r["label"] for r in items if r["kind"] == "original")
    for name, n in per_class.items():  # the imbalance: majors capped at 40, the others at 40 // 10
        assert n == (40 if name in truth["major_classes"] else 4)
    assert Counter(r["label"] for r in items if r["kind"] == "test") == Counter({c: 3 for c in per_class})
    lines = [json.loads(line) for line in (folder / "pool.jsonl").read_text().splitlines()]
    assert [(r["id"], r["image"], r["label"]) for r in lines] == [
        (r["id"], r["image"], r["label"]) for r in items
    ]
    assert len({r["id"] for r in items}) == len(items)
    files = sorted(p.name for p in (folder / "images").iterdir())
    assert files == sorted(Path(r["image"]).name for r in items)


def test_copies_are_what_the_truth_says(pool):
    folder, truth = pool
    by_id = {r["id"]: r for r in truth["items"]}
    seen = Counter()
    for r in truth["items"]:
        kind, t = r["kind"], r.get("transform")
        pixels = _pixels(folder, r)
        source = _source_pixels(r)
        if kind == "original":
            assert np.array_equal(pixels, source)
            continue
        if kind != "test":  # a pool copy names its original, which holds the same source pixels
            original = by_id[r["source"]]
            assert original["kind"] == "original" and original["index"] == r["index"]
            assert original["label"] == r["label"]
        else:
            assert r["source"] == f"{SPEC.data}/{r['index']}"
        seen[t] += 1
        if t == "exact":
            assert np.array_equal(pixels, source)
            if kind == "exact":
                original = (folder / by_id[r["source"]]["image"]).read_bytes()
                assert (folder / r["image"]).read_bytes() == original
        elif t == "flip":
            assert np.array_equal(pixels, np.asarray(ImageOps.mirror(Image.fromarray(source))))
        elif t == "crop":
            left, top, right, bottom = r["params"]["box"]
            assert np.array_equal(pixels, source[top:bottom, left:right])
            width = source.shape[1]
            assert 0 < left <= 3 and width - 3 <= right < width
        elif t == "resize":
            side = r["params"]["size"]
            assert pixels.shape == (side, side) and (side <= 21 or side >= 42)
        elif t == "jpeg":
            assert r["image"].endswith(".jpg") and 10 <= r["params"]["quality"] <= 30
            assert Image.open(folder / r["image"]).format == "JPEG"
            assert not np.array_equal(pixels, source)  # lossy, but the same image:
            assert np.corrcoef(pixels.ravel(), source.ravel())[0, 1] > 0.8
    assert set(seen) == {*bench.TRANSFORMS, "exact"}


def test_the_pool_has_no_natural_exact_duplicates_and_is_deterministic(pool, tmp_path):
    folder, truth = pool
    originals = [_source_pixels(r).tobytes() for r in truth["items"] if r["kind"] == "original"]
    tests = {_source_pixels(r).tobytes() for r in truth["items"] if r["kind"] == "test"}
    assert len(set(originals)) == len(originals)
    assert not tests & set(originals)
    again = bench.build_pool(tmp_path, SPEC)
    assert again == truth
    assert (tmp_path / "pool.jsonl").read_bytes() == (folder / "pool.jsonl").read_bytes()


def _truth(*items: tuple[str, str, str | None, str]) -> dict:
    return {"items": [{"id": i, "kind": k, "source": s, "transform": t} for i, k, s, t in items]}


TRUTH = _truth(
    ("a", "original", None, None),
    ("a1", "near", "a", "flip"),
    ("a2", "exact", "a", "exact"),
    ("b", "original", None, None),
    ("b1", "near", "b", "jpeg"),
    ("c", "original", None, None),
    ("t", "test", "animal-mnist/7", "crop"),
)


def test_dedup_scores_keep_one_of_each_group():
    # a's group: 2 of 3 dropped (both correct); b's group dropped whole (1 correct, 1 wrong); c wrong
    s = bench.dedup_scores(TRUTH, {"a1", "a2", "b", "b1", "c"})
    assert (s["dropped"], s["injected"], s["correct"]) == (5, 3, 3)
    assert (s["whole_group_dropped"], s["outside_groups"], s["outside_test_copies"]) == (1, 1, 0)
    assert s["precision"] == pytest.approx(3 / 5) and s["recall"] == 1.0
    # the original dropped instead of its copy is as good; a copy kept beside its original is missed
    s = bench.dedup_scores(TRUTH, {"a", "t"})
    assert (s["correct"], s["precision"], s["recall"]) == (1, 0.5, pytest.approx(1 / 3))
    assert s["outside_test_copies"] == 1
    assert s["found_by_transform"] == {"exact": 1.0, "flip": 1.0, "jpeg": 0.0}
    assert bench.dedup_scores(TRUTH, set())["precision"] is None


def test_decontamination_scores():
    s = bench.decontamination_scores(TRUTH, {"t", "a1", "c"})
    assert (s["test_copies"], s["recall"], s["wrongly_dropped"], s["clean_items"]) == (1, 1.0, 2, 6)
    assert s["wrongly_dropped_by_kind"] == {"near": 1, "original": 1}
    assert bench.decontamination_scores(TRUTH, {"a"})["recall"] == 0.0


def test_copy_separability_finds_flipped_copies_and_pairs_twin_originals(tmp_path):
    """Three distinct random originals, a flipped copy of the first and a twin of the second (a second
    original with the same pixels but one): the flip scores 1.0 against its original, the twins pair
    each other at every threshold, the third original pairs with nothing."""
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(3)]
    twin = pixels[1].copy()
    twin[0, 0] ^= 1
    images = {"a": pixels[0], "b": pixels[1], "c": pixels[2], "b2": twin, "a-flip": pixels[0][:, ::-1]}
    (tmp_path / "pool").mkdir()
    for name, p in images.items():
        Image.fromarray(np.ascontiguousarray(p)).save(tmp_path / "pool" / f"{name}.png")
    kinds = {"a-flip": ("near", "a", "flip")}
    truth = {
        "items": [
            {"id": n, "image": f"{n}.png", "kind": kinds.get(n, ("original",))[0]}
            | ({"source": kinds[n][1], "transform": kinds[n][2]} if n in kinds else {"source": None})
            for n in images
        ]
    }
    r = bench.copy_separability(tmp_path, truth)
    assert r["copy_to_original"]["flip"] == [1.0, 1.0, 1.0]
    assert {x["threshold"]: x["copies_found"] for x in r["by_threshold"]}[0.98] == 1.0
    # originals a, b, c, b2: the twins b and b2 pair at every threshold, a and c with nothing
    assert all(x["originals_paired"] == 0.5 for x in r["by_threshold"])
