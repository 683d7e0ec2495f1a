"""Text files written by other tools: a UTF-8 byte-order mark (Windows editors, Excel), CRLF line endings
and an Excel-style export (BOM + CRLF + a trailing empty line) read like plain UTF-8 by every reader of a
file a user writes: manifests (file and stdin), capfilt input, ids files, class names, templates, the
fields of --forget-where and the ledger. Each keeps the first record and reports nothing malformed."""

from __future__ import annotations

import io
import json
import sys

import pytest

from cvfm.capfilt import io as capfilt_io
from cvfm.data.exclude import read_ids
from cvfm.data.sources import open_source
from cvfm.eval.zeroshot import read_classnames, read_templates
from cvfm.unlearn.ledger import Ledger
from cvfm.unlearn.request import ForgetRequest

BOM = "\ufeff"


def plain(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def with_bom(lines: list[str]) -> str:
    return BOM + plain(lines)


def crlf(lines: list[str]) -> str:
    return "".join(line + "\r\n" for line in lines)


def excel(lines: list[str]) -> str:
    """What Excel's "CSV UTF-8" export writes: a BOM, CRLF endings, an empty last line."""
    return BOM + crlf([*lines, ""])


STYLES = {"bom": with_bom, "crlf": crlf, "excel": excel}


def write(path, text: str):
    path.write_bytes(text.encode("utf-8"))  # bytes as written: no newline translation
    return path


@pytest.fixture
def records(tmp_path, make_image) -> list[dict]:
    for i in range(3):
        make_image(tmp_path / f"{i}.png", (50 * i, 0, 0))
    return [
        {
            "id": f"r{i}",
            "image": f"{i}.png",
            "label": ("cat", "dog")[i % 2],
            "caption": f"photo {i}",
            "user": i,
        }
        for i in range(3)
    ]


@pytest.mark.parametrize("style", STYLES)
def test_manifest_file(tmp_path, records, style):
    path = write(tmp_path / "data.jsonl", STYLES[style]([json.dumps(r) for r in records]))
    source = open_source(str(path), text_column="caption")
    assert [it.id for it in source.items] == ["r0", "r1", "r2"]
    assert [it.text for it in source.items] == ["photo 0", "photo 1", "photo 2"]
    assert source.skipped == []


@pytest.mark.parametrize("style", STYLES)
def test_manifest_on_stdin(tmp_path, records, style, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = STYLES[style]([json.dumps(records[0]), "1.png", json.dumps(records[2])])
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    source = open_source("-")
    assert [it.id for it in source.items] == ["r0", "1.png", "r2"]
    assert source.items[1].ref == str(tmp_path / "1.png")  # no "\r" left on a bare path
    assert source.skipped == []


@pytest.mark.parametrize("style", STYLES)
def test_capfilt_input(tmp_path, records, style):
    raw = STYLES[style]([json.dumps(r) for r in records]).encode("utf-8")
    jobs = [
        capfilt_io.parse(n, line, tmp_path, "in.jsonl", "image", "caption")
        for n, line in capfilt_io.read_lines(io.BytesIO(raw))
    ]
    assert [(j.line, j.id, j.error) for j in jobs] == [(1, "r0", None), (2, "r1", None), (3, "r2", None)]
    assert jobs[0].raw == json.dumps(records[0])


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_ids_file(tmp_path, style, suffix):
    lines = ["r0", "r2"] if suffix == ".txt" else ['{"id": "r0"}', '{"id": "r2"}']
    assert read_ids(str(write(tmp_path / f"ids{suffix}", STYLES[style](lines)))) == ["r0", "r2"]


@pytest.mark.parametrize("style", STYLES)
def test_ids_on_stdin(style, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(STYLES[style](['{"id": "r0"}', '{"id": "r2"}'])))
    assert read_ids("-") == ["r0", "r2"]


@pytest.mark.parametrize("style", STYLES)
def test_classnames_and_templates_files(tmp_path, style):
    names = write(tmp_path / "classes.txt", STYLES[style](["cat", "dog"]))
    templates = write(tmp_path / "templates.txt", STYLES[style](["a photo of a {c}.", "art of the {c}"]))
    assert read_classnames(str(names)) == ["cat", "dog"]
    assert read_templates(str(templates)) == ("a photo of a {c}.", "art of the {c}")


@pytest.mark.parametrize("style", STYLES)
def test_forget_where_reads_the_first_record_fields(tmp_path, records, style):
    path = write(tmp_path / "data.jsonl", STYLES[style]([json.dumps(r) for r in records]))
    retain, forget = ForgetRequest(where=("user=0",)).split(open_source(str(path)))
    assert [it.id for it in forget.items] == ["r0"]


@pytest.mark.parametrize("style", STYLES)
def test_ledger(tmp_path, style, capsys):
    entries = [{"request_id": "q1", "forget_ids": ["r0"]}, {"request_id": "q2", "forget_ids": ["r2"]}]
    ledger = Ledger(write(tmp_path / "ledger.jsonl", STYLES[style]([json.dumps(e) for e in entries])))
    assert [e["request_id"] for e in ledger.entries()] == ["q1", "q2"]
    assert ledger.forgotten_ids() == {"r0", "r2"}
    assert "unreadable" not in capsys.readouterr().err
