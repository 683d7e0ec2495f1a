"""A classifier: a registry backbone and a head from its pooled features to class logits.

This is the model that machine unlearning edits: `cvfm finetune` trains one (the whole network, or a
head on a frozen backbone), `cvfm unlearn` changes it, `cvfm evaluate unlearning` audits it. The head is
a `LinearHead` (standardised features -> logits) or a `KnnHead` (a bank of L2-normalised training
features voting as in `cvfm.models.knn`; forgetting an item drops its row).

Saved as a folder: classifier.json (format, head kind, classes, provenance, the bank's item ids),
backbone/ (`Encoder.save`, loadable by the registry) and head.safetensors. Loading is strict: a head
file with missing or unexpected tensors is an error, never a partial load.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cvfm.data.views import Preprocess
from cvfm.errors import CvfmError, UsageError
from cvfm.models.encoder import Encoder
from cvfm.models.knn import knn_predict_scores

FORMAT = "cvfm-classifier"
CONFIG_FILE = "classifier.json"
HEAD_FILE = "head.safetensors"


class LinearHead(nn.Module):
    """logits = linear((features - mean) / std); mean / std are zeros / ones when features are used as is
    (full fine-tuning), the training features' statistics for a probe on a frozen backbone."""

    kind = "linear"

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


class KnnHead(nn.Module):
    """Weighted k-NN (Wu et al. 2018; DINO's eval_knn.py): each of the k nearest bank rows (cosine
    similarity s) votes for its label with weight exp(s / T). `forward` returns log(vote share + 1e-8).

    `bank` rows must be L2-normalised (`KnnHead.fit` normalises raw features); `ids[i]` names row i's item.
    """

    kind = "knn"

    def __init__(
        self,
        bank: torch.Tensor,
        labels: torch.Tensor,
        ids: list[str],
        num_classes: int,
        k: int = 20,  # DINO's k-NN evaluation: k = 20, T = 0.07
        temperature: float = 0.07,
    ):
        super().__init__()
        if bank.shape[0] != len(ids) or labels.shape[0] != len(ids):
            raise CvfmError(f"k-NN bank of {bank.shape[0]} rows, {labels.shape[0]} labels and {len(ids)} ids")
        if k < 1:
            raise UsageError(f"k must be at least 1, got {k}")
        self.register_buffer("bank", bank.float())
        self.register_buffer("labels", labels.long())
        self.ids, self.num_classes, self.k, self.temperature = list(ids), num_classes, k, temperature

    @classmethod
    def fit(
        cls, features: torch.Tensor, labels: torch.Tensor, ids: list[str], num_classes: int, **kw
    ) -> KnnHead:
        """A head whose bank is `features`, L2-normalised."""
        return cls(F.normalize(features.float(), dim=1), labels, ids, num_classes, **kw)

    @torch.no_grad()
    def votes(self, features: torch.Tensor) -> torch.Tensor:
        """Summed vote weights per class (N, C): `knn_predict_scores` over the bank."""
        if len(self.ids) == 0:
            raise CvfmError("the k-NN head has an empty bank")
        if features.shape[0] == 0:
            return torch.zeros(0, self.num_classes, device=self.bank.device)
        k, t = self.k, self.temperature
        return knn_predict_scores(self.bank, self.labels, features, k, self.num_classes, t)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        votes = self.votes(features)
        return torch.log(votes / votes.sum(dim=1, keepdim=True) + 1e-8)

    def without(self, ids: Iterable[str]) -> KnnHead:
        """This head with the rows of `ids` dropped (exact forgetting for a k-NN classifier)."""
        gone = set(ids)
        keep = [i for i, item in enumerate(self.ids) if item not in gone]
        if not keep:
            raise UsageError("forgetting these ids would leave the k-NN bank empty")
        index = torch.tensor(keep, dtype=torch.long, device=self.bank.device)
        return KnnHead(
            self.bank[index],
            self.labels[index],
            [self.ids[i] for i in keep],
            self.num_classes,
            k=self.k,
            temperature=self.temperature,
        )


class Classifier(nn.Module):
    """A backbone encoder and a head from its pooled features to class logits (B, C).

    `frozen`: the backbone was never trained on the classification data (a probe or a k-NN head).
    `backbone`: the registry id the encoder was built from. `fit`: how a frozen head was fitted.
    """

    def __init__(
        self,
        encoder: Encoder,
        head: LinearHead | KnnHead,
        classes: list[str],
        *,
        frozen: bool,
        backbone: str | None = None,
        fit: dict | None = None,
    ):
        super().__init__()
        if len(classes) < 2:
            raise UsageError(f"a classifier needs at least 2 classes, got {len(classes)}")
        self.encoder, self.head, self.classes, self.frozen = encoder, head, list(classes), frozen
        self.backbone = backbone or encoder.name
        self.fit = dict(fit or {})

    @property
    def preprocess(self) -> Preprocess:
        return self.encoder.preprocess

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def save(self, folder: str | Path) -> Path:
        """classifier.json + backbone/ + head.safetensors, loadable by `load_classifier(folder)`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "format": FORMAT,
            "head": self.head.kind,
            "classes": self.classes,
            "frozen": self.frozen,
            "backbone": self.backbone,
            "num_features": int(self.encoder.num_features),
        }
        if self.fit:
            config["fit"] = self.fit
        if isinstance(self.head, KnnHead):
            config.update(k=self.head.k, temperature=self.head.temperature, ids=self.head.ids)
        self.encoder.save(folder / "backbone")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(tensors, folder / HEAD_FILE, metadata={"format": "pt"})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return folder


def class_names(source) -> list[str]:
    """The class names of a labelled `ImageSource`: its own, else the label indices as strings."""
    if source.classes:
        return list(source.classes)
    return [str(i) for i in range(int(source.labels.max()) + 1)] if len(source) else []


def labelled_classes(source, data: str) -> list[str]:
    """`class_names(source)`; unlabelled data (`data` names it) is refused: a classifier needs labels."""
    if not source.has_labels:
        unlabelled = int((source.labels < 0).sum())
        raise UsageError(
            f"a classifier trains on labels, but {unlabelled} of the {len(source)} images of '{data}' have "
            'none (labels come from class sub-folders, a JSONL "label" field or an hf: label column)'
        )
    return class_names(source)


def is_classifier_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def load_classifier(folder: str | Path, load_backbone: Callable[[str], Encoder]) -> Classifier:
    """Rebuild `Classifier.save`'s folder: the backbone by `load_backbone(backbone folder)` (the registry's
    `create_encoder`), the head from safetensors; every head tensor must be present, expected and of the
    right shape."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise UsageError(f"'{folder}' holds no classifier (no {CONFIG_FILE})") from None
    except ValueError as e:
        raise CvfmError(f"'{folder / CONFIG_FILE}' is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CvfmError(f"'{folder / CONFIG_FILE}' is not a {FORMAT} file")
    if not (folder / HEAD_FILE).is_file():
        raise CvfmError(f"classifier '{folder}' has no {HEAD_FILE} (cvfm reads no pickle files)")
    encoder = load_backbone(str(folder / "backbone"))
    state = load_file(folder / HEAD_FILE)
    classes = list(config["classes"])
    if config["head"] == "linear":
        head: LinearHead | KnnHead = LinearHead(encoder.num_features, len(classes))
    elif config["head"] == "knn":
        ids = list(config.get("ids", []))
        rows = state["bank"].shape[0] if "bank" in state else len(ids)
        head = KnnHead(
            torch.zeros(len(ids), encoder.num_features),
            torch.zeros(len(ids), dtype=torch.long),
            ids,
            len(classes),
            k=int(config.get("k", 20)),
            temperature=float(config.get("temperature", 0.07)),
        )
        if rows != len(ids):
            raise CvfmError(f"classifier '{folder}': the k-NN bank has {rows} rows but {len(ids)} ids")
    else:
        raise CvfmError(f"classifier '{folder}' has an unknown head '{config['head']}' (linear or knn)")
    _load_strict(head, state, folder)
    return Classifier(
        encoder,
        head,
        classes,
        frozen=bool(config.get("frozen", False)),
        backbone=config.get("backbone"),
        fit=config.get("fit"),
    )


def _load_strict(head: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", wrong),
        )
        if keys
    ]
    if problems:
        raise CvfmError(
            f"head weights of classifier '{folder}' do not match its {head.kind} head ({'; '.join(problems)})"
        )
    head.load_state_dict(state, strict=True)
