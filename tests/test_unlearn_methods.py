"""Approximate unlearning methods over the shared loop: each does what it is for, keeps what it should,
and reproduces.

One tiny classifier (cvfm/tiny-resnet + a linear head) is trained once on 300 `builtin:digits` images
(30 per class) until it fits them; each test unlearns a copy of it. Forgetting a whole class ("three")
shows clearly in accuracy.

The published learning rates are per 256 samples, for 10 epochs over CIFAR-10's ~45,000 retained
images (SCRUB: 3 epochs, per 128). Over 300 images the same epochs apply 1/150 of that total update
(the sum of per-sample steps), and nothing moves. Tests that claim forgetting therefore run the
published epochs at `UPDATE_SCALE` times the published rate, which is still about a fifth of the
published total update, and require the retained classes to stay at least `RETAIN_FLOOR` accurate: a
method that breaks the model would "forget" trivially. Tests of mechanics run the published defaults.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvfm.data.sources import open_source, subset
from cvfm.errors import UsageError
from cvfm.registry import create_encoder
from cvfm.unlearn.loop import run_unlearning
from cvfm.unlearn.methods import METHODS, build_unlearn_method
from cvfm.unlearn.methods.base import PAPER_TRAINING_EPOCHS
from cvfm.unlearn.methods.salun import top_fraction_mask
from cvfm.unlearn.methods.scrub import distill_kl

FORGET_CLASS = 3
BATCH = 16
UPDATE_SCALE = 32  # 10 epochs x 300 images x 32 = 0.21 x (10 epochs x 45,000 images) at the published rate
RETAIN_FLOOR = 0.95


@dataclass
class Trained:
    model: nn.Module  # the original classifier, eval mode: copy it before unlearning
    data: object  # the 300-image source
    images: torch.Tensor  # its images through `transform`, in source order
    labels: torch.Tensor
    transform: object

    def split(self, forget: np.ndarray):
        keep = np.setdiff1d(np.arange(len(self.labels)), forget)
        return subset(self.data, keep.tolist()), subset(self.data, forget.tolist()), keep

    def accuracy(self, model: nn.Module, rows: np.ndarray) -> float:
        model.eval()
        with torch.no_grad():
            return float((model(self.images[rows]).argmax(1) == self.labels[rows]).float().mean())

    def loss(self, model: nn.Module, rows: np.ndarray) -> float:
        model.eval()
        with torch.no_grad():
            return float(F.cross_entropy(model(self.images[rows]), self.labels[rows]))


def tiny_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    encoder = create_encoder("cvfm/tiny-resnet")
    return nn.Sequential(encoder, nn.Linear(encoder.num_features, 10))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tiny steps run fastest so, and the results do not depend on the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread) -> Trained:
    source = open_source("builtin:digits", split="train")
    rows = np.sort(np.concatenate([np.flatnonzero(source.labels == c)[:30] for c in range(10)]))
    data = subset(source, rows.tolist())
    model = tiny_classifier()
    transform = model[0].preprocess.transform()
    images = torch.stack([transform(data.load(i)) for i in range(len(data))])
    labels = torch.as_tensor(data.labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(15):
        for batch in torch.randperm(len(images), generator=generator).split(32):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    t = Trained(model.eval(), data, images, labels, transform)
    assert t.accuracy(t.model, np.arange(len(labels))) >= 0.95  # it fits its training data
    return t


def unlearn(trained: Trained, name: str, options: dict, forget_rows: np.ndarray, seed: int = 0, **kwargs):
    retain, forget, _ = trained.split(forget_rows)
    model = copy.deepcopy(trained.model)
    method = build_unlearn_method(name, options)
    logs = run_unlearning(
        model, method, retain, forget, transform=trained.transform, batch_size=BATCH, seed=seed, **kwargs
    )
    return model, method, logs


def class_rows(trained: Trained) -> np.ndarray:
    return np.flatnonzero(trained.labels.numpy() == FORGET_CLASS)


def scaled(name: str, **options) -> dict[str, str]:
    """The published epochs at UPDATE_SCALE x the published rate (and any other option given)."""
    method = build_unlearn_method(name)
    epochs = method.resolve_epochs(PAPER_TRAINING_EPOCHS)  # 10 (SCRUB: 3), as in the papers
    return {"lr": repr(method.cfg.lr * UPDATE_SCALE), "epochs": str(epochs), **options}


@pytest.mark.parametrize("name", ["random-label", "salun", "scrub"])
def test_forgetting_methods_forget_a_class_and_keep_the_others(trained, name):
    """The methods that push the model away from the forget set (random labels; SCRUB's max steps) erase
    a class and keep every other one."""
    rows = class_rows(trained)
    options = scaled(name)
    model, _, logs = unlearn(trained, name, options, rows)
    _, _, keep = trained.split(rows)
    assert trained.accuracy(trained.model, rows) == 1.0
    assert trained.accuracy(model, rows) <= 0.1, f"{name} still knows the class"
    assert trained.accuracy(model, keep) >= RETAIN_FLOOR
    assert logs["skipped"] == 0 and len(logs["epochs"]) == int(options["epochs"])


def test_neggrad_plus_ascends_on_the_forget_set(trained):
    """NegGrad+ at its published beta (0.999: the ascent is a nudge) lifts the forget set's loss by orders of
    magnitude while the retain loss stays near zero and the retained classes stay right."""
    rows = class_rows(trained)
    model, _, _ = unlearn(trained, "neggrad+", scaled("neggrad+"), rows)
    _, _, keep = trained.split(rows)
    forget_loss = trained.loss(model, rows)
    assert forget_loss > 100 * trained.loss(trained.model, rows)
    assert forget_loss > 100 * trained.loss(model, keep)
    assert trained.accuracy(model, rows) < 1.0 and trained.accuracy(model, keep) >= RETAIN_FLOOR


def test_retain_only_methods_keep_the_model_and_l1_sparse_shrinks_it(trained):
    """finetune and l1-sparse only train on the retain set (Jia et al. 2023): they keep the retained
    classes, and l1-sparse's decaying penalty shrinks the weights' l1 norm well below finetune's. (Neither
    forgets a class in a short run: the forget set fades only by catastrophic forgetting, which at this
    scale leaves it intact, as the benchmark's UA of a few percent shows too.)"""
    rows = class_rows(trained)
    _, _, keep = trained.split(rows)
    norms = {}
    for name in ("finetune", "l1-sparse"):
        model, _, _ = unlearn(trained, name, scaled(name, epochs="2"), rows)
        assert trained.accuracy(model, keep) >= RETAIN_FLOOR
        norms[name] = sum(float(p.detach().abs().sum()) for p in model.parameters() if p.requires_grad)
    assert norms["l1-sparse"] < 0.97 * norms["finetune"]


def test_registry_and_published_defaults():
    assert list(METHODS) == ["finetune", "neggrad+", "random-label", "l1-sparse", "salun", "scrub"]
    expected_lr = {"finetune": 0.01, "neggrad+": 0.01, "random-label": 0.01, "l1-sparse": 0.01}
    expected_lr |= {"salun": 0.013, "scrub": 5e-4}
    for name, cls in METHODS.items():
        method = build_unlearn_method(name, {})
        assert cls.exact is False and method.name == name
        assert method.cfg.lr == expected_lr[name]
        assert (method.cfg.momentum, method.cfg.weight_decay, method.cfg.epochs) == (0.9, 5e-4, None)
    assert build_unlearn_method("neggrad+").cfg.beta == 0.999
    assert build_unlearn_method("l1-sparse").cfg.gamma == 5e-4
    assert build_unlearn_method("salun").cfg.threshold == 0.5
    scrub = build_unlearn_method("scrub").cfg
    assert (scrub.temperature, scrub.gamma, scrub.alpha, scrub.msteps) == (4.0, 0.99, 0.001, 2)
    assert build_unlearn_method("salun").settings() == {
        "method": "salun",
        "lr": 0.013,
        "epochs": None,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "threshold": 0.5,
    }


def test_options_are_parsed_by_type():
    method = build_unlearn_method(
        "scrub", {"msteps": "1", "temperature": "2", "epochs": "auto", "lr": "1e-3"}
    )
    assert (method.cfg.msteps, method.cfg.temperature, method.cfg.epochs, method.cfg.lr) == (
        1,
        2.0,
        None,
        1e-3,
    )
    assert build_unlearn_method("finetune", {"epochs": "7"}).cfg.epochs == 7


def test_bad_options_and_names_are_usage_errors():
    with pytest.raises(UsageError, match=r"unknown option 'alpha'.*options: beta, epochs, lr, momentum"):
        build_unlearn_method("neggrad+", {"alpha": "0.5"})
    with pytest.raises(UsageError, match=r"unknown unlearning method 'gradient-ascent'.*salun, scrub"):
        build_unlearn_method("gradient-ascent", {})
    with pytest.raises(UsageError, match=r"beta='lots'"):
        build_unlearn_method("neggrad+", {"beta": "lots"})
    for name, options, key in [
        ("neggrad+", {"beta": "1.5"}, "beta"),
        ("salun", {"threshold": "0"}, "threshold"),
        ("finetune", {"epochs": "0"}, "epochs"),
        ("finetune", {"lr": "-1"}, "lr"),
        ("scrub", {"temperature": "0"}, "temperature"),
    ]:
        with pytest.raises(UsageError, match=rf"option {key}="):
            build_unlearn_method(name, options)


def test_epochs_resolve_from_the_original_training_length():
    finetune = build_unlearn_method("finetune")
    # 10 unlearning epochs per 182 training epochs (Jia et al. 2023), at least 1; 10 when unknown
    assert [finetune.resolve_epochs(n) for n in (182, 91, 30, 1, None)] == [10, 5, 2, 1, 10]
    assert build_unlearn_method("salun", {"epochs": "4"}).resolve_epochs(182) == 4  # explicit wins
    scrub = build_unlearn_method("scrub")
    # SCRUB: its own 3 epochs (2 with a max pass), never fewer than msteps + 1, longer for long originals
    assert [scrub.resolve_epochs(n) for n in (182, 30, 600, None)] == [3, 3, 10, 3]
    assert build_unlearn_method("scrub", {"msteps": "4"}).resolve_epochs(30) == 5
    assert build_unlearn_method("scrub", {"epochs": "1"}).resolve_epochs(182) == 1


def test_learning_rate_scales_linearly_from_the_published_batch():
    assert build_unlearn_method("finetune").lr_at(64) == pytest.approx(0.0025)
    assert build_unlearn_method("salun").lr_at(512) == pytest.approx(0.026)
    assert build_unlearn_method("scrub").lr_at(128) == pytest.approx(5e-4)  # SCRUB's batch is 128


def test_salun_changes_only_the_salient_half_of_the_weights(trained):
    model, method, _ = unlearn(trained, "salun", {"epochs": "1"}, class_rows(trained))
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    assert sum(int(m.sum()) for m in method.mask) == int(n * 0.5)
    assert method.masked_fraction == pytest.approx(0.5, abs=1e-5)
    moved = 0
    for p, p0, m in zip(params, trained.model.parameters(), method.mask, strict=True):
        assert torch.equal(p.detach()[~m], p0.detach()[~m])  # masked-out weights: exactly the original
        moved += int((p.detach()[m] != p0.detach()[m]).sum())
    assert moved > 0.9 * int(n * 0.5)
    assert build_unlearn_method("salun", {"threshold": "0.1"})  # the fraction is an option


def test_saliency_ranks_all_parameters_together():
    scores = [torch.tensor([[0.1, 5.0], [3.0, 0.2]]), torch.tensor([4.0, 0.0, 1.0, 2.0])]
    masks = top_fraction_mask(scores, 0.5)  # 4 of the 8: the values 5, 4, 3, 2
    assert masks[0].tolist() == [[False, True], [True, False]]
    assert masks[1].tolist() == [True, False, False, True]
    assert sum(int(m.sum()) for m in top_fraction_mask(scores, 0.3)) == 2  # int(8 * 0.3)


def test_scrub_keeps_its_teacher_frozen_and_maxes_only_first_msteps(trained):
    model, method, logs = unlearn(trained, "scrub", {"epochs": "3"}, class_rows(trained))
    original = trained.model.state_dict()
    for key, value in method.teacher.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert not any(p.requires_grad for p in method.teacher.parameters()) and not method.teacher.training
    assert any(not torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert [e["passes"] for e in logs["epochs"]] == [["forget", "retain"], ["forget", "retain"], ["retain"]]
    assert "kl_forget" in logs["epochs"][0] and "kl_forget" not in logs["epochs"][2]


def test_distill_kl_matches_the_formula():
    student, teacher, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, 1.0, 3.0]]), 4.0
    q, p = F.softmax(teacher / t, dim=1), F.softmax(student / t, dim=1)
    expected = float((q * (q.log() - p.log())).sum()) * t * t
    assert float(distill_kl(student, teacher, t)) == pytest.approx(expected, rel=1e-5)
    assert float(distill_kl(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def test_l1_weight_decays_linearly_over_the_epochs(trained):
    _, method, logs = unlearn(trained, "l1-sparse", {"epochs": "2"}, class_rows(trained))
    assert [method.gamma_at(e) for e in (0, 1)] == [5e-4, 2.5e-4]
    assert all(e["l1"] > 0 for e in logs["epochs"])


def test_same_seed_same_weights(trained):
    rows = class_rows(trained)
    runs = [unlearn(trained, "salun", {"epochs": "1"}, rows, seed=s)[0] for s in (5, 5, 6)]
    a, b, c = (r.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_logs_count_steps_per_pass(trained):
    records = []
    rows = class_rows(trained)
    _, _, logs = unlearn(trained, "random-label", {"epochs": "2"}, rows, on_step=records.append)
    steps = math.ceil(len(rows) / BATCH) + math.ceil((300 - len(rows)) / BATCH)
    assert logs["steps"] == 2 * steps == len(records)
    assert [e["steps"] for e in logs["epochs"]] == [steps, steps]
    assert logs["lr"] == pytest.approx(0.01 * BATCH / 256)
    assert {r["pass"] for r in records} == {"forget", "retain"} and logs["wall_s"] > 0
    _, _, paired = unlearn(trained, "neggrad+", {"epochs": "1"}, rows)  # one step per retain batch
    assert paired["steps"] == math.ceil((300 - len(rows)) / BATCH)


def test_unreadable_images_are_skipped_and_counted(image_folder):
    source = open_source(str(image_folder))
    (image_folder / "cat" / "0.png").unlink()
    retain, forget = subset(source, [0, 1, 2, 3, 4]), subset(source, [5])
    model = tiny_classifier()
    for name in ("random-label", "neggrad+"):
        logs = run_unlearning(
            model,
            build_unlearn_method(name, {"epochs": "2"}),
            retain,
            forget,
            transform=model[0].preprocess.transform(),
            batch_size=2,
        )
        assert logs["skipped"] == 1 and logs["skipped_items"][0]["where"].endswith("cat/0.png")
        assert logs["steps"] > 0


def test_empty_sets_are_usage_errors(trained):
    rows = class_rows(trained)
    retain, forget, _ = trained.split(rows)
    empty = subset(trained.data, [])
    model = copy.deepcopy(trained.model)
    kwargs = {"transform": trained.transform, "batch_size": BATCH, "epochs": 1}
    with pytest.raises(UsageError, match="neggrad\\+ needs a non-empty forget set"):
        run_unlearning(model, build_unlearn_method("neggrad+"), retain, empty, **kwargs)
    with pytest.raises(UsageError, match="finetune needs a non-empty retain set"):
        run_unlearning(model, build_unlearn_method("finetune"), empty, forget, **kwargs)
    logs = run_unlearning(
        model, build_unlearn_method("finetune"), retain, empty, **kwargs
    )  # FT reads no forget
    assert logs["steps"] == math.ceil(len(retain) / BATCH)


def test_non_finite_loss_stops_with_advice(trained):
    model = copy.deepcopy(trained.model)
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    retain, forget, _ = trained.split(class_rows(trained))
    with pytest.raises(FloatingPointError, match=r"neggrad\+: the loss is nan.*raise beta"):
        run_unlearning(
            model, build_unlearn_method("neggrad+"), retain, forget, transform=trained.transform, epochs=1
        )


def test_a_frozen_backbone_stays_exactly_as_it_was(trained):
    model = copy.deepcopy(trained.model)
    model[0].requires_grad_(False)
    retain, forget, _ = trained.split(class_rows(trained))
    run_unlearning(
        model, build_unlearn_method("random-label", {"epochs": "1"}), retain, forget,
        transform=trained.transform, batch_size=BATCH,
    )  # fmt: skip
    before = trained.model[0].state_dict()
    assert all(torch.equal(v, before[k]) for k, v in model[0].state_dict().items())  # BN statistics too
    assert not torch.equal(model[1].weight, trained.model[1].weight)
