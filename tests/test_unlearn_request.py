"""Forget requests (ids, classes, predicates) and the deletion ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvfm.data.exclude import ids_sha256
from cvfm.data.sources import open_source
from cvfm.errors import CvfmError, UsageError
from cvfm.unlearn.ledger import Ledger, model_digest
from cvfm.unlearn.request import ForgetRequest, default_request_id


@pytest.fixture
def manifest(tmp_path, make_image) -> Path:
    """12 images of 3 classes, each record with a "user" field (4 users)."""
    lines = []
    for i in range(12):
        label = ("cat", "dog", "bird")[i % 3]
        make_image(tmp_path / "img" / f"{i}.png", (20 * i, 10, 10))
        split = "test" if i >= 9 else "train"
        lines.append(
            {"id": f"r{i}", "image": f"img/{i}.png", "label": label, "user": f"u{i % 4}", "split": split}
        )
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def _ids(source) -> list[str]:
    return [it.id for it in source.items]


def test_ids_file_text_and_jsonl(manifest, tmp_path):
    source = open_source(str(manifest), split="train")
    (tmp_path / "ids.txt").write_text("r1\n\nr4\n")
    (tmp_path / "ids.jsonl").write_text('{"id": "r1"}\n{"id": "r4", "reason": "gdpr"}\n')
    for name in ("ids.txt", "ids.jsonl"):
        retain, forget = ForgetRequest(ids_file=str(tmp_path / name)).split(source)
        assert _ids(forget) == ["r1", "r4"]
        assert _ids(retain) == ["r0", "r2", "r3", "r5", "r6", "r7", "r8"]


def test_unknown_ids_are_named(manifest, tmp_path):
    (tmp_path / "ids.txt").write_text("r1\nr10\nnope\n")  # r10 is a test item: not training data
    with pytest.raises(UsageError, match="2 of 3 ids .* not in the training data.*nope, r10"):
        ForgetRequest(ids_file=str(tmp_path / "ids.txt")).split(open_source(str(manifest), split="train"))


def test_class_by_name_or_index(manifest):
    source = open_source(str(manifest), split="train")  # classes sorted: bird, cat, dog
    assert source.classes == ["bird", "cat", "dog"]
    by_name = ForgetRequest(classes=("dog",)).split(source)[1]
    by_index = ForgetRequest(classes=("2",)).split(source)[1]
    assert _ids(by_name) == _ids(by_index) == ["r1", "r4", "r7"]
    with pytest.raises(UsageError, match="'horse' is not a class.*bird, cat, dog"):
        ForgetRequest(classes=("horse",)).split(source)


def test_predicates_on_label_id_and_manifest_fields(manifest):
    source = open_source(str(manifest), split="train")
    forget = lambda *where: _ids(ForgetRequest(where=where).split(source)[1])  # noqa: E731
    assert forget("user=u1") == ["r1", "r5"]
    assert forget("label=cat,dog") == ["r0", "r1", "r3", "r4", "r6", "r7"]
    assert forget("label!=cat,dog") == ["r2", "r5", "r8"]
    assert forget("id=r[0-2]") == ["r0", "r1", "r2"]
    assert forget("label=cat", "user=u0") == ["r0"]  # all predicates must hold
    with pytest.raises(UsageError, match="no record .* has the field colour"):
        forget("colour=red")
    with pytest.raises(UsageError, match="is not FIELD=VALUE"):
        ForgetRequest(where=("user",))


def test_union_of_kinds_and_split_is_a_partition(manifest, tmp_path):
    source = open_source(str(manifest), split="train")
    (tmp_path / "ids.txt").write_text("r8\n")
    retain, forget = ForgetRequest(ids_file=str(tmp_path / "ids.txt"), classes=("cat",)).split(source)
    assert _ids(forget) == ["r0", "r3", "r6", "r8"]
    assert sorted(_ids(retain) + _ids(forget)) == sorted(_ids(source))
    assert not set(_ids(retain)) & set(_ids(forget))


def test_empty_and_total_requests_are_refused(manifest):
    source = open_source(str(manifest), split="train")
    with pytest.raises(UsageError, match="say what to forget"):
        ForgetRequest()
    with pytest.raises(UsageError, match="matches no item"):
        ForgetRequest(where=("user=nobody",)).split(source)
    with pytest.raises(UsageError, match="nothing would be retained"):
        ForgetRequest(where=("id=*",)).split(source)


def test_predicates_on_fields_a_folder_lacks(image_folder):
    with pytest.raises(UsageError, match="only has label and id"):
        ForgetRequest(where=("user=u1",)).split(open_source(str(image_folder)))


def test_split_test_for_class_requests_only(manifest, tmp_path):
    train = open_source(str(manifest), split="train")
    test = open_source(str(manifest), split="test")  # r9 cat, r10 dog, r11 bird
    kept, gone = ForgetRequest(classes=("dog",)).split_test(test, train)
    assert _ids(kept) == ["r9", "r11"] and _ids(gone) == ["r10"]
    kept, gone = ForgetRequest(where=("label=dog,cat",)).split_test(test, train)
    assert _ids(kept) == ["r11"] and _ids(gone) == ["r9", "r10"]
    (tmp_path / "ids.txt").write_text("r1\n")
    kept, gone = ForgetRequest(ids_file=str(tmp_path / "ids.txt")).split_test(test, train)
    assert _ids(kept) == _ids(test) and gone is None
    kept, gone = ForgetRequest(where=("user=u1",)).split_test(test, train)  # not a class: test untouched
    assert gone is None


def test_builtin_class_request():
    source = open_source("builtin:digits", split="train")
    retain, forget = ForgetRequest(classes=("three",)).split(source)
    assert set(forget.labels.tolist()) == {3}
    assert len(retain) + len(forget) == len(source)
    assert (retain.labels != 3).all()


def test_request_ids_are_stable():
    assert ids_sha256(["b", "a"]) == ids_sha256(["a", "b"])
    assert default_request_id(["b", "a"]) == default_request_id(["a", "b"])
    assert default_request_id(["a"]) != default_request_id(["a", "b"])
    assert default_request_id(["a"]).startswith("req-")


def test_ledger_appends_and_finds(tmp_path):
    ledger = Ledger(tmp_path / "sub" / "ledger.jsonl")
    assert ledger.entries() == [] and ledger.forgotten_ids() == set()
    first = ledger.append({"request_id": "a", "forget_ids": ["x", "y"]})
    ledger.append({"request_id": "b", "forget_ids": ["z"]})
    assert "time" in first
    assert [e["request_id"] for e in ledger.entries()] == ["a", "b"]
    assert ledger.find("b")["forget_ids"] == ["z"] and ledger.find("c") is None
    assert ledger.forgotten_ids() == {"x", "y", "z"}
    before = ledger.path.read_bytes()
    with pytest.raises(CvfmError, match="already in the ledger"):
        ledger.append({"request_id": "a", "forget_ids": []})
    assert ledger.path.read_bytes() == before  # append-only: a refused entry changes nothing


def test_ledger_survives_a_cut_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.append({"request_id": "a", "forget_ids": ["x"]})
    with open(path, "a") as f:
        f.write('{"request_id": "b", "forget_')  # a crash mid-write
    assert [e["request_id"] for e in ledger.entries()] == ["a"]
    ledger.append({"request_id": "c", "forget_ids": ["w"]})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith('{"request_id": "b"')  # the old bytes are untouched
    assert [e["request_id"] for e in ledger.entries()] == ["a", "c"]
    assert ledger.forgotten_ids() == {"x", "w"}


def test_model_digest_tracks_weights(tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.zeros(3)}, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    first = model_digest(folder)
    assert first == model_digest(folder)
    save_file({"w": torch.tensor([0.0, 0.0, 1e-6])}, folder / "model.safetensors")
    assert model_digest(folder) != first
    with pytest.raises(CvfmError, match="no model files"):
        model_digest(tmp_path / "empty")
