""" "Exact" holds only on the data the model was trained on: training records its items (ids, labels,
content hashes), and `unlearn --method retrain|head` refuses data that changed since, names what changed,
and with --allow-changed-data goes on with an empirical guarantee."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import assert_usage_error, one_json_line
from PIL import Image

from cvfm.data.digest import DIGEST_FILE, compare, digest_items
from cvfm.data.sources import open_source
from cvfm.finetune import FinetuneConfig, finetune, open_training_data
from cvfm.unlearn.ledger import Ledger

TINY = dict(split="train", epochs=1, batch_size=32, num_workers=0)


@pytest.fixture
def data(digit_folder, tmp_path) -> Path:
    """A private copy of the digits folder (train/ and test/), free to change."""
    return Path(shutil.copytree(digit_folder, tmp_path / "data"))


def knn_model(data: Path, out: Path) -> Path:
    """A k-NN classifier on `data` (features once: the quickest exact-method model)."""
    return finetune(FinetuneConfig(data=str(data), output=str(out), head="knn", **TINY))


def unlearn_head(cli, model: Path, out: Path, *extra):
    return cli("unlearn", "--model", model, "--forget-class", "zero", "--no-audit", "-o", out, *extra)


def test_the_digest_is_ids_labels_and_the_bytes_as_stored(data, tmp_path):
    folder = open_source(str(data), split="train")
    entries = digest_items(folder)
    assert len(entries) == 128 and entries == sorted(entries)
    first = data / "train" / entries[0][0]
    assert entries[0] == (entries[0][0], "one", hashlib.sha256(first.read_bytes()).hexdigest())
    digits = open_source("builtin:digits", split="train")
    item = digits.items[0]
    expected = hashlib.sha256(digits.pixels[item.ref].tobytes()).hexdigest()
    assert (item.id, digits.classes[item.label], expected) in digest_items(digits)
    # an image-text record hashes its text with its image: another caption is another item
    lines = [{"id": "a", "image": str(first), "label": "one", "caption": c} for c in ("x", "y")]
    for i, line in enumerate(lines):
        (tmp_path / f"m{i}.jsonl").write_text(json.dumps(line) + "\n")
    a, b = (digest_items(open_source(str(tmp_path / f"m{i}.jsonl"), text_column="caption")) for i in (0, 1))
    assert a[0][:2] == b[0][:2] and a[0][2] != b[0][2]


def test_compare_names_what_changed():
    recorded = [("a", "cat", "1"), ("b", "cat", "2"), ("c", "dog", "3"), ("d", "dog", "4")]
    current = [("a", "cat", "9"), ("b", "dog", "2"), ("d", "dog", "4"), ("e", "dog", "5")]
    changes = compare(recorded, current)
    found = changes.changed, changes.relabelled, changes.added, changes.removed
    assert found == (["a"], ["b"], ["e"], ["c"])
    assert changes.describe() == "1 changed (a), 1 relabelled (b), 1 appeared (e), 1 disappeared (c)"
    assert not compare(recorded, list(reversed(recorded)))


def test_training_records_its_items(data, tmp_path):
    """Both kinds of fine-tuning write data_items.jsonl: the items trained on, less the excluded ones."""
    (tmp_path / "drop.txt").write_text("one/" + sorted(p.name for p in (data / "train/one").iterdir())[0])
    for name, extra in (("full", {}), ("frozen", {"freeze": True, "lr": 0.1})):
        cfg = FinetuneConfig(data=str(data), output=str(tmp_path / name), exclude=str(tmp_path / "drop.txt"))
        run = finetune(FinetuneConfig(**{**cfg.__dict__, **TINY, **extra}))
        record = json.loads((run / "run.json").read_text())["data_digest"]
        text = (run / DIGEST_FILE).read_text()
        assert record["items"] == 127 and record["sha256"] == hashlib.sha256(text.encode()).hexdigest()
        source, _, _ = open_training_data(FinetuneConfig(**{**cfg.__dict__, **TINY}), quiet=True)
        recorded = [(r["id"], r["label"], r["sha256"]) for r in map(json.loads, text.splitlines())]
        assert recorded == digest_items(source)


def test_unchanged_data_is_exact(cli, data, tmp_path):
    model = knn_model(data, tmp_path / "knn")
    rec = one_json_line(unlearn_head(cli, model, tmp_path / "u"))
    assert rec["guarantee"] == "exact" and rec["exact"] is True
    assert rec["data_check"] == {"status": "verified", "items": 96}
    assert "match, id by id and byte by byte" in rec["guarantee_basis"]
    # the output records the retained items, so a later request on it is checked too
    chained = one_json_line(
        cli("unlearn", "--model", tmp_path / "u", "--forget-class", "one", "--no-audit", "-o", tmp_path / "v")
    )
    assert chained["guarantee"] == "exact" and chained["data_check"]["items"] == 64


def _change_bytes(data: Path) -> str:
    path = sorted((data / "train" / "two").iterdir())[0]
    Image.fromarray(255 - np.asarray(Image.open(path))).save(path)  # the same name, other pixels
    return f"1 changed (two/{path.name})"


def _add(data: Path) -> str:
    shutil.copy(sorted((data / "train" / "two").iterdir())[0], data / "train" / "two" / "new.png")
    return "1 appeared (two/new.png)"


def _delete(data: Path) -> str:
    path = sorted((data / "train" / "three").iterdir())[-1]
    path.unlink()
    return f"1 disappeared (three/{path.name})"


@pytest.mark.parametrize("change", [_change_bytes, _add, _delete])
def test_changed_folder_is_refused_then_empirical(cli, data, tmp_path, change):
    model = knn_model(data, tmp_path / "knn")
    message = change(data)
    out = tmp_path / "u"
    assert_usage_error(unlearn_head(cli, model, out), message, "--allow-changed-data", "not be exact")
    assert not out.exists()  # refused before anything was written
    ledger = tmp_path / "ledger.jsonl"
    rec = one_json_line(unlearn_head(cli, model, out, "--allow-changed-data", "--ledger", ledger))
    assert rec["guarantee"] == "empirical" and rec["exact"] is False
    assert message in rec["guarantee_basis"] and rec["data_check"]["status"] == "changed"
    saved = json.loads((out / "unlearn.json").read_text())
    assert saved["guarantee"] == "empirical" and message in saved["data_check"]["problem"]
    assert Ledger(ledger).entries()[0]["guarantee_basis"] == rec["guarantee_basis"]
    audit = one_json_line(
        cli("evaluate", "unlearning", out, "--data", data, "--forget-class", "zero", "--num-workers", "0")
    )
    assert audit["guarantee"] == "empirical" and message in audit["guarantee_basis"]


def test_relabelled_manifest_item_is_refused(cli, data, tmp_path):
    manifest = tmp_path / "data.jsonl"
    rows = [
        {"id": p.stem + p.parent.name, "image": str(p), "label": p.parent.name, "split": "train"}
        for p in sorted((data / "train").rglob("*.png"))
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = knn_model(manifest, tmp_path / "knn")
    rows[40]["label"] = "three" if rows[40]["label"] != "three" else "two"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_usage_error(unlearn_head(cli, model, tmp_path / "u"), f"1 relabelled ({rows[40]['id']})")


def test_retrain_checks_before_it_trains(cli, data, tmp_path):
    model = finetune(FinetuneConfig(data=str(data), output=str(tmp_path / "full"), **TINY))
    message = _add(data)
    out = tmp_path / "r"
    r = cli("unlearn", "--model", model, "--forget-class", "zero", "--method", "retrain", "-o", out)
    assert_usage_error(r, message, "--method retrain")
    assert not out.exists() and not (tmp_path / ".r.forget-ids").exists()


def test_a_run_without_a_digest_is_unverified(cli, data, tmp_path):
    model = knn_model(data, tmp_path / "knn")
    (model / DIGEST_FILE).unlink()
    run = json.loads((model / "run.json").read_text())
    del run["data_digest"]
    (model / "run.json").write_text(json.dumps(run))
    rec = one_json_line(unlearn_head(cli, model, tmp_path / "u"))
    assert rec["guarantee"] == "exact (data unverified)" and rec["exact"] is False
    assert "predates data digests" in rec["guarantee_basis"]
    assert rec["data_check"] == {"status": "unverified"}


def test_an_edited_record_is_refused(cli, data, tmp_path):
    model = knn_model(data, tmp_path / "knn")
    sidecar = model / DIGEST_FILE
    sidecar.write_text(sidecar.read_text().replace('"label": "one"', '"label": "two"', 1))
    assert_usage_error(unlearn_head(cli, model, tmp_path / "u"), "not the file run.json describes")


def test_a_resumed_run_refuses_changed_data(data, tmp_path):
    from cvfm.errors import UsageError

    cfg = FinetuneConfig(data=str(data), output=str(tmp_path / "run"), **{**TINY, "epochs": 2})

    def stop(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, on_step=stop)
    _delete(data)
    with pytest.raises(UsageError, match=r"training data changed since it started \(1 disappeared"):
        finetune(FinetuneConfig(**{**cfg.__dict__, "resume": True}))
