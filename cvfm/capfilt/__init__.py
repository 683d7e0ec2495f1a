"""CapFilt (Li et al. 2022, BLIP): caption web image-text pairs with a captioner, keep the captions the
image-text matcher accepts.

For each pair the captioner samples `num_captions` synthetic captions (nucleus sampling, top-p 0.9,
after a prompt); the ITM head scores the web caption and every synthetic one; captions with a match
probability >= the threshold are kept (duplicates of a kept caption and empty ones are dropped). See
`run.capfilt` for the files, `rules` for the decisions and `models` for the batch-independent sampling.

Output, one JSON line per usable input line (the input record's fields are kept as they are):

    {"id": <input id, or "<file name>:<line>">, "image": ..., "text": ..., <other input fields>,
     "line": <input line number>,
     "captions": [<kept captions: the web one first, then synthetic, in order>],
     "scores": [{"caption": ..., "source": "web"|"synthetic", "itm": <P(match)>, "kept": true|false,
                 "reason": "itm 0.31 < 0.5"|"duplicate"|"empty"  (dropped captions only)}, ...]}

Rejects, one per unusable line: `{"line", "id"?, "kind": "malformed"|"image", "input": <the raw
line>, "error"}`. Input fields named "line", "captions" or "scores" make a line a reject (they would be
overwritten). Blank lines are skipped; every other line is in exactly one of the two files.
"""

from cvfm.capfilt.models import itm_scores, sample_captions
from cvfm.capfilt.rules import filter_captions
from cvfm.capfilt.run import capfilt

__all__ = ["capfilt", "filter_captions", "itm_scores", "sample_captions"]
