"""mmkit/build/condense.py and condense_stages.py: the condense pipeline on planted data (build.md §2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file

from mmkit.build import condense_stages as st
from mmkit.build.condense import CondenseConfig, pending_units, run
from mmkit.build.manifest import stable_view
from mmkit.config import load_config
from mmkit.errors import DataError, MmkitError

D = 8


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _axis(i: int, extra: dict[int, float] | None = None) -> np.ndarray:
    v = np.zeros(D)
    v[i] = 1.0
    for j, a in (extra or {}).items():
        v[j] = a
    return _unit(v)


def write_corpus(root: Path, x: np.ndarray, clip: np.ndarray, *, shard_rows: int = 5,
                 captions: list[str] | None = None) -> tuple[Path, Path]:
    """``pairs.jsonl`` (key k<i>) and mmkit-layout embedding shards for vectors ``x``."""
    root.mkdir(parents=True, exist_ok=True)
    pairs = root / "pairs.jsonl"
    with open(pairs, "w", encoding="utf-8") as fh:
        for i in range(len(x)):
            cap = captions[i] if captions else f"caption {i}"
            fh.write(json.dumps({"key": f"k{i}", "image": f"img{i}.jpg", "caption": cap}) + "\n")
    emb = root / "emb"
    emb.mkdir(exist_ok=True)
    for s in range(0, len(x), shard_rows):
        r = np.arange(s, min(s + shard_rows, len(x)))
        save_file({"row": r, "image": x[r].astype(np.float16), "clip_score": clip[r].astype(np.float32)},
                  str(emb / f"shard-{s // shard_rows:05d}.safetensors"))
    return pairs, emb


def cfg_for(pairs: Path, emb: Path, **flags) -> CondenseConfig:
    base = {"pairs": str(pairs), "embeddings": str(emb), "clip_band": (0.0, 1.0), "centroid_band": (0.0, 1.0),
            "target": 1000, "shard_rows": 4}
    return load_config(CondenseConfig, flags={**base, **flags})


def planted(root: Path) -> tuple[Path, Path, Path]:
    """build.md §2 test 1: centroids e0, e1, e2; cluster 1 holds 5 near-copies (rows 2-6) at
    known distances plus 3 well-separated points (rows 7-9); clusters 0 and 2 two points each."""
    copies = {2: 0.02, 3: 0.0, 4: 0.12, 5: 0.01, 6: 0.09}  # row -> offset along e3
    rows = {0: _axis(0, {4: 1.0}), 1: _axis(0, {5: 1.0}),
            **{r: _axis(1, {3: a}) for r, a in copies.items()},
            7: _axis(1, {4: 1.0}), 8: _axis(1, {5: 1.0}), 9: _axis(1, {6: 1.0}),
            10: _axis(2, {4: 1.0}), 11: _axis(2, {7: 1.0})}
    x = np.stack([rows[i] for i in range(12)]).astype(np.float32)
    clip = np.array([0.1, 0.2, 0.3, 0.5, 0.1, 0.5, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3])
    pairs, emb = write_corpus(root, x, clip)
    centroids = root / "centroids.npy"
    np.save(centroids, np.eye(3, D, dtype=np.float32))
    return pairs, emb, centroids


def kept_keys(out: Path) -> list[str]:
    return pq.read_table(out / "data" / "part-00000.parquet").column("key").to_pylist()


@pytest.mark.parametrize("representative, copy", [
    ("middle", "k2"),  # distances ascending: rows 3, 5, 2, 6, 4 -> position 2
    ("near", "k3"), ("far", "k4"),
    ("inner-middle", "k6"),  # to the copies' mean: rows 2, 5, 6, 3, 4 -> position 2
    ("clip-max", "k3"),  # 0.5 at rows 3 and 5: the smaller row
])
def test_planted_duplicates_collapse_to_one(tmp_path, representative, copy):
    pairs, emb, centroids = planted(tmp_path)
    x = np.stack([_axis(1, {3: a}) for a in (0.02, 0.0, 0.12, 0.01, 0.09)])
    assert (x @ x.T).min() >= 0.99
    out = tmp_path / "out"
    m = run(cfg_for(pairs, emb, centroids=str(centroids), representative=representative), out)
    others = ["k0", "k1", "k7", "k8", "k9", "k10", "k11"]
    assert kept_keys(out) == sorted([copy, *others], key=lambda k: int(k[1:]))
    dedup = next(s for s in m["metrics"]["stages"] if s["name"] == "dedup")
    assert dedup == {"name": "dedup", "in": 12, "kept": 8, "dropped": {"duplicate": 4}}
    table = pq.read_table(out / "data" / "part-00000.parquet").to_pylist()
    assert {r["key"]: r["cluster"] for r in table}[copy] == 1
    assert any("target_not_reached" in w for w in m["warnings"])


def test_bands_and_funnel_by_hand(tmp_path):
    """10 separated points in one cluster, clip 0.10..0.19: clip band [0.4, 0.6) keeps 0.15, 0.14;
    the centroid band [0, 0.5) of those keeps the one closer to the centroid."""
    x = np.stack([_axis(0, {1 + i % 7: 0.5 + 0.1 * i}) for i in range(10)]).astype(np.float32)
    clip = np.arange(10, 20) / 100
    pairs, emb = write_corpus(tmp_path, x, clip)
    np.save(tmp_path / "c.npy", np.eye(1, D, dtype=np.float32))
    m = run(cfg_for(pairs, emb, centroids=str(tmp_path / "c.npy"), clip_band=(0.4, 0.6), dedup_threshold=0.9999,
                    centroid_band=(0.0, 0.5), target=1), tmp_path / "out")
    # rows 5 (0.15) and 4 (0.14): cos to e0 falls with the offset 0.5 + 0.1 i, so row 4 ranks first
    assert kept_keys(tmp_path / "out") == ["k4"]
    stages = m["metrics"]["stages"]
    assert [(s["name"], s["in"], s["kept"]) for s in stages] == [
        ("embed", 10, 10), ("kmeans", 10, 10), ("assign", 10, 10), ("partition", 10, 10), ("dedup", 10, 10),
        ("clip-band", 10, 2), ("centroid-band", 2, 1), ("sample", 1, 1), ("export", 1, 1)]
    funnel = json.loads((tmp_path / "out" / "funnel.json").read_text())
    assert [f["kept"] for f in funnel] == [s["kept"] for s in stages]
    assert funnel[5] == {"stage": "clip-band", "in": 10, "kept": 2, "pct_of_stage_input": 20.0,
                         "pct_of_input": 20.0, "dropped": {"clip_band": 8}}
    assert all(f["in"] - f["kept"] == sum(f["dropped"].values()) for f in funnel)
    assert (tmp_path / "out" / "funnel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "funnel.csv").read_text().splitlines()[6] == "clip-band,10,2,20.00,20.00,clip_band=8"
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    assert {(d["key"], d["reason"]) for d in dropped} >= {("k9", "clip_band"), ("k5", "centroid_band")}


def _giant(tmp_path: Path, policy: str) -> tuple[dict, Path]:
    x = np.stack([_axis(0, {1 + i: 1.0}) for i in range(7)] + [_axis(1), _axis(2, {3: 1.0})]).astype(np.float32)
    pairs, emb = write_corpus(tmp_path, x, np.full(9, 0.3))
    np.save(tmp_path / "c.npy", np.eye(3, D, dtype=np.float32))
    out = tmp_path / f"out-{policy}"
    cfg = cfg_for(pairs, emb, centroids=str(tmp_path / "c.npy"), max_cluster_size=3, giant_cluster=policy,
                  work_dir=str(tmp_path / f"work-{policy}"))
    return run(cfg, out), out


def test_giant_cluster_drop_records_the_rows(tmp_path):
    m, out = _giant(tmp_path, "drop")
    assign = m["metrics"]["stages"][2]
    assert assign == {"name": "assign", "in": 9, "kept": 2, "dropped": {"giant_cluster": 7}}
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert [(d["key"], d["stage"], d["reason"]) for d in dropped] == [
        (f"k{i}", "assign", "giant_cluster") for i in range(7)]
    assert kept_keys(out) == ["k7", "k8"]


def test_giant_cluster_split_makes_ceil_n_over_max_subclusters(tmp_path):
    m, out = _giant(tmp_path, "split")
    bucket = st.load_tensors(tmp_path / "work-split" / "dedup" / "bucket-00000.safetensors")
    giant = bucket["cluster"] == 0
    assert sorted(np.unique(bucket["subcluster"][giant]).tolist()) == list(range(math.ceil(7 / 3)))
    assert m["metrics"]["stages"][4]["kept"] == 9  # seven separated points: nothing to remove


def _random_corpus(root: Path, n: int = 60) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((n // 3, D))
    x = np.concatenate([base, base + 0.01 * rng.standard_normal(base.shape), rng.standard_normal((n // 3, D))])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return write_corpus(root, x, rng.uniform(0.1, 0.4, n), shard_rows=7)


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def _manifest(out: Path) -> dict:
    m = stable_view(json.loads((out / "manifest.json").read_text()))
    m["config"].pop("work_dir")
    return m


def test_same_seed_same_output_and_resume_after_a_failure(tmp_path, monkeypatch):
    pairs, emb = _random_corpus(tmp_path)
    flags = dict(clusters=3, clip_band=(0.2, 0.9), centroid_band=(0.1, 0.8), target=12, buckets=2)
    run(cfg_for(pairs, emb, work_dir=str(tmp_path / "w1"), **flags), tmp_path / "a")
    run(cfg_for(pairs, emb, work_dir=str(tmp_path / "w2"), **flags), tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _manifest(tmp_path / "a") == _manifest(tmp_path / "b")

    real = st.dedup_bucket
    monkeypatch.setattr(st, "dedup_bucket", lambda ctx, b: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg_for(pairs, emb, work_dir=str(tmp_path / "w3"), **flags), tmp_path / "c")
    assert not (tmp_path / "c").exists() and (tmp_path / "w3" / "part" / "_STAGE.json").exists()
    monkeypatch.setattr(st, "dedup_bucket", real)
    part_state = (tmp_path / "w3" / "part" / "_STAGE.json").stat().st_mtime_ns
    run(cfg_for(pairs, emb, work_dir=str(tmp_path / "w3"), **flags), tmp_path / "c")
    assert (tmp_path / "w3" / "part" / "_STAGE.json").stat().st_mtime_ns == part_state  # reused
    assert _files(tmp_path / "c") == _files(tmp_path / "a")
    assert _manifest(tmp_path / "c") == _manifest(tmp_path / "a")

    names = ("emb", "kmeans", "assign", "part", "dedup", "clip_band")
    before = {n: (tmp_path / "w3" / n / "_STAGE.json").read_bytes() for n in names}
    stamps = {n: (tmp_path / "w3" / n / "_STAGE.json").stat().st_mtime_ns for n in names}
    run(cfg_for(pairs, emb, work_dir=str(tmp_path / "w3"), **{**flags, "clip_band": (0.1, 0.9)}),
        tmp_path / "c", overwrite=True)
    for n in names[:-1]:
        assert (tmp_path / "w3" / n / "_STAGE.json").read_bytes() == before[n]
        assert (tmp_path / "w3" / n / "_STAGE.json").stat().st_mtime_ns == stamps[n]
    assert (tmp_path / "w3" / "clip_band" / "_STAGE.json").read_bytes() != before["clip_band"]


def test_resume_redoes_only_missing_shards(tmp_path, monkeypatch):
    pairs, emb = _random_corpus(tmp_path)
    real, calls, killed = st.assign_rows, [], []

    def flaky(x, c):
        calls.append(len(x))
        if len(calls) == 3 and not killed:
            killed.append(True)
            raise RuntimeError("killed")
        return real(x, c)

    monkeypatch.setattr(st, "assign_rows", flaky)
    cfg = cfg_for(pairs, emb, clusters=3, work_dir=str(tmp_path / "w"))
    with pytest.raises(RuntimeError):
        run(cfg, tmp_path / "out")
    done = sorted(p.name for p in (tmp_path / "w" / "assign").glob("shard-*"))
    assert done == ["shard-00000.safetensors", "shard-00001.safetensors"]
    calls.clear()
    run(cfg, tmp_path / "out")
    assert len(calls) == math.ceil(60 / 4) - 2  # only the missing shards


def test_stages_subset_and_from_stage(tmp_path):
    pairs, emb = _random_corpus(tmp_path)
    cfg = cfg_for(pairs, emb, clusters=3, work_dir=str(tmp_path / "w"), stages=["embed", "kmeans"])
    m = run(cfg, tmp_path / "out")
    assert [s["name"] for s in m["metrics"]["stages"]] == ["embed", "kmeans"] and not (tmp_path / "out").exists()
    with pytest.raises(MmkitError, match="'assign' has not run"):
        run(cfg_for(pairs, emb, clusters=3, work_dir=str(tmp_path / "w"), stages=["dedup"]), tmp_path / "out")
    stamp = (tmp_path / "w" / "emb" / "_STAGE.json").stat().st_mtime_ns
    run(cfg_for(pairs, emb, clusters=3, work_dir=str(tmp_path / "w"), from_stage="kmeans"), tmp_path / "out")
    assert (tmp_path / "w" / "emb" / "_STAGE.json").stat().st_mtime_ns == stamp
    assert (tmp_path / "out" / "manifest.json").exists()


def test_formats_and_target(tmp_path):
    pairs, emb = _random_corpus(tmp_path)
    common = dict(clusters=3, target=5, work_dir=str(tmp_path / "w"))
    run(cfg_for(pairs, emb, format="jsonl", **common), tmp_path / "j")
    run(cfg_for(pairs, emb, format="llava", llava_prompt=["P1", "P2"], **common), tmp_path / "l")
    lines = [json.loads(x) for x in (tmp_path / "j" / "data" / "part-00000.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and list(lines[0]) == ["key", "image", "caption", "clip_score", "cluster",
                                                   "cos_to_centroid"]
    items = json.loads((tmp_path / "l" / "pretrain.json").read_text())
    assert [i["id"] for i in items] == [x["key"] for x in lines]
    first = items[0]
    row = int(first["id"][1:])
    assert first["conversations"] == [
        {"from": "human", "value": "<image>\n" + st.llava_prompt(["P1", "P2"], 0, row)},
        {"from": "gpt", "value": f"caption {row}"}]


def test_empty_captions_are_dropped_not_errors(tmp_path):
    x = np.stack([_axis(i % D) for i in range(6)]).astype(np.float32)
    pairs, emb = write_corpus(tmp_path, x, np.full(6, 0.3), captions=["a", " ", "c", "", "e", "f"])
    m = run(cfg_for(pairs, emb, clusters=1), tmp_path / "out")
    assert m["metrics"]["stages"][0] == {"name": "embed", "in": 6, "kept": 4, "dropped": {"empty_caption": 2}}


# --------------------------------------------------------------------------- clip-retrieval layout


def write_clip_retrieval(root: Path, keys: list[list[str]], d: int = D, short_text: int | None = None) -> Path:
    import pyarrow as pa

    rng = np.random.default_rng(5)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, ks in enumerate(keys):
        np.save(root / "img_emb" / f"img_emb_{i:04d}.npy", rng.standard_normal((len(ks), d)).astype(np.float16))
        n_text = len(ks) if short_text is None or i else short_text
        np.save(root / "text_emb" / f"text_emb_{i:04d}.npy", rng.standard_normal((n_text, d)).astype(np.float16))
        pq.write_table(pa.table({"key": ks}), root / "metadata" / f"metadata_{i:04d}.parquet")
    return root


def test_clip_retrieval_layout_maps_keys_to_rows(tmp_path):
    x = np.stack([_axis(i % D) for i in range(6)]).astype(np.float32)
    pairs, _ = write_corpus(tmp_path, x, np.zeros(6))
    cr = write_clip_retrieval(tmp_path / "cr", [["k5", "k0", "k2"], ["k1", "k4"]])  # k3 has no embedding
    cfg = cfg_for(pairs, cr, clusters=1, store_text_emb=True, work_dir=str(tmp_path / "w"))
    m = run(cfg, tmp_path / "out")
    assert m["metrics"]["stages"][0] == {"name": "embed", "in": 6, "kept": 5, "dropped": {"no_embedding": 1}}
    shard = st.load_tensors(tmp_path / "w" / "emb" / "shard-00001.safetensors")
    assert shard["row"].tolist() == [4, 5]
    img = np.load(tmp_path / "cr" / "img_emb" / "img_emb_0000.npy").astype(np.float32)[0]
    txt = np.load(tmp_path / "cr" / "text_emb" / "text_emb_0000.npy").astype(np.float32)[0]
    expect = float(img @ txt / np.linalg.norm(img) / np.linalg.norm(txt))
    assert shard["clip_score"][1] == pytest.approx(expect, abs=1e-5)  # row 5 = k5, first in shard 0


def test_bad_embeddings_are_errors(tmp_path):
    x = np.stack([_axis(i % D) for i in range(4)]).astype(np.float32)
    pairs, _ = write_corpus(tmp_path, x, np.zeros(4))
    short = write_clip_retrieval(tmp_path / "short", [["k0", "k1", "k2"]], short_text=2)
    with pytest.raises(DataError, match=r"img_emb_0000.npy: rows: row counts differ: 3 image rows, 2 text rows"):
        run(cfg_for(pairs, short, clusters=1), tmp_path / "out")
    stranger = write_clip_retrieval(tmp_path / "stranger", [["k0", "zz", "k1"]])
    with pytest.raises(DataError, match=r"metadata_0000.parquet:row 2: key: key 'zz' is not in --pairs"):
        run(cfg_for(pairs, stranger, clusters=1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_duplicate_key_names_the_second_occurrence(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"key": k, "image": "i.jpg", "caption": "c"}) + "\n"
                             for k in ("a", "b", "a", "b")), encoding="utf-8")
    with pytest.raises(DataError) as exc:
        st.scan_pairs(load_config(CondenseConfig, flags={"pairs": str(pairs)}))
    assert str(exc.value) == f"{pairs}:3: key: duplicate key 'a' (first at 1)"


# --------------------------------------------------------------------------- embed with tiny CLIP


def _image_pairs(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    recs = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
        recs.append({"key": f"p{i}", "image": f"{i}.png", "caption": f"a photo number {i}"})
    (root / "bad.png").write_bytes(b"not an image")
    recs.insert(2, {"key": "bad", "image": "bad.png", "caption": "broken"})
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return pairs


def test_embed_with_tiny_clip(tmp_path, tiny_clip):
    pairs = _image_pairs(tmp_path)
    cfg = load_config(CondenseConfig, flags={"pairs": str(pairs), "clip": tiny_clip, "shard_rows": 4,
                                             "store_text_emb": True, "device": "cpu", "stages": ["embed"],
                                             "work_dir": str(tmp_path / "w")})
    m = run(cfg, tmp_path / "out")
    assert m["metrics"]["stages"][0] == {"name": "embed", "in": 6, "kept": 5, "dropped": {"unreadable_image": 1}}
    shards = [st.load_tensors(tmp_path / "w" / "emb" / f"shard-0000{s}.safetensors") for s in (0, 1)]
    assert [s["row"].tolist() for s in shards] == [[0, 1, 3], [4, 5]]
    for s in shards:
        assert s["image"].dtype == np.float16 and s["image"].shape[1] == 16 and s["clip_score"].dtype == np.float32
        img, txt = s["image"].astype(np.float32), s["text"].astype(np.float32)
        assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-3)
        assert np.allclose(s["clip_score"], np.einsum("ij,ij->i", img, txt), atol=1e-3)
    meta = st.tensor_meta(tmp_path / "w" / "emb" / "shard-00000.safetensors")
    assert (meta["model"], meta["dim"], meta["dropped"]) == (tiny_clip, 16, {"unreadable_image": [2]})

    # a simulated world size of 2 (rank r takes shards r mod 2) writes the same shards
    ctx = st.Ctx(cfg=cfg, work=tmp_path / "w2", pairs=st.scan_pairs(cfg), world=2)
    stage = st.STAGES[0]
    for rank in (0, 1):
        ctx.rank = rank
        units = pending_units(ctx, stage)
        assert units == [rank]
        stage.run_units(ctx, units)
    for s in ("shard-00000.safetensors", "shard-00001.safetensors"):
        a, b = (st.load_tensors(w / "emb" / s) for w in (tmp_path / "w", tmp_path / "w2"))
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_end_to_end_with_tiny_clip(tmp_path, tiny_clip):
    pairs = _image_pairs(tmp_path)
    cfg = load_config(CondenseConfig, flags={"pairs": str(pairs), "clip": tiny_clip, "device": "cpu",
                                             "target": 2, "clusters": 2, "dedup_threshold": 1.0,
                                             "centroid_band": (0.0, 1.0)})
    m = run(cfg, tmp_path / "out")
    assert m["models"] == {"clip": {"id": tiny_clip, "revision": None}}
    # 5 readable pairs; the default clip band keeps ranks [floor(0.4 x 5), floor(0.6 x 5)) = [2, 3)
    assert [(s["name"], s["kept"]) for s in m["metrics"]["stages"]][3:7] == [
        ("partition", 5), ("dedup", 5), ("clip-band", 1), ("centroid-band", 1)]
    assert len(kept_keys(tmp_path / "out")) == 1 and any("target_not_reached" in w for w in m["warnings"])


def test_missing_image_is_an_error(tmp_path, tiny_clip):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"key": "a", "image": "nope.png", "caption": "c"}) + "\n", encoding="utf-8")
    cfg = load_config(CondenseConfig, flags={"pairs": str(pairs), "clip": tiny_clip, "device": "cpu"})
    with pytest.raises(DataError, match=r"pairs.jsonl:1: image: image file not found"):
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
