"""`cvfm capfilt`: the keep/drop rules, the output schema, every input line accounted for, streaming,
resume, settings refusal, and batched results equal to a per-pair loop over the same models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clitools import assert_usage_error, one_json_line
from conftest import write_image

from cvfm.capfilt import capfilt, filter_captions, sample_captions
from cvfm.capfilt.rules import Tally, below_reason, histogram_bin
from cvfm.errors import UsageError

# Small and quick: the tiny random-init BLIP on the CPU (even where a GPU is: the per-pair loop below runs
# there), fp32, short captions.
FAST = {"num_captions": 2, "max_length": 10, "min_length": 3, "precision": "fp32", "num_workers": 0}
FAST["device"] = "cpu"
GOOD = 7  # pairs with a readable image in the manifest below


# ------------------------------------------------------------------------------------ the pure rules


def test_threshold_exactly_at_threshold_is_kept_and_order_is_web_then_synthetic():
    parts = filter_captions(
        "a dog on grass", ["a brown dog", "a cat", "a dog running"], 0.5, [0.9, 0.49, 0.5]
    )
    assert parts["captions"] == ["a dog on grass", "a brown dog", "a dog running"]
    assert [s["source"] for s in parts["scores"]] == ["web", "synthetic", "synthetic", "synthetic"]
    assert [s["kept"] for s in parts["scores"]] == [True, True, False, True]
    assert [s["itm"] for s in parts["scores"]] == [0.5, 0.9, 0.49, 0.5]
    dropped = parts["scores"][2]
    assert dropped["reason"] == "itm 0.49 < 0.5"
    assert all("reason" not in s for s in parts["scores"] if s["kept"])


def test_web_caption_below_threshold_is_dropped_with_its_score():
    parts = filter_captions("buy now cheap", ["a red car"], 0.31, [0.8], threshold=0.5)
    assert parts["captions"] == ["a red car"]
    assert parts["scores"][0] == {
        "caption": "buy now cheap",
        "source": "web",
        "itm": 0.31,
        "kept": False,
        "reason": "itm 0.31 < 0.5",
    }


def test_duplicates_of_a_kept_caption_are_dropped_but_not_duplicates_of_a_dropped_one():
    parts = filter_captions(
        "A dog.", ["a  dog", "a cat", "A CAT!", "a dog"], 0.9, [0.95, 0.2, 0.7, 0.9], threshold=0.5
    )
    reasons = [s.get("reason") for s in parts["scores"]]
    # "a cat" scored 0.2 (dropped), so "A CAT!" (0.7) is the first kept cat caption, not a duplicate.
    assert reasons == [None, "duplicate", "itm 0.20 < 0.5", None, "duplicate"]
    assert parts["captions"] == ["A dog.", "A CAT!"]


def test_empty_captions_are_never_kept_and_lengths_must_match():
    parts = filter_captions("a boat", ["", " . "], 0.7, [0.99, 0.99])
    assert [s.get("reason") for s in parts["scores"]] == [None, "empty", "empty"]
    with pytest.raises(ValueError):
        filter_captions("a boat", ["x"], 0.7, [])


def test_reason_never_rounds_a_score_up_to_the_threshold():
    assert below_reason(0.4999, 0.5) == "itm 0.49 < 0.5"
    assert filter_captions("x y", [], 0.49999999, [], threshold=0.5)["scores"][0]["kept"] is False


def test_tally_counts_and_histogram_bins():
    assert [histogram_bin(s) for s in (0.0, 0.0999, 0.1, 0.55, 0.9999, 1.0)] == [0, 0, 1, 5, 9, 9]
    t = Tally()
    t.add_record(filter_captions("a", ["b", "a"], 0.95, [0.05, 1.0]))
    t.add_reject({"line": 3, "kind": "image"})
    d = t.as_dict()
    assert (d["total"], d["pairs"], d["web_kept"], d["synthetic"], d["synthetic_kept"]) == (2, 1, 1, 2, 0)
    assert d["dropped"] == {"web": {}, "synthetic": {"itm": 1, "duplicate": 1}}
    assert (
        d["histogram"]["web"][9] == 1
        and d["histogram"]["synthetic"][0] == d["histogram"]["synthetic"][9] == 1
    )
    assert d["reject_kinds"] == {"image": 1}


# ---------------------------------------------------------------------------------------- the data


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    """A manifest of 11 non-blank lines: 7 good pairs (one without an id, one with a numeric id, two
    sharing an image, one with an extra field), a malformed line, a line without text, a missing and a
    corrupt image; plus a blank line."""
    folder = tmp_path / "data"
    for i in range(6):
        write_image(folder / "img" / f"{i}.png", None, size=16, seed=i)
    (folder / "img" / "corrupt.png").write_bytes(b"not a png at all")
    recs = [{"id": f"p{i}", "image": f"img/{i}.png", "text": f"a photo number {i}"} for i in range(6)]
    recs[5]["id"] = 5  # a number: written back as a number
    lines = [json.dumps(r) for r in recs[:3]]
    lines += ['{"id": "broken", "image": ', ""]  # malformed, then a blank line
    lines += [json.dumps(r) for r in recs[3:]]
    lines += [json.dumps({"id": "notext", "image": "img/0.png"})]
    lines += [json.dumps({"id": "gone", "image": "img/missing.png", "text": "a ghost"})]
    lines += [json.dumps({"id": "bad", "image": "img/corrupt.png", "text": "noise"})]
    lines += [json.dumps({"image": "img/1.png", "text": "the same image again", "url": "http://x"})]
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _input_lines(path: Path) -> dict[int, str]:
    return {n: t for n, t in enumerate(path.read_text().splitlines(), start=1) if t.strip()}


def _same_records(a: list[dict], b: list[dict]) -> None:
    """Equal records; ITM scores equal up to float noise (a batch pads its captions differently)."""
    assert [r["line"] for r in a] == [r["line"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if k != "scores"} == {k: v for k, v in y.items() if k != "scores"}
        for s, t in zip(x["scores"], y["scores"], strict=True):
            assert s["itm"] == pytest.approx(t["itm"], abs=1e-5)
            assert {k: v for k, v in s.items() if k != "itm"} == {k: v for k, v in t.items() if k != "itm"}


@pytest.fixture
def full_run(pairs: Path, tmp_path: Path):
    out = tmp_path / "ref" / "out.jsonl"
    out.parent.mkdir()
    summary = capfilt(str(pairs), str(out), batch_size=3, **FAST)
    return out, summary


# ------------------------------------------------------------------------------- schema and accounting


def test_every_input_line_lands_in_exactly_one_file_and_the_schema_holds(pairs, full_run):
    out, summary = full_run
    records, rejects = _lines(out), _lines(out.with_name("out.rejects.jsonl"))
    inputs = _input_lines(pairs)
    lines = [r["line"] for r in records] + [r["line"] for r in rejects]
    assert sorted(lines) == sorted(inputs) and len(lines) == len(set(lines)) == 11
    assert len(records) == GOOD
    by_id = {r.get("id"): r for r in rejects}
    assert by_id["gone"]["kind"] == "image" and "file not found" in by_id["gone"]["error"]
    assert by_id["bad"]["kind"] == "image" and "cannot decode" in by_id["bad"]["error"]
    assert by_id["notext"]["kind"] == "malformed" and '"text"' in by_id["notext"]["error"]
    malformed = by_id[None]
    assert malformed["kind"] == "malformed" and "JSON" in malformed["error"]
    for r in rejects:  # the raw line, verbatim
        assert r["input"] == inputs[r["line"]]
    for rec in records:
        src = json.loads(inputs[rec["line"]])
        assert rec["id"] == src.get("id", f"pairs.jsonl:{rec['line']}")
        assert {k: v for k, v in rec.items() if k not in ("id", "line", "captions", "scores")} == {
            k: v for k, v in src.items() if k != "id"
        }
        scores = rec["scores"]
        assert [s["source"] for s in scores] == ["web", "synthetic", "synthetic"]
        assert scores[0]["caption"] == src["text"]
        for s in scores:
            assert set(s) == {"caption", "source", "itm", "kept"} | ({"reason"} if not s["kept"] else set())
            assert 0.0 <= s["itm"] <= 1.0
            if s["itm"] < 0.5:
                assert not s["kept"] and s["reason"].startswith("itm ")
        assert rec["captions"] == [s["caption"] for s in scores if s["kept"]]
    assert summary["total"] == 11 and summary["pairs"] == GOOD and summary["rejects"] == 4
    assert summary["reject_kinds"] == {"malformed": 2, "image": 2}
    assert sum(summary["histogram"]["web"]) == GOOD and sum(summary["histogram"]["synthetic"]) == 2 * GOOD
    assert summary["web_kept"] == sum(r["scores"][0]["kept"] for r in records)
    assert summary["synthetic_kept"] == sum(len(r["captions"]) for r in records) - summary["web_kept"]


def test_threshold_decides_on_real_scores(pairs, tmp_path):
    """With the threshold at a real score: that caption is kept, the ones below it are dropped."""
    out = tmp_path / "a.jsonl"
    capfilt(str(pairs), str(out), batch_size=8, **FAST, threshold=0.0)
    scores = sorted(s["itm"] for r in _lines(out) for s in r["scores"])
    middle = scores[len(scores) // 2]
    out2 = tmp_path / "b.jsonl"
    capfilt(str(pairs), str(out2), batch_size=8, **FAST, threshold=middle)
    for s in (s for r in _lines(out2) for s in r["scores"]):
        assert s["kept"] == (s["itm"] >= middle and s.get("reason") not in ("duplicate", "empty"))
    assert any(s["itm"] == middle and s["kept"] for r in _lines(out2) for s in r["scores"])


# ------------------------------------------------------------------ batched equals a per-pair loop


def test_batched_results_equal_a_per_pair_loop_over_the_same_models(pairs, full_run):
    """The benchmark's baseline: each pair alone through the public model faces (same seed policy)."""
    from cvfm.data.decode import decode_image
    from cvfm.registry import create_captioner, create_matcher

    out, _ = full_run
    torch.manual_seed(0)
    captioner = create_captioner("cvfm/tiny-blip").eval()
    torch.manual_seed(0)
    matcher = create_matcher("cvfm/tiny-blip").eval()
    loop = []
    for rec in _lines(out):
        src = json.loads(_input_lines(pairs)[rec["line"]])
        pixels = captioner.preprocess.transform()(decode_image(pairs.parent / src["image"]))[None]
        synthetic = sample_captions(
            captioner, pixels, [rec["id"]], seed=0, num_captions=2, top_p=0.9, max_length=10, min_length=3
        )[0]
        probs = matcher.itm_probs(pixels.repeat(3, 1, 1, 1), [src["text"], *synthetic]).tolist()
        loop.append({**rec, **filter_captions(src["text"], synthetic, probs[0], probs[1:], 0.5)})
    _same_records(_lines(out), loop)


def test_captions_do_not_depend_on_the_batch_or_the_workers_but_on_the_seed(pairs, full_run, tmp_path):
    out, _ = full_run
    other = tmp_path / "other.jsonl"
    capfilt(str(pairs), str(other), batch_size=5, **{**FAST, "num_workers": 1})
    _same_records(_lines(out), _lines(other))
    synthetic = [s["caption"] for r in _lines(out) for s in r["scores"][1:]]
    assert len(set(synthetic)) == len(synthetic)  # sampled per pair and per caption, not one draw reused
    reseeded = tmp_path / "seed1.jsonl"
    capfilt(str(pairs), str(reseeded), batch_size=5, **FAST, seed=1)
    assert [s["caption"] for r in _lines(reseeded) for s in r["scores"][1:]] != synthetic


# ------------------------------------------------------------------------------------------ resume


def test_resume_after_an_interruption_equals_an_uninterrupted_run(pairs, full_run, tmp_path):
    ref, ref_summary = full_run
    out = tmp_path / "out.jsonl"

    def stop(i: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capfilt(str(pairs), str(out), batch_size=3, on_batch=stop, **FAST)
    first = _lines(out) + _lines(tmp_path / "out.rejects.jsonl")
    assert 0 < len(first) < 11  # one batch of 3 lines written
    summary = capfilt(str(pairs), str(out), batch_size=4, **FAST)  # another batch size resumes too
    assert summary["already_done"] == len(first) and summary["written"] == 11 - len(first)
    _same_records(sorted(_lines(out), key=lambda r: r["line"]), _lines(ref))
    rejects = sorted(_lines(tmp_path / "out.rejects.jsonl"), key=lambda r: r["line"])
    assert rejects == _lines(ref.with_name("out.rejects.jsonl"))
    for key in ("total", "pairs", "rejects", "web_kept", "synthetic_kept", "dropped", "histogram"):
        assert summary[key] == ref_summary[key]
    again = capfilt(str(pairs), str(out), batch_size=4, **FAST)  # all done: nothing written twice
    assert again["written"] == 0 and len(_lines(out)) == GOOD


def test_a_batch_cut_by_a_kill_is_recomputed_whole(pairs, full_run, tmp_path, capsys):
    """Killed while writing the records of its 2nd batch (input lines 4, 6, 7: the malformed line, p3,
    p4): p3 is written, p4 cut short, the batch's reject not yet written. The rerun cuts off the piece,
    computes that batch whole again (the same batch, the same padding) and writes only what is missing:
    both files end equal to an uninterrupted run's, byte for byte."""
    out, _ = full_run
    rejects = out.with_name("out.rejects.jsonl")
    text, rejected = out.read_text(), rejects.read_text()
    lines = text.splitlines(keepends=True)
    assert [json.loads(x)["id"] for x in lines[3:5]] == ["p3", "p4"]
    out.write_text("".join(lines[:4]) + lines[4][:40])
    rejects.write_text("")
    summary = capfilt(str(pairs), str(out), batch_size=3, **FAST)
    assert summary["already_done"] == 4 and summary["written"] == 7
    assert "cut short" in capsys.readouterr().err
    assert out.read_text() == text and rejects.read_text() == rejected


# ---------------------------------------------------------------------------------- refusals


def test_other_settings_foreign_files_and_a_changed_input_are_refused(pairs, full_run, tmp_path):
    out, _ = full_run
    with pytest.raises(UsageError, match="other settings.*threshold"):
        capfilt(str(pairs), str(out), batch_size=3, **FAST, threshold=0.7)
    summary = capfilt(str(pairs), str(out), batch_size=3, **FAST, threshold=0.7, overwrite=True)
    assert summary["written"] == 11 and summary["already_done"] == 0
    assert len(_lines(out)) == GOOD  # replaced, not appended
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"mine": 1}\n')
    with pytest.raises(UsageError, match="no capfilt settings"):
        capfilt(str(pairs), str(foreign), **FAST)
    assert foreign.read_text() == '{"mine": 1}\n'
    changed = pairs.with_name("changed.jsonl")
    changed.write_text(pairs.read_text().replace('"p1"', '"q1"'))
    with pytest.raises(UsageError, match="input line 2 differs"):
        capfilt(str(changed), str(out), batch_size=3, **FAST, threshold=0.7)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_streams_stdin_to_stdout_with_rejects_on_stderr(pairs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    args = ["--in", "-", "--out", "-", "-n", "1", "--max-length", "10", "--min-length", "3"]
    r = subprocess.run(
        [sys.executable, "-m", "cvfm", "capfilt", *args, "--precision", "fp32", "--num-workers", "1"],
        input=pairs.read_bytes(),
        capture_output=True,
        cwd=pairs.parent,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr.decode()
    records = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert len(records) == GOOD and all({"id", "line", "captions", "scores"} <= set(x) for x in records)
    assert records[0]["id"] == "p0" and records[-1]["id"] == "<stdin>:12"
    err = r.stderr.decode().splitlines()
    rejects = [json.loads(x) for x in err if x.startswith("{")]
    assert sorted(x["line"] for x in rejects + records) == sorted(_input_lines(pairs))
    assert "ITM score" in r.stderr.decode()


def test_cli_file_output_prints_the_summary_and_refuses_bad_options(cli, pairs, tmp_path):
    out = tmp_path / "cli.jsonl"
    common = ["--in", pairs, "--out", out, "-n", "1", "--max-length", "10", "--precision", "fp32"]
    r = cli("capfilt", *common, "--num-workers", "0", "--rejects", tmp_path / "bad.jsonl")
    summary = one_json_line(r)
    assert summary["pairs"] == GOOD and summary["rejects"] == 4
    assert summary["rejects_file"] == str(tmp_path / "bad.jsonl") and len(_lines(tmp_path / "bad.jsonl")) == 4
    assert "kept: web" in r.err
    assert_usage_error(cli("capfilt", *common, "--threshold", "1.5"), "--threshold")
    assert_usage_error(cli("capfilt", "--in", tmp_path / "nope.jsonl", "--out", "-"), "is not a file")
    help_text = cli("capfilt", "--help").out
    assert "Examples" in help_text and "--in -" in help_text


def test_cli_data_and_output_name_the_same_files_as_in_and_out(cli, pairs, tmp_path):
    settings = ["-n", "1", "--max-length", "10", "--precision", "fp32", "--num-workers", "0"]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert cli("capfilt", "--in", pairs, "--out", a, *settings).code == 0
    assert cli("capfilt", "--data", pairs, "--output", b, *settings).code == 0
    assert len(_lines(b)) == GOOD and a.read_bytes() == b.read_bytes()


# ------------------------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_engine_resumes_a_cut_output_to_the_local_runs_bytes(pairs, tmp_path, monkeypatch):
    """`--engine ray` resuming an output cut by a kill (batch 0 whole, batch 1 cut mid-line, no rejects
    yet): it skips batch 0, computes batches 1-3 on Ray (the same batches as the local engine, so the
    same padding and scores) and ends with the local run's files and summary, byte for byte."""
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    opts = {k: v for k, v in FAST.items() if k != "device"}  # both engines on the default device
    files = ("out.jsonl", "out.rejects.jsonl", "out.capfilt.json")
    runs = {}
    for engine in ("local", "ray"):  # the same relative output names: the same settings sidecar
        (tmp_path / engine).mkdir()
        monkeypatch.chdir(tmp_path / engine)
        if engine == "ray":  # what the local run had written when killed
            lines = runs["local"][1][0].splitlines(keepends=True)
            Path("out.jsonl").write_bytes(b"".join(lines[:4]) + lines[4][:40])  # p0-p2, p3, p4 cut short
            Path(files[2]).write_bytes(runs["local"][1][2])
        batches = []
        summary = capfilt(
            str(pairs), "out.jsonl", batch_size=3, engine=engine, on_batch=batches.append, **opts
        )
        runs[engine] = (summary, [Path(f).read_bytes() for f in files], batches)
    (local, want, _), (ray, got, batches) = runs["local"], runs["ray"]
    assert batches == [0, 1, 2]  # batch 0 was done: Ray computed the other three
    assert ray["already_done"] == 4 and ray["written"] == 7
    assert {**ray, "already_done": 0, "written": 11} == local
    assert got == want and len(want[0].splitlines()) == GOOD


def test_ray_refuses_to_follow_stdin_to_stdout_before_reading_it(cli, pairs, tmp_path):
    """Ray works on a whole input: --in - --out - (records flowing while stdin is written) is the local
    engine's; the refusal names the way out, and the engine options are checked before any work."""
    r = cli("capfilt", "--in", "-", "--out", "-", "--engine", "ray")
    assert_usage_error(r, "--engine ray", "--in - --out -", "local engine", "file")
    out = tmp_path / "out.jsonl"
    assert_usage_error(cli("capfilt", "--in", pairs, "--out", out, "--actors", "2"), "need --engine ray")
    assert not out.exists()
    assert "'cvfm[ray]'" in cli("capfilt", "--help").out  # the extra's name, not eaten as markup
