"""Zero-shot classification and image-text retrieval: metrics on hand-made score matrices, the prompt
classifier against a hand computation, `evaluate_zeroshot|retrieval` end to end (a fake dual encoder
with known embeddings, and cvfm/tiny-clip), and `cvfm evaluate zeroshot|retrieval` from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import assert_usage_error, one_json_line
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from cvfm.data.sources import DataError, Item
from cvfm.data.views import Preprocess
from cvfm.errors import UsageError
from cvfm.eval.retrieval import group_captions, retrieval_metrics
from cvfm.eval.vl_run import evaluate_retrieval, evaluate_zeroshot
from cvfm.eval.zeroshot import (
    build_zeroshot_classifier,
    check_templates,
    prompts,
    read_classnames,
    read_templates,
    true_class_rank,
    zeroshot_metrics,
)
from cvfm.models.dual import DualEncoder

RED, BLUE, PURPLE = (200, 30, 30), (30, 30, 200), (150, 30, 200)

# ------------------------------------------------------------------------------------------ zero-shot metrics


def _six_class_scores():
    """6 images, 6 classes; the true class's 0-based rank is noted per row."""
    logits = np.array(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0, rank 0
            [0.2, 0.8, 0.1, 0.0, 0.0, 0.0],  # label 0, rank 1 (predicted 1)
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0, rank 5: outside the top 5
            [0.0, 0.7, 0.1, 0.0, 0.0, 0.2],  # label 1, rank 0
            [0.6, 0.1, 0.3, 0.2, 0.15, 0.0],  # label 2, rank 1 (predicted 0)
            [0.0, 0.0, 0.0, 0.9, 0.1, 0.0],  # label 3, rank 0
        ]
    )
    return logits, np.array([0, 0, 0, 1, 2, 3])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_zeroshot_metrics_on_a_hand_made_matrix():
    logits, labels = _six_class_scores()
    assert true_class_rank(logits, labels).tolist() == [0, 1, 5, 0, 1, 0]
    m = zeroshot_metrics(logits, labels)
    assert set(m) == {"acc1", "acc5", "mean_per_class_recall"}
    assert m["acc1"] == pytest.approx(3 / 6)
    assert m["acc5"] == pytest.approx(5 / 6)
    # Recall per class present in the labels: 0 -> 1/3, 1 -> 1, 2 -> 0 (class 2 is never predicted),
    # 3 -> 1; classes 4 and 5 have no images and do not count.
    assert m["mean_per_class_recall"] == pytest.approx((1 / 3 + 1 + 0 + 1) / 4)
    # clip_benchmark computes it with scikit-learn's balanced accuracy.
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))


def test_mean_per_class_recall_weighs_classes_not_images():
    # 3 images of class 0, 1 of class 1, everything predicted 0: accuracy 3/4, per-class recall 1 and 0.
    logits = np.array([[1.0, 0.0, 0.5]] * 4)
    m = zeroshot_metrics(logits, np.array([0, 0, 0, 1]))
    assert m["acc1"] == pytest.approx(0.75)
    assert m["mean_per_class_recall"] == pytest.approx(0.5)


def test_acc5_is_null_below_five_classes_and_exact_at_five():
    logits = np.array([[0.1, 0.9, 0.0, 0.3], [0.5, 0.2, 0.1, 0.0]])
    m = zeroshot_metrics(logits, np.array([0, 0]))
    assert m["acc5"] is None  # clip_benchmark: NaN, which strict JSON cannot hold
    assert m["acc1"] == pytest.approx(0.5)
    json.dumps(m, allow_nan=False)
    five = zeroshot_metrics(np.array([[0.5, 0.4, 0.3, 0.2, 0.1]]), np.array([4]))
    assert five["acc1"] == 0.0 and five["acc5"] == 1.0


def test_zeroshot_ties_rank_the_lower_class_index_first():
    # All scores equal: every image is predicted class 0, like argmax.
    m = zeroshot_metrics(np.zeros((4, 3)), np.array([0, 1, 2, 2]))
    assert m["acc1"] == pytest.approx(0.25)
    assert m["mean_per_class_recall"] == pytest.approx(1 / 3)
    # Label 2 tied with class 1 at the top: class 1 ranks first, so label 2 has rank 1.
    assert true_class_rank(np.array([[0.0, 0.7, 0.7]]), np.array([2])).tolist() == [1]
    assert true_class_rank(np.array([[0.0, 0.7, 0.7]]), np.array([1])).tolist() == [0]


def test_zeroshot_metrics_reject_bad_shapes_and_labels():
    with pytest.raises(ValueError, match="labels"):
        zeroshot_metrics(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError):
        zeroshot_metrics(np.zeros((2, 3)), np.array([0]))


# ------------------------------------------------------------------------------------------ retrieval metrics


def _three_images_five_texts():
    """Similarity (3 images, 5 texts); texts 0, 1 describe image 0, text 2 image 1, texts 3, 4 image 2."""
    sim = np.array(
        [
            [0.9, 0.1, 0.5, 0.3, 0.2],
            [0.8, 0.2, 0.4, 0.1, 0.0],
            [0.1, 0.3, 0.6, 0.0, 0.5],
        ]
    )
    return sim, np.array([0, 0, 1, 2, 2])


def test_retrieval_metrics_on_a_hand_made_matrix():
    sim, t2i = _three_images_five_texts()
    m = retrieval_metrics(sim, t2i, ks=(1, 2, 3, 10))
    assert set(m) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 2, 3, 10)}
    # text -> image, rank of each caption's image in its column: t0 0, t1 2, t2 2, t3 2, t4 0.
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 5)
    assert m["image_retrieval_recall@2"] == pytest.approx(2 / 5)
    assert m["image_retrieval_recall@3"] == pytest.approx(1.0)
    # image -> text, best rank of an own caption in the image's row: image 0: t0 first (0);
    # image 1: t2 after t0 (1); image 2: t4 after t2 (1), its other caption t3 is last (4).
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    # ANY caption counts: image 2's t4 is 2nd; with only its first caption (t3, 5th) this would be 2/3.
    assert m["text_retrieval_recall@2"] == pytest.approx(1.0)
    # k beyond the number of candidates (3 images, 5 texts) retrieves everything.
    assert m["image_retrieval_recall@10"] == 1.0 and m["text_retrieval_recall@10"] == 1.0


def test_retrieval_metric_names_follow_clip_benchmark_directions():
    # Image 0 prefers its caption, and so does image 1 (0.1 > 0.0): image -> text is perfect.
    # Caption 1 prefers image 0 (0.9 > 0.1): text -> image misses once.
    sim = np.array([[1.0, 0.9], [0.0, 0.1]])
    m = retrieval_metrics(sim, np.array([0, 1]), ks=(1,))
    assert m["text_retrieval_recall@1"] == 1.0  # image queries retrieve texts
    assert m["image_retrieval_recall@1"] == 0.5  # text queries retrieve images


def test_retrieval_ties_rank_the_lower_index_first():
    m = retrieval_metrics(np.ones((2, 2)), np.array([0, 1]), ks=(1, 2))
    assert m["image_retrieval_recall@1"] == 0.5 and m["text_retrieval_recall@1"] == 0.5
    assert m["image_retrieval_recall@2"] == 1.0 and m["text_retrieval_recall@2"] == 1.0


def test_retrieval_metrics_match_a_top_k_reference_on_random_scores():
    """clip_benchmark's recipe (top-k indices, hit if any positive among them) on tie-free scores."""
    rng = np.random.default_rng(0)
    t2i = np.concatenate([np.arange(40), rng.integers(0, 40, 60)])
    sim = rng.normal(size=(40, 100)).astype(np.float32)
    ks = (1, 5, 10, 50)
    m = retrieval_metrics(sim, t2i, ks)
    positives = np.zeros((40, 100), dtype=bool)
    positives[t2i, np.arange(100)] = True

    def reference(scores, pos, k):
        top = np.argsort(-scores, axis=1)[:, :k]
        return float(np.take_along_axis(pos, top, axis=1).any(axis=1).mean())

    for k in ks:
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(reference(sim, positives, k))
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(reference(sim.T, positives.T, k))


def test_retrieval_metrics_reject_bad_inputs():
    sim, t2i = _three_images_five_texts()
    with pytest.raises(ValueError, match="caption"):
        retrieval_metrics(sim, np.array([0, 0, 1, 1, 1]))  # image 2 has no caption
    with pytest.raises(ValueError):
        retrieval_metrics(sim, t2i[:4])
    with pytest.raises(UsageError, match="recall-k"):
        retrieval_metrics(sim, t2i, ks=(0,))


def test_group_captions_merges_records_of_one_image():
    items = [
        Item("a", -1, "x.png", ("x one", "x two")),
        Item("b", -1, "y.png", "y one"),
        Item("c", -1, "x.png", "x three"),
    ]
    g = group_captions(items)
    assert g.image_items == [0, 1]
    assert g.captions == ["x one", "x two", "y one", "x three"]
    assert g.text_image == [0, 0, 1, 0]


# ---------------------------------------------------------------------------------------------------- prompts


def test_templates_need_the_class_placeholder(tmp_path):
    assert check_templates(["a {c}", "the {c}."]) == ("a {c}", "the {c}.")
    with pytest.raises(UsageError, match="a photo of a dog"):
        check_templates(["a {c}", "a photo of a dog"])
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {c}.\n\nart of the {c}\n")
    assert read_templates(str(path)) == ("a photo of a {c}.", "art of the {c}")
    assert read_templates("itap of a {c}") == ("itap of a {c}",)
    with pytest.raises(UsageError, match="nothing here"):
        read_templates("nothing here")


def test_classnames_from_a_file_or_commas(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("golden retriever\ntabby cat\n\n")
    assert read_classnames(str(path)) == ["golden retriever", "tabby cat"]
    assert read_classnames("cat, dog ,bird") == ["cat", "dog", "bird"]
    with pytest.raises(UsageError, match="missing.txt"):
        read_classnames(str(tmp_path / "missing.txt"))
    with pytest.raises(UsageError, match="empty"):
        read_classnames("cat,,dog")
    assert prompts(["cat", "dog"], ["a {c}", "the {c}!"]) == ["a cat", "the cat!", "a dog", "the dog!"]


# ---------------------------------------------------------------------------------------- a fake dual encoder


class _Lookup:
    """Tokenizer of `FakeDual`: each whole text is one id (an unknown text is a KeyError)."""

    def __init__(self, texts: list[str]):
        self.index = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"ids": torch.tensor([self.index[t] for t in texts])}


class FakeDual(DualEncoder):
    """Deterministic embeddings: a text's is its row of `text_vectors`, an image's is its mean RGB in
    [0, 1] (8 px, no normalisation), padded with zeros to the text dimension."""

    def __init__(self, text_vectors: dict[str, list[float]]):
        super().__init__()
        self.name = "test/fake-dual"
        self.table = torch.tensor(list(text_vectors.values()), dtype=torch.float32)
        self.embed_dim = self.table.shape[1]
        self.preprocess = Preprocess(size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        self._tokenizer = _Lookup(list(text_vectors))
        self._scale = nn.Parameter(torch.tensor(0.0))

    @property
    def tokenizer(self) -> _Lookup:
        return self._tokenizer

    @property
    def logit_scale(self) -> nn.Parameter:
        return self._scale

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        rgb = pixels.mean(dim=(2, 3))
        return nn.functional.pad(rgb, (0, self.embed_dim - 3))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.table[tokens["ids"]]

    def save(self, folder):
        raise NotImplementedError


def test_classifier_is_the_normalised_mean_of_normalised_prompt_embeddings():
    dual = FakeDual(
        {
            "a cat": [3.0, 0.0, 0.0, 4.0],  # unit: (0.6, 0, 0, 0.8)
            "the cat": [0.0, 2.0, 0.0, 0.0],  # unit: (0, 1, 0, 0)
            "a dog": [0.0, 0.0, 5.0, 0.0],  # unit: (0, 0, 1, 0)
            "the dog": [0.0, 0.0, 1.0, 1.0],  # unit: (0, 0, 0.7071, 0.7071)
        }
    )
    w = build_zeroshot_classifier(dual, ["cat", "dog"], ["a {c}", "the {c}"], batch_size=3)
    # cat: mean (0.3, 0.5, 0, 0.4), norm sqrt(0.5); dog: mean (0, 0, 0.85355, 0.35355), norm 0.92388.
    # (The mean of raw embeddings, (1.5, 1, 0, 2), would point elsewhere.)
    expected = torch.tensor(
        [
            [0.3 / 0.5**0.5, 0.5 / 0.5**0.5, 0.0, 0.4 / 0.5**0.5],
            [0.0, 0.0, 0.85355339 / 0.92387953, 0.35355339 / 0.92387953],
        ]
    )
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-5)


def _write_png(path: Path, colour: tuple[int, int, int]) -> str:
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), colour, dtype=np.uint8)).save(path)
    return path.name


def _manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def colour_manifest(tmp_path) -> tuple[Path, Path]:
    """Labelled flat-colour images (red x2, blue x2, a purple one labelled red) and a corrupt file."""
    rows = []
    for i, (colour, label) in enumerate([(RED, "red"), (RED, "red"), (BLUE, "blue"), (BLUE, "blue")]):
        rows.append({"image": _write_png(tmp_path / f"{label}{i}.png", colour), "label": label})
    rows.append({"image": _write_png(tmp_path / "purple.png", PURPLE), "label": "red"})
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png" * 20)
    rows.append({"image": bad.name, "label": "blue"})
    return _manifest(tmp_path / "colours.jsonl", rows), bad


def test_evaluate_zeroshot_with_known_embeddings(colour_manifest):
    manifest, bad = colour_manifest
    # Classes are the sorted label names, ["blue", "red"]; the default template is "a photo of a {c}.".
    dual = FakeDual({"a photo of a blue.": [0.0, 0.0, 1.0], "a photo of a red.": [1.0, 0.0, 0.0]})
    record = evaluate_zeroshot(dual, str(manifest), split=None, num_workers=0, precision="fp32", device="cpu")
    assert record["task"] == "zeroshot_classification" and record["model"] == "test/fake-dual"
    # Red and blue images are right; purple (150, 30, 200) is nearer blue: 4 of 5 right,
    # recall red 2/3, blue 2/2.
    assert record["metrics"] == {
        "acc1": pytest.approx(0.8),
        "acc5": None,
        "mean_per_class_recall": pytest.approx((2 / 3 + 1) / 2),
    }
    assert record["data"]["images"] == 5 and record["data"]["classes"] == 2
    assert record["data"]["templates"] == 1
    assert record["data"]["skipped"][0]["where"] == str(bad)
    with pytest.raises(DataError, match="broken.png"):
        evaluate_zeroshot(dual, str(manifest), split=None, num_workers=0, precision="fp32", strict=True)


def test_evaluate_zeroshot_class_names_and_templates_options(colour_manifest):
    manifest, _ = colour_manifest
    # Renamed classes (label order: blue, red) and two templates per class.
    dual = FakeDual(
        {"sky": [0.0, 0.0, 1.0], "sky!": [0.0, 0.2, 1.0], "fire": [1.0, 0.0, 0.0], "fire!": [1.0, 0.2, 0.0]}
    )
    kw = {"split": None, "num_workers": 0, "precision": "fp32", "device": "cpu"}
    record = evaluate_zeroshot(dual, str(manifest), classnames="sky,fire", templates=["{c}", "{c}!"], **kw)
    assert record["metrics"]["acc1"] == pytest.approx(0.8) and record["data"]["templates"] == 2
    with pytest.raises(UsageError, match="3 class names"):
        evaluate_zeroshot(dual, str(manifest), classnames=["a", "b", "c"], **kw)
    with pytest.raises(UsageError, match="no {c}"):
        evaluate_zeroshot(dual, str(manifest), templates=["a photo"], **kw)


def test_evaluate_zeroshot_needs_labels_and_class_names(tmp_path):
    png = _write_png(tmp_path / "red.png", RED)
    dual = FakeDual({"a photo of a red.": [1.0, 0.0, 0.0]})
    kw = {"split": None, "num_workers": 0, "precision": "fp32"}
    unlabelled = _manifest(tmp_path / "unlabelled.jsonl", [{"image": png}])
    with pytest.raises(UsageError, match="unlabelled"):
        evaluate_zeroshot(dual, str(unlabelled), **kw)
    numbered = _manifest(tmp_path / "numbered.jsonl", [{"image": png, "label": 2}])
    with pytest.raises(UsageError, match="--classnames"):
        evaluate_zeroshot(dual, str(numbered), **kw)
    with pytest.raises(UsageError, match="label 2"):
        evaluate_zeroshot(dual, str(numbered), classnames=["a", "b"], **kw)


@pytest.fixture
def caption_manifest(tmp_path) -> tuple[Path, Path]:
    """Two images with four captions over three records (one repeats the red image), and a corrupt
    image whose caption must be dropped."""
    red, blue = _write_png(tmp_path / "red.png", RED), _write_png(tmp_path / "blue.png", BLUE)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png" * 20)
    rows = [
        {"image": red, "caption": ["red thing", "crimson"]},
        {"image": blue, "caption": "blue thing"},
        {"image": red, "caption": "scarlet"},
        {"image": bad.name, "caption": "lost caption"},
    ]
    return _manifest(tmp_path / "pairs.jsonl", rows), bad


def test_evaluate_retrieval_with_known_embeddings(caption_manifest):
    manifest, bad = caption_manifest
    # "lost caption" has no embedding: encoding it would raise, so it must be dropped with its image.
    dual = FakeDual(
        {
            "red thing": [1.0, 0.0, 0.0],
            "crimson": [1.0, 0.1, 0.0],
            "blue thing": [0.0, 0.0, 1.0],
            "scarlet": [0.1, 0.0, 1.0],  # a red image's caption that points at blue
        }
    )
    record = evaluate_retrieval(
        dual, str(manifest), split=None, ks=(1, 5), num_workers=0, precision="fp32", device="cpu"
    )
    assert record["task"] == "zeroshot_retrieval"
    assert record["data"]["images"] == 2 and record["data"]["texts"] == 4
    assert [s["where"] for s in record["data"]["skipped"]] == [str(bad)]
    m = record["metrics"]
    # text -> image: "scarlet" finds the blue image first; the other three find theirs.
    assert m["image_retrieval_recall@1"] == pytest.approx(0.75)
    # image -> text: the red image ranks "crimson" first (hit); the blue image ranks "scarlet" first.
    assert m["text_retrieval_recall@1"] == pytest.approx(0.5)
    assert m["image_retrieval_recall@5"] == 1.0 and m["text_retrieval_recall@5"] == 1.0
    with pytest.raises(DataError, match="broken.png"):
        evaluate_retrieval(dual, str(manifest), split=None, num_workers=0, precision="fp32", strict=True)


# --------------------------------------------------------------------------------------------- cvfm/tiny-clip


def _tiny_clip_embeddings(folder: Path, images: list[str], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """cvfm/tiny-clip (seed 0, as the commands build it) called directly: unit image and text embeddings."""
    from PIL import Image

    from cvfm.registry import create_dual_encoder

    torch.manual_seed(0)
    dual = create_dual_encoder("cvfm/tiny-clip").eval()
    x = torch.stack([dual.preprocess.transform()(Image.open(folder / i).convert("RGB")) for i in images])
    with torch.no_grad():
        img, txt = dual.encode_image(x), dual.encode_text(dual.tokenizer(texts))
    return nn.functional.normalize(img, dim=-1).numpy(), nn.functional.normalize(txt, dim=-1).numpy()


def test_evaluate_zeroshot_tiny_clip_end_to_end(colour_manifest):
    manifest, bad = colour_manifest
    record = evaluate_zeroshot(
        "cvfm/tiny-clip", str(manifest), split=None, num_workers=0, precision="fp32", device="cpu"
    )
    assert set(record) == {
        "task",
        "model",
        "dataset",
        "metrics",
        "seed",
        "cvfm_version",
        "wall_s",
        "precision",
        "data",
    }
    assert record["task"] == "zeroshot_classification" and record["model"] == "cvfm/tiny-clip"
    assert record["dataset"] == str(manifest) and record["precision"] == "fp32"
    m = record["metrics"]
    assert set(m) == {"acc1", "acc5", "mean_per_class_recall"} and m["acc5"] is None
    # By hand: the cosine argmax over the two class prompts (classes sorted: blue, red).
    images = ["red0.png", "red1.png", "blue2.png", "blue3.png", "purple.png"]
    img, txt = _tiny_clip_embeddings(manifest.parent, images, ["a photo of a blue.", "a photo of a red."])
    labels, predicted = np.array([1, 1, 0, 0, 1]), (img @ txt.T).argmax(1)
    assert m["acc1"] == pytest.approx(float((predicted == labels).mean()), abs=1e-9)
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, predicted), abs=1e-9)
    assert record["data"] == {
        "split": None,
        "images": 5,
        "classes": 2,
        "templates": 1,
        "skipped": [record["data"]["skipped"][0]],
    }
    assert record["data"]["skipped"][0]["where"] == str(bad)
    json.dumps(record, allow_nan=False)


def test_evaluate_retrieval_tiny_clip_end_to_end(caption_manifest):
    manifest, _ = caption_manifest
    record = evaluate_retrieval(
        "cvfm/tiny-clip", str(manifest), split=None, num_workers=0, precision="fp32", device="cpu"
    )
    m = record["metrics"]
    assert set(m) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    # By hand: image 0 (red) has captions 0, 1, 3; image 1 (blue) caption 2.
    captions = ["red thing", "crimson", "blue thing", "scarlet"]
    img, txt = _tiny_clip_embeddings(manifest.parent, ["red.png", "blue.png"], captions)
    sim, owner = img @ txt.T, np.array([0, 0, 1, 0])
    assert m["image_retrieval_recall@1"] == pytest.approx(float((sim.argmax(0) == owner).mean()), abs=1e-9)
    assert m["text_retrieval_recall@1"] == pytest.approx(
        float(np.mean([owner[sim[i].argmax()] == i for i in range(2)])), abs=1e-9
    )
    # Two images and four captions: every k >= 4 retrieves all candidates.
    assert all(m[f"{d}_retrieval_recall@{k}"] == 1.0 for d in ("image", "text") for k in (5, 10))
    assert record["data"]["images"] == 2 and record["data"]["texts"] == 4


# -------------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("command", ["zeroshot", "retrieval"])
def test_help_has_examples(cli, command):  # noqa: F811
    r = cli("evaluate", command, "--help")
    assert r.code == 0, r.err
    assert "Examples" in r.out and f"cvfm evaluate {command} " in r.out


def test_cli_zeroshot_prints_one_json_line_and_appends_to_output(cli, colour_manifest, tmp_path):  # noqa: F811
    manifest, _ = colour_manifest
    args = ["evaluate", "zeroshot", "cvfm/tiny-clip", "--data", manifest, "--split", "", "--num-workers", "0"]
    record = one_json_line(cli(*args, "--precision", "fp32", "--classnames", "azure,crimson"))
    assert record["task"] == "zeroshot_classification" and record["data"]["images"] == 5
    assert set(record["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    out = tmp_path / "results.jsonl"
    for _ in range(2):
        r = cli(*args, "--precision", "fp32", "--output", out)
        assert r.code == 0 and r.out == "", r.err
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["data"]["classes"] == 2


def test_cli_retrieval_printsone_json_line(cli, caption_manifest):  # noqa: F811
    manifest, _ = caption_manifest
    args = [
        "evaluate",
        "retrieval",
        "cvfm/tiny-clip",
        "--data",
        manifest,
        "--split",
        "",
        "--num-workers",
        "0",
    ]
    record = one_json_line(cli(*args, "--recall-k", "1", "--recall-k", "3", "--precision", "fp32"))
    assert record["task"] == "zeroshot_retrieval"
    assert set(record["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 3)}
    assert record["metrics"]["text_retrieval_recall@3"] == 1.0  # 2 images
    assert len(record["data"]["skipped"]) == 1


def test_cli_usage_errors(cli, colour_manifest, caption_manifest, tmp_path):  # noqa: F811
    labelled, _ = colour_manifest
    pairs, _ = caption_manifest
    common = ["--split", "", "--num-workers", "0"]
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {c}.\na blurry photo\n")
    zs = ["evaluate", "zeroshot", "cvfm/tiny-clip", "--data", labelled, *common]
    assert_usage_error(cli(*zs, "--templates", templates), "a blurry photo", "{c}")
    assert_usage_error(cli(*zs, "--classnames", "a,b,c"), "3 class names")
    assert_usage_error(cli(*zs, "--precision", "fp8"), "fp8")
    assert_usage_error(
        cli("evaluate", "zeroshot", "cvfm/tiny-resnet", "--data", labelled, *common), "cvfm/tiny-resnet"
    )
    rt = ["evaluate", "retrieval", "cvfm/tiny-clip", "--data", pairs, *common]
    assert_usage_error(cli(*rt, "--text-column", "text"), "'text'")
    assert_usage_error(cli(*rt, "--recall-k", "0"), "recall-k")
    assert_usage_error(cli("evaluate", "retrieval", "cvfm/tiny-clip", "--data", labelled, *common), "caption")
