"""The pure part of CapFilt: which captions of a pair survive, and the run's tallies.

A caption is kept when its ITM match probability is at least the threshold, it is not empty, and it is
not a duplicate of a caption kept before it (compared case-, space- and end-punctuation-insensitively).
Kept captions keep their order: the web caption first, then the synthetic ones as generated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

WEB, SYNTHETIC = "web", "synthetic"
BINS = 10


def normalize(caption: str) -> str:
    """The form duplicates are compared in: lower case, single spaces, no trailing punctuation."""
    return re.sub(r"\s+", " ", caption).strip().lower().rstrip(" .,;:!?")


def below_reason(score: float, threshold: float) -> str:
    """`"itm 0.31 < 0.5"`: the score is truncated (never rounded up to look like the threshold)."""
    shown = math.floor(score * 100) / 100
    return f"itm {shown:.2f} < {threshold:g}"


def filter_captions(
    web: str,
    synthetic: list[str],
    web_score: float,
    synthetic_scores: list[float],
    threshold: float = 0.5,
) -> dict:
    """Decide every caption of one pair. Returns `{"captions": [kept, in order], "scores": [{"caption",
    "source": "web"|"synthetic", "itm", "kept", "reason"?}]}` (web first, then synthetic in order)."""
    if len(synthetic) != len(synthetic_scores):
        raise ValueError(f"{len(synthetic)} synthetic captions but {len(synthetic_scores)} scores")
    rows = [(web, WEB, float(web_score))] + [
        (c, SYNTHETIC, float(s)) for c, s in zip(synthetic, synthetic_scores, strict=True)
    ]
    kept: list[str] = []
    seen: set[str] = set()
    scores = []
    for caption, source, score in rows:
        entry: dict = {"caption": caption, "source": source, "itm": score, "kept": False}
        key = normalize(caption)
        if not key:
            entry["reason"] = "empty"
        elif score < threshold:
            entry["reason"] = below_reason(score, threshold)
        elif key in seen:
            entry["reason"] = "duplicate"
        else:
            entry["kept"] = True
            kept.append(caption)
            seen.add(key)
        scores.append(entry)
    return {"captions": kept, "scores": scores}


def reason_kind(reason: str) -> str:
    """ "itm" for a score below the threshold, else the reason itself ("duplicate", "empty")."""
    return "itm" if reason.startswith("itm ") else reason


def histogram_bin(score: float) -> int:
    """Bin of a probability in 10 equal bins over [0, 1] (1.0 falls in the last)."""
    return min(BINS - 1, max(0, int(score * BINS)))


@dataclass
class Tally:
    """Counts over output records and rejects: the summary of a (possibly resumed) run."""

    pairs: int = 0
    rejects: int = 0
    web_kept: int = 0
    synthetic: int = 0
    synthetic_kept: int = 0
    dropped: dict = field(default_factory=lambda: {WEB: {}, SYNTHETIC: {}})
    reject_kinds: dict = field(default_factory=dict)
    histogram: dict = field(default_factory=lambda: {WEB: [0] * BINS, SYNTHETIC: [0] * BINS})

    def add_record(self, record: dict) -> None:
        self.pairs += 1
        for s in record["scores"]:
            source = s["source"]
            self.histogram[source][histogram_bin(s["itm"])] += 1
            if source == SYNTHETIC:
                self.synthetic += 1
            if s["kept"]:
                if source == WEB:
                    self.web_kept += 1
                else:
                    self.synthetic_kept += 1
            else:
                kind = reason_kind(s.get("reason", ""))
                self.dropped[source][kind] = self.dropped[source].get(kind, 0) + 1

    def add_reject(self, reject: dict) -> None:
        self.rejects += 1
        kind = reject.get("kind", "other")
        self.reject_kinds[kind] = self.reject_kinds.get(kind, 0) + 1

    def as_dict(self) -> dict:
        return {
            "total": self.pairs + self.rejects,
            "pairs": self.pairs,
            "web_kept": self.web_kept,
            "synthetic": self.synthetic,
            "synthetic_kept": self.synthetic_kept,
            "dropped": self.dropped,
            "rejects": self.rejects,
            "reject_kinds": self.reject_kinds,
            "histogram": {"edges": [i / BINS for i in range(BINS + 1)], **self.histogram},
        }


def format_summary(summary: dict) -> str:
    """The summary as plain text lines for stderr (counts, drop reasons, the ITM histogram)."""
    lines = [
        f"capfilt: {summary['total']} lines: {summary['pairs']} pairs, {summary['rejects']} rejects "
        f"({summary['written']} written now, {summary['already_done']} already done)",
        f"  kept: web {summary['web_kept']}/{summary['pairs']}, "
        f"synthetic {summary['synthetic_kept']}/{summary['synthetic']}",
    ]
    for source in (WEB, SYNTHETIC):
        drops = summary["dropped"][source]
        if drops:
            lines.append(f"  dropped {source}: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())))
    if summary["reject_kinds"]:
        lines.append(
            "  rejects: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["reject_kinds"].items()))
        )
    hist, edges = summary["histogram"], summary["histogram"]["edges"]
    lines.append(f"  {'ITM score':<10} {'web':>8} {'synthetic':>10}")
    for i in range(BINS):
        lines.append(f"  {edges[i]:.1f}-{edges[i + 1]:.1f}    {hist[WEB][i]:>8} {hist[SYNTHETIC][i]:>10}")
    return "\n".join(lines)
