"""CLIP: the symmetric InfoNCE loss against a hand computation, the logit-scale clamp, training on image-text
pairs through the shared loop (JSONL and the captioned built-ins), the saved dual encoder, exact resume
and the refusals."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from clitools import one_json_line
from conftest import TOY_COLOURS, write_colour_pairs
from PIL import Image
from safetensors.torch import load_file

from cvfm.data.builtin import TEMPLATES
from cvfm.data.sources import open_source
from cvfm.errors import UsageError
from cvfm.methods import Budget, build_method
from cvfm.methods.clip import MAX_LOGIT_SCALE, clip_loss
from cvfm.pretrain import PretrainConfig, pretrain
from cvfm.registry import create_dual_encoder, create_encoder
from cvfm.runtime.checkpoint import latest_checkpoint

# ---------------------------------------------------------------------------------------------- the loss


def _clip_loss_by_hand(img: np.ndarray, txt: np.ndarray, log_scale: float) -> float:
    """Mean of the image->text and text->image cross-entropies, with explicit loops."""
    n, scale = len(img), math.exp(log_scale)
    a = [v / math.sqrt(sum(float(x) ** 2 for x in v)) for v in img]
    b = [v / math.sqrt(sum(float(x) ** 2 for x in v)) for v in txt]
    sim = [
        [scale * sum(float(x) * float(y) for x, y in zip(a[i], b[j], strict=True)) for j in range(n)]
        for i in range(n)
    ]
    image_side = text_side = 0.0
    for i in range(n):
        image_side += -math.log(math.exp(sim[i][i]) / sum(math.exp(sim[i][j]) for j in range(n)))
        text_side += -math.log(math.exp(sim[i][i]) / sum(math.exp(sim[j][i]) for j in range(n)))
    return (image_side / n + text_side / n) / 2


@pytest.mark.parametrize("log_scale", [0.0, math.log(1 / 0.07), math.log(100)])
def test_clip_loss_matches_hand_computation(log_scale):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g), 3 * torch.randn(5, 8, generator=g)
    got = float(clip_loss(img, txt, torch.tensor(log_scale)))
    assert got == pytest.approx(
        _clip_loss_by_hand(img.double().numpy(), txt.double().numpy(), log_scale), abs=1e-5
    )


def test_clip_loss_is_symmetric_in_images_and_texts_and_bounded():
    g = torch.Generator().manual_seed(1)
    img, txt, s = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.tensor(2.0)
    assert float(clip_loss(img, txt, s)) == pytest.approx(float(clip_loss(txt, img, s)), abs=1e-6)
    # Matched orthogonal pairs at the maximal scale: the loss vanishes; at a vanishing scale every logit is
    # 0, so each side is ln(n) whatever the features.
    eye = torch.eye(4, 6)
    assert float(clip_loss(eye, eye, torch.tensor(MAX_LOGIT_SCALE))) < 1e-6
    assert float(clip_loss(img, txt, torch.tensor(-20.0))) == pytest.approx(math.log(4), abs=1e-6)


def test_clip_loss_gradient_reaches_features_and_logit_scale():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    txt = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    # Every gradient entry (features and scale) against finite differences of the loss.
    assert torch.autograd.gradcheck(clip_loss, (img, txt, scale))


# ---------------------------------------------------------------------------------------------- the method


def _method(**options):
    torch.manual_seed(0)
    dual = create_dual_encoder("cvfm/tiny-clip")
    return build_method("clip", dual, options, Budget(64, 4, 8, 16))


def test_logit_scale_starts_at_one_over_007_and_is_clamped_after_each_step():
    method = _method()
    assert method.encoder.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-4)
    with torch.no_grad():
        method.encoder.logit_scale.fill_(7.0)
    method.after_optimizer_step(0)
    assert method.encoder.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        method.encoder.logit_scale.fill_(-0.5)
    method.after_optimizer_step(1)
    assert method.encoder.logit_scale.item() == 0.0


def test_no_weight_decay_on_logit_scale_biases_and_norms():
    method = _method()
    decay, no_decay = (g["params"] for g in method.param_groups())
    assert any(p is method.encoder.logit_scale for p in no_decay)
    assert all(p.ndim >= 2 for p in decay) and all(p.ndim <= 1 for p in no_decay)  # biases, norms, scale
    assert len(decay) + len(no_decay) == len(list(method.parameters()))
    assert any(p is method.encoder.model.visual_projection.weight for p in decay)
    assert method.weight_decay == (0.2, 0.2) and method.adam_betas == (0.9, 0.98)


def test_forward_logs_scale_and_feature_spread_and_needs_tokens():
    method = _method()
    views = method.views()(Image.new("RGB", (28, 28), (200, 30, 30)))
    assert len(views) == 1 and views[0].shape == (3, 32, 32)
    x = torch.stack([views[0], views[0].flip(-1)])
    tokens = method.encoder.tokenizer(["a red square", "a blue square"])
    with torch.no_grad():
        img, txt = method.encoder.encode_image(x).double(), method.encoder.encode_text(tokens).double()
    loss, logs = method({"image": [x], "tokens": tokens}, 0)
    assert loss.item() == pytest.approx(
        _clip_loss_by_hand(img.numpy(), txt.numpy(), math.log(1 / 0.07)), rel=1e-5
    )
    assert logs["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-4)
    # The spread: per-dimension std (n - 1) of the unit features, averaged over dimensions.
    for key, z in (("feature_std", img), ("text_feature_std", txt)):
        unit = z / z.norm(dim=1, keepdim=True)
        by_hand = float(((unit - unit.mean(0)) ** 2).sum(0).div(len(unit) - 1).sqrt().mean())
        assert logs[key] == pytest.approx(by_hand, rel=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        method({"image": [x]}, 0)


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture
def toy_pairs(tmp_path):
    return write_colour_pairs(tmp_path / "pairs", size=12)


def _config(out, data, **kw) -> PretrainConfig:
    base = dict(
        data=str(data), method="clip", epochs=2, batch_size=16, num_workers=0, checkpoint_every=4, lr=2e-3
    )
    return PretrainConfig(**{**base, "output": str(out), **kw})


def _caption_accuracy(dual, data) -> float:
    """Each toy image against the four colour captions: cosine argmax (an independent scorer)."""
    source = open_source(str(data))
    dual.eval()
    with torch.no_grad():
        tokens = dual.tokenizer([f"a {name} square" for name in TOY_COLOURS])
        texts = torch.nn.functional.normalize(dual.encode_text(tokens), dim=-1)
        x = torch.stack([dual.preprocess.transform()(source.load(i)) for i in range(len(source))])
        images = torch.nn.functional.normalize(dual.encode_image(x), dim=-1)
    return float(((images @ texts.T).argmax(1).numpy() == source.labels).mean())


@pytest.mark.slow  # long; test_paired trains, saves and resumes CLIP by default
def test_clip_trains_on_jsonl_pairs_and_saves_a_dual_encoder(tmp_path, toy_pairs):
    run = pretrain(_config(tmp_path / "run", toy_pairs, epochs=12))
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["model"] == "cvfm/tiny-clip" and info["config"]["text_column"] == "text"
    assert info["status"] == "finished" and info["step"] == 36  # 48 pairs / 16 = 3 steps an epoch
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch_loss = [r["epoch/loss"] for r in records if "epoch/loss" in r]
    assert epoch_loss[-1] < 0.7 * epoch_loss[0]
    scales = [r["train/logit_scale"] for r in records if "train/logit_scale" in r]
    assert len(scales) == 36 and all(0 < s <= 100 + 1e-4 for s in scales)

    torch.manual_seed(0)
    assert _caption_accuracy(create_dual_encoder("cvfm/tiny-clip"), toy_pairs) <= 0.5  # random init
    trained = create_dual_encoder(str(run))
    assert _caption_accuracy(trained, toy_pairs) >= 0.9  # 1.0 here

    # backbone/ is the whole dual encoder: the same weights as the last checkpoint, and an image tower.
    state = load_file(latest_checkpoint(run / "checkpoints") / "model.safetensors")
    torch.manual_seed(1)
    fresh = create_dual_encoder("cvfm/tiny-clip")
    fresh.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()}, strict=True)
    fresh.eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = trained.tokenizer(["a red square", "a green square in blue", "zebra"])
    with torch.no_grad():
        torch.testing.assert_close(trained.encode_image(x), fresh.encode_image(x))
        torch.testing.assert_close(trained.encode_text(tokens), fresh.encode_text(tokens))
        tower = create_encoder(str(run)).eval()
        torch.testing.assert_close(tower(x), trained.encode_image(x))
    assert trained.logit_scale.item() == pytest.approx(float(state["encoder.model.logit_scale"]))
    assert trained.preprocess == fresh.preprocess


def _independent_zero_shot(dual, data: str) -> float:
    source = open_source(data, split="test")
    dual.eval()
    with torch.no_grad():
        rows = []
        for name in source.classes:
            e = torch.nn.functional.normalize(
                dual.encode_text(dual.tokenizer([t.format(c=name) for t in TEMPLATES["digit"]])), dim=-1
            )
            rows.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
        x = torch.stack([dual.preprocess.transform()(source.load(i)) for i in range(len(source))])
        images = torch.nn.functional.normalize(dual.encode_image(x), dim=-1)
    return float(((images @ torch.stack(rows).T).argmax(1).numpy() == source.labels).mean())


def test_captioned_builtin_defaults_and_zero_shot_monitor(tmp_path):
    data = "builtin:digits-captions"
    run = pretrain(
        _config(
            tmp_path / "run", data, split="train", epochs=2, batch_size=128, monitor=data, monitor_size=10**6
        )
    )
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["text_column"] == "caption"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    monitored = [r for r in records if "monitor/zeroshot_top1" in r]
    steps = info["resolved"]["steps_per_epoch"]
    assert [r["step"] for r in monitored] == [0, steps, 2 * steps]
    assert not any("monitor/knn_top1@20" in r for r in records)
    # The last reading is of the final weights on the whole test split: an independent scorer agrees.
    final = _independent_zero_shot(create_dual_encoder(str(run)), data)
    assert monitored[-1]["monitor/zeroshot_top1"] == pytest.approx(final, abs=1e-9)


def test_image_only_monitor_falls_back_to_knn_on_the_image_tower(tmp_path, toy_pairs, digit_folder):
    run = pretrain(_config(tmp_path / "run", toy_pairs, epochs=1, monitor=str(digit_folder)))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "monitor/knn_top1@20" in r] == [0, 3]


def _stop_at(step_to_stop: int):
    def on_step(step: int) -> None:
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)

    return on_step


@pytest.mark.slow
def test_interrupted_clip_run_resumes_to_identical_weights(tmp_path, toy_pairs):
    full = pretrain(_config(tmp_path / "full", toy_pairs, epochs=3))
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        pretrain(_config(part, toy_pairs, epochs=3), on_step=_stop_at(5))
    assert latest_checkpoint(part / "checkpoints").name == "step-00000005"
    pretrain(_config(part, toy_pairs, resume=True))
    for name in ("model.safetensors",):
        a, b = load_file(full / "backbone" / name), load_file(part / "backbone" / name)
        assert a.keys() == b.keys() and "logit_scale" in a
        for k in a:
            assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    a = load_file(latest_checkpoint(full / "checkpoints") / "model.safetensors")
    b = load_file(latest_checkpoint(part / "checkpoints") / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- refusals


def _write_manifest(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no-texts", "has no text in 'text'"),
        ("list-texts", "list of texts"),
        ("wrong-column", "has no text in 'caption'"),
        ("image-only-model", "text tower"),
        ("folder", "images only"),
        ("builtin-without-captions", "builtin:digits-captions"),
        ("text-column-for-dino", "--text-column"),
    ],
)
def test_clip_refusals_are_usage_errors_before_anything_is_written(
    tmp_path, toy_pairs, digit_folder, case, needle
):
    img = str(toy_pairs.parent / "red0.png")
    kw: dict = {}
    if case == "no-texts":
        data = _write_manifest(tmp_path / "m.jsonl", [{"image": img}] * 20)
    elif case == "list-texts":
        data = _write_manifest(tmp_path / "m.jsonl", [{"image": img, "text": ["a", "b"]}] * 20)
    elif case == "wrong-column":
        data, kw = str(toy_pairs), {"text_column": "caption"}
    elif case == "image-only-model":
        data, kw = str(toy_pairs), {"model": "cvfm/tiny-resnet"}
    elif case == "folder":
        data = str(digit_folder)
    elif case == "builtin-without-captions":
        data = "builtin:digits"
    else:
        data, kw = str(toy_pairs), {"method": "dino", "text_column": "text"}
    out = tmp_path / "run"
    with pytest.raises(UsageError, match=needle):
        pretrain(_config(out, data, **kw))
    assert not (out / "run.json").exists()


def test_cli_pretrain_clip_defaults_to_the_tiny_clip(tmp_path, toy_pairs, cli):
    out = tmp_path / "run"
    args = ["pretrain", "--data", toy_pairs, "--method", "clip", "-b", "16", "--epochs", "1"]
    record = one_json_line(cli(*args, "--num-workers", "0", "-o", out))
    assert record == {"run": str(out), "backbone": str(out / "backbone")}
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["model"] == "cvfm/tiny-clip" and config["text_column"] == "text"
    assert json.loads((out / "backbone" / "config.json").read_text())["model_type"] == "clip"
