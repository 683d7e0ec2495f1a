"""What a curation step reads: a `cvfm embed` output folder, or images (any `--data` spec) and a model,
embedded first into the step's output folder (a rerun resumes the embedding where it stopped)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cvfm.curate.pool import EmbeddingPool
from cvfm.embed.folder import CONFIG_FILE
from cvfm.errors import UsageError


@dataclass(frozen=True)
class EmbedOptions:
    """How a step embeds images given instead of an embed output (`model` None: embed outputs only)."""

    model: str | None = None
    split: str | None = None
    batch_size: int = 256
    num_workers: int = 2

    def open(self, spec: str, embed_to: Path, what: str = "EMBED_DIR") -> EmbeddingPool:
        return open_pool(
            spec,
            embed_to,
            model=self.model,
            split=self.split,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            what=what,
        )


def open_pool(
    spec: str,
    embed_to: Path,
    *,
    model: str | None = None,
    split: str | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    what: str = "EMBED_DIR",
) -> EmbeddingPool:
    """The pool of `spec`: an embed output folder as it is, or (with `model`) the images of the data spec
    `spec` embedded by `model` into `embed_to`."""
    if (Path(spec) / CONFIG_FILE).is_file():
        pool = EmbeddingPool(spec)
        if model is not None and model != pool.config["model"]:
            raise UsageError(
                f"{what} '{spec}' holds embeddings of {pool.config['model']}, not of --model {model}: "
                "leave --model out to use them, or give the images"
            )
        return pool
    if model is None:
        raise UsageError(
            f"{what} '{spec}' is not a cvfm embed output (no {CONFIG_FILE}): give the folder cvfm embed "
            "wrote, or images with --model to embed them first"
        )
    from cvfm.embed import embed

    embed(model, spec, str(embed_to), split=split, batch_size=batch_size, num_workers=num_workers)
    return EmbeddingPool(embed_to)


def describe(pool: EmbeddingPool, **others: EmbeddingPool) -> dict:
    """What a step read, for curate.json: the pool's folder, model and data, and each other input's."""
    out = {"pool": str(pool.path.absolute()), "model": pool.config["model"], "data": pool.config["data"]}
    for name, other in others.items():
        out |= {
            name: str(other.path.absolute()),
            f"{name}_data": other.config["data"],
            f"{name}_rows": len(other),
        }
    return out


def check_same_space(pool: EmbeddingPool, other: EmbeddingPool, what: str) -> None:
    """Refuse to compare embeddings of two different models (or sizes): their similarities mean nothing."""
    mine, theirs = (pool.config["model"], pool.dim), (other.config["model"], other.dim)
    if mine != theirs:
        raise UsageError(
            f"{what} was embedded by {theirs[0]} ({theirs[1]} dims), the pool by {mine[0]} ({mine[1]} dims): "
            "embed both with the same model"
        )
