"""`cvfm unlearn` end to end: exact methods equal training without the forget set, approximate ones
forget, the ledger records each request once, and later runs leave forgotten ids out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clitools import assert_usage_error, one_json_line

from cvfm.finetune import FinetuneConfig, finetune
from cvfm.registry import create_classifier
from cvfm.unlearn.ledger import Ledger

FAST = ["--epochs", "2", "--batch-size", "32", "--num-workers", "0"]


@pytest.fixture(scope="module")
def trained(digit_folder, tmp_path_factory) -> dict[str, Path]:
    """A fine-tuned and a frozen-probe classifier on the 128 training digits (4 classes)."""
    root = tmp_path_factory.mktemp("unlearn_models")
    common = dict(data=str(digit_folder), split="train", epochs=2, batch_size=32, num_workers=0)
    # fits its 128 training images (train top-1 1.0), so that forgetting has something to undo
    full = finetune(
        FinetuneConfig(output=str(root / "full"), **{**common, "epochs": 8, "batch_size": 16}, lr=0.05)
    )
    probe = finetune(FinetuneConfig(output=str(root / "probe"), freeze=True, **common))
    knn = finetune(FinetuneConfig(output=str(root / "knn"), head="knn", **common))
    return {"full": full, "probe": probe, "knn": knn}


def _weights(folder) -> dict[str, torch.Tensor]:
    return create_classifier(str(folder)).state_dict()


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _ids(digit_folder, cls: str) -> list[str]:
    return sorted(f"{cls}/{p.name}" for p in (digit_folder / "train" / cls).glob("*.png"))


def test_retrain_equals_training_without_the_forget_set(cli, trained, digit_folder, tmp_path):
    ids = _ids(digit_folder, "two")[:5]
    (tmp_path / "erase.txt").write_text("\n".join(ids) + "\n")
    ledger = tmp_path / "ledger.jsonl"
    out = tmp_path / "retrained"
    rec = one_json_line(
        cli(
            "unlearn",
            "--model",
            trained["full"],
            "--forget",
            tmp_path / "erase.txt",
            "--ledger",
            ledger,
            "-o",
            out,
        )
    )
    assert rec["method"] == "retrain" and rec["guarantee"] == "exact" and rec["num_forgotten"] == 5
    assert "forget_ids" not in rec  # printed without the ids; the ledger keeps them
    assert {"ua", "ra", "ta", "mia_efficacy", "loss_auc"} <= set(rec["audit"]["after"])
    for name in ("classifier", "unlearn.json", "forgotten_ids.txt", "attack_scores.png", "run.json"):
        assert (out / name).exists(), name
    assert (out / "forgotten_ids.txt").read_text().split() == ids
    # the same recipe, run by hand with the ids excluded, gives the same weights bit for bit
    recipe = json.loads((trained["full"] / "run.json").read_text())["finetune"]
    manual = finetune(
        FinetuneConfig(
            **{**recipe, "output": str(tmp_path / "manual"), "exclude": str(tmp_path / "erase.txt")}
        )
    )
    assert _same_weights(out, manual)
    assert not _same_weights(out, trained["full"])
    # the output's recipe excludes the forgotten ids, so a later retrain from it stays exact
    saved = json.loads((out / "run.json").read_text())["finetune"]
    assert Path(saved["exclude"]).read_text().split() == ids
    entry = Ledger(ledger).entries()[0]
    assert entry["forget_ids"] == ids and entry["request_id"] == rec["request_id"]
    assert entry["model_after"]["sha256"] == rec["model_after"]["sha256"] != entry["model_before"]["sha256"]


def test_a_repeated_request_is_idempotent(cli, trained, digit_folder, tmp_path):
    ids = _ids(digit_folder, "one")[:3]
    (tmp_path / "erase.txt").write_text("\n".join(ids) + "\n")
    ledger = tmp_path / "ledger.jsonl"
    args = ["unlearn", "--model", trained["probe"], "--forget", tmp_path / "erase.txt", "--ledger", ledger]
    first = one_json_line(cli(*args, "-o", tmp_path / "a", "--no-audit"))
    assert first["method"] == "head"  # the exact method for a frozen backbone
    before = ledger.read_bytes()
    again = one_json_line(cli(*args, "-o", tmp_path / "b", "--no-audit"))
    assert again["already_done"] is True and again["request_id"] == first["request_id"]
    assert ledger.read_bytes() == before and not (tmp_path / "b").exists()
    (tmp_path / "other.txt").write_text(_ids(digit_folder, "one")[5] + "\n")
    r = cli(
        "unlearn", "--model", trained["probe"], "--forget", tmp_path / "other.txt", "--ledger", ledger,
        "--request-id", first["request_id"], "-o", tmp_path / "c",
    )  # fmt: skip
    assert_usage_error(r, "different set of ids")


def test_head_refits_the_probe_exactly(cli, trained, digit_folder, tmp_path):
    out = tmp_path / "probe-head"
    rec = one_json_line(cli("unlearn", "--model", trained["probe"], "--forget-class", "three", "-o", out))
    assert rec["method"] == "head" and rec["guarantee"] == "exact"
    ids = _ids(digit_folder, "three")
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    recipe = json.loads((trained["probe"] / "run.json").read_text())["finetune"]
    manual = finetune(
        FinetuneConfig(**{**recipe, "output": str(tmp_path / "m"), "exclude": str(tmp_path / "ids.txt")})
    )
    assert _same_weights(out, manual)
    after, before = rec["audit"]["after"], rec["audit"]["before"]
    assert after["ua"] > before["ua"] + 0.5  # the head never saw a "three"
    assert after["forget_test_accuracy"] < before["forget_test_accuracy"]


def test_knn_head_drops_the_forgotten_rows(cli, trained, tmp_path):
    rec = one_json_line(
        cli("unlearn", "--model", trained["knn"], "--forget-class", "zero", "-o", tmp_path / "k")
    )
    assert rec["method"] == "head"
    head = create_classifier(str(tmp_path / "k")).head
    assert len(head.ids) == 96 and not any(i.startswith("zero/") for i in head.ids)
    assert rec["audit"]["after"]["ua"] == 1.0


def test_approximate_method_forgets_a_class(cli, trained, tmp_path):
    # lr 0.8 at batch 256 is 0.05 at this model's batch 16: its own training rate, 80x the published 0.01.
    # The published rate suits 10 epochs after 182; here (8 training epochs) it forgets nothing: measured
    # UA 0.0 after 30 epochs at 0.01, 0.0 after 6 at 0.08, 0.09 after 3 at 0.2; 1.0 after 3 at 0.8.
    rec = one_json_line(
        cli("unlearn", "--model", trained["full"], "--forget-class", "zero", "--method", "random-label",
            "--epochs", "3", "--opt", "lr=0.8", "--num-workers", "0", "-o", tmp_path / "rl")
    )  # fmt: skip
    assert rec["guarantee"] == "empirical" and rec["exact"] is False
    assert rec["settings"]["epochs"] == 3
    after, before = rec["audit"]["after"], rec["audit"]["before"]
    assert before["ua"] == 0.0 and before["forget_test_accuracy"] == 1.0
    assert after["ua"] >= 0.9 and after["forget_test_accuracy"] <= 0.1  # 1.0 and 0.0 here
    # ... while keeping the rest (1.0 and 1.0 before). At this rate the result depends on the CPU's float
    # kernels: measured RA 0.96 / TA 1.0 on an AMD EPYC, 0.99 / 0.83 (20 of the 24 test images of the three
    # kept classes; chance is 0.33) on an Intel Xeon.
    assert after["ra"] >= 0.9 and after["ta"] >= 0.75
    assert json.loads((tmp_path / "rl" / "unlearn.json").read_text())["method"] == "random-label"


def test_later_runs_leave_ledger_ids_out(cli, trained, digit_folder, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    one_json_line(
        cli("unlearn", "--model", trained["probe"], "--forget-class", "two", "--ledger", ledger, "--no-audit",
            "-o", tmp_path / "u")
    )  # fmt: skip
    run = one_json_line(
        cli(
            "finetune",
            "--data",
            digit_folder,
            "--split",
            "train",
            *FAST,
            "--ledger",
            ledger,
            "-o",
            tmp_path / "f",
        )
    )
    assert run["excluded"] == 32 and run["train_images"] == 96
    excluded = json.loads((tmp_path / "f" / "run.json").read_text())["excluded"]
    assert excluded["count"] == 32


def test_chained_requests_accumulate(cli, trained, digit_folder, tmp_path):
    first = tmp_path / "first"
    one_json_line(
        cli("unlearn", "--model", trained["probe"], "--forget-class", "one", "--no-audit", "-o", first)
    )
    second = one_json_line(
        cli("unlearn", "--model", first, "--forget-class", "two", "--no-audit", "-o", tmp_path / "second")
    )
    assert second["data"]["train"] == 96  # class one is already gone from this model's training data
    forgotten = (tmp_path / "second" / "forgotten_ids.txt").read_text().split()
    assert sorted(forgotten) == sorted(_ids(digit_folder, "one") + _ids(digit_folder, "two"))
    # the audit of the second model leaves the first request's class out of retain too
    audit = one_json_line(
        cli("evaluate", "unlearning", tmp_path / "second", "--data", digit_folder, "--forget-class", "two",
            "--num-workers", "0")
    )  # fmt: skip
    assert audit["data"]["train"] == 96 and audit["data"]["retain"] == 64
    assert audit["guarantee"] == "exact" and audit["forget"]["count"] == 32


def test_ledger_listing(cli, trained, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    rec = one_json_line(
        cli("unlearn", "--model", trained["probe"], "--forget-class", "one", "--ledger", ledger, "--no-audit",
            "--request-id", "ticket-7", "-o", tmp_path / "u")
    )  # fmt: skip
    assert rec["request_id"] == "ticket-7"
    listed = one_json_line(cli("unlearn", "ledger", ledger, "--json"))
    assert listed["request_id"] == "ticket-7" and listed["num_forgotten"] == 32 and "forget_ids" not in listed
    r = cli("unlearn", "ledger", ledger)
    assert r.code == 0 and "ticket-7" in r.out
    assert_usage_error(cli("unlearn", "ledger", tmp_path / "none.jsonl"), "does not exist")


def test_usage_errors(cli, trained, tmp_path, digit_folder):
    out = tmp_path / "x"
    assert_usage_error(cli("unlearn", "--model", trained["full"], "-o", out), "say what to forget")
    assert_usage_error(
        cli("unlearn", "--model", trained["full"], "--forget-class", "one", "--method", "magic", "-o", out),
        "unknown unlearning method 'magic'",
    )
    assert_usage_error(
        cli("unlearn", "--model", trained["full"], "--forget-class", "one", "--method", "head", "-o", out),
        "frozen",
    )
    assert_usage_error(
        cli("unlearn", "--model", trained["knn"], "--forget-class", "one", "--method", "salun", "-o", out),
        "k-NN",
    )
    assert_usage_error(
        cli("unlearn", "--model", digit_folder, "--forget-class", "one", "-o", out), "run.json"
    )
    assert_usage_error(cli("unlearn", "--forget-class", "one", "-o", out), "--model")
    assert not out.exists()


@pytest.mark.slow
def test_interrupted_retrain_resumes_exactly(trained, digit_folder, tmp_path, monkeypatch):
    import os
    import signal

    from cvfm.errors import UsageError
    from cvfm.unlearn import run as run_module
    from cvfm.unlearn.request import ForgetRequest
    from cvfm.unlearn.run import UnlearnConfig, unlearn

    real_finetune = run_module.finetune

    def ctrl_c(step):
        if step == 5:  # in the second of 8 epochs of 6 steps
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(run_module, "finetune", lambda cfg: real_finetune(cfg, on_step=ctrl_c))
    cfg = UnlearnConfig(
        model=str(trained["full"]),
        output=str(tmp_path / "r"),
        request=ForgetRequest(classes=("one",)),
        audit=False,
        num_workers=0,
    )
    with pytest.raises(KeyboardInterrupt):
        unlearn(cfg)
    assert not (tmp_path / "r" / "unlearn.json").exists()
    monkeypatch.setattr(run_module, "finetune", real_finetune)
    with pytest.raises(UsageError, match="--resume"):
        unlearn(cfg)  # the half-done retraining is not silently replaced
    record = unlearn(UnlearnConfig(**{**cfg.__dict__, "resume": True}))
    assert record["method"] == "retrain" and record["num_forgotten"] == 32
    (tmp_path / "ids.txt").write_text("\n".join(_ids(digit_folder, "one")) + "\n")
    recipe = json.loads((trained["full"] / "run.json").read_text())["finetune"]
    manual = finetune(
        FinetuneConfig(**{**recipe, "output": str(tmp_path / "m"), "exclude": str(tmp_path / "ids.txt")})
    )
    assert _same_weights(tmp_path / "r", manual)


def test_an_existing_output_is_kept_unless_overwrite(cli, trained, tmp_path):
    out = tmp_path / "o"
    args = ["unlearn", "--model", trained["probe"], "--forget-class", "one", "--no-audit", "-o", out]
    one_json_line(cli(*args))
    before = (out / "unlearn.json").read_bytes()
    assert_usage_error(cli(*args[:-2], "--forget-class", "two", "-o", out), "--overwrite")
    assert (out / "unlearn.json").read_bytes() == before
    rec = one_json_line(cli(*args[:-2], "--forget-class", "two", "-o", out, "--overwrite"))
    assert (
        rec["num_forgotten"] == 64 and json.loads((out / "unlearn.json").read_text())["num_forgotten"] == 64
    )
