"""Embed images and/or texts with any registry model: the clip-retrieval layout, or JSON lines.

Layout of an output folder (row i of every file of part p describes the same record):

    embed.json                        configuration; a rerun with the same one resumes
    img_emb/img_emb_{p}.npy           float32 (n_p, D), L2-normalised unless asked not to
    text_emb/text_emb_{p}.npy         the texts' embeddings, when a text column is embedded
    metadata/metadata_{p}.parquet     id, image, label, caption (written last: the part is done);
                                      label is the class name (or the integer label), null if unknown

Part p holds source rows [p * part_size, (p + 1) * part_size), minus unreadable images (dropped from
every file, listed in the summary). See `plan` for how shards and processes split the parts.
"""

from cvfm.embed.run import embed

embed_images = embed  # the name of the images-only function this grew from

__all__ = ["embed", "embed_images"]
