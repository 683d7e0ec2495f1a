"""Model registry: presets, save/reload round trips, timm and transformers parity, strict weight loading."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from cvfm.data.views import Preprocess
from cvfm.errors import CvfmError, UsageError
from cvfm.models.encoder import HFEncoder, TimmEncoder
from cvfm.models.pixels import PixelEncoder
from cvfm.registry import PRESETS, create_encoder, list_models

_RESNET_SIDE = 32 // PRESETS["cvfm/tiny-resnet"].kwargs.get("output_stride", 32)  # final map is side x side
PRESET_SHAPES = {  # id: (num_features, patch-token shape for a (2, 3, 32, 32) batch)
    "cvfm/tiny-resnet": (128, (2, _RESNET_SIDE**2, 128)),  # the flattened last feature map
    "cvfm/tiny-vit": (96, (2, 64, 96)),  # (32 / 4)^2 patches, class token dropped
}
HF_KW = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _build(model_id, **overrides):
    torch.manual_seed(0)
    return create_encoder(model_id, **overrides).eval()


@pytest.fixture(scope="module")
def saved_presets(tmp_path_factory):
    """Each preset, built once (eval mode) and saved: {id: (encoder, folder)}."""
    out = {}
    for model_id in PRESET_SHAPES:
        enc = _build(model_id)
        folder = tmp_path_factory.mktemp(model_id.split("/")[1])
        enc.save(folder)
        out[model_id] = (enc, folder)
    return out


def _rewrite_weights(folder, edit):
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("model_id", list(PRESET_SHAPES))
def test_preset_shapes(saved_presets, x, model_id):
    enc, _ = saved_presets[model_id]
    num_features, token_shape = PRESET_SHAPES[model_id]
    assert isinstance(enc, TimmEncoder)
    assert enc.num_features == num_features
    assert enc.preprocess == Preprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)
    with torch.no_grad():
        out = enc.encode(x)
        assert out.pooled.shape == (2, num_features)
        assert out.patch_tokens.shape == token_shape
        assert torch.equal(enc(x), out.pooled)
    assert torch.isfinite(out.pooled).all()


def test_resnet_tokens_are_the_flattened_feature_map(saved_presets, x):
    enc, _ = saved_presets["cvfm/tiny-resnet"]
    assert enc.channels_last  # conv nets take NHWC input (faster), and their weights are NHWC too
    assert enc.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fmap = enc.model.forward_features(x.contiguous(memory_format=torch.channels_last))  # (B, C, H, W)
        out = enc.encode(x)
    assert fmap.shape == (2, 128, _RESNET_SIDE, _RESNET_SIDE)
    assert torch.equal(out.patch_tokens, fmap.flatten(2).transpose(1, 2))
    assert torch.allclose(out.pooled, fmap.mean(dim=(2, 3)), atol=1e-6)  # average pooling


def test_vit_pooled_is_the_class_token_and_tokens_the_rest(saved_presets, x):
    enc, _ = saved_presets["cvfm/tiny-vit"]
    assert not enc.channels_last  # a ViT's one conv (the patch embedding) keeps NCHW input
    with torch.no_grad():
        feats = enc.model.forward_features(x)  # (B, 1 + 64, D) after the final norm
        out = enc.encode(x)
    assert feats.shape == (2, 65, 96)
    assert torch.equal(out.pooled, feats[:, 0])
    assert torch.equal(out.patch_tokens, feats[:, 1:])


def test_preset_overrides_reach_timm():
    enc = create_encoder("cvfm/tiny-vit", depth=2)
    assert len(enc.model.blocks) == 2
    assert len(create_encoder("cvfm/tiny-vit").model.blocks) == PRESETS["cvfm/tiny-vit"].kwargs["depth"]


@pytest.mark.parametrize("model_id", list(PRESET_SHAPES))
def test_preset_save_reload_is_identical(saved_presets, x, model_id):
    enc, folder = saved_presets[model_id]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "model.safetensors"]  # timm's hub layout, nothing else
    assert json.loads((folder / "config.json").read_text())["architecture"] == PRESETS[model_id].arch

    again = create_encoder(str(folder)).eval()
    assert isinstance(again, TimmEncoder)
    assert again.preprocess == enc.preprocess
    assert again.num_features == enc.num_features
    with torch.no_grad():
        a, b = enc.encode(x), again.encode(x)
    assert torch.equal(a.pooled, b.pooled)
    assert torch.equal(a.patch_tokens, b.patch_tokens)


@pytest.mark.parametrize("model_id", list(PRESET_SHAPES))
def test_plain_timm_reads_the_export(saved_presets, x, model_id):
    enc, folder = saved_presets[model_id]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert model.num_classes == 0
    # Conv nets run NHWC inside the encoder: the same layout gives the same bits, NCHW the same values.
    same = x.contiguous(memory_format=torch.channels_last) if enc.channels_last else x
    with torch.no_grad():
        assert torch.equal(model(same), enc(x))
        assert torch.equal(model.forward_head(model.forward_features(same), pre_logits=True), enc(x))
        torch.testing.assert_close(model(x), enc(x), rtol=1e-5, atol=1e-6)


def test_differently_initialised_encoders_differ(saved_presets, x):
    # Guards the parity tests above against comparing two things that are always equal.
    enc, _ = saved_presets["cvfm/tiny-vit"]
    torch.manual_seed(1)
    other = create_encoder("cvfm/tiny-vit").eval()
    with torch.no_grad():
        assert not torch.equal(enc(x), other(x))


def test_run_folder_layout_loads_its_backbone(saved_presets, x, tmp_path):
    enc, folder = saved_presets["cvfm/tiny-resnet"]
    run = tmp_path / "my.run.v1"  # dots in the path must not be read as a timm tag
    shutil.copytree(folder, run / "backbone")
    (run / "metrics.jsonl").write_text("{}\n")
    again = create_encoder(str(run)).eval()
    assert again.name == str(run)
    with torch.no_grad():
        assert torch.equal(again(x), enc(x))


# --------------------------------------------------------------------------------------------- transformers


def _tiny_hf(kind):
    import transformers

    torch.manual_seed(0)
    if kind == "dinov2":
        return transformers.Dinov2Model(transformers.Dinov2Config(**HF_KW)).eval()
    if kind == "dinov2-registers":
        cfg = transformers.Dinov2WithRegistersConfig(**HF_KW, num_register_tokens=4)
        return transformers.Dinov2WithRegistersModel(cfg).eval()
    return transformers.ViTModel(transformers.ViTConfig(**HF_KW)).eval()


@pytest.mark.parametrize(("kind", "prefix"), [("dinov2", 1), ("vit", 1), ("dinov2-registers", 5)])
def test_transformers_parity(tmp_path, x, kind, prefix):
    model = _tiny_hf(kind)
    model.save_pretrained(tmp_path / "hf")
    enc = create_encoder(str(tmp_path / "hf")).eval()
    assert isinstance(enc, HFEncoder)
    assert enc.num_features == 32
    assert enc.preprocess.size == 32
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state
        out = enc.encode(x)
    assert hidden.shape == (2, prefix + 16, 32)
    assert out.pooled.shape == (2, 32) and out.patch_tokens.shape == (2, 16, 32)
    assert (out.pooled - hidden[:, 0]).abs().max() <= 1e-6
    assert (out.patch_tokens - hidden[:, prefix:]).abs().max() <= 1e-6

    # HFEncoder.save -> create_encoder round trip keeps features and the preprocessing.
    enc.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "preprocess.json").exists()
    again = create_encoder(str(tmp_path / "saved")).eval()
    assert again.preprocess == enc.preprocess
    with torch.no_grad():
        assert torch.equal(again(x), out.pooled)


@pytest.fixture
def dinov2_folder(tmp_path):
    folder = tmp_path / "dinov2"
    _tiny_hf("dinov2").save_pretrained(folder)
    return folder


def test_missing_weight_key_is_an_error(dinov2_folder):
    _rewrite_weights(dinov2_folder, lambda s: s.pop("layernorm.weight"))
    with pytest.raises(CvfmError, match=r"do not match its architecture \(missing keys: layernorm\.weight\)"):
        create_encoder(str(dinov2_folder))


def test_renamed_weight_key_is_an_error(dinov2_folder):
    _rewrite_weights(dinov2_folder, lambda s: s.__setitem__("layernorm.wait", s.pop("layernorm.weight")))
    with pytest.raises(CvfmError, match=r"missing keys: layernorm\.weight; unexpected keys: layernorm\.wait"):
        create_encoder(str(dinov2_folder))


def test_mis_shaped_weight_is_a_cvfm_error(dinov2_folder):
    _rewrite_weights(dinov2_folder, lambda s: s.__setitem__("layernorm.weight", torch.ones(31)))
    with pytest.raises(CvfmError, match=r"mismatched keys: .*layernorm\.weight"):
        create_encoder(str(dinov2_folder))


def test_untouched_rewrite_still_loads(dinov2_folder):
    # The rewrite itself (load_file/save_file with format metadata) is harmless.
    _rewrite_weights(dinov2_folder, lambda s: None)
    assert isinstance(create_encoder(str(dinov2_folder)), HFEncoder)


# --------------------------------------------------------------------------------------------- broken folders


def test_corrupt_timm_export_is_an_error(saved_presets, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "broken"
    shutil.copytree(saved_presets["cvfm/tiny-resnet"][1], folder)
    _rewrite_weights(folder, lambda s: s.pop("conv1.weight"))
    with pytest.raises(CvfmError, match=r"do not match its architecture.*conv1\.weight") as info:
        create_encoder(str(folder))
    # a broken file on disk is not a "not in the local cache" usage error
    assert not isinstance(info.value, UsageError)


def test_timm_export_without_safetensors_is_refused(saved_presets, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(saved_presets["cvfm/tiny-resnet"][1], folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UsageError, match=r"no \.safetensors weights"):
        create_encoder(str(folder))


def test_folders_that_hold_no_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no model"):
        create_encoder(str(tmp_path / "empty"))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"lr": 0.1}')
    with pytest.raises(UsageError, match="neither a timm nor a transformers model"):
        create_encoder(str(tmp_path / "odd"))


# --------------------------------------------------------------------------------------------- ids


def test_unknown_preset_suggests():
    with pytest.raises(
        UsageError, match=r"unknown preset 'cvfm/tiny-resnt' \(did you mean: cvfm/tiny-resnet,"
    ):
        create_encoder("cvfm/tiny-resnt")


def test_unknown_timm_arch_suggests():
    with pytest.raises(UsageError, match=r"timm has no model 'resnet5O' \(did you mean: .*resnet50\b"):
        create_encoder("timm/resnet5O")


def test_unknown_model_kind():
    with pytest.raises(UsageError, match="unknown model 'not-a-model'"):
        create_encoder("not-a-model")


@pytest.mark.parametrize("model_id", ["hf/some-org/not-cached", "timm/resnet50"])
def test_uncached_pretrained_weights_offline(empty_hf_cache, model_id):
    with pytest.raises(UsageError, match=rf"'{model_id}' is not in the local Hugging Face cache"):
        create_encoder(model_id)


def test_timm_arch_without_weights_builds_offline(x):
    enc = create_encoder("timm/resnet10t", pretrained=False)
    assert isinstance(enc, TimmEncoder) and enc.num_features == 512
    cfg = enc.model.pretrained_cfg  # preprocessing comes from timm's pretrained config
    assert enc.preprocess.size == cfg["input_size"][-1]
    assert enc.preprocess.crop_pct == cfg["crop_pct"]
    assert enc.preprocess.mean == tuple(cfg["mean"])
    with torch.no_grad():
        assert enc.eval()(x).shape == (2, 512)


def test_list_models():
    ids = [r["id"] for r in list_models("cvfm/*")]
    assert ids == [
        "cvfm/pixels",
        *PRESETS,
        "cvfm/tiny-clip",
        "cvfm/tiny-blip",
        "cvfm/tiny-sam",
        "cvfm/tiny-sam2",
        "cvfm/tiny-owlv2",
    ]
    assert all(r["source"] == "cvfm" for r in list_models("cvfm/*"))
    assert [r["id"] for r in list_models("cvfm/tiny-*")] == [
        "cvfm/tiny-resnet",
        "cvfm/tiny-vit",
        "cvfm/tiny-clip",
        "cvfm/tiny-blip",
        "cvfm/tiny-sam",
        "cvfm/tiny-sam2",
        "cvfm/tiny-owlv2",
    ]
    assert [r["id"] for r in list_models("*") if r["kind"] == "image-text"] == ["cvfm/tiny-clip"]
    assert list_models("timm/resnet18*") == []  # timm is not listed unless asked for
    both = [r["id"] for r in list_models("timm/resnet18*", sources=("cvfm", "timm"))]
    assert "timm/resnet18" in both
    assert all(i.startswith("timm/resnet18") for i in both)


# --------------------------------------------------------------------------------------------- pixels


def test_pixel_encoder_flattens_the_image(x):
    enc = create_encoder("cvfm/pixels")
    assert isinstance(enc, PixelEncoder)
    assert enc.num_features == 3 * 32 * 32
    out = enc.encode(x)
    assert out.patch_tokens is None
    assert out.pooled.shape == (2, 3072)
    assert torch.equal(out.pooled, x.reshape(2, -1))
    assert torch.equal(out.pooled[1, :32], x[1, 0, 0])
    assert create_encoder("cvfm/pixels", size=16).num_features == 768
    with pytest.raises(CvfmError, match="no weights to save"):
        enc.save("unused")
