"""Classifiers and `cvfm finetune`: save / load, the k-NN head, full and frozen fine-tuning, exact resume,
id exclusion (a file or a deletion ledger) in `finetune` and `pretrain`, and the CLI's refusals."""

from __future__ import annotations

import io
import json
import os
import signal

import pytest
import torch
from clitools import assert_usage_error, one_json_line
from conftest import classifier_top1
from safetensors.torch import load_file, save_file

from cvfm.data.exclude import drop_ids, excluded_ids, ids_sha256, read_ids
from cvfm.data.sources import open_source, subset
from cvfm.errors import CvfmError, UsageError
from cvfm.eval.knn import knn_predict_scores
from cvfm.finetune import FinetuneConfig, finetune, fit_frozen_classifier
from cvfm.models.classifier import Classifier, KnnHead, LinearHead, load_classifier
from cvfm.pretrain import PretrainConfig, pretrain
from cvfm.registry import create_classifier, create_encoder
from cvfm.unlearn.ledger import Ledger

DIGITS = "builtin:digits"  # its test split: 359 real 8x8 digits, 10 classes


def _cfg(out, **kw) -> FinetuneConfig:
    return FinetuneConfig(
        **{"data": DIGITS, "split": "test", "output": str(out), "batch_size": 64, "num_workers": 0, **kw}
    )


def _tiny_classifier(head: str = "linear") -> Classifier:
    torch.manual_seed(0)
    encoder = create_encoder("cvfm/tiny-resnet").eval()
    if head == "linear":
        lin = LinearHead(encoder.num_features, 3)
        with torch.no_grad():
            lin.mean.normal_()
            lin.std.uniform_(0.5, 2.0)
        return Classifier(encoder, lin, ["a", "b", "c"], frozen=False, backbone="cvfm/tiny-resnet").eval()
    bank = torch.randn(12, encoder.num_features)
    knn = KnnHead.fit(bank, torch.arange(12) % 3, [f"id{i}" for i in range(12)], 3, k=5)
    return Classifier(encoder, knn, ["a", "b", "c"], frozen=True).eval()


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _head(run) -> dict:
    return load_file(run / "classifier" / "head.safetensors")


# ------------------------------------------------------------------------------------------ the classifier


@pytest.mark.parametrize("head", ["linear", "knn"])
def test_classifier_round_trip_gives_the_same_logits(tmp_path, head):
    model = _tiny_classifier(head)
    model.save(tmp_path / "clf")
    config = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert config["format"] == "cvfm-classifier" and config["head"] == head
    assert config["classes"] == ["a", "b", "c"] and config["frozen"] is (head == "knn")
    assert config["backbone"] == "cvfm/tiny-resnet"
    assert (config.get("ids") == [f"id{i}" for i in range(12)]) is (head == "knn")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for loaded in (
            load_classifier(tmp_path / "clf", create_encoder),
            create_classifier(str(tmp_path / "clf")),
        ):
            assert loaded.classes == model.classes and loaded.num_classes == 3
            torch.testing.assert_close(loaded.eval()(x), expected, rtol=0, atol=0)
    assert expected.shape == (4, 3)
    # A run folder holding classifier/ loads too; create_encoder on either gives the backbone.
    (tmp_path / "run").mkdir()
    (tmp_path / "clf").rename(tmp_path / "run" / "classifier")
    with torch.no_grad():
        torch.testing.assert_close(create_classifier(str(tmp_path / "run")).eval()(x), expected)
        torch.testing.assert_close(create_encoder(str(tmp_path / "run")).eval()(x), model.encoder(x))
        torch.testing.assert_close(
            create_encoder(str(tmp_path / "run" / "classifier")).eval()(x), model.encoder(x)
        )


def test_head_weights_must_match_exactly(tmp_path):
    folder = _tiny_classifier().save(tmp_path / "clf")
    state = load_file(folder / "head.safetensors")
    save_file(
        {**{k: v for k, v in state.items() if k != "std"}, "extra.weight": torch.zeros(1)},
        folder / "head.safetensors",
    )
    with pytest.raises(CvfmError, match=r"missing keys: std; unexpected keys: extra\.weight"):
        load_classifier(folder, create_encoder)
    save_file({**state, "linear.weight": torch.zeros(5, 128)}, folder / "head.safetensors")
    with pytest.raises(CvfmError, match=r"wrong shapes: linear\.weight \(5, 128\)"):
        load_classifier(folder, create_encoder)


def test_create_classifier_names_what_it_expects(tmp_path):
    with pytest.raises(
        UsageError, match="expected a folder with classifier.json or a run folder with classifier/"
    ):
        create_classifier(str(tmp_path))


def test_knn_head_votes_as_the_knn_evaluation_and_forgets_rows():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(50, 16, generator=g), torch.randint(0, 4, (50,), generator=g)
    queries = torch.randn(30, 16, generator=g)
    ids = [f"item{i}" for i in range(50)]
    head = KnnHead.fit(feats, labels, ids, 4, k=7, temperature=0.1)
    expected = knn_predict_scores(feats, labels, queries, 7, 4, temperature=0.1)
    torch.testing.assert_close(head.votes(queries), expected)
    shares = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(head(queries), torch.log(shares + 1e-8))
    assert torch.equal(head(queries).argmax(1), expected.argmax(1))

    gone = {f"item{i}" for i in range(0, 50, 3)}
    kept = [i for i in range(50) if f"item{i}" not in gone]
    smaller = head.without(gone | {"not-in-bank"})
    assert smaller.ids == [ids[i] for i in kept] and smaller.k == 7 and smaller.temperature == 0.1
    refit = KnnHead.fit(feats[kept], labels[kept], smaller.ids, 4, k=7, temperature=0.1)
    assert torch.equal(smaller.bank, refit.bank) and torch.equal(smaller.labels, refit.labels)
    torch.testing.assert_close(
        smaller.votes(queries), knn_predict_scores(feats[kept], labels[kept], queries, 7, 4, 0.1)
    )
    with pytest.raises(UsageError, match="empty"):
        head.without(ids)


# ------------------------------------------------------------------------------------------------ exclusion


def test_read_ids_from_text_jsonl_and_stdin(tmp_path, monkeypatch):
    (tmp_path / "ids.txt").write_text("a\n\n  b \nc\n")
    assert read_ids(str(tmp_path / "ids.txt")) == ["a", "b", "c"]
    (tmp_path / "ids.jsonl").write_text('{"id": "x", "label": 1}\n\n{"id": 7}\n')
    assert read_ids(str(tmp_path / "ids.jsonl")) == ["x", "7"]
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n{"image": "y.png"}\n')
    with pytest.raises(UsageError, match=r"bad\.jsonl:2: expected a JSON object with a string \"id\""):
        read_ids(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UsageError, match="does not exist"):
        read_ids(str(tmp_path / "missing.txt"))
    monkeypatch.setattr("sys.stdin", io.StringIO('{"id": "s1"}\n{"id": "s2"}\n'))
    assert read_ids("-") == ["s1", "s2"]
    monkeypatch.setattr("sys.stdin", io.StringIO("t1\nt2\n"))
    assert read_ids("-") == ["t1", "t2"]


def test_drop_ids_and_ledger_ids(tmp_path):
    source = open_source(DIGITS, split="test")
    first = [it.id for it in source.items[:3]]
    rest, dropped = drop_ids(source, {*first, "digits/not-an-id"})
    assert dropped == 3 and len(rest) == len(source) - 3
    assert [it.id for it in rest.items] == [it.id for it in source.items[3:]]
    ledger = tmp_path / "ledger.jsonl"
    assert excluded_ids(None, str(ledger)) == set()  # no ledger yet: nothing forgotten
    Ledger(ledger).append({"request_id": "r1", "forget_ids": first[:2]})
    (tmp_path / "ids.txt").write_text(first[2] + "\n")
    assert excluded_ids(str(tmp_path / "ids.txt"), str(ledger)) == set(first)


# ------------------------------------------------------------------------------------------- full fine-tune


def test_full_finetune_trains_a_classifier_that_reloads(tmp_path):
    run = finetune(_cfg(tmp_path / "run", epochs=2, lr=0.1, augment=False))
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and record["config"]["method"] == "supervised"
    assert record["finetune"] == {**record["finetune"], "head": "linear", "freeze": False, "epochs": 2}
    assert record["method_config"] == {
        "augment": False,
        "min_scale": 0.8,
        "optimizer": "sgd",
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "layer_decay": 1.0,
        "label_smoothing": 0.0,
    }
    assert record["data"]["images"] == 359 and len(record["data"]["classes"]) == 10
    assert record["excluded"] is None
    # The classifier's own top-1 on its training images (0.32 here; chance is 0.1).
    train_top1 = classifier_top1(run, open_source(DIGITS, split="test"))
    assert record["train_top1"] == pytest.approx(train_top1, abs=1e-6) and train_top1 > 0.3
    assert not (run / "backbone").exists()
    clf = create_classifier(str(run)).eval()
    assert clf.classes[:3] == ["zero", "one", "two"] and not clf.frozen and clf.backbone == "cvfm/tiny-resnet"
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            load_classifier(run / "classifier", create_encoder).eval()(x), clf(x), rtol=0, atol=0
        )
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [m["train/lr"] for m in metrics if "train/lr" in m]
    assert len(lrs) == 10 and max(lrs) == pytest.approx(0.1)
    assert all("train/accuracy" in m for m in metrics if "train/loss" in m)


def test_supervised_default_recipe_and_classifier_monitor(tmp_path, digit_folder):
    """SGD at 0.1 x batch / 256, and --monitor reports the classifier's own test top-1."""
    run = pretrain(
        PretrainConfig(
            data=str(digit_folder),
            output=str(tmp_path / "run"),
            split="train",
            method="supervised",
            model="cvfm/tiny-resnet",
            epochs=1,
            batch_size=32,
            num_workers=0,
            monitor=str(digit_folder),
        )
    )
    record = json.loads((run / "run.json").read_text())
    assert record["resolved"]["lr"] == pytest.approx(0.1 * 32 / 256)
    optimizer = torch.load(next((run / "checkpoints").glob("step-*")) / "optimizer.pt", weights_only=True)
    assert optimizer["param_groups"][0]["momentum"] == 0.9 and "betas" not in optimizer["param_groups"][0]
    monitored = [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "monitor/top1" in r
    ]
    assert [r["step"] for r in monitored] == [0, 4]
    # The last reading is the saved classifier's top-1 on the test split (0.16 here after one short epoch).
    test = open_source(str(digit_folder), split="test")
    assert monitored[-1]["monitor/top1"] == pytest.approx(classifier_top1(run, test), abs=1e-6)


def _supervised(model: str, **options):
    from cvfm.methods import Budget
    from cvfm.methods.supervised import Supervised, SupervisedConfig

    torch.manual_seed(0)
    encoder = create_encoder(model)
    classifier = Classifier(encoder, LinearHead(encoder.num_features, 4), list("abcd"), frozen=False)
    return Supervised(classifier, SupervisedConfig(**options), Budget(64, 1, 1, 32))


def test_layer_decay_groups_are_timms_with_the_head_at_full_lr():
    """AdamW + layer decay on a ViT: the head at lr x 1, the backbone one level below it, each parameter's
    scale and weight decay as timm's param_groups_layer_decay groups them; by hand, MAE's / BEiT's scales."""
    from timm.optim import param_groups_layer_decay

    method = _supervised("cvfm/tiny-vit", optimizer="adamw", layer_decay=0.5)
    assert method.weight_decay == (0.05, 0.05) and method.peak_lr(512) == pytest.approx(1e-3)
    groups = method.param_groups()
    got = {id(p): (g["lr_scale"], g["weight_decay"], g["apply_wd"]) for g in groups for p in g["params"]}
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) and set(got) == {id(p) for p in trainable}
    vit = method.encoder.encoder.model
    reference = param_groups_layer_decay(
        vit, weight_decay=0.05, no_weight_decay_list=vit.no_weight_decay(), layer_decay=0.5
    )
    for g in reference:
        for p in g["params"]:
            assert got[id(p)] == (g["lr_scale"] * 0.5, g["weight_decay"], g["weight_decay"] > 0)
    depth = len(vit.blocks)
    assert got[id(vit.patch_embed.proj.weight)] == (0.5 ** (depth + 1), 0.05, True)
    assert got[id(vit.pos_embed)][:2] == (0.5 ** (depth + 1), 0.0)  # no_weight_decay(): not decayed
    assert got[id(vit.blocks[-1].mlp.fc1.weight)] == (0.5, 0.05, True)
    assert got[id(vit.blocks[0].mlp.fc1.bias)] == (0.5**depth, 0.0, False)
    assert got[id(vit.norm.weight)] == (0.5, 0.0, False)  # timm keeps it with the last block
    head = method.encoder.head.linear
    assert got[id(head.weight)] == (1.0, 0.05, True) and got[id(head.bias)] == (1.0, 0.0, False)


def test_sgd_recipe_is_one_group_and_layer_decay_needs_a_timm_backbone(tmp_path):
    method = _supervised("cvfm/tiny-resnet")
    (group,) = method.param_groups()
    assert group["apply_wd"] and len(group["params"]) == len(list(method.parameters()))
    assert method.weight_decay == (5e-4, 5e-4) and method.peak_lr(256) == pytest.approx(0.1)
    sgd = _supervised("cvfm/tiny-resnet", layer_decay=0.5).param_groups()  # SGD decays every parameter
    assert {g["weight_decay"] for g in sgd} == {5e-4} and min(g["lr_scale"] for g in sgd) < 0.5**3
    with pytest.raises(UsageError, match="layer decay needs a timm backbone"):
        _supervised("cvfm/pixels", layer_decay=0.5).param_groups()
    with pytest.raises(UsageError, match="optimizer must be one of sgd, adamw, not 'adam'"):
        _supervised("cvfm/tiny-resnet", optimizer="adam")
    with pytest.raises(UsageError, match="layer decay needs a timm backbone"):  # before the run exists
        finetune(_cfg(tmp_path / "pixels", model="cvfm/pixels", layer_decay=0.5, epochs=1))
    assert not (tmp_path / "pixels").exists()


@pytest.mark.parametrize("recipe", [{}, {"optimizer": "adamw", "layer_decay": 0.5}], ids=["sgd", "adamw"])
def test_interrupted_finetune_resumes_to_identical_weights(tmp_path, digit_folder, recipe):
    cfg = dict(data=str(digit_folder), split="train", batch_size=32, epochs=2, **recipe)  # 4 steps an epoch
    full = finetune(_cfg(tmp_path / "full", **cfg))
    optimizer = torch.load(next((full / "checkpoints").glob("step-*")) / "optimizer.pt", weights_only=True)
    groups = optimizer["param_groups"]
    if recipe:  # AdamW, each group at the step's lr x its layer's scale (stem 0.5^(n+1) ... head 1)
        assert {round(g["lr"] / g["lr_scale"], 12) for g in groups} == {round(groups[-1]["lr"], 12)}
        scales = sorted({g["lr_scale"] for g in groups}, reverse=True)
        assert len(scales) > 4 and scales == [0.5**k for k in range(len(scales))] and "betas" in groups[0]
    else:
        assert len(groups) == 1 and groups[0]["momentum"] == 0.9

    def ctrl_c(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(tmp_path / "part", **cfg), on_step=ctrl_c)
    part = finetune(FinetuneConfig(data="", output=str(tmp_path / "part"), resume=True, num_workers=0))
    _same_tensors(_head(full), _head(part))
    backbone = "classifier/backbone/model.safetensors"
    _same_tensors(load_file(full / backbone), load_file(part / backbone))
    assert json.loads((part / "run.json").read_text())["train_top1"] is not None
    # run.json's recipe reruns the same training (what `unlearn --method retrain` relies on).
    recipe = json.loads((full / "run.json").read_text())["finetune"]
    again = finetune(FinetuneConfig(**{**recipe, "output": str(tmp_path / "again")}))
    _same_tensors(_head(full), _head(again))


# ----------------------------------------------------------------------------------------- frozen backbone


def test_frozen_linear_and_knn_finetune(tmp_path):
    linear = finetune(_cfg(tmp_path / "linear", freeze=True, epochs=5))
    knn = finetune(_cfg(tmp_path / "knn", head="knn", k=10))
    for run, head in ((linear, "linear"), (knn, "knn")):
        record = json.loads((run / "run.json").read_text())
        assert record["status"] == "finished" and record["finetune"]["head"] == head
        assert record["data"]["images"] == 359
        train_top1 = classifier_top1(run, open_source(DIGITS, split="test"))
        assert record["train_top1"] == pytest.approx(train_top1, abs=1e-6)
        assert record["resolved"]["head"] == head
        clf = create_classifier(str(run))
        assert clf.frozen and isinstance(clf.head, LinearHead if head == "linear" else KnnHead)
        assert not (run / "checkpoints").exists()
    record = json.loads((linear / "run.json").read_text())
    assert record["resolved"]["lr"] in (1e-3, 3e-3, 1e-2) and record["resolved"]["val_top1"] is not None
    clf = create_classifier(str(knn))
    assert clf.head.k == 10 and len(clf.head.ids) == 359 and clf.head.ids[0].startswith("digits/")
    with pytest.raises(UsageError, match="--overwrite"):
        finetune(_cfg(tmp_path / "knn", head="knn"))
    # A folder's own weights are the backbone (no --pretrained needed), kept as they are.
    torch.manual_seed(123)
    create_encoder("cvfm/tiny-resnet").save(tmp_path / "encoder")
    from_folder = finetune(_cfg(tmp_path / "from-folder", head="knn", model=str(tmp_path / "encoder")))
    backbone = "model.safetensors"
    _same_tensors(
        load_file(tmp_path / "encoder" / backbone), load_file(from_folder / "classifier/backbone" / backbone)
    )
    with pytest.raises(UsageError, match="no checkpoints to resume"):
        finetune(FinetuneConfig(data="", output=str(knn), resume=True))


@pytest.mark.parametrize("head", ["linear", "knn"])
def test_fit_frozen_classifier_on_retain_equals_finetune_with_exclude(tmp_path, head):
    """`unlearn --method head`: refit on the retain data == fine-tune with the forgotten ids left out."""
    source = open_source(DIGITS, split="test")
    forget = [it.id for it in source.items[::7]]
    (tmp_path / "forget.txt").write_text("\n".join(forget) + "\n")
    cfg = _cfg(tmp_path / "original", head=head, freeze=True, epochs=3, lr=None if head == "linear" else 0.01)
    original = finetune(cfg)
    excluded = finetune(
        _cfg(
            tmp_path / "excluded",
            **{**vars(cfg), "output": str(tmp_path / "excluded"), "exclude": str(tmp_path / "forget.txt")},
        )
    )
    record = json.loads((excluded / "run.json").read_text())["excluded"]
    assert record["count"] == len(forget) and record["sha256"] == ids_sha256(forget)

    retain = subset(source, [i for i, it in enumerate(source.items) if it.id not in set(forget)])
    recipe = FinetuneConfig(**json.loads((original / "run.json").read_text())["finetune"])
    refit = fit_frozen_classifier(
        load_classifier(original / "classifier", create_encoder).encoder, retain, recipe
    )
    _same_tensors({k: v.cpu() for k, v in refit.head.state_dict().items()}, _head(excluded))
    if head == "knn":  # dropping the rows of the original bank is the same bank
        dropped = create_classifier(str(original)).head.without(forget)
        assert torch.equal(dropped.bank, refit.head.bank) and dropped.ids == refit.head.ids


# ---------------------------------------------------------------------------------- exclusion in training


def test_pretrain_leaves_out_excluded_and_forgotten_ids(tmp_path, digit_folder):
    source = open_source(str(digit_folder), split="train")
    ids = [it.id for it in source.items]
    (tmp_path / "ids.txt").write_text("\n".join(ids[:10]) + "\n")
    ledger = tmp_path / "ledger.jsonl"
    Ledger(ledger).append({"request_id": "r1", "forget_ids": ids[5:20]})
    common = dict(
        data=str(digit_folder),
        split="train",
        method="simclr",
        model="cvfm/tiny-resnet",
        epochs=1,
        batch_size=32,
        num_workers=0,
    )
    run = pretrain(
        PretrainConfig(
            output=str(tmp_path / "run"), exclude=str(tmp_path / "ids.txt"), ledger=str(ledger), **common
        )
    )
    record = json.loads((run / "run.json").read_text())
    assert record["data"]["images"] == 128 - 20
    assert record["excluded"] == {
        "count": 20,
        "requested": 20,
        "sha256": ids_sha256(ids[:20]),
        "exclude": str(tmp_path / "ids.txt"),
        "ledger": str(ledger),
    }
    assert record["resolved"]["steps_per_epoch"] == 3  # 108 images, batch 32

    # A run interrupted before a new request was carried out refuses to resume on different data.
    part = tmp_path / "part"

    def ctrl_c(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        pretrain(PretrainConfig(output=str(part), ledger=str(ledger), **common), on_step=ctrl_c)
    Ledger(ledger).append({"request_id": "r2", "forget_ids": ids[20:22]})
    with pytest.raises(UsageError, match="changed since it started"):
        pretrain(PretrainConfig(data="", output=str(part), resume=True))


def test_finetune_cli_leaves_out_ledger_ids(tmp_path, cli):
    source = open_source(DIGITS, split="test")
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(
        json.dumps({"request_id": "r1", "forget_ids": [it.id for it in source.items[:9]]}) + "\n"
    )
    out = tmp_path / "run"
    r = cli(
        "finetune",
        "--data",
        DIGITS,
        "--split",
        "test",
        "--head",
        "knn",
        "--ledger",
        ledger,
        "-o",
        out,
        "--num-workers",
        "0",
    )
    record = one_json_line(r)
    assert record["run"] == str(out) and record["classifier"] == str(out / "classifier")
    assert record["head"] == "knn" and record["frozen"] is True and record["classes"] == 10
    assert record["train_images"] == 350 and record["excluded"] == 9
    retain, _ = drop_ids(source, set(source.items[i].id for i in range(9)))
    assert record["train_top1"] == pytest.approx(classifier_top1(out, retain), abs=1e-6)
    assert "left out 9 training image(s)" in r.err
    assert len(create_classifier(str(out)).head.ids) == 350


def test_finetune_cli_usage_errors(tmp_path, cli, image_folder, make_image):
    unlabelled = tmp_path / "flat"
    for i in range(3):
        make_image(unlabelled / f"{i}.png")
    r = cli("finetune", "--data", unlabelled, "--split", "", "-o", tmp_path / "a")
    assert_usage_error(r, "a classifier trains on labels", "3 of the 3 images")
    r = cli("pretrain", "--data", unlabelled, "--method", "supervised", "-o", tmp_path / "b")
    assert_usage_error(r, "a classifier trains on labels")
    r = cli("finetune", "--data", image_folder, "--split", "", "--head", "svm", "-o", tmp_path / "c")
    assert_usage_error(r, "--head must be linear or knn, not 'svm'")
    r = cli(
        "finetune",
        "--data",
        image_folder,
        "--split",
        "",
        "--exclude",
        tmp_path / "nope.txt",
        "-o",
        tmp_path / "d",
    )
    assert_usage_error(r, "nope.txt", "does not exist")
    r = cli("pretrain", "--data", image_folder, "--exclude", tmp_path / "nope.txt", "-o", tmp_path / "e")
    assert_usage_error(r, "nope.txt", "does not exist")
    r = cli("finetune", "-o", tmp_path / "f")
    assert_usage_error(r, "--data is required")
    r = cli("finetune", "--data", image_folder, "--split", "", "--optimizer", "adam", "-o", tmp_path / "g")
    assert_usage_error(r, "optimizer must be one of sgd, adamw, not 'adam'")
    r = cli("finetune", "--data", image_folder, "--split", "", "--layer-decay", "0", "-o", tmp_path / "h")
    assert_usage_error(r, "layer decay must be in (0, 1], not 0.0")
    r = cli("finetune", "--data", image_folder, "--freeze", "--layer-decay", "0.7", "-o", tmp_path / "i")
    assert_usage_error(r, "--optimizer and --layer-decay are for full fine-tuning")
    for name in "abcdefghi":
        assert not (tmp_path / name).exists(), name
