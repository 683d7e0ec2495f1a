"""Data curation over `cvfm embed` output, as DINOv2's LVD-142M and SemDeDup: deduplicate, decontaminate,
cluster (hierarchical k-means), sample balanced subsets, retrieve around seed images.

Each step writes `OUT/decisions.parquet` (one row per input row: id, image, kept, reason, and the step's
fields) and `OUT/kept.jsonl` (a manifest of the kept items that any `--data` takes), so nothing is
dropped silently. Embeddings are read memory-mapped (`EmbeddingPool`), k-means and nearest-neighbour
search run on faiss in blocks.
"""

from cvfm.curate.decisions import Decisions, check_output, write_decisions
from cvfm.curate.decontaminate import decontaminate
from cvfm.curate.dedup import dedup
from cvfm.curate.inputs import EmbedOptions
from cvfm.curate.kmeans import nearest, train_kmeans
from cvfm.curate.pool import EmbeddingPool
from cvfm.curate.retrieve import retrieve

__all__ = [
    "Decisions",
    "EmbedOptions",
    "EmbeddingPool",
    "check_output",
    "decontaminate",
    "dedup",
    "nearest",
    "retrieve",
    "train_kmeans",
    "write_decisions",
]
