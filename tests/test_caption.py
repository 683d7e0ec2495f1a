"""`cvfm caption` and `cvfm.caption.caption`: schema, batching, seeds, resume, bad inputs, stdin, errors.

Most tests use a saved tiny BLIP captioner folder (fixed weights, so separate runs use the same model);
the stdin test runs `cvfm/tiny-blip` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clitools import assert_usage_error
from conftest import write_image

from cvfm.caption import caption
from cvfm.data.sources import DataError
from cvfm.errors import UsageError

FAST = {"num_workers": 0, "precision": "fp32", "max_length": 10, "min_length": 2}
SAMPLE = {"top_p": 0.9, "num_captions": 2}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from transformers import BlipForConditionalGeneration

    from cvfm.models.blip import Captioner
    from cvfm.models.tiny_blip import build_tiny_blip, build_tokenizer
    from cvfm.registry.presets import SMALL_PREPROCESS

    blip = build_tiny_blip(BlipForConditionalGeneration)
    with torch.no_grad():  # a stronger cross-attention: at random init the image barely shapes the captions
        for name, p in blip.named_parameters():
            if "crossattention" in name and ("value.weight" in name or "output.dense.weight" in name):
                p.mul_(8)
    folder = tmp_path_factory.mktemp("blip") / "captioner"
    Captioner(blip, build_tokenizer(), "t", SMALL_PREPROCESS).save(folder)
    return str(folder)


@pytest.fixture
def photos(tmp_path) -> Path:
    """7 noise images (24 px) and one corrupt file, `bad.png`, sorted 5th."""
    root = tmp_path / "photos"
    for i in range(7):
        write_image(root / f"{i if i < 4 else i + 1}.png", None, size=24, seed=i)
    (root / "4bad.png").write_bytes(b"not an image")
    return root


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_output_schema_and_summary(model, photos, tmp_path, capsys):
    out = tmp_path / "caps.jsonl"
    summary = caption(model, str(photos), str(out), batch_size=3, **FAST)
    rows = _lines(out)
    assert [r["id"] for r in rows] == ["0.png", "1.png", "2.png", "3.png", "5.png", "6.png", "7.png"]
    for r in rows:
        assert set(r) == {"id", "image", "caption"}
        assert Path(r["image"]) == photos / r["id"] and isinstance(r["caption"], str) and r["caption"]
    assert len({r["caption"] for r in rows}) > 1  # the captions depend on the image
    assert summary["images"] == 8 and summary["captioned"] == 7 and summary["already_done"] == 0
    assert [s["where"] for s in summary["skipped"]] == [str(photos / "4bad.png")]
    assert "cannot decode" in summary["skipped"][0]["reason"]
    err = capsys.readouterr().err
    assert "4bad.png" in err and "7 images captioned" in err
    rejects = _lines(Path(f"{out}.rejects"))
    assert [r["id"] for r in rejects] == ["4bad.png"]
    settings = json.loads(Path(f"{out}.json").read_text())
    assert settings["num_beams"] == 3 and settings["top_p"] is None and settings["rows"] == 8


def test_several_sampled_captions(model, photos, tmp_path):
    out = tmp_path / "caps.jsonl"
    caption(model, str(photos), str(out), batch_size=4, num_captions=3, top_p=0.9, **FAST)
    for r in _lines(out):
        assert set(r) == {"id", "image", "captions"}
        assert len(r["captions"]) == 3 and len(set(r["captions"])) == 3


def test_batched_equals_one_by_one(model, photos, tmp_path):
    caption(model, str(photos), str(tmp_path / "a.jsonl"), batch_size=5, num_beams=3, **FAST)
    # and decoding in 2 worker processes changes nothing
    caption(
        model, str(photos), str(tmp_path / "b.jsonl"), batch_size=1, num_beams=3, **{**FAST, "num_workers": 2}
    )
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_sampling_is_deterministic_given_the_seed(model, photos, tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        caption(
            model, str(photos), str(tmp_path / f"{name}.jsonl"), batch_size=3, seed=seed, **SAMPLE, **FAST
        )
        runs[name] = (tmp_path / f"{name}.jsonl").read_text()
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


@pytest.mark.parametrize("sampling", [False, True])
def test_an_interrupted_run_resumes_to_the_same_file(model, photos, tmp_path, sampling):
    settings = {**FAST, **(SAMPLE if sampling else {}), "batch_size": 2, "seed": 5}
    whole = tmp_path / "whole.jsonl"
    caption(model, str(photos), str(whole), **settings)

    def stop_after_batch_1(k: int) -> None:
        if k == 1:
            raise KeyboardInterrupt

    part = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        caption(model, str(photos), str(part), on_batch=stop_after_batch_1, **settings)
    assert len(_lines(part)) == 4
    summary = caption(model, str(photos), str(part), **settings)
    assert summary["already_done"] == 4 and summary["captioned"] == 3
    assert part.read_text() == whole.read_text()
    assert Path(f"{part}.rejects").read_text() == Path(f"{whole}.rejects").read_text()
    # a rerun of a finished file computes nothing and still reports the unreadable image
    summary = caption(model, str(photos), str(part), **settings)
    assert summary["captioned"] == 0 and summary["already_done"] == 7 and len(summary["skipped"]) == 1
    assert part.read_text() == whole.read_text()


def test_a_truncated_last_line_is_recomputed(model, photos, tmp_path):
    settings = {**FAST, **SAMPLE, "batch_size": 3}
    whole = tmp_path / "whole.jsonl"
    caption(model, str(photos), str(whole), **settings)
    killed = tmp_path / "killed.jsonl"
    text = whole.read_text()
    killed.write_text(text[: text.index("\n", text.index("\n") + 1) + 15])  # 2 lines and a piece of a 3rd
    Path(f"{killed}.json").write_text(Path(f"{whole}.json").read_text())
    summary = caption(model, str(photos), str(killed), **settings)
    assert summary["already_done"] == 2 and summary["captioned"] == 5
    assert killed.read_text() == text


def test_other_settings_are_refused_unless_overwrite(model, photos, tmp_path):
    out = tmp_path / "caps.jsonl"
    caption(model, str(photos), str(out), batch_size=4, **FAST)
    before = out.read_text()
    with pytest.raises(UsageError, match="other settings .*num_beams: 3 there, 2 now"):
        caption(model, str(photos), str(out), batch_size=4, num_beams=2, **FAST)
    assert out.read_text() == before
    caption(model, str(photos), str(out), batch_size=4, num_beams=2, overwrite=True, **FAST)
    assert json.loads(Path(f"{out}.json").read_text())["num_beams"] == 2
    assert len(_lines(out)) == 7
    # beam search: the batch size is no setting of the captions, a rerun with another one resumes
    assert caption(model, str(photos), str(out), batch_size=2, num_beams=2, **FAST)["already_done"] == 7


def test_a_foreign_file_is_never_overwritten_silently(model, photos, tmp_path):
    out = tmp_path / "notes.jsonl"
    out.write_text('{"mine": 1}\n')
    with pytest.raises(UsageError, match="not written by cvfm caption"):
        caption(model, str(photos), str(out), **FAST)
    assert out.read_text() == '{"mine": 1}\n'
    caption(model, str(photos), str(out), overwrite=True, **FAST)
    assert len(_lines(out)) == 7


def test_strict_stops_at_an_unreadable_image(model, photos, tmp_path):
    with pytest.raises(DataError, match="4bad.png"):
        caption(model, str(photos), str(tmp_path / "o.jsonl"), strict=True, batch_size=2, **FAST)


def test_a_malformed_manifest_line_is_reported_not_fatal(model, photos, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"id": "a", "image": str(photos / "0.png")})
        + "\n{broken\n"
        + json.dumps({"id": "b", "image": str(photos / "missing.png")})
        + "\n"
        + json.dumps({"id": "c", "image": str(photos / "1.png")})
        + "\n"
    )
    out = tmp_path / "o.jsonl"
    summary = caption(model, str(manifest), str(out), **FAST)
    assert [r["id"] for r in _lines(out)] == ["a", "c"]
    assert {s["where"] for s in summary["skipped"]} == {f"{manifest}:2", str(photos / "missing.png")}


def test_stdin_to_stdout_subprocess(photos):
    paths = "".join(f"{p}\n" for p in sorted(photos.glob("[0-2].png")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "cvfm", "caption", "cvfm/tiny-blip", "--data", "-", "-o", "-"]
    cmd += ["--top-p", "0.9", "--num-captions", "3", "--num-workers", "0", "--max-length", "8"]
    r = subprocess.run(cmd, input=paths, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["image"] for row in rows] == paths.split()
    assert all(set(row) == {"id", "image", "captions"} and len(row["captions"]) == 3 for row in rows)
    assert "3 images captioned" in r.stderr


def test_cli_writes_a_file_and_prints_the_summary(cli, model, photos, tmp_path):
    out = tmp_path / "c.jsonl"
    r = cli("caption", model, "--data", photos, "-o", out, "--num-workers", "0", "--precision", "fp32")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["captioned"] == 7 and summary["output"] == str(out)
    assert len(_lines(out)) == 7
    assert "4bad.png" in r.err


def test_cli_strict_exits_1(cli, model, photos):
    r = cli("caption", model, "--data", photos, "--strict", "--num-workers", "0", "--precision", "fp32")
    assert r.code == 1 and "4bad.png" in r.err


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--top-p", "1.5"], ["--top-p", "1.5"]),
        (["--num-beams", "0"], ["--num-beams", "0"]),
        (["--num-captions", "4"], ["--num-captions 4", "--num-beams 3"]),
        (["--min-length", "40"], ["--min-length", "40"]),
        (["--precision", "fp8"], ["--precision", "fp8"]),
        (["--batch-size", "0"], ["--batch-size", "0"]),
    ],
)
def test_cli_usage_errors(cli, photos, args, needles):
    assert_usage_error(cli("caption", "cvfm/tiny-blip", "--data", photos, *args), *needles)


def test_cli_usage_errors_on_data_and_output(cli, photos, tmp_path):
    assert_usage_error(cli("caption", "cvfm/tiny-blip", "--data", tmp_path / "nope"), "nope")
    assert_usage_error(cli("caption", "cvfm/tiny-blip", "--data", photos, "-o", tmp_path), "is a folder")
    assert_usage_error(
        cli("caption", "cvfm/nothing", "--data", photos, "-o", tmp_path / "x.jsonl"), "cvfm/nothing"
    )


def test_cli_help_has_examples(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich would wrap the long example lines at 80
    r = cli("caption", "--help")
    assert r.code == 0
    assert "cvfm caption hf/Salesforce/blip-image-captioning-base --data photos/ -o captions.jsonl" in r.out
    assert "--top-p 0.9 --num-captions 3" in r.out
