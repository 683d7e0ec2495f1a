"""Each model family is preprocessed exactly as its own library does, for any image size and aspect ratio:
transformers' image processors (what `AutoImageProcessor.from_pretrained` returns), timm's
`create_transform(**resolve_data_config(model))`, open_clip's `image_transform`.

Real photos (scikit-learn's sample photos, fitted to odd sizes: wide, tall, odd and even crop margins,
smaller than the 32-px input) go through the model's preprocessing as a user loads it from a folder
(`create_encoder`, `create_dual_encoder`, `create_captioner`, `create_matcher`) and through the reference.
The pixels must agree within 1e-5 in normalised units (measured: 0.0, bit for bit, for every family), and
so must the end-to-end outputs: embeddings, ITM scores, captions."""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict

import open_clip
import pytest
import timm
import torch
import transformers
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image
from timm.data import create_transform, resolve_data_config
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from cvfm.data.preprocess import Preprocess, from_transformers
from cvfm.errors import CvfmError, UsageError
from cvfm.models.tiny_blip import build_tokenizer as blip_tokenizer
from cvfm.models.tiny_blip import tiny_blip_config
from cvfm.models.tiny_clip import build_tokenizer as clip_tokenizer
from cvfm.registry import create_captioner, create_dual_encoder, create_encoder, create_matcher

TOL = 1e-5
# W x H: near-square with an odd margin (85x81, 80x77), wide (75x55, 103x62, 200x47), tall (31x97), and
# smaller than the 32-px input on both sides (23x17).
SIZES = [(85, 81), (75, 55), (80, 77), (103, 62), (31, 97), (200, 47), (23, 17)]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
VISION = {**SMALL, "image_size": 32, "patch_size": 8}


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Crops of the two sample photos, fitted (centre crop to the aspect ratio, then Lanczos) to SIZES."""
    china, flower = (Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg"))
    return [
        ImageOps.fit((china, flower)[i % 2], size, Image.Resampling.LANCZOS) for i, size in enumerate(SIZES)
    ]


def _ours(preprocess: Preprocess, photos) -> torch.Tensor:
    transform = preprocess.transform()
    return torch.stack([torch.as_tensor(transform(p)) for p in photos])


def _assert_same_pixels(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    per_photo = (ours - ref).abs().amax(dim=(1, 2, 3))
    assert per_photo.max() <= TOL, dict(zip(SIZES, per_photo.tolist(), strict=True))


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max() <= TOL
    assert a.abs().mean() > 1e-3  # not a degenerate comparison


def _features(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


def _hf_folder(tmp_path, name: str, model, processor, tokenizer=None):
    folder = tmp_path / name
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    reference = transformers.AutoImageProcessor.from_pretrained(folder)  # what a user of transformers gets
    return folder, reference


# ------------------------------------------------------------------------------------ transformers: pixels

PROCESSORS = {
    "clip": lambda: transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ),
    "clip-crop-larger": lambda: transformers.CLIPImageProcessor(  # the crop pads the resized image
        size={"shortest_edge": 28}, crop_size={"height": 32, "width": 32}
    ),
    "siglip": lambda: transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2),
    "blip": lambda: transformers.BlipImageProcessor(size={"height": 32, "width": 32}),
    "dinov2": lambda: transformers.BitImageProcessor(
        size={"shortest_edge": 37}, crop_size={"height": 32, "width": 32}
    ),
    "vit": lambda: transformers.ViTImageProcessor(size={"height": 32, "width": 32}),
    "deit": lambda: transformers.DeiTImageProcessor(
        size={"height": 37, "width": 37}, crop_size={"height": 32, "width": 32}
    ),
    "dinov3": lambda: transformers.DINOv3ViTImageProcessor(size={"height": 32, "width": 32}),
    "convnext": lambda: transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875),
    "convnext-384": lambda: transformers.ConvNextImageProcessor(size={"shortest_edge": 384}),
    "sam": lambda: transformers.SamImageProcessor(
        size={"longest_edge": 48}, pad_size={"height": 48, "width": 48}
    ),
}
GEOMETRY = {  # (resize_mode, size, crop_pct, interpolation, resize_dtype) read from each processor
    "clip": ("shortest", 32, 1.0, "bicubic", "uint8"),
    "clip-crop-larger": ("shortest", 32, 32 / 28, "bicubic", "uint8"),
    "siglip": ("squash", 32, 1.0, "bilinear", "uint8"),
    "blip": ("squash", 32, 1.0, "bicubic", "uint8"),
    "dinov2": ("shortest", 32, 32 / 37, "bicubic", "uint8"),
    "vit": ("squash", 32, 1.0, "bilinear", "uint8"),
    "deit": ("squash", 32, 32 / 37, "bicubic", "uint8"),
    "dinov3": ("squash", 32, 1.0, "bilinear", "float32"),
    "convnext": ("shortest", 32, 32 / 36, "bicubic", "uint8"),
    "convnext-384": ("squash", 384, 1.0, "bicubic", "uint8"),
    "sam": ("longest", 48, 1.0, "bilinear", "uint8"),
}


@pytest.mark.parametrize("kind", PROCESSORS)
def test_transformers_processors_are_reproduced(tmp_path, photos, kind):
    PROCESSORS[kind]().save_pretrained(tmp_path)
    proc = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert proc.backend == "torchvision"  # transformers 5's default: the reference
    pre = from_transformers(proc)
    got = (pre.resize_mode, pre.size, pre.crop_pct, pre.interpolation, pre.resize_dtype)
    assert got == pytest.approx(GEOMETRY[kind]) and pre.library == "transformers"
    _assert_same_pixels(_ours(pre, photos), proc(images=photos, return_tensors="pt").pixel_values)
    # preprocess.json keeps all of it
    assert Preprocess.from_dict(json.loads(json.dumps(asdict(pre)))) == pre


def test_unsupported_processors_are_refused():
    class Custom(transformers.CLIPImageProcessor):
        def resize(self, image, size, **kwargs):  # any step of its own: cvfm could not follow it
            return super().resize(image, size, **kwargs)

    with pytest.raises(UsageError, match=r"as Custom does \(its own resize; cvfm follows"):
        from_transformers(Custom())
    with pytest.raises(UsageError, match=r"as CLIPImageProcessor does \(a non-square size"):
        from_transformers(transformers.CLIPImageProcessor(crop_size={"height": 224, "width": 192}))
    with pytest.raises(UsageError, match=r"as MobileViTImageProcessor does \(its own"):  # RGB to BGR
        from_transformers(transformers.MobileViTImageProcessor())
    with pytest.raises(UsageError, match=r"as CLIPImageProcessorPil does \(cvfm follows the torchvision"):
        from_transformers(transformers.CLIPImageProcessorPil())


# ---------------------------------------------------------------------- transformers: models, end to end


def _seeded(model_cls, config):
    torch.manual_seed(0)
    return model_cls(config).eval()


def _clip_like(kind: str):
    """A tiny random CLIPModel or SiglipModel, and a tokenizer its folder can hold (cvfm/tiny-clip's)."""
    tokenizer = clip_tokenizer()
    text = {**SMALL, "vocab_size": len(tokenizer.get_vocab()), "max_position_embeddings": 32}
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=24)
        return _seeded(transformers.CLIPModel, config), tokenizer
    config = transformers.SiglipConfig(text_config=text, vision_config=VISION)
    return _seeded(transformers.SiglipModel, config), tokenizer


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_image_text_embeddings_equal_the_reference(tmp_path, photos, kind):
    model, tokenizer = _clip_like(kind)
    folder, proc = _hf_folder(tmp_path, kind, model, PROCESSORS[kind](), tokenizer)
    dual = create_dual_encoder(str(folder))
    ours = _ours(dual.preprocess, photos)
    ref = proc(images=photos, return_tensors="pt").pixel_values
    _assert_same_pixels(ours, ref)
    with torch.no_grad():
        expected = _features(model.get_image_features(pixel_values=ref))
        _assert_close(dual.encode_image(ours), expected)
        _assert_close(create_encoder(str(folder))(ours), expected)  # its image tower, for `cvfm embed`


@pytest.mark.parametrize("kind", ["dinov2", "vit", "dinov3"])
def test_backbone_embeddings_equal_the_reference(tmp_path, photos, kind):
    model_cls, config_cls = {
        "dinov2": (transformers.Dinov2Model, transformers.Dinov2Config),
        "vit": (transformers.ViTModel, transformers.ViTConfig),
        "dinov3": (transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig),
    }[kind]
    model = _seeded(model_cls, config_cls(**VISION))
    folder, proc = _hf_folder(tmp_path, kind, model, PROCESSORS[kind]())
    encoder = create_encoder(str(folder))
    ours = _ours(encoder.preprocess, photos)
    ref = proc(images=photos, return_tensors="pt").pixel_values
    _assert_same_pixels(ours, ref)
    with torch.no_grad():
        _assert_close(encoder(ours), model(pixel_values=ref).last_hidden_state[:, 0])


def test_blip_captions_and_itm_equal_the_reference(tmp_path, photos):
    """BLIP's processor squashes a non-square photo to the square input (cvfm used to crop its centre)."""
    texts = ["a photo of a temple"] * len(photos)
    cap = _seeded(transformers.BlipForConditionalGeneration, tiny_blip_config(width=32, layers=1))
    folder, proc = _hf_folder(tmp_path, "cap", cap, PROCESSORS["blip"](), blip_tokenizer())
    captioner = create_captioner(str(folder))
    ours = _ours(captioner.preprocess, photos)
    ref = proc(images=photos, return_tensors="pt").pixel_values
    _assert_same_pixels(ours, ref)
    with torch.no_grad():
        ids = cap.generate(pixel_values=ref, num_beams=1, max_length=8, min_length=3)
    expected = [t.strip() for t in captioner.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    got = captioner.generate(ours, num_beams=1, max_length=8, min_length=3)
    assert [c[0] for c in got] == expected

    itm = _seeded(transformers.BlipForImageTextRetrieval, tiny_blip_config(width=32, layers=1))
    folder, proc = _hf_folder(tmp_path, "itm", itm, PROCESSORS["blip"](), blip_tokenizer())
    matcher = create_matcher(str(folder))
    ours = _ours(matcher.preprocess, photos)
    _assert_same_pixels(ours, ref)
    tokens = matcher.tokenize(texts)
    with torch.no_grad():
        logits = itm(pixel_values=ref, use_itm_head=True, **tokens).itm_score
    _assert_close(matcher.itm_probs(ours, texts), logits.softmax(-1)[:, 1])


# ----------------------------------------------------------------------------------------------------- timm


def _timm_reference(model, photos) -> torch.Tensor:
    transform = create_transform(**resolve_data_config({}, model=model))
    return torch.stack([transform(p) for p in photos])


def test_timm_model_by_name(photos):
    """resnet18's default (a1_in1k) data config: 224 px, crop_pct 0.95 (the short side to floor(235.8)),
    bicubic."""
    encoder = create_encoder(
        "timm/resnet18", pretrained=False, layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), stem_width=8
    )
    pre = encoder.preprocess
    assert (pre.library, pre.size, pre.crop_pct, pre.interpolation) == ("timm", 224, 0.95, "bicubic")
    ours, ref = _ours(pre, photos), _timm_reference(encoder.model, photos)
    _assert_same_pixels(ours, ref)
    with torch.no_grad():
        _assert_close(encoder(ours), encoder.model.forward_head(encoder.model.forward_features(ref), True))


@pytest.mark.parametrize(("crop_mode", "resize_mode"), [("squash", "squash"), ("border", "longest")])
def test_timm_folder_written_by_timm(tmp_path, photos, crop_mode, resize_mode):
    from timm.models import save_for_hf

    model = timm.create_model(
        "resnet18", num_classes=0, layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), stem_width=8
    )
    data = {"input_size": (3, 32, 32), "crop_pct": 0.9, "crop_mode": crop_mode, "interpolation": "bicubic"}
    save_for_hf(model, tmp_path, data_config=data, safe_serialization=True)
    reference = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    encoder = create_encoder(str(tmp_path)).eval()
    assert (encoder.preprocess.resize_mode, encoder.preprocess.crop_pct) == (resize_mode, 0.9)
    ours, ref = _ours(encoder.preprocess, photos), _timm_reference(reference, photos)
    _assert_same_pixels(ours, ref)
    with torch.no_grad():
        _assert_close(encoder(ours), reference(ref))

    # cvfm's own export writes the crop mode where timm reads it, and loads back the same
    encoder.save(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["pretrained_cfg"]["crop_mode"] == crop_mode
    assert create_encoder(str(tmp_path / "again")).preprocess == encoder.preprocess
    again = timm.create_model(f"local-dir:{tmp_path / 'again'}", pretrained=True)
    _assert_same_pixels(ours, _timm_reference(again, photos))


# ------------------------------------------------------------------------------------------------ open_clip

OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
def test_open_clip_resize_modes(tmp_path, photos, resize_mode):
    from open_clip.push_to_hf_hub import save_for_hf
    from open_clip.transform import PreprocessCfg, image_transform_v2

    spec, folder = tmp_path / "spec", tmp_path / "oc"
    spec.mkdir()
    pp = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "resize_mode": resize_mode}
    spec_config = {"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": pp}
    (spec / "open_clip_config.json").write_text(json.dumps(spec_config))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{spec}").eval()  # random init
    tokenizer = type("NoFiles", (), {"save_pretrained": lambda self, dest: None})()  # built-in BPE
    save_for_hf(model, tokenizer, OPEN_CLIP_CFG, folder, safe_serialization=True)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["fill_color"] = 90  # open_clip's save drops it; a hub config may hold it
    (folder / "open_clip_config.json").write_text(json.dumps(config))

    dual = create_dual_encoder(str(folder))
    assert (dual.preprocess.resize_mode, dual.preprocess.fill, dual.preprocess.library) == (
        resize_mode,
        90,
        "open_clip",
    )
    reference = open_clip.create_model(f"local-dir:{folder}").eval()
    transform = image_transform_v2(PreprocessCfg(**reference.visual.preprocess_cfg), is_train=False)
    ours, ref = _ours(dual.preprocess, photos), torch.stack([transform(p) for p in photos])
    _assert_same_pixels(ours, ref)
    with torch.no_grad():
        _assert_close(dual.encode_image(ours), reference.encode_image(ref))
    assert create_dual_encoder(str(dual.save(tmp_path / "again"))).preprocess == dual.preprocess


# ------------------------------------------------------------------------- cvfm's own convention, storage


def _old_transform(size: int, mean, std, crop_pct: float, interpolation: str) -> T.Compose:
    """cvfm's evaluation transform before this change, for files that predate it."""
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(
                int(round(size / crop_pct)), interpolation=InterpolationMode(interpolation), antialias=True
            ),
            T.CenterCrop(size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )


def test_presets_and_old_preprocess_json_keep_their_numerics(tmp_path, photos):
    old = {
        "size": 32,
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.2, 0.3],
        "crop_pct": 0.8,
        "interpolation": "bilinear",
    }
    model = _seeded(transformers.ViTModel, transformers.ViTConfig(**VISION))
    model.save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocess.json").write_text(json.dumps(old))  # as cvfm wrote it before
    loaded = create_encoder(str(tmp_path / "vit")).preprocess
    assert (loaded.library, loaded.resize_mode) == ("cvfm", "shortest")
    before = _old_transform(**{**old, "mean": tuple(old["mean"]), "std": tuple(old["std"])})
    for preprocess, reference in [
        (loaded, before),
        (
            create_encoder("cvfm/tiny-resnet").preprocess,
            _old_transform(32, (0.5,) * 3, (0.5,) * 3, 1.0, "bicubic"),
        ),
    ]:
        for p in photos:
            assert torch.equal(preprocess.transform()(p), reference(p))

    (tmp_path / "vit" / "preprocess.json").write_text(json.dumps({**old, "resize_mode": "sideways"}))
    with pytest.raises(CvfmError, match="preprocess.json: resize_mode 'sideways' is not one of"):
        create_encoder(str(tmp_path / "vit"))


@pytest.mark.parametrize(
    "preprocess",
    [
        Preprocess(size=32),
        Preprocess(size=32, resize_mode="longest", library="transformers"),
        Preprocess(size=32, resize_dtype="float32", library="transformers"),
        Preprocess(size=32, crop_pct=0.9, resize_mode="longest", library="timm"),
        Preprocess(size=32, resize_mode="squash", library="open_clip"),
    ],
    ids=lambda p: f"{p.library}-{p.resize_mode}-{p.resize_dtype}",
)
def test_transforms_pickle_for_dataloader_workers(photos, preprocess):
    transform = preprocess.transform()
    again = pickle.loads(pickle.dumps(transform))
    assert torch.equal(torch.as_tensor(again(photos[1])), torch.as_tensor(transform(photos[1])))


def test_preprocess_rejects_what_no_library_does():
    with pytest.raises(ValueError, match="the cvfm convention resizes the shortest side only"):
        Preprocess(resize_mode="squash")
    with pytest.raises(ValueError, match="library 'pillow' is not one of"):
        Preprocess(library="pillow")
    with pytest.raises(ValueError, match="unknown keys colour"):
        Preprocess.from_dict({"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "colour": 1})
