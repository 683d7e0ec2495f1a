"""cvfm curate: SemDeDup against a brute-force reference, exact duplicates, decontamination, retrieval, the
decisions / kept.jsonl outputs, and the CLI on a real embed run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from clitools import assert_usage_error, one_json_line
from PIL import Image

import cvfm
from cvfm.curate import EmbeddingPool, decontaminate, dedup, retrieve
from cvfm.data.sources import open_source
from cvfm.embed.folder import EmbedFolder


def write_pool(path: Path, x: np.ndarray, *, ids=None, images=None, labels=None, parts: int = 2) -> Path:
    """An embed output folder holding the rows `x` (in `parts` parts), as cvfm embed writes one."""
    n = len(x)
    ids = ids or [f"item{i:03d}" for i in range(n)]
    images, labels = images or ids, labels or [None] * n
    config = {"cvfm_version": cvfm.__version__, "model": "test/planted", "data": "planted", "split": None}
    config |= {"modalities": ["image"], "num_parts": parts, "num_rows": n}
    folder = EmbedFolder(path, config, ("image",))
    folder.write_config()
    for p, rows in enumerate(np.array_split(np.arange(n), parts)):
        columns = {k: [v[i] for i in rows] for k, v in {"id": ids, "image": images, "label": labels}.items()}
        folder.write_part(p, {"image": x[rows].astype(np.float32)}, columns, [], {"label": "string"})
    return path


def strings(column) -> list[str | None]:
    """A string column of decisions.parquet with its nulls as None (pandas reads them as NaN)."""
    return [v if isinstance(v, str) else None for v in column]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted(n: int = 120, d: int = 16, seed: int = 0) -> np.ndarray:
    """Random unit rows with near-copies planted: rows 80-99 copy rows 0-19 closely (noise 0.02), rows
    100-119 copy rows 20-39 loosely (noise 0.25), so different eps find different duplicates."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x[80:100] = x[0:20] + 0.02 * rng.normal(size=(20, d)) * np.linalg.norm(x[0:20], axis=1, keepdims=True)
    x[100:120] = x[20:40] + 0.25 * rng.normal(size=(20, d)) * np.linalg.norm(x[20:40], axis=1, keepdims=True)
    return unit(x).astype(np.float32)


def brute_force(x, cluster, distance, keep, eps, against, seed=0) -> np.ndarray:
    """The reference, one item at a time: for each row, the row it duplicates (-1: kept)."""
    sim = x.astype(np.float64) @ x.astype(np.float64).T
    of = np.full(len(x), -1)
    rng = np.random.default_rng(seed)
    for c in np.unique(cluster):
        members = np.flatnonzero(cluster == c)
        if keep == "random":
            order = members[rng.permutation(len(members))]
        else:
            key = -distance[members] if keep == "hard" else distance[members]
            order = members[np.lexsort((members, key))]
        kept = []
        for pos, i in enumerate(order):
            earlier = kept if against == "kept" else list(order[:pos])
            if earlier and sim[i, earlier].max() > 1 - eps:
                of[i] = earlier[int(np.argmax(sim[i, earlier]))]
            else:
                kept.append(i)
    return of


@pytest.mark.parametrize(
    ("keep", "against", "clusters"),
    [
        ("hard", "kept", 1),
        ("easy", "kept", 3),
        ("random", "kept", 3),
        ("hard", "any", 3),
        ("random", "any", 1),
    ],
)
def test_semdedup_matches_brute_force(tmp_path, keep, against, clusters):
    x = planted()
    pool = write_pool(tmp_path / "emb", x)
    eps = [0.01, 0.1, 0.5]
    summary = dedup(
        str(pool),
        tmp_path / "out",
        eps=eps,
        keep=keep,
        against=against,
        clusters=clusters,
        exact=False,
        seed=3,
    )
    d = pd.read_parquet(tmp_path / "out" / "decisions.parquet")
    assert d["cluster"].nunique() == clusters
    ids = np.array(d["id"])
    for e, row in zip(eps, summary["eps"], strict=True):
        of = brute_force(x, d["cluster"].to_numpy(), d["distance"].to_numpy(), keep, e, against, seed=3)
        expected = [ids[i] if i >= 0 else None for i in of]
        assert strings(d[f"duplicate_of_eps{e:g}"]) == expected
        np.testing.assert_array_equal(d[f"kept_eps{e:g}"], of < 0)
        assert row["kept"] == int((of < 0).sum())
        dropped = of >= 0
        sims = np.einsum("ij,ij->i", x[dropped], x[of[dropped]])
        np.testing.assert_allclose(d[f"similarity_eps{e:g}"][dropped], sims, atol=1e-5)
        assert d[f"similarity_eps{e:g}"][~dropped].isna().all()
    # The close copies (sim ~ 0.9998) go at every eps: one of each planted pair is dropped.
    close = d["kept_eps0.01"].to_numpy()
    assert not (close[0:20] & close[80:100]).any()
    # The first eps is the main decision; its reasons name the item kept instead.
    np.testing.assert_array_equal(d["kept"], d["kept_eps0.01"])
    for reason, of in zip(d["reason"], strings(d["duplicate_of"]), strict=True):
        assert reason == ("kept" if of is None else f"near-duplicate-of {of}")


def test_semdedup_in_small_blocks_equals_one_block():
    from cvfm.curate.semdedup import find_duplicates

    x = planted()
    order = [np.random.default_rng(1).permutation(len(x))]
    for against in ("kept", "any"):
        whole = find_duplicates(x, order, [0.1, 0.5], against=against)
        blocks = find_duplicates(x, order, [0.1, 0.5], against=against, block_rows=7)
        for a, b in zip(whole, blocks, strict=True):
            np.testing.assert_array_equal(a.of, b.of)
            np.testing.assert_allclose(a.similarity, b.similarity, atol=1e-6)


def test_greedy_rule_differs_from_the_reference_on_a_chain(tmp_path):
    """a ~ b ~ c with a and c apart: against kept items c stays (b was dropped); SemDeDup's code drops it."""
    a = np.array([1.0, 0.0])
    b = np.array([np.cos(0.3), np.sin(0.3)])
    c = np.array([np.cos(0.6), np.sin(0.6)])
    x = np.stack([a, b, c, [-1.0, 0.0]]).astype(np.float32)  # hard: a (farthest from the mean) first
    pool = write_pool(tmp_path / "emb", x, parts=1)
    eps = float(1 - np.cos(0.4))  # b is within eps of a and of c; a and c are not
    for against, kept in (("kept", [True, False, True, True]), ("any", [True, False, False, True])):
        dedup(str(pool), tmp_path / against, eps=[eps], against=against, clusters=1, exact=False)
        d = pd.read_parquet(tmp_path / against / "decisions.parquet")
        assert list(d["kept"]) == kept, (against, d[["id", "distance", "reason"]])


def test_exact_duplicates_are_byte_identical_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        p = Path("photos") / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    shutil.copy(paths[1], "photos/renamed.png")  # same bytes, other name
    Image.open(paths[2]).save("photos/resaved.bmp")  # same pixels, other bytes: not exact
    paths += [Path("photos/renamed.png"), Path("photos/resaved.bmp"), Path("photos/gone.png")]
    x = unit(rng.normal(size=(7, 8))).astype(np.float32)  # embeddings far apart: only exact duplicates go
    pool = write_pool(tmp_path / "emb", x, ids=[p.name for p in paths], images=[str(p) for p in paths])
    summary = dedup("emb", "out", eps=[0.01])
    d = pd.read_parquet("out/decisions.parquet")
    assert list(d["reason"][:6]) == ["kept"] * 4 + ["exact-duplicate-of 1.png", "kept"]
    assert d["reason"][6].startswith("unreadable: ") and "gone.png" in d["reason"][6]
    assert list(d["kept"]) == [True] * 4 + [False, True, False]
    sha = strings(d["sha256"])
    assert sha[4] == sha[1] and sha[5] != sha[2] and sha[6] is None
    assert d["similarity"][4] == 1.0
    assert summary["eps"][0] == {
        "eps": 0.01,
        "kept": 5,
        "near_duplicates": 0,
        "exact_duplicates": 1,
        "unreadable": 1,
        "dropped": 2,
    }
    assert EmbeddingPool(pool).ids == list(d["id"])


def test_decisions_cover_every_row_and_kept_jsonl_loads(tmp_path, monkeypatch):
    """Relative image paths (relative to where embed ran) become absolute; the manifest opens as --data
    and lists the kept items, dropped.txt the others, curate.json the counts."""
    monkeypatch.chdir(tmp_path)
    x = planted()
    names = [f"img/{c}/{i:03d}.png" for i, c in zip(range(len(x)), ["cat", "dog"] * 60, strict=True)]
    for name in names:
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(name.encode())  # distinct bytes; open_source lists files without decoding
    ids = [n.removeprefix("img/") for n in names]
    pool = write_pool(tmp_path / "emb", x, ids=ids, images=names, labels=[i[:3] for i in ids], parts=3)
    summary = dedup("emb", "out", eps=[0.05, 0.5], exact=False, clusters=2)
    d = pd.read_parquet("out/decisions.parquet")
    assert list(d["id"]) == EmbeddingPool(pool).ids and d["id"].is_unique and len(d) == len(x)
    kept_ids = list(d["id"][d["kept"]])
    source = open_source("out/kept.jsonl")
    assert [it.id for it in source.items] == kept_ids
    assert all(Path(it.ref).is_absolute() and Path(it.ref).is_file() for it in source.items)
    assert [it.ref for it in source.items] == [str(tmp_path / "img" / i) for i in kept_ids]
    assert source.classes == ["cat", "dog"]
    wider = open_source("out/kept_eps0.5.jsonl")
    assert [it.id for it in wider.items] == list(d["id"][d["kept_eps0.5"]]) and len(wider) < len(source)
    assert Path("out/dropped.txt").read_text().split() == list(d["id"][~d["kept"]])
    saved = json.loads(Path("out/curate.json").read_text())
    assert saved == {k: v for k, v in summary.items() if k != "eps"}
    assert saved["step"] == "dedup" and saved["kept"] + saved["dropped"] == len(x) == saved["rows"]
    assert saved["kept"] == len(kept_ids) and saved["settings"]["eps"] == [0.05, 0.5]


def test_decontaminate_drops_the_planted_copies_only(tmp_path):
    rng = np.random.default_rng(0)
    evaluation = unit(rng.normal(size=(30, 32)))
    x = unit(rng.normal(size=(200, 32)))
    copies = [5, 50, 51, 199]
    x[copies] = unit(evaluation[[0, 7, 7, 29]] + 0.01 * rng.normal(size=(4, 32)))  # an eval image twice
    pool = write_pool(tmp_path / "pool", x.astype(np.float32))
    ev = write_pool(tmp_path / "eval", evaluation.astype(np.float32), ids=[f"val{i}" for i in range(30)])
    summary = decontaminate(str(pool), str(ev), tmp_path / "out")
    d = pd.read_parquet(tmp_path / "out" / "decisions.parquet")
    assert list(np.flatnonzero(~d["kept"])) == copies and summary["dropped"] == 4
    assert list(d["contaminates"][copies]) == ["val0", "val7", "val7", "val29"]
    assert list(d["reason"][copies]) == [
        "contaminates val0",
        "contaminates val7",
        "contaminates val7",
        "contaminates val29",
    ]
    np.testing.assert_allclose(d["similarity"], (x @ evaluation.T).max(axis=1), atol=1e-5)
    assert (
        d["contaminates"][d["kept"]].isna().all()
        and d["similarity"].max() > 0.95 > d["similarity"][d["kept"]].max()
    )


def test_retrieve_keeps_the_brute_force_nearest_neighbours(tmp_path):
    rng = np.random.default_rng(0)
    x = unit(rng.normal(size=(150, 16))).astype(np.float32)
    seeds = unit(rng.normal(size=(6, 16))).astype(np.float32)
    pool = write_pool(tmp_path / "pool", x)
    seed_dir = write_pool(tmp_path / "seeds", seeds, ids=[f"s{i}" for i in range(6)], parts=1)
    retrieve(str(pool), str(seed_dir), tmp_path / "out", k=5)
    d = pd.read_parquet(tmp_path / "out" / "decisions.parquet")
    sim = seeds.astype(np.float64) @ x.T.astype(np.float64)
    top = np.argsort(-sim, axis=1)[:, :5]
    assert set(np.flatnonzero(d["kept"])) == set(top.ravel())
    counts = np.bincount(top.ravel(), minlength=len(x))
    np.testing.assert_array_equal(d["retrieved_by"], counts)
    for row in np.flatnonzero(d["kept"]):
        by = [s for s in range(6) if row in top[s]]
        best = max(by, key=lambda s: sim[s, row])
        assert d["seed"][row] == f"s{best}" and d["reason"][row] == f"retrieved-by s{best}"
        assert d["rank"][row] == list(top[best]).index(row) + 1
        assert d["similarity"][row] == pytest.approx(sim[best, row], abs=1e-5)
    assert d["seed"][~d["kept"]].isna().all() and set(d["reason"][~d["kept"]]) == {"not-retrieved"}


def test_retrieve_from_the_seeds_clusters(tmp_path):
    """A hand-made `curate cluster` output: three clusters around the axes; one seed near axis 1 takes
    cluster 1 (all of it, or --per-cluster items of it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    centroids = np.eye(3, 8, dtype=np.float32)
    cluster = np.repeat([0, 1, 2], 10)
    x = unit(centroids[cluster] + 0.1 * rng.normal(size=(30, 8))).astype(np.float32)
    pool = write_pool(tmp_path / "pool", x)
    ids = EmbeddingPool(pool).ids
    cdir = tmp_path / "clusters"
    cdir.mkdir()
    order = rng.permutation(30)  # by id, not by row order
    table = pa.table({"id": [ids[i] for i in order], "cluster_1": cluster[order], "cluster_2": [0] * 30})
    pq.write_table(table, cdir / "decisions.parquet")
    np.save(cdir / "centroids_1.npy", centroids)
    seed = unit(centroids[[1]] + 0.05).astype(np.float32)
    seeds = write_pool(tmp_path / "seeds", seed, ids=["q"], parts=1)

    retrieve(str(pool), str(seeds), tmp_path / "all", clusters=cdir)
    d = pd.read_parquet(tmp_path / "all" / "decisions.parquet")
    assert list(np.flatnonzero(d["kept"])) == list(range(10, 20))
    assert list(d["cluster"]) == list(cluster) and set(d["reason"][d["kept"]]) == {"cluster-of q"}
    np.testing.assert_allclose(d["similarity"][10:20], x[10:20] @ seed[0], atol=1e-5)

    retrieve(str(pool), str(seeds), tmp_path / "three", clusters=cdir, per_cluster=3, seed=1)
    d = pd.read_parquet(tmp_path / "three" / "decisions.parquet")
    taken = np.flatnonzero(d["kept"])
    assert len(taken) == 3 and set(taken) <= set(range(10, 20))

    pq.write_table(table.slice(0, 29), cdir / "decisions.parquet")  # one pool item not clustered
    with pytest.raises(cvfm.UsageError, match="does not cover the pool"):
        retrieve(str(pool), str(seeds), tmp_path / "partial", clusters=cdir)


def test_existing_output_and_incomplete_embed_are_refused(cli, tmp_path):
    pool = write_pool(tmp_path / "emb", planted())
    out = tmp_path / "out"
    first = one_json_line(
        cli("curate", "dedup", pool, "-o", out, "--eps", "0.05", "--eps", "0.5", "--no-exact")
    )
    assert (out / "kept_eps0.5.jsonl").is_file()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_usage_error(cli("curate", "dedup", pool, "-o", out), str(out), "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite replaces the outputs, the file of an eps not asked for again included.
    again = one_json_line(cli("curate", "dedup", pool, "-o", out, "--no-exact", "--overwrite"))
    assert again["kept"] == first["kept"] and not (out / "kept_eps0.5.jsonl").exists()
    assert json.loads((out / "curate.json").read_text())["settings"]["eps"] == [0.05]

    (pool / "metadata" / "metadata_1.parquet").unlink()  # a part not finished
    assert_usage_error(cli("curate", "dedup", pool, "-o", tmp_path / "o2"), "incomplete", "rerun")
    assert_usage_error(
        cli("curate", "dedup", tmp_path, "-o", tmp_path / "o3"), "not a cvfm embed output", "--model"
    )
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random picture (resizing and JPEG barely change it)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    channels = [np.sin(rng.uniform(1, 6) * xx + rng.uniform(1, 6) * yy + rng.uniform(0, 6)) for _ in range(3)]
    return ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)


def test_cli_on_images_with_a_model(cli, tmp_path, monkeypatch):
    """Images of odd sizes, embedded by `--model cvfm/pixels` into OUT/embeddings: a byte copy goes as an
    exact duplicate, a resized JPEG of another as a near duplicate; decontaminate and retrieve reuse the
    embed output; kept.jsonl feeds `cvfm embed --data`."""
    monkeypatch.chdir(tmp_path)
    sizes = [(23, 37), (64, 48), (31, 31), (50, 17), (40, 70), (33, 45)]
    for i, (h, w) in enumerate(sizes):
        Path("photos").mkdir(exist_ok=True)
        Image.fromarray(_smooth(h, w, i)).save(f"photos/p{i}.png")
    shutil.copy("photos/p0.png", "photos/z_copy.png")
    Image.open("photos/p1.png").resize((40, 53)).save("photos/z_small.jpg", quality=90)
    r = cli("curate", "dedup", "photos", "--model", "cvfm/pixels", "-o", "dedup", "--num-workers", "0")
    summary = one_json_line(r)
    assert "eps" in r.err and "dropped %" in r.err  # the table, on stderr
    d = pd.read_parquet("dedup/decisions.parquet")
    reasons = dict(zip(d["id"], d["reason"], strict=True))
    assert reasons["z_copy.png"] == "exact-duplicate-of p0.png"
    pair = {reasons["p1.png"], reasons["z_small.jpg"]}  # which one stays is --keep's choice
    assert pair in ({"kept", "near-duplicate-of p1.png"}, {"kept", "near-duplicate-of z_small.jpg"})
    assert summary["kept"] == 6 and summary["dropped"] == 2
    assert len(open_source("dedup/kept.jsonl")) == 6 and Path("dedup/embeddings/embed.json").is_file()

    # decontaminate against a folder of evaluation images, embedded with the same model
    Path("val").mkdir()
    Image.open("photos/p3.png").save("val/v.png")
    emb = "dedup/embeddings"
    r = cli(
        "curate",
        "decontaminate",
        emb,
        "--against",
        "val",
        "--model",
        "cvfm/pixels",
        "-o",
        "clean",
        "--num-workers",
        "0",
    )
    clean = pd.read_parquet("clean/decisions.parquet")
    assert one_json_line(r)["dropped"] == 1 and list(clean["id"][~clean["kept"]]) == ["p3.png"]

    r = cli("curate", "retrieve", emb, "--seeds", "clean/embeddings-against", "-k", "2", "-o", "near")
    near = pd.read_parquet("near/decisions.parquet")
    assert one_json_line(r)["kept"] == 2 and near["kept"][list(near["id"]).index("p3.png")]

    r = cli("embed", "cvfm/pixels", "--data", "dedup/kept.jsonl", "-o", "-", "--num-workers", "0")
    assert r.code == 0 and len(r.lines) == 6


def test_in_memory_images_get_dropped_ids_not_a_manifest(cli, tmp_path):
    r = cli(
        "curate",
        "dedup",
        "builtin:digits",
        "--split",
        "test",
        "--model",
        "cvfm/pixels",
        "-o",
        tmp_path / "o",
        "--num-workers",
        "0",
    )
    summary = one_json_line(r)
    assert "--exclude" in summary["no_manifest"] and not (tmp_path / "o" / "kept.jsonl").exists()
    d = pd.read_parquet(tmp_path / "o" / "decisions.parquet")
    assert d["sha256"].notna().all()  # the pixel arrays, read from the reopened data
    dropped = (tmp_path / "o" / "dropped.txt").read_text().split()
    assert dropped == list(d["id"][~d["kept"]]) and len(d) == summary["rows"]


def test_nearest_walks_keys_and_queries_in_blocks():
    """A pool larger than a block is searched block by block, the blocks' results merged: the same
    neighbours as one exact search."""
    from cvfm.curate.kmeans import nearest

    rng = np.random.default_rng(0)
    queries, keys = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(500, 8)).astype(np.float32)
    scores, ids = nearest(queries, keys, 5, block_rows=64)
    expected = np.argsort(-(queries @ keys.T), axis=1)[:, :5]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ keys.T, expected, axis=1), rtol=1e-5)
