"""Image-text dual encoders: transformers CLIP / SigLIP and open_clip parity (same weights, same inputs,
max abs diff <= 1e-5), tokenizers, preprocessing config (pixel parity:
test_preprocess_parity.py), save/reload round trips, cvfm/tiny-clip, errors."""

from __future__ import annotations

import json
import pickle
import shutil
import types

import open_clip
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from cvfm.data.builtin import ANIMAL_CLASSES, COLOURS, DIGIT_CLASSES
from cvfm.errors import CvfmError, UsageError
from cvfm.models.dual import HFDualEncoder, ImageTower
from cvfm.models.encoder import Encoder
from cvfm.models.openclip import OpenCLIPDualEncoder
from cvfm.models.tiny_clip import BOS, CORPUS_WORDS, EOS, build_tokenizer
from cvfm.registry import create_dual_encoder, create_encoder, list_models

TOL = 1e-5
TEXTS = ["a photo of a red giraffe", "the digit seven written in blue", "xylophone-42 naïve café"]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
OPEN_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 4, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
OPEN_CLIP_PREPROCESS = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


# --------------------------------------------------------------------------------------------- transformers


def _tiny_clip_model():
    tokenizer = build_tokenizer(16)
    vocab = tokenizer.get_vocab()
    text = {
        **SMALL,
        "vocab_size": len(vocab),
        "max_position_embeddings": 16,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[EOS],
    }
    config = transformers.CLIPConfig(
        text_config=text, vision_config={**SMALL, "image_size": 32, "patch_size": 8}, projection_dim=24
    )
    torch.manual_seed(0)
    return transformers.CLIPModel(config).eval(), tokenizer


def _siglip_tokenizer(max_length: int = 16):
    """A SigLIP-style tokenizer built offline: SentencePiece-like unigram pieces ("▁word"), lower-casing,
    "</s>" appended and used as padding. (transformers' SiglipTokenizer needs a sentencepiece model file
    and the sentencepiece package; SiglipModel takes any ids below its vocab size.)"""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = sorted({w.lower() for w in CORPUS_WORDS})
    chars = sorted(set("".join(words)) | set("0123456789-!.,"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in words] + [(c, -4.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def _tiny_siglip_model():
    tokenizer = _siglip_tokenizer(16)
    text = {**SMALL, "vocab_size": len(tokenizer), "max_position_embeddings": 16, "pad_token_id": 1}
    text |= {"eos_token_id": 1, "bos_token_id": None}
    config = transformers.SiglipConfig(
        text_config=text, vision_config={**SMALL, "image_size": 32, "patch_size": 8}
    )
    torch.manual_seed(0)
    return transformers.SiglipModel(config).eval(), tokenizer


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """{"clip"|"siglip": (model, tokenizer, folder)}: model, tokenizer and image processor saved."""
    out = {}
    for kind, build, proc in [
        (
            "clip",
            _tiny_clip_model,
            transformers.CLIPImageProcessor(
                size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
            ),
        ),
        ("siglip", _tiny_siglip_model, transformers.SiglipImageProcessor(size={"height": 32, "width": 32})),
    ]:
        model, tokenizer = build()
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        proc.save_pretrained(folder)
        out[kind] = (model, tokenizer, folder)
    return out


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_parity(hf_folders, x, kind):
    model, hf_tokenizer, folder = hf_folders[kind]
    dual = create_dual_encoder(str(folder))
    assert isinstance(dual, HFDualEncoder) and dual.name == str(folder)
    assert dual.embed_dim == (24 if kind == "clip" else 32)
    assert torch.equal(dual.logit_scale, model.logit_scale)

    # The tokenizer: CLIP pads to the longest text, SigLIP to its fixed length (it pools the last token).
    tokens = dual.tokenizer(TEXTS)
    padding = {"padding": "longest"} if kind == "clip" else {"padding": "max_length", "max_length": 16}
    expected = hf_tokenizer(TEXTS, truncation=True, return_tensors="pt", **padding)
    assert set(tokens) == set(expected)
    for key in expected:
        assert torch.equal(tokens[key], expected[key]), key
    if kind == "siglip":
        assert tokens["input_ids"].shape == (3, 16)
        assert (tokens["input_ids"][0, -1] == hf_tokenizer.pad_token_id).item()  # padded up to the end

    with torch.no_grad():
        image_ref = model.get_image_features(pixel_values=x).pooler_output  # transformers 5: an output object
        text_ref = model.get_text_features(**expected).pooler_output
        image, text = dual.encode_image(x), dual.encode_text(tokens)
    assert image.shape == (2, dual.embed_dim) and text.shape == (3, dual.embed_dim)
    assert _max_diff(image, image_ref) <= TOL
    assert _max_diff(text, text_ref) <= TOL
    assert image.abs().mean() > 0.1 and text.abs().mean() > 0.1  # not a degenerate comparison

    # The image tower is the same function, through the Encoder face.
    tower = create_encoder(str(folder))
    assert isinstance(tower, ImageTower) and tower.num_features == dual.embed_dim
    with torch.no_grad():
        assert torch.equal(tower(x), image)


def test_transformers_save_reload(hf_folders, x, tmp_path):
    _, _, folder = hf_folders["siglip"]
    dual = create_dual_encoder(str(folder))
    dual.save(tmp_path / "again")
    again = create_dual_encoder(str(tmp_path / "again"))
    assert again.preprocess == dual.preprocess
    tokens = dual.tokenizer(TEXTS)
    assert all(torch.equal(tokens[k], again.tokenizer(TEXTS)[k]) for k in tokens)
    with torch.no_grad():
        assert torch.equal(again.encode_image(x), dual.encode_image(x))
        assert torch.equal(again.encode_text(tokens), dual.encode_text(tokens))


def test_transformers_missing_weight_key_is_an_error(hf_folders, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(hf_folders["clip"][2], folder)
    state = load_file(folder / "model.safetensors")
    state.pop("text_projection.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CvfmError, match=r"do not match its architecture \(missing keys: text_projection\.weight"
    ):
        create_dual_encoder(str(folder))


def test_image_only_folder_is_not_a_dual_encoder(tmp_path):
    cfg = transformers.ViTConfig(**SMALL, image_size=32, patch_size=8)
    transformers.ViTModel(cfg).save_pretrained(tmp_path / "vit")
    with pytest.raises(UsageError, match=r"is an image-only model \(ViTModel\): it has no text tower"):
        create_dual_encoder(str(tmp_path / "vit"))


def test_uncached_transformers_model_offline(empty_hf_cache):
    with pytest.raises(
        UsageError, match=r"'hf/openai/clip-vit-base-patch32' is not in the local Hugging Face cache"
    ):
        create_dual_encoder("hf/openai/clip-vit-base-patch32")


# --------------------------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory):
    """A tiny random open_clip CLIP written by open_clip itself (`push_to_hf_hub.save_for_hf`,
    safetensors only): open_clip_config.json + open_clip_model.safetensors."""
    from open_clip.push_to_hf_hub import save_for_hf

    spec = tmp_path_factory.mktemp("open_clip_spec")
    (spec / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": OPEN_CLIP_PREPROCESS})
    )
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{spec}")  # no weights there: random init
    folder = tmp_path_factory.mktemp("open_clip")
    no_tokenizer_files = types.SimpleNamespace(
        save_pretrained=lambda dest: None
    )  # the default BPE is built in
    save_for_hf(model, no_tokenizer_files, OPEN_CLIP_CFG, folder, safe_serialization=True)
    assert sorted(p.name for p in folder.iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    return folder


def _reference(folder):
    return open_clip.create_model(f"local-dir:{folder}").eval(), open_clip.get_tokenizer(
        f"local-dir:{folder}"
    )


def _assert_open_clip_parity(dual, ref, ref_tokenizer, x):
    tokens = dual.tokenizer(TEXTS)
    assert set(tokens) == {"input_ids"}
    assert tokens["input_ids"].dtype == torch.long and tokens["input_ids"].shape == (3, 16)
    assert torch.equal(tokens["input_ids"], ref_tokenizer(TEXTS))
    with torch.no_grad():
        image, text = dual.encode_image(x), dual.encode_text(tokens)
        image_ref, text_ref = ref.encode_image(x), ref.encode_text(ref_tokenizer(TEXTS))
    assert image.shape == (2, 24) and text.shape == (3, 24)
    assert _max_diff(image, image_ref) <= TOL
    assert _max_diff(text, text_ref) <= TOL
    assert image.abs().mean() > 0.1 and text.abs().mean() > 0.1
    assert torch.equal(dual.logit_scale, ref.logit_scale)
    return image, text


@pytest.mark.parametrize("how", ["local-dir", "folder"])
def test_open_clip_parity(open_clip_folder, x, how):
    ref, ref_tokenizer = _reference(open_clip_folder)
    model_id = f"open_clip/local-dir:{open_clip_folder}" if how == "local-dir" else str(open_clip_folder)
    dual = create_dual_encoder(model_id)
    assert isinstance(dual, OpenCLIPDualEncoder) and dual.name == model_id
    assert dual.embed_dim == 24 and not dual.model.training
    _assert_open_clip_parity(dual, ref, ref_tokenizer, x)

    # Preprocessing comes from open_clip's preprocess_cfg (shortest-side resize, centre crop).
    pre = dual.preprocess
    assert (pre.size, pre.crop_pct, pre.interpolation) == (32, 1.0, "bilinear")
    assert pre.mean == tuple(OPEN_CLIP_PREPROCESS["mean"]) and pre.std == tuple(OPEN_CLIP_PREPROCESS["std"])

    tower = create_encoder(model_id)
    assert isinstance(tower, ImageTower) and isinstance(tower, Encoder) and tower.num_features == 24
    with torch.no_grad():
        assert _max_diff(tower(x), ref.encode_image(x)) <= TOL


def test_open_clip_save_round_trip(open_clip_folder, x, tmp_path):
    dual = create_dual_encoder(str(open_clip_folder))
    saved = dual.save(tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    config = json.loads((saved / "open_clip_config.json").read_text())
    assert config["model_cfg"] == OPEN_CLIP_CFG
    assert config["preprocess_cfg"] == {**OPEN_CLIP_PREPROCESS, "resize_mode": "shortest"}

    # open_clip itself loads what cvfm wrote, with identical outputs.
    ref, ref_tokenizer = _reference(saved)
    image, text = _assert_open_clip_parity(dual, ref, ref_tokenizer, x)
    with torch.no_grad():
        assert torch.equal(ref.encode_image(x), image) and torch.equal(
            ref.encode_text(ref_tokenizer(TEXTS)), text
        )
    assert ref.visual.preprocess_cfg["mean"] == OPEN_CLIP_PREPROCESS["mean"]

    again = create_dual_encoder(str(saved))
    assert again.preprocess == dual.preprocess
    with torch.no_grad():
        assert torch.equal(again.encode_image(x), image)

    # As a cvfm run folder's backbone/, through both doors.
    shutil.copytree(saved, tmp_path / "run" / "backbone")
    run = str(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(create_dual_encoder(run).encode_text(dual.tokenizer(TEXTS)), text)
        assert torch.equal(create_encoder(run)(x), image)


def test_open_clip_random_init_differs(open_clip_folder, x):
    # Guards the parity tests against comparing two things that are always equal.
    loaded = create_dual_encoder(str(open_clip_folder))
    torch.manual_seed(1)
    fresh = create_dual_encoder(str(open_clip_folder), pretrained=False)
    with torch.no_grad():
        assert _max_diff(fresh.encode_image(x), loaded.encode_image(x)) > 1e-2


def test_open_clip_never_unpickles(open_clip_folder, tmp_path, monkeypatch, x):
    folder = tmp_path / "both"
    shutil.copytree(open_clip_folder, folder)
    torch.save(load_file(folder / "open_clip_model.safetensors"), folder / "open_clip_pytorch_model.bin")

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    dual = create_dual_encoder(str(folder))  # the safetensors file is read, the pickle never opened
    ref, _ = _reference(open_clip_folder)
    with torch.no_grad():
        assert _max_diff(dual.encode_image(x), ref.encode_image(x)) <= TOL

    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(UsageError, match=r"has only pickle weights \(open_clip_pytorch_model\.bin\)"):
        create_dual_encoder(str(folder))


def test_open_clip_tokenizer_pickles(open_clip_folder, hf_folders):
    for dual in (create_dual_encoder(str(open_clip_folder)), create_dual_encoder(str(hf_folders["clip"][2]))):
        again = pickle.loads(pickle.dumps(dual.tokenizer))
        a, b = dual.tokenizer(TEXTS), again(TEXTS)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("text_projection"), r"Missing key\(s\).*\"text_projection\""),
        (
            lambda s: s.__setitem__("text_proj", s.pop("text_projection")),
            r"Unexpected key\(s\).*\"text_proj\"",
        ),
        (lambda s: s.__setitem__("ln_final.weight", torch.ones(63)), r"size mismatch for ln_final\.weight"),
    ],
    ids=["missing", "renamed", "mis-shaped"],
)
def test_open_clip_weight_mismatch_is_an_error(open_clip_folder, tmp_path, edit, match):
    folder = tmp_path / "broken"
    shutil.copytree(open_clip_folder, folder)
    state = load_file(folder / "open_clip_model.safetensors")
    edit(state)
    save_file(state, folder / "open_clip_model.safetensors")
    with pytest.raises(
        CvfmError, match=rf"weights of '{folder}' do not match its architecture: .*{match}"
    ) as info:
        create_dual_encoder(str(folder))
    assert not isinstance(info.value, UsageError)


def test_open_clip_arch_random_init_offline():
    dual = create_dual_encoder("open_clip/ViT-S-32", pretrained=False)
    assert isinstance(dual, OpenCLIPDualEncoder) and dual.embed_dim == 384
    assert dual.preprocess.size == 224 and dual.preprocess.mean == pytest.approx(
        (0.48145466, 0.4578275, 0.40821073)
    )
    assert dual.tokenizer(["a cat"])["input_ids"].shape == (1, 77)
    assert dual.model_cfg == open_clip.get_model_config("ViT-S-32")


def test_open_clip_tag_preprocessing_without_weights():
    # A tag names weights and their preprocessing; with pretrained=False only the latter applies.
    cfg = open_clip.get_pretrained_cfg("MobileCLIP2-S0", "dfndr2b")
    assert (cfg["mean"], cfg["std"], cfg["interpolation"]) == ((0.0,) * 3, (1.0,) * 3, "bilinear")
    dual = create_dual_encoder("open_clip/MobileCLIP2-S0:dfndr2b", pretrained=False)
    assert dual.preprocess.mean == (0.0,) * 3 and dual.preprocess.std == (1.0,) * 3
    assert dual.preprocess.interpolation == "bilinear"
    assert dual.preprocess.size == open_clip.get_model_config("MobileCLIP2-S0")["vision_cfg"]["image_size"]


# ------------------------------------------------------------------------------ open_clip from the hub
# A stand-in for a warm Hugging Face cache: `hf_hub_download` (cvfm's and open_clip's) serves files from
# local folders, so the hub and pretrained-tag code paths run offline, and every requested file is logged.

HUB_REPO, PICKLE_REPO, TINY_ARCH = "cvfm-test/tiny-open-clip", "cvfm-test/pickled", "cvfm-test-tiny"


@pytest.fixture
def fake_hub(monkeypatch, open_clip_folder, tmp_path):
    import huggingface_hub
    import open_clip.pretrained
    from huggingface_hub.errors import EntryNotFoundError

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(open_clip_folder / "open_clip_config.json", pickled)
    state = load_file(open_clip_folder / "open_clip_model.safetensors")
    torch.save(state, pickled / "open_clip_pytorch_model.bin")
    repos, requested = {HUB_REPO: open_clip_folder, PICKLE_REPO: pickled}, []

    def hf_hub_download(repo_id, filename, *args, **kwargs):
        requested.append((repo_id, filename))
        path = repos[repo_id] / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hf_hub_download)
    # A built-in architecture with two pretrained tags stored in HUB_REPO (one trained with QuickGELU).
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_ARCH, OPEN_CLIP_CFG)
    tag = {"hf_hub": f"{HUB_REPO}/", "mean": (0.1, 0.2, 0.3), "std": (0.3,) * 3, "interpolation": "bicubic"}
    tags = {"plain": {**tag, "resize_mode": "shortest"}, "quick": {**tag, "quick_gelu": True}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_ARCH, tags)
    return requested


def test_open_clip_hub_repo_parity(fake_hub, x):
    model_id = f"open_clip/hf-hub:{HUB_REPO}"
    dual = create_dual_encoder(model_id)
    assert "open_clip_pytorch_model.bin" not in {f for _, f in fake_hub}  # only safetensors asked for
    ref = open_clip.create_model(f"hf-hub:{HUB_REPO}").eval()  # open_clip's own hub loading
    _assert_open_clip_parity(dual, ref, open_clip.get_tokenizer(f"hf-hub:{HUB_REPO}"), x)
    assert dual.preprocess.mean == tuple(OPEN_CLIP_PREPROCESS["mean"])
    with torch.no_grad():
        assert torch.equal(create_encoder(model_id)(x), dual.encode_image(x))


def test_open_clip_hub_repo_without_safetensors_is_refused(fake_hub):
    with pytest.raises(UsageError, match=r"publishes no safetensors weights.*cvfm reads no pickle files"):
        create_dual_encoder(f"open_clip/hf-hub:{PICKLE_REPO}")
    assert (PICKLE_REPO, "open_clip_pytorch_model.bin") not in fake_hub  # never even downloaded
    random_init = create_dual_encoder(f"open_clip/hf-hub:{PICKLE_REPO}", pretrained=False)  # config only
    assert random_init.model_cfg == OPEN_CLIP_CFG


def test_open_clip_pretrained_tag_parity(fake_hub, x):
    dual = create_dual_encoder(f"open_clip/{TINY_ARCH}:plain")
    ref = open_clip.create_model(TINY_ARCH, pretrained="plain").eval()
    _assert_open_clip_parity(dual, ref, open_clip.get_tokenizer(TINY_ARCH), x)
    assert (dual.preprocess.mean, dual.preprocess.std) == ((0.1, 0.2, 0.3), (0.3, 0.3, 0.3))
    assert (HUB_REPO, "open_clip_model.safetensors") in fake_hub
    assert all(f.endswith(".safetensors") for _, f in fake_hub)


def test_open_clip_quick_gelu_tag_builds_quick_gelu(fake_hub, x):
    # open_clip only warns when a QuickGELU tag is loaded into a GELU config; cvfm builds what was trained.
    dual = create_dual_encoder(f"open_clip/{TINY_ARCH}:quick")
    assert dual.model_cfg["quick_gelu"] is True
    with pytest.warns(UserWarning, match="QuickGELU mismatch"):
        open_clip.create_model(TINY_ARCH, pretrained="quick")
    ref = open_clip.create_model(TINY_ARCH, pretrained="quick", force_quick_gelu=True).eval()
    _assert_open_clip_parity(dual, ref, open_clip.get_tokenizer(TINY_ARCH), x)
    plain = create_dual_encoder(f"open_clip/{TINY_ARCH}:plain")
    with torch.no_grad():
        assert _max_diff(dual.encode_image(x), plain.encode_image(x)) > 1e-3  # same weights, other activation


@pytest.mark.parametrize(
    "model_id",
    ["open_clip/ViT-B-32:laion2b_s34b_b79k", "open_clip/hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"],
)
def test_uncached_open_clip_weights_offline(empty_hf_cache, model_id):
    message = (
        rf"'{model_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it"
    )
    with pytest.raises(UsageError, match=message):
        create_dual_encoder(model_id)
    with pytest.raises(UsageError, match=message):
        create_encoder(model_id)


def test_unknown_open_clip_arch_and_tag():
    with pytest.raises(UsageError, match=r"open_clip has no model 'ViT-B-3' \(did you mean: .*ViT-B-32\b"):
        create_dual_encoder("open_clip/ViT-B-3:openai")
    with pytest.raises(
        UsageError, match=r"has no pretrained tag 'laion9b' \(tags: openai, .*laion2b_s34b_b79k"
    ):
        create_dual_encoder("open_clip/ViT-B-32:laion9b")
    with pytest.raises(
        UsageError, match=r"'open_clip/ViT-B-32' names no weights: use open_clip/ViT-B-32:<tag>"
    ):
        create_encoder("open_clip/ViT-B-32")
    with pytest.raises(UsageError, match="does not exist"):
        create_dual_encoder("open_clip/local-dir:/no/such/folder")
    with pytest.raises(UsageError, match=r"open_clip models take no overrides \(got: depth\)"):
        create_encoder("open_clip/ViT-S-32", pretrained=False, depth=2)


def test_list_models_open_clip_rows():
    assert not any(r["source"] == "open_clip" for r in list_models("*"))  # only when asked for
    archs = list_models("open_clip/ViT-B-32*", sources=("cvfm", "open_clip"))
    row = next(r for r in archs if r["id"] == "open_clip/ViT-B-32")
    assert row == {
        "id": "open_clip/ViT-B-32",
        "source": "open_clip",
        "arch": "ViT-B-32",
        "kind": "image-text",
        "input_size": 224,
        "description": "open_clip model (weights: add :<tag>)",
    }
    assert not any(":" in r["id"] for r in archs)
    tagged = [r["id"] for r in list_models("open_clip/ViT-B-32:*", sources=("open_clip",))]
    assert tagged == [f"open_clip/ViT-B-32:{t}" for t in open_clip.list_pretrained_tags_by_model("ViT-B-32")]
    assert "open_clip/ViT-B-32:laion2b_s34b_b79k" in tagged


# --------------------------------------------------------------------------------------------- cvfm/tiny-clip


def test_tiny_clip_save_reload_is_identical(x, tmp_path):
    dual = create_dual_encoder("cvfm/tiny-clip").eval()
    assert isinstance(dual, HFDualEncoder) and dual.embed_dim == 64 and dual.preprocess.size == 32
    dual.save(tmp_path / "tiny")
    again = create_dual_encoder(str(tmp_path / "tiny"))
    assert again.preprocess == dual.preprocess
    tokens = dual.tokenizer(TEXTS)
    again_tokens = again.tokenizer(TEXTS)
    assert set(tokens) == set(again_tokens) and all(torch.equal(tokens[k], again_tokens[k]) for k in tokens)
    with torch.no_grad():
        assert torch.equal(again.encode_image(x), dual.encode_image(x))
        assert torch.equal(again.encode_text(tokens), dual.encode_text(tokens))
        assert torch.equal(again.logit_scale, dual.logit_scale)


def test_tiny_clip_tokenizer_covers_any_text():
    tok = build_tokenizer(64)
    for text in ["a photo of a red giraffe", "naïve café ☃ 日本語", "Zebra!!  xylophone-42\tok"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.convert_tokens_to_ids(BOS) and ids[-1] == tok.convert_tokens_to_ids(EOS)
        assert tok.unk_token_id not in ids[1:-1]  # unknown words fall back to byte tokens
        decoded = tok.decode(ids, skip_special_tokens=True)
        # CLIP lower-cases, and splits punctuation and digits off words (decoded with spaces between).
        assert decoded.replace(" ", "") == "".join(text.lower().split())
    assert tok.decode(tok("a photo of a red giraffe")["input_ids"], skip_special_tokens=True) == (
        "a photo of a red giraffe"
    )
    for word in [*ANIMAL_CLASSES, *DIGIT_CLASSES, *COLOURS]:  # the built-in sets' words are whole tokens
        assert tok.tokenize(word) == [f"{word}</w>"], word
    assert len(tok.tokenize("xylophone")) > 1  # ... while an unseen word is pieced together


def test_tiny_clip_image_encoder_is_its_image_tower(x):
    torch.manual_seed(0)
    enc = create_encoder("cvfm/tiny-clip").eval()
    assert isinstance(enc, ImageTower) and isinstance(enc, Encoder)
    assert enc.num_features == 64 and enc.preprocess == enc.dual.preprocess
    with torch.no_grad():
        out = enc.encode(x)
        assert out.patch_tokens is None
        assert torch.equal(out.pooled, enc.dual.encode_image(x))
        direct = enc.dual.model.get_image_features(pixel_values=x).pooler_output
    assert _max_diff(out.pooled, direct) <= TOL
