"""The `cvfm` command end to end: exit codes, stdout (data only) vs stderr (logs and errors), outputs on disk.

Most checks call `cvfm.cli.app.main()` in-process with `sys.argv` set (stdout and stderr captured
separately, real exit codes through SystemExit, and an escaping exception fails the test the way a
traceback would). A few run `python -m cvfm` in a subprocess for full fidelity.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import Result, assert_usage_error, one_json_line
from PIL import Image
from safetensors.torch import load_file

import cvfm
from cvfm.eval.knn import knn_evaluate
from cvfm.eval.linear import linear_evaluate
from cvfm.registry import create_encoder

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ("zero", "one", "two", "three")  # digits 0-3; a folder source numbers its classes in sorted order
LABELS = {name: i for i, name in enumerate(sorted(CLASSES))}
EXCLUDE_HELP = 'A file of ids left out of training: one per line, or a .jsonl file with an "id" per line'


def _subprocess(*args, timeout=120) -> Result:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "cvfm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    return Result(p.returncode, p.stdout, p.stderr)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _features(model: str, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The model (seeded as the commands seed it) called directly on a folder split: (features, labels)."""
    torch.manual_seed(0)
    encoder = create_encoder(model).eval()
    paths = sorted((folder / split).glob("*/*.png"))
    x = torch.stack([encoder.preprocess.transform()(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        feats = encoder(x).numpy()
    return feats, np.array([LABELS[p.parent.name] for p in paths])


def _assert_every_weight_moved(run: Path) -> None:
    """The optimizer ran: every weight of the run's backbone differs from the random init (seed 0)."""
    torch.manual_seed(0)
    initial = dict(create_encoder("cvfm/tiny-resnet").model.named_parameters())
    saved = load_file(run / "backbone" / "model.safetensors")
    assert [k for k, w in initial.items() if not torch.equal(saved[k], w)] == list(initial)


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under `folder`."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------- basics


def test_version(cli):
    r = cli("--version")
    assert r.code == 0
    assert r.out.strip() == f"cvfm {cvfm.__version__}"


def test_root_help_lists_subcommands(cli):
    r = cli("--help")
    assert r.code == 0
    for name in ("models", "pretrain", "embed", "evaluate"):
        assert name in r.out


@pytest.mark.parametrize(
    "command",
    [["models"], ["pretrain"], ["embed"], ["evaluate", "knn"], ["evaluate", "linear"]],
    ids=lambda c: " ".join(c),
)
def test_subcommand_help_has_examples(cli, command):
    r = cli(*command, "--help")
    assert r.code == 0, r.err
    assert "Examples" in r.out
    assert "cvfm " + command[0] in r.out  # the examples are runnable command lines


def _help_examples():
    """(command path, argument list) of every `cvfm ...` line under "Examples:" of every command's help."""
    import shlex

    import typer

    from cvfm.cli.app import app

    def walk(command, path):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, (*path, name))

    for path, command in walk(typer.main.get_command(app), ()):
        examples = (command.help or "").partition("Examples:")[2].replace("\\\n", " ")
        for part in (p for line in examples.splitlines() for p in line.split("|")):
            words = shlex.split(part)
            if "cvfm" in words:  # also `accelerate launch -m cvfm ...` and the cvfm stage of a pipe
                yield path, words[words.index("cvfm") + 1 :]


def test_every_help_example_parses():
    """The examples in --help name options that exist, with values of the right types."""
    import typer

    from cvfm.cli.app import app

    checked, bad = 0, []
    for path, args in _help_examples():
        command, rest = typer.main.get_command(app), list(args)
        while rest and rest[0] in getattr(command, "commands", {}):
            command = command.commands[rest.pop(0)]
        try:
            command.make_context("cvfm", rest)
        except Exception as e:  # typer's click: a usage error (unknown option, bad value, missing argument)
            bad.append((" ".join(path), " ".join(args), str(e)))
        checked += 1
    assert checked >= 40 and not bad, bad


def test_help_through_a_pipe_keeps_its_lines():
    """Piped (a CI log, `| less`), help is not folded at 80 columns."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    command = [sys.executable, "-m", "cvfm", "pretrain", "--help"]
    piped = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    assert piped.returncode == 0, piped.stderr
    lines = piped.stdout.splitlines()
    assert any(EXCLUDE_HELP in line for line in lines)
    docstring = "Ctrl-C or SIGTERM writes a checkpoint first. --resume continues from the last whole"
    assert any(docstring in line for line in lines)


def test_help_obeys_columns(cli, monkeypatch):
    from typer import rich_utils

    monkeypatch.setattr(rich_utils, "MAX_WIDTH", None)  # as a fresh process has it
    monkeypatch.setenv("COLUMNS", "80")
    r = cli("pretrain", "--help")
    assert r.code == 0 and max(len(line) for line in r.out.splitlines()) == 80
    assert not any(EXCLUDE_HELP in line for line in r.out.splitlines())


def test_models_json_lines(cli):
    r = cli("models", "--json")
    assert r.code == 0, r.err
    rows = [json.loads(line) for line in r.lines]
    ids = {row["id"] for row in rows}
    assert {"cvfm/tiny-resnet", "cvfm/pixels"} <= ids
    assert all({"id", "source", "input_size", "description"} <= set(row) for row in rows)
    filtered = [json.loads(line) for line in cli("models", "cvfm/*-resnet", "--json").lines]
    assert {row["id"] for row in filtered} == {"cvfm/tiny-resnet", "cvfm/small-resnet"}


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_knn_digits_prints_exactly_one_json_line_subprocess():
    r = _subprocess(
        "evaluate",
        "knn",
        "cvfm/pixels",
        "--data",
        "builtin:digits",
        "--num-workers",
        "0",
        "--k",
        "5",
        "--k",
        "20",
    )
    record = one_json_line(r)
    assert "Traceback" not in r.err
    assert record["task"] == "knn" and record["model"] == "cvfm/pixels"
    assert {"knn_top1@5", "knn_top1@20"} <= set(record["metrics"])
    assert record["metrics"]["knn_top1@5"] > 0.9
    assert record["metrics"]["knn_top1@20"] > 0.9


def test_evaluate_knn_in_process_and_output_file_appends(cli, digit_folder, tmp_path):
    args = ("evaluate", "knn", "cvfm/pixels", "--data", digit_folder, "--num-workers", "0", "--k", "3")
    record = one_json_line(cli(*args))
    assert set(record["metrics"]) == {"knn_top1@3"}  # 4 classes: no top-5
    assert record["data"]["train"] == 128 and record["data"]["test"] == 32
    assert record["metrics"]["knn_top1@3"] > 0.7

    out = tmp_path / "results.jsonl"
    out.write_text('{"earlier": true}\n')
    for _ in range(2):
        r = cli(*args, "--output", out)
        assert r.code == 0, r.err
        assert r.out == ""
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0]) == {"earlier": True}
    assert json.loads(lines[1])["metrics"] == record["metrics"]
    assert json.loads(lines[2])["metrics"] == record["metrics"]


def test_evaluate_linear_on_folder(cli, digit_folder):
    # tiny-resnet (random init, 128 dims) keeps the 9-point sweep quick.
    record = one_json_line(
        cli("evaluate", "linear", "cvfm/tiny-resnet", "--data", digit_folder, "--num-workers", "0")
    )
    assert record["task"] == "linear" and record["data"]["train"] == 128
    assert set(record["metrics"]) == {"linear_top1", "val_top1", "best_lr", "best_weight_decay"}
    # The probe (tested on hand-made features in test_eval.py) on the model's own features of each split,
    # at the chosen sweep point (one point instead of nine: the same seeded fit and validation split).
    train, test = (_features("cvfm/tiny-resnet", digit_folder, split) for split in ("train", "test"))
    m = record["metrics"]
    expected = linear_evaluate(*train, *test, lrs=(m["best_lr"],), weight_decays=(m["best_weight_decay"],))
    assert m == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------------------------- usage errors


def test_unknown_model_is_a_one_line_usage_error_subprocess():
    r = _subprocess("evaluate", "knn", "cvfm/nope", "--data", "builtin:digits", "--num-workers", "0")
    assert_usage_error(r, "cvfm/nope")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["evaluate", "knn", "cvfm/tiny-resnett", "--data", "builtin:digits"], "cvfm/tiny-resnett"),
        (["evaluate", "knn", "not-a-model-or-folder", "--data", "builtin:digits"], "not-a-model-or-folder"),
        (["evaluate", "linear", "cvfm/pixels", "--data", "/no/such/images"], "/no/such/images"),
        (["evaluate", "knn", "cvfm/pixels", "--data", "builtin:nope"], "nope"),
        (["evaluate", "knn", "cvfm/pixels", "--data", "builtin:digits", "--k", "0"], "--k"),
        (["evaluate", "knn", "cvfm/pixels", "--data", "builtin:digits", "--train-split", "val"], "val"),
        (["embed", "cvfm/nope", "--data", "builtin:digits", "-o", "-"], "cvfm/nope"),
        (["embed", "cvfm/pixels", "--data", "builtin:digits", "-o", "pyproject.toml"], "pyproject.toml"),
    ],
    ids=[
        "typo-preset",
        "unknown-model",
        "missing-path",
        "unknown-builtin",
        "k-zero",
        "bad-split",
        "embed-model",
        "embed-to-a-file",
    ],
)
def test_usage_errors_exit_2_with_one_line(cli, args, needle, monkeypatch):
    monkeypatch.chdir(ROOT)
    before = (ROOT / "pyproject.toml").read_bytes()
    assert_usage_error(cli(*args, "--num-workers", "0"), needle)
    assert (ROOT / "pyproject.toml").read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--opt", "local_crops"], "local_crops"),  # no '='
        (["--opt", "=3"], "=3"),
        (["--method", "simclr", "--opt", "nope=1"], "nope"),
        (["--method", "dino", "--opt", "local_crops=many"], "local_crops"),
        (["--method", "dino", "--opt", "global_scale=0.4"], "global_scale"),
        (["--method", "mocov9"], "mocov9"),
        (["--precision", "fp8"], "fp8"),
    ],
    ids=[
        "opt-no-equals",
        "opt-no-key",
        "unknown-option",
        "bad-option-value",
        "bad-tuple",
        "unknown-method",
        "bad-precision",
    ],
)
def test_pretrain_usage_errors(cli, tmp_path, extra, needle):
    out = tmp_path / "run"
    r = cli("pretrain", "--data", "builtin:digits", "-o", out, "--epochs", "1", "--num-workers", "0", *extra)
    assert_usage_error(r, needle)
    # Nothing was trained: no run.json, no checkpoints.
    assert not (out / "run.json").exists()
    assert not (out / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- pretrain


def _check_run_folder(run: Path, method: str) -> None:
    info = json.loads((run / "run.json").read_text())
    for key in ("config", "method_config", "resolved", "versions", "seed", "status"):
        assert key in info, key
    assert info["status"] == "finished"
    assert info["config"]["method"] == method
    assert info["seed"] == 0
    assert info["resolved"]["steps_per_epoch"] == 2 and info["resolved"]["total_steps"] == 2
    assert info["versions"]["cvfm"] == cvfm.__version__
    assert info["step"] == 2

    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all("step" in r for r in records)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))

    assert (run / "curves.png").read_bytes()[:8] == PNG_MAGIC
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert checkpoints and all((c / "model.safetensors").is_file() for c in checkpoints)
    assert (run / "backbone" / "model.safetensors").is_file()
    config = json.loads((run / "backbone" / "config.json").read_text())
    assert config["architecture"] == "resnet18"


@pytest.mark.parametrize(
    ("method", "opts"),
    [
        ("simclr", []),
        ("byol", ["--opt", "proj_hidden=256"]),
        ("dino", ["--opt", "local_crops=2", "--opt", "teacher_temp=0.05"]),
    ],
)
def test_pretrain_end_to_end(cli, digit_folder, tmp_path, method, opts):
    run = tmp_path / f"run-{method}"
    args = (
        "pretrain",
        "--data",
        digit_folder,
        "--split",
        "train",
        "--method",
        method,
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--num-workers",
        "0",
        "-o",
        run,
        *opts,
    )
    summary = one_json_line(cli(*args))
    assert Path(summary["run"]) == run
    assert Path(summary["backbone"]) == run / "backbone"
    _check_run_folder(run, method)
    if method == "dino":
        info = json.loads((run / "run.json").read_text())
        assert info["method_config"]["local_crops"] == 2
        assert info["method_config"]["teacher_temp"] == pytest.approx(0.05)

    # A second run into the same folder is refused and changes nothing.
    before = _tree(run)
    assert_usage_error(cli(*args), str(run), "--overwrite")
    assert _tree(run) == before

    _assert_every_weight_moved(run)

    # The run folder is a registry model: the k-NN of its backbone's features, computed here.
    train, test = (_features(str(run), digit_folder, split) for split in ("train", "test"))
    record = one_json_line(
        cli("evaluate", "knn", run, "--data", digit_folder, "--num-workers", "0", "--k", "5")
    )
    assert record["model"] == str(run)
    assert record["metrics"] == pytest.approx(knn_evaluate(*train, *test, ks=(5,)), abs=1e-9)
    assert record["data"] == {"train": 128, "test": 32, "skipped": []}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "opts"), [("simclr", []), ("byol", []), ("dino", ["--opt", "local_crops=2"])]
)
def test_pretrain_on_builtin_digits_then_evaluate(cli, tmp_path, method, opts):
    run = tmp_path / "run"
    summary = one_json_line(
        cli(
            "pretrain",
            "--data",
            "builtin:digits",
            "--method",
            method,
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--num-workers",
            "0",
            "-o",
            run,
            *opts,
        )
    )
    assert Path(summary["run"]) == run
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["resolved"]["steps_per_epoch"] == 1797 // 64
    record = one_json_line(cli("evaluate", "knn", run, "--data", "builtin:digits", "--num-workers", "0"))
    # The random init scores 0.84; one epoch: SimCLR 0.928, BYOL 0.930, DINO 0.900. Without optimizer steps
    # (BatchNorm statistics adapted only; measured with the earlier three-channel views): 0.875, 0.872, 0.866.
    assert record["metrics"]["knn_top1@20"] > 0.88
    _assert_every_weight_moved(run)


# ---------------------------------------------------------------------------------------------- bad images


@pytest.fixture
def folder_with_corrupt_image(tmp_path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for name, base in (("dark", 30), ("light", 220)):
        for i in range(6):
            _write_png(
                root / name / f"{i}.png", np.clip(base + rng.normal(0, 10, (8, 8)), 0, 255).astype(np.uint8)
            )
    bad = root / "dark" / "broken.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    return root, bad


def test_corrupt_image_is_skipped_and_reported(cli, folder_with_corrupt_image):
    root, bad = folder_with_corrupt_image
    r = cli(
        "evaluate",
        "knn",
        "cvfm/pixels",
        "--data",
        root,
        "--test-data",
        root,
        "--train-split",
        "",
        "--test-split",
        "",
        "--num-workers",
        "0",
        "--k",
        "3",
    )
    record = one_json_line(r)
    assert record["data"]["train"] == 12 and record["data"]["test"] == 12
    skipped = record["data"]["skipped"]
    assert len(skipped) == 1
    assert skipped[0]["where"] == str(bad)
    assert skipped[0]["reason"]
    assert record["metrics"]["knn_top1@3"] == pytest.approx(1.0)


def test_corrupt_image_with_strict_exits_1_naming_the_file(cli, folder_with_corrupt_image):
    root, bad = folder_with_corrupt_image
    r = cli(
        "evaluate",
        "knn",
        "cvfm/pixels",
        "--data",
        root,
        "--test-data",
        root,
        "--train-split",
        "",
        "--test-split",
        "",
        "--num-workers",
        "0",
        "--strict",
    )
    assert r.code == 1, r.err
    assert r.out == ""
    assert r.err.startswith("cvfm: error: ")
    assert str(bad) in r.err
    assert "Traceback" not in r.err


def test_empty_split_means_no_split(cli, folder_with_corrupt_image):
    root, _ = folder_with_corrupt_image
    # Without '' the default splits ('train'/'test' sub-folders) are looked up and do not exist here.
    assert_usage_error(cli("evaluate", "knn", "cvfm/pixels", "--data", root, "--num-workers", "0"), "train")


def test_empty_split_means_no_split_for_a_manifest(cli, folder_with_corrupt_image, tmp_path):
    # A manifest without "split" fields: '' must select every line, not the lines whose split is ''.
    root, bad = folder_with_corrupt_image
    manifest = tmp_path / "all.jsonl"
    lines = [json.dumps({"image": str(p), "label": p.parent.name}) for p in sorted(root.rglob("*.png"))]
    manifest.write_text("\n".join(lines) + "\n")
    record = one_json_line(
        cli(
            "evaluate",
            "knn",
            "cvfm/pixels",
            "--data",
            manifest,
            "--test-data",
            manifest,
            "--train-split",
            "",
            "--test-split",
            "",
            "--num-workers",
            "0",
            "--k",
            "3",
        )
    )
    assert record["data"]["train"] == 12
    assert [s["where"] for s in record["data"]["skipped"]] == [str(bad)]


# ------------------------------------------------------------------------------- remaining documented flags


def test_pretrain_runtime_flags_and_resume_from_the_cli(cli, digit_folder, tmp_path):
    run = tmp_path / "run"
    common = ("--num-workers", "0", "-o", run)
    r = cli(
        "pretrain",
        "--data",
        digit_folder,
        "--split",
        "train",
        "--method",
        "simclr",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--grad-accum",
        "2",
        "--checkpoint-every",
        "3",
        "--log",
        "jsonl",
        "--log",
        "tensorboard",
        "--monitor",
        digit_folder,
        "--seed",
        "3",
        *common,
    )
    assert r.code == 0, r.err
    info = json.loads((run / "run.json").read_text())
    assert info["resolved"]["steps_per_epoch"] == 4 and info["seed"] == 3
    assert info["config"]["grad_accum"] == 2 and info["config"]["log"] == ["jsonl", "tensorboard"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]
    assert list((run / "cvfm").glob("events.out.tfevents.*"))
    assert any("monitor/knn_top1@20" in line for line in (run / "metrics.jsonl").read_text().splitlines())
    # --resume needs no --data: the configuration comes from run.json; a finished run stays finished.
    r = cli("pretrain", "--resume", *common)
    assert r.code == 0, r.err
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    # Without --resume, neither --data nor the run folder may be missing.
    r = cli("pretrain", "-o", tmp_path / "other")
    assert r.code == 2 and "--data is required" in r.err


# Each command that loads a model, the library function it hands the choice to, and its default.
WEIGHT_CHOICE = [
    (("pretrain", "--data", "d", "-o", "r"), "cvfm.pretrain.pretrain", False),
    (("finetune", "--data", "d", "-o", "r"), "cvfm.finetune.finetune", False),
    (("embed", "m", "--data", "d", "-o", "e"), "cvfm.embed.embed", True),
    (("evaluate", "knn", "m", "--data", "d"), "cvfm.eval.run.evaluate", True),
    (("evaluate", "linear", "m", "--data", "d"), "cvfm.eval.run.evaluate", True),
    (("evaluate", "zeroshot", "m", "--data", "d"), "cvfm.eval.vl_run.evaluate_zeroshot", True),
    (("evaluate", "retrieval", "m", "--data", "d"), "cvfm.eval.vl_run.evaluate_retrieval", True),
    (("caption", "m", "--data", "d"), "cvfm.caption.caption", True),
    (("capfilt", "--in", "p.jsonl", "--out", "o.jsonl"), "cvfm.capfilt.capfilt", True),
]


@pytest.mark.parametrize(
    "args, function, default",
    WEIGHT_CHOICE,
    ids=[" ".join(args[: 2 if args[0] == "evaluate" else 1]) for args, _, _ in WEIGHT_CHOICE],
)
def test_every_command_takes_pretrained_or_random_init(cli, monkeypatch, args, function, default):
    """The same two words everywhere; each command keeps its default, and the choice reaches the library."""
    seen = []

    def library(*a, **kw):
        seen.append(kw["pretrained"] if "pretrained" in kw else a[0].pretrained)  # a keyword or a config
        raise cvfm.UsageError("stopped by the test")

    monkeypatch.setattr(function, library)
    for flag in ((), ("--pretrained",), ("--random-init",)):
        assert_usage_error(cli(*args, *flag), "stopped by the test")
    assert seen == [default, True, False]


def test_pretrained_flag_needs_cached_weights(cli, digit_folder, tmp_path, empty_hf_cache):
    r = cli(
        "pretrain", "--data", digit_folder, "--model", "timm/resnet18", "--pretrained", "-o", tmp_path / "r"
    )
    assert r.code == 2 and "not in the local Hugging Face cache" in r.err
    assert not (tmp_path / "r").exists()


def _tiny_dinov2(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(1)  # not 0: commands seed 0 before building a model, so --random-init would match
    Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(folder)
    return folder


def test_random_init_and_trust_remote_code_reach_the_loader(cli, digit_folder, tmp_path, monkeypatch):
    import transformers

    model = _tiny_dinov2(tmp_path / "dinov2")
    args = ("embed", model, "--data", digit_folder, "--split", "test", "--num-workers", "0", "-o", "-")
    trained = [json.loads(line)["image_embedding"] for line in cli(*args).lines]
    random = [json.loads(line)["image_embedding"] for line in cli(*args, "--random-init").lines]
    assert len(trained) == len(random) == 32
    assert not np.allclose(trained, random), "--random-init must ignore the saved weights"

    seen = {}
    original = transformers.AutoModel.from_pretrained

    def spy(*a, **kw):
        seen["trust_remote_code"] = kw.get("trust_remote_code")
        return original(*a, **kw)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy)
    assert cli(*args, "--trust-remote-code").code == 0
    assert seen["trust_remote_code"] is True
    assert cli(*args).code == 0
    assert seen["trust_remote_code"] is False


def test_knn_temperature_changes_the_votes(cli, digit_folder):
    base = ("evaluate", "knn", "cvfm/tiny-resnet", "--data", digit_folder, "--num-workers", "0", "--k", "20")
    sharp = one_json_line(cli(*base, "--temperature", "0.01"))["metrics"]
    flat = one_json_line(cli(*base, "--temperature", "100"))["metrics"]
    # With T = 100 every neighbour votes almost equally: a majority vote, which differs from T = 0.01.
    assert sharp != flat


def test_models_lists_timm_architectures(cli):
    rows = [json.loads(line) for line in cli("models", "timm/resnet18*", "--timm", "--json").lines]
    assert {"timm/resnet18", "timm/resnet18d"} <= {r["id"] for r in rows}
    assert all(r["source"] == "timm" for r in rows)


def test_models_table_keeps_each_row_on_one_line_when_piped(cli):
    lines = cli("models").out.splitlines()
    assert any("cvfm/tiny-sam2" in line and "128 px" in line for line in lines)
