"""`cvfm caption`: BLIP captions for every image of a source (`caption`, in run.py).

Images stream through a DataLoader (decoded in worker processes) in a fixed grid of batches: batch k
holds source rows [k * batch_size, (k + 1) * batch_size). Each batch's sampling randomness is seeded by
(seed, k), so a caption depends only on the settings, never on where a run was interrupted.

Output: one JSON line per image, `{"id", "image", "caption"}` (`"captions": [...]` with
`num_captions > 1`), in source order, to stdout (`"-"`) or a file. From stdin to stdout the lines are
followed as they arrive (`follow_stdin`), in whole batches of the same grid. A file output is resumable:

    out.jsonl            the captions, appended batch by batch (flushed and fsynced after each batch)
    out.jsonl.json       the settings it was produced with (written first, atomically)
    out.jsonl.rejects    one JSON line per unreadable image `{"id", "image", "reason"}` (when any)

A rerun with the same settings drops a truncated last line (a kill in mid-write), keeps every complete
line and computes only the batches that still miss an id (captions or rejects), writing just the missing
rows, so the final file equals an uninterrupted run's. Other settings are a usage error unless
`overwrite=True`; a file without its settings sidecar is never overwritten silently.
"""

from cvfm.caption.run import caption

__all__ = ["caption"]
