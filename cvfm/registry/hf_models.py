"""transformers models: `hf/<repo-id>` ids and `save_pretrained` folders (config.json with "model_type").

One loader per kind: a vision backbone (AutoModel; a CLIP-like model gives its image tower), an image-text
model (CLIP, SigLIP, ...), BLIP's captioner and matcher, SAM-family segmenters and open-vocabulary
detectors (OWL-ViT, OWLv2, Grounding DINO, with their processors). Weights must match the architecture
exactly.
"""

from __future__ import annotations

from pathlib import Path

from cvfm.data.preprocess import Preprocess, from_transformers
from cvfm.errors import CvfmError, UsageError
from cvfm.models.blip import Captioner, Matcher
from cvfm.models.detector import DETECTOR_TYPES, Detector
from cvfm.models.dual import HFDualEncoder, is_dual_model
from cvfm.models.encoder import Encoder, HFEncoder, check_loading_info, read_preprocess
from cvfm.models.segmenter import Segmenter
from cvfm.registry.hints import offline_hint
from cvfm.registry.source import Request, config_json


def is_folder(folder: Path) -> bool:
    return "model_type" in config_json(folder)


def load_encoder(repo: str, request: Request) -> Encoder:
    """A vision backbone; the image tower (and its projection) of an image-text model."""
    model, preprocess = hf_model(repo, request)
    if is_dual_model(model):
        return HFDualEncoder(model, hf_tokenizer(repo, request), request.model_id, preprocess).image_encoder()
    return HFEncoder(model, request.model_id, preprocess)


def load_dual(repo: str, request: Request) -> HFDualEncoder:
    """An image-text model (`get_image_features` and `get_text_features`)."""
    model, preprocess = hf_model(repo, request)
    if not is_dual_model(model):
        raise UsageError(
            f"'{request.model_id}' is an image-only model ({type(model).__name__}): it has no text tower"
        )
    return HFDualEncoder(model, hf_tokenizer(repo, request), request.model_id, preprocess)


def load_captioner(repo: str, request: Request) -> Captioner:
    """A BLIP captioner (BlipForConditionalGeneration)."""
    from transformers import BlipForConditionalGeneration

    return _blip(repo, request, BlipForConditionalGeneration, Captioner)


def load_matcher(repo: str, request: Request) -> Matcher:
    """A BLIP image-text matcher, ITM and ITC heads (BlipForImageTextRetrieval)."""
    from transformers import BlipForImageTextRetrieval

    return _blip(repo, request, BlipForImageTextRetrieval, Matcher)


def load_segmenter(repo: str, request: Request) -> Segmenter:
    """A SAM or SAM-HQ model (AutoModel: SamModel, SamHQModel), preprocessed as its SamProcessor does."""
    model, preprocess = hf_model(repo, request)
    return Segmenter(model, request.model_id, preprocess)


def load_detector(repo: str, request: Request) -> Detector:
    """An open-vocabulary detector (AutoModelForZeroShotObjectDetection: OWL-ViT, OWLv2, Grounding DINO)
    with its processor (AutoProcessor), whose pre- and post-processing it uses."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    found = config_json(Path(repo)).get("model_type") if Path(repo).is_dir() else None
    if found is not None and found not in DETECTOR_TYPES:
        what = "an open-vocabulary detector (OWL-ViT, OWLv2, Grounding DINO)"
        raise UsageError(f"folder '{request.model_id}' holds a {found} model, not {what}")
    model = hf_weights(repo, request, AutoModelForZeroShotObjectDetection)
    try:
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=request.trust_remote_code)
    except (OSError, ValueError) as e:
        raise offline_hint(request.model_id, e) from None
    return Detector(model.eval(), processor, request.model_id)


def _blip(repo: str, request: Request, model_cls, face):
    name = request.model_id
    if Path(repo).is_dir():
        found = ", ".join(config_json(Path(repo)).get("architectures", [])) or "no transformers model"
        if model_cls.__name__ not in found.split(", "):
            raise UsageError(f"folder '{name}' holds {found}, not a {model_cls.__name__}")
    try:
        model, preprocess = hf_model(repo, request, model_cls)
    except CvfmError:
        raise
    except ValueError as e:  # e.g. a config of another model type
        raise UsageError(f"'{name}' is not a {model_cls.__name__}: {e}") from None
    return face(model, hf_tokenizer(repo, request), name, preprocess)


def hf_model(repo: str, request: Request, model_cls=None):
    """A transformers model (`model_cls`, default AutoModel) from the hub or a folder, and its
    preprocessing; weights must match the architecture."""
    model = hf_weights(repo, request, model_cls)
    preprocess = read_preprocess(Path(repo)) if Path(repo).is_dir() else None
    return model, preprocess or _hf_preprocess(repo, model, request.trust_remote_code)


def hf_weights(repo: str, request: Request, model_cls=None):
    """A transformers model (`model_cls`, default AutoModel; an Auto class or a model class) from the hub
    or a folder, its weights matching the architecture exactly (random weights unless `pretrained`)."""
    from transformers import AutoConfig, AutoModel

    model_cls = model_cls or AutoModel
    trust = request.trust_remote_code
    try:
        if request.pretrained:
            model, info = model_cls.from_pretrained(
                repo,
                output_loading_info=True,
                use_safetensors=True,
                ignore_mismatched_sizes=True,  # reported, then refused
                trust_remote_code=trust,
            )
            check_loading_info(info, request.model_id)
            return model
        config = AutoConfig.from_pretrained(repo, trust_remote_code=trust)
        if model_cls.__name__.startswith("Auto"):
            return model_cls.from_config(config, trust_remote_code=trust)
        return model_cls(config)
    except (OSError, ValueError) as e:
        if Path(repo).is_dir():
            raise CvfmError(f"cannot load transformers model from '{repo}': {e}") from None
        raise offline_hint(request.model_id, e) from None


def hf_tokenizer(repo: str, request: Request):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(repo, trust_remote_code=request.trust_remote_code)
    except (OSError, ValueError) as e:
        raise offline_hint(request.model_id, e) from None


def _hf_preprocess(repo: str, model, trust_remote_code: bool) -> Preprocess:
    """The repo's image processor, reproduced exactly (`from_transformers`); without one, the model
    config's image size and ImageNet normalisation."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(repo, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        proc = None
    if proc is not None:
        return from_transformers(proc)
    size = getattr(model.config, "image_size", 224)
    return Preprocess(size=size[0] if isinstance(size, (list, tuple)) else int(size))
