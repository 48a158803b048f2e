"""mmkit/build/manifest.py: manifest.json per build.md §1."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pytest

from mmkit import __version__
from mmkit.build import manifest as mf


@dataclass
class _Cfg:
    seed: int = 7
    target: int = 3


def test_hash_file_full_and_sampled(tmp_path, monkeypatch):
    f = tmp_path / "a.bin"
    data = bytes(range(256)) * 100  # 25,600 bytes
    f.write_bytes(data)
    assert mf.hash_file(f) == (hashlib.sha256(data).hexdigest(), "full")
    monkeypatch.setattr(mf, "SAMPLE_BYTES", 10)
    expected = hashlib.sha256(str(len(data)).encode() + data[:10] + data[-10:]).hexdigest()
    assert mf.hash_file(f, hash_max_bytes=100) == (expected, "sampled")


def test_fingerprint_kinds(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"key": "a"}\n', encoding="utf-8")
    entry = mf.fingerprint_input(str(f))
    assert entry == {"spec": str(f), "kind": "file", "bytes": 13,
                     "sha256": hashlib.sha256(b'{"key": "a"}\n').hexdigest(), "hash_mode": "full", "revision": None}
    d = tmp_path / "emb"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "x.npy").write_bytes(b"xy")
    (d / "a.txt").write_bytes(b"z")
    pairs = [("a.txt", hashlib.sha256(b"z").hexdigest()), ("sub/x.npy", hashlib.sha256(b"xy").hexdigest())]
    want = hashlib.sha256("".join(f"{p}\x1f{h}\x1e" for p, h in pairs).encode()).hexdigest()
    entry = mf.fingerprint_input(str(d))
    assert (entry["kind"], entry["bytes"], entry["sha256"], entry["hash_mode"]) == ("dir", 3, want, "full")
    hub = mf.fingerprint_input("org/set", revision="abc", hub_fingerprint="f00")
    assert hub == {"spec": "org/set", "kind": "hub", "bytes": None, "sha256": "f00",
                   "hash_mode": "hub-fingerprint", "revision": "abc"}


def test_images_digest_is_order_free(tmp_path):
    (tmp_path / "a.png").write_bytes(b"1")
    (tmp_path / "b.png").write_bytes(b"2")
    files = [("a.png", tmp_path / "a.png"), ("b.png", tmp_path / "b.png")]
    assert mf.images_digest(files) == mf.images_digest(files[::-1])


def test_check_stages_chains_and_sums():
    rows = [mf.stage_counts("embed", 10, 9, {"empty_caption": 1}), {"name": "dedup", "in": 9, "kept": 5,
                                                                   "dropped": {"duplicate": 4}}]
    assert mf.check_stages(rows)[1] == {"name": "dedup", "in": 9, "kept": 5, "dropped": {"duplicate": 4}}
    with pytest.raises(ValueError, match="in=8"):
        mf.check_stages([rows[0], {"name": "dedup", "in": 8, "kept": 8}])
    with pytest.raises(ValueError, match="drops add up"):
        mf.check_stages([{"name": "embed", "in": 10, "kept": 9}])


def test_write_manifest_fields_and_outputs(tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "part-00000.parquet").write_bytes(b"abc")
    (out / "funnel.json").write_text("{}\n", encoding="utf-8")
    src = tmp_path / "pairs.jsonl"
    src.write_text("x\n", encoding="utf-8")
    m = mf.write_manifest(out, "condense", _Cfg(), [str(src)], [mf.stage_counts("embed", 2, 2)],
                          models={"clip": {"id": "m", "revision": None}}, warnings=["w"], device="cpu")
    assert list(m) == ["schema_version", "mmkit_version", "command", "method", "seed", "config", "models",
                       "data", "metrics", "outputs", "environment", "warnings", "standins", "started",
                       "finished", "wall_s", "run"]
    assert (m["schema_version"], m["mmkit_version"], m["command"], m["method"], m["seed"]) == (
        1, __version__, "build-dataset", "condense", 7)
    assert m["config"] == {"seed": 7, "target": 3}
    assert [o["path"] for o in m["outputs"]] == ["data/part-00000.parquet", "funnel.json"]
    assert m["outputs"][0] == {"path": "data/part-00000.parquet", "bytes": 3,
                               "sha256": hashlib.sha256(b"abc").hexdigest()}
    assert m["data"][0]["spec"] == str(src) and m["run"] == {"device": "cpu"}
    assert set(m["environment"]) == {"python", "torch", "transformers", "datasets", "faiss", "numpy"}
    text = (out / "manifest.json").read_text(encoding="utf-8")
    assert json.loads(text) == m and text.endswith("}\n") and text.startswith('{\n  "schema_version": 1,')
    again = mf.write_manifest(out, "condense", _Cfg(), [str(src)], [mf.stage_counts("embed", 2, 2)],
                              models={"clip": {"id": "m", "revision": None}}, warnings=["w"])
    assert mf.stable_view(again) == mf.stable_view(m)  # the manifest itself is not an output
    assert not set(mf.VOLATILE) & set(mf.stable_view(m))
