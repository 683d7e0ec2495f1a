"""open_clip image-text models behind cvfm's `DualEncoder` face.

The model is built by `open_clip.create_model(..., load_weights=False)` (architecture only: open_clip
never opens a checkpoint itself), then cvfm loads a `.safetensors` file it chose with open_clip's own
`load_checkpoint(strict=True)`, which reads safetensors through `safetensors.torch.load_file`. So no
pickle file is ever opened, whatever else a folder or hub repo holds.

`save()` writes open_clip's hub layout (`open_clip_config.json` with `model_cfg` and `preprocess_cfg`,
weights in `open_clip_model.safetensors`), which `open_clip.create_model("local-dir:<folder>")` loads.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from cvfm.data.preprocess import from_open_clip
from cvfm.errors import CvfmError, UsageError
from cvfm.models.dual import DualEncoder

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# open_clip's preference among a folder's checkpoints (factory._find_checkpoint_in_dir), safetensors only.
_SAFE_WEIGHTS = (WEIGHTS_FILE, "open_clip_pytorch_model.safetensors", "model.safetensors")
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


class OpenCLIPTokenizer:
    """An open_clip tokenizer (SimpleTokenizer, HFTokenizer, ...) returning `{"input_ids": (B, L) long}`,
    padded to the model's context length as open_clip does. Picklable (DataLoader workers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.context_length = int(tokenizer.context_length)

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer(list(texts)).long()}


class OpenCLIPDualEncoder(DualEncoder):
    """An open_clip model (CLIP, CustomTextCLIP, ...), its tokenizer and the `model_cfg` it was built from
    (kept so that `save()` writes a config open_clip can rebuild the same architecture from)."""

    def __init__(self, model: nn.Module, tokenizer, name: str, model_cfg: dict):
        super().__init__()
        self.model, self.name, self.model_cfg = model, name, copy.deepcopy(model_cfg)
        self.open_clip_tokenizer = tokenizer
        self._tokenizer = OpenCLIPTokenizer(tokenizer)
        self.embed_dim = int(model_cfg["embed_dim"])
        self.preprocess = from_open_clip(model.visual.preprocess_cfg)  # open_clip's own transform

    @property
    def tokenizer(self) -> OpenCLIPTokenizer:
        return self._tokenizer

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=False)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode_text(tokens["input_ids"], normalize=False)

    def save(self, folder: str | Path) -> Path:
        """open_clip's hub layout, as `open_clip.push_to_hf_hub.save_for_hf` writes it (safetensors only):
        config, weights and, for a transformers-backed tokenizer, its files (open_clip reads them back
        from a `local-dir:` folder)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        pp = self.model.visual.preprocess_cfg
        preprocess_cfg = {
            k: _jsonable(pp[k]) for k in ("mean", "std", "interpolation", "resize_mode") if k in pp
        }
        if pp.get("fill_color"):  # open_clip's save leaves it out; kept when it is not the default (0)
            preprocess_cfg["fill_color"] = pp["fill_color"]
        config = {"model_cfg": self.model_cfg, "preprocess_cfg": preprocess_cfg}
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt"})
        if hasattr(self.open_clip_tokenizer, "save_pretrained"):
            self.open_clip_tokenizer.save_pretrained(folder)
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return folder


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def build(
    model_name: str,
    tokenizer_name: str,
    model_cfg: dict,
    weights: Path | None,
    name: str,
    **create_kwargs,
) -> OpenCLIPDualEncoder:
    """`open_clip.create_model(model_name)` without any checkpoint (nor default tower weights), then the
    `weights` safetensors file loaded strictly; `weights=None` keeps the random initialisation.

    Raises what open_clip raises while building (missing configs, uncached tokenizers); the caller turns
    those into cvfm errors. A weights file that does not fit the architecture is a CvfmError."""
    import open_clip

    # open_clip logs "No pretrained weights loaded ... initialized randomly": untrue once cvfm loads them.
    quiet = weights is not None
    with _drop_root_warning("No pretrained weights loaded") if quiet else contextlib.nullcontext():
        model = open_clip.create_model(
            model_name,
            load_weights=False,
            pretrained_image=False,
            pretrained_text=False,
            **create_kwargs,
        )
    if weights is not None:
        load_weights(model, weights, name)
    tokenizer = open_clip.get_tokenizer(tokenizer_name)
    return OpenCLIPDualEncoder(model.eval(), tokenizer, name, model_cfg)


@contextlib.contextmanager
def _drop_root_warning(prefix: str):
    """Hide root-logger records starting with `prefix` (open_clip logs through the root logger)."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def load_weights(model: nn.Module, path: Path, name: str) -> None:
    """open_clip's `load_checkpoint` (its key conversions for older checkpoints), strict, safetensors only."""
    import open_clip

    if Path(path).suffix != ".safetensors":
        raise UsageError(
            f"'{name}': {Path(path).name} is not a .safetensors file (cvfm reads no pickle files)"
        )
    try:
        open_clip.load_checkpoint(model, str(path), strict=True)
    except Exception as e:  # noqa: BLE001 (safetensors, key and shape errors all mean: these weights do not fit)
        detail = " ".join(str(e).split())[:600]
        raise CvfmError(f"weights of '{name}' do not match its architecture: {detail}") from None


def find_weights(folder: Path, name: str) -> Path:
    """The safetensors checkpoint open_clip would pick in `folder`; pickle-only folders are refused."""
    for candidate in _SAFE_WEIGHTS:
        if (folder / candidate).is_file():
            return folder / candidate
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found[0]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise UsageError(
            f"'{name}' has only pickle weights ({', '.join(pickles)}): cvfm reads .safetensors files only"
        )
    raise UsageError(f"'{name}' has an {CONFIG_FILE} but no .safetensors weights")


def read_config(folder: Path, name: str) -> dict:
    """`open_clip_config.json`'s content; `model_cfg` must be there (as open_clip requires)."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"'{name}': cannot read {CONFIG_FILE}: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise UsageError(f"'{name}': {CONFIG_FILE} has no 'model_cfg' section")
    return config
