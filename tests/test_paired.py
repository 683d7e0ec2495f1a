"""PairedEncoder: any registry image encoder + a projection + the text half of an image-text model. Save and
reload through both registry doors, the image/ sub-folder on its own (cvfm and timm), strict heads, the
open_clip text half kept whole and frozen, CLIP training with --text-model (loss, run folder, exact
resume), and the refusals."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from clitools import one_json_line
from conftest import write_colour_pairs
from safetensors.torch import load_file, save_file

from cvfm.errors import CvfmError, UsageError
from cvfm.models.dual import ImageTower
from cvfm.models.encoder import TimmEncoder
from cvfm.models.paired import DualTextTower, HFTextTower, PairedEncoder
from cvfm.pretrain import PretrainConfig, pretrain
from cvfm.registry import create_dual_encoder, create_encoder
from cvfm.runtime.checkpoint import latest_checkpoint

TEXTS = ["a red square", "the digit seven written in blue", "zebra"]


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _paired() -> tuple[PairedEncoder, object]:
    torch.manual_seed(0)
    dual = create_dual_encoder("cvfm/tiny-clip")
    return PairedEncoder(create_encoder("cvfm/tiny-resnet"), dual).eval(), dual.eval()


def _embed(model, x):
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(model.tokenizer(TEXTS))


# ---------------------------------------------------------------------------------------------- the model


def test_paired_keeps_only_the_text_half_and_matches_the_dual_text_embedding(x):
    paired, dual = _paired()
    assert (
        isinstance(paired.text, HFTextTower)
        and type(paired.text.model).__name__ == "CLIPTextModelWithProjection"
    )
    names = [n for n, _ in paired.named_parameters()]
    assert not any("vision_model" in n or "visual_projection" in n for n in names)  # the dual's image tower
    assert paired.embed_dim == 64 and paired.projection.weight.shape == (64, 128)
    assert paired.projection.bias is None
    assert paired.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert paired.preprocess == create_encoder("cvfm/tiny-resnet").preprocess
    tokens = dual.tokenizer(TEXTS)
    with torch.no_grad():
        assert torch.equal(paired.encode_text(tokens), dual.encode_text(tokens))
        pooled = paired.image(x)
        assert torch.equal(paired.encode_image(x), pooled @ paired.projection.weight.T)


def test_save_reload_through_both_doors_and_image_folder_alone(tmp_path, x):
    import timm

    paired, _ = _paired()
    with torch.no_grad():
        paired.logit_scale.fill_(3.0)  # not the initial value: the heads file carries it
    folder = paired.save(tmp_path / "paired")
    config = json.loads((folder / "paired.json").read_text())
    assert config["format"] == "cvfm-paired-encoder" and config["embed_dim"] == 64
    assert (config["image"], config["text"], config["text_kind"]) == ("image", "text", "transformers")
    assert set(load_file(folder / "heads.safetensors")) == {"projection.weight", "logit_scale"}
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))

    image, text = _embed(paired, x)
    for model_id in (str(folder), str(tmp_path)):  # the folder itself; a run folder's backbone/
        if model_id == str(tmp_path):
            (tmp_path / "paired").rename(tmp_path / "backbone")
        dual = create_dual_encoder(model_id)
        assert isinstance(dual, PairedEncoder) and not dual.training
        got_image, got_text = _embed(dual, x)
        assert torch.equal(got_image, image) and torch.equal(got_text, text)
        assert dual.logit_scale.item() == 3.0 and dual.preprocess == paired.preprocess
        tower = create_encoder(model_id).eval()
        assert isinstance(tower, ImageTower) and tower.num_features == 64
        with torch.no_grad():
            assert torch.equal(tower(x), image)
    folder = tmp_path / "backbone"

    # image/ alone: the image encoder before the projection, through cvfm and through timm itself.
    alone = create_encoder(str(folder / "image")).eval()
    assert isinstance(alone, TimmEncoder) and alone.preprocess == paired.preprocess
    timm_model = timm.create_model(f"local-dir:{folder / 'image'}", pretrained=True).eval()
    with torch.no_grad():
        before = paired.image(x)
        assert torch.equal(alone(x), before)
        nhwc = x.contiguous(memory_format=torch.channels_last)  # how the cvfm encoder feeds a conv net
        plain = timm_model.forward_head(timm_model.forward_features(nhwc), pre_logits=True)
        assert torch.equal(plain, before)


def test_random_init_from_folder_and_strict_heads(tmp_path, x):
    paired, _ = _paired()
    folder = paired.save(tmp_path / "paired")
    image, _ = _embed(paired, x)
    torch.manual_seed(5)
    fresh = create_dual_encoder(str(folder), pretrained=False)
    assert isinstance(fresh, PairedEncoder) and not torch.equal(_embed(fresh, x)[0], image)

    heads = load_file(folder / "heads.safetensors")
    for edit, match in [
        ({**heads, "extra": torch.zeros(1)}, "unexpected keys: extra"),
        ({"projection.weight": heads["projection.weight"]}, "missing keys: logit_scale"),
        ({**heads, "projection.weight": torch.zeros(64, 7)}, r"projection.weight \(64, 7\) != \(64, 128\)"),
    ]:
        save_file(edit, folder / "heads.safetensors")
        with pytest.raises(CvfmError, match=match):
            create_dual_encoder(str(folder))
    save_file(heads, folder / "heads.safetensors")
    config = json.loads((folder / "paired.json").read_text())
    for bad, match in [({"format": "x"}, "not a cvfm paired encoder"), ({"text": "../x"}, "valid 'text'")]:
        (folder / "paired.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(CvfmError, match=match):
            create_encoder(str(folder))


def test_open_clip_text_half_is_kept_whole_with_its_image_tower_frozen(tmp_path, x):
    from cvfm.models.openclip import build

    spec = tmp_path / "spec"
    spec.mkdir()
    cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (spec / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(0)
    dual = build(f"local-dir:{spec}", f"local-dir:{spec}", cfg, None, "oc")
    paired = PairedEncoder(create_encoder("cvfm/tiny-resnet"), dual).eval()
    assert isinstance(paired.text, DualTextTower) and paired.embed_dim == 24
    frozen = {n for n, p in paired.named_parameters() if not p.requires_grad}
    assert frozen and all(".model.visual." in n or n.endswith("logit_scale") for n in frozen)
    assert "text.dual.model.logit_scale" in frozen and "scale" not in frozen
    assert all(p.requires_grad for n, p in paired.named_parameters() if "token_embedding" in n)
    tokens = paired.tokenizer(TEXTS)
    with torch.no_grad():
        assert torch.equal(paired.encode_text(tokens), dual.encode_text(tokens))
    folder = paired.save(tmp_path / "paired")
    assert json.loads((folder / "paired.json").read_text())["text_kind"] == "dual"
    again = create_dual_encoder(str(folder))
    assert torch.equal(_embed(again, x)[1], _embed(paired, x)[1])
    assert {n for n, p in again.named_parameters() if not p.requires_grad} == frozen


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture
def toy_pairs(tmp_path):
    return write_colour_pairs(tmp_path / "pairs", size=12)


def _config(out, data, **kw) -> PretrainConfig:
    base = dict(
        data=str(data),
        method="clip",
        model="cvfm/tiny-resnet",
        text_model="cvfm/tiny-clip",
        epochs=4,
        batch_size=16,
        num_workers=0,
        checkpoint_every=4,
        lr=2e-3,
    )
    return PretrainConfig(**{**base, "output": str(out), **kw})


def _stop_at(step_to_stop: int):
    def on_step(step: int) -> None:
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)

    return on_step


def test_paired_clip_trains_saves_and_resumes_to_identical_weights(tmp_path, toy_pairs, x):
    full = pretrain(_config(tmp_path / "full", toy_pairs))
    info = json.loads((full / "run.json").read_text())
    assert info["config"]["model"] == "cvfm/tiny-resnet" and info["config"]["text_model"] == "cvfm/tiny-clip"
    assert info["status"] == "finished" and info["step"] == 12
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    epoch_loss = [r["epoch/loss"] for r in records if "epoch/loss" in r]
    assert epoch_loss[-1] < 0.8 * epoch_loss[0]

    trained = create_dual_encoder(str(full))
    assert isinstance(trained, PairedEncoder)
    state = load_file(latest_checkpoint(full / "checkpoints") / "model.safetensors")
    assert trained.logit_scale.item() == pytest.approx(float(state["encoder.scale"]))
    fresh, _ = _paired()
    fresh.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()}, strict=True)
    fresh.eval()
    assert all(torch.equal(a, b) for a, b in zip(_embed(trained, x), _embed(fresh, x), strict=True))

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        pretrain(_config(part, toy_pairs), on_step=_stop_at(5))
    assert latest_checkpoint(part / "checkpoints").name == "step-00000005"
    pretrain(PretrainConfig(data="", output=str(part), resume=True, num_workers=0))  # run.json: the models
    for name in ("heads.safetensors", "image/model.safetensors", "text/model.safetensors"):
        a, b = load_file(full / "backbone" / name), load_file(part / "backbone" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"text_model": None}, "no text tower: pair it with one, e.g. --text-model cvfm/tiny-clip"),
        ({"method": "dino"}, "--text-model is for methods that train on texts"),
        ({"model": None}, "name one"),
        ({"text_model": "cvfm/tiny-resnet"}, "--text-model must be an image-text model"),
    ],
)
def test_refusals_are_usage_errors_before_anything_is_written(tmp_path, toy_pairs, kw, needle):
    out = tmp_path / "run"
    with pytest.raises(UsageError, match=needle):
        pretrain(_config(out, toy_pairs, **kw))
    assert not out.exists() or not (out / "run.json").exists()


def test_cli_text_model(tmp_path, toy_pairs, cli):
    out = tmp_path / "run"
    args = ["pretrain", "--data", toy_pairs, "--method", "clip", "--model", "cvfm/tiny-resnet"]
    args += ["--text-model", "cvfm/tiny-clip", "-b", "16", "--epochs", "1", "--num-workers", "0"]
    record = one_json_line(cli(*args, "-o", out))
    assert record == {"run": str(out), "backbone": str(out / "backbone")}
    assert json.loads((out / "run.json").read_text())["config"]["text_model"] == "cvfm/tiny-clip"
    assert (out / "backbone" / "paired.json").is_file()
