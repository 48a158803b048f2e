"""Tests of mmkit/distill/teacher_cache.py with a fake teacher whose targets encode the example index."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmkit.distill.teacher_cache import MANIFEST, CacheConfig, Target, TeacherCache, estimate_bytes, key_digest, \
    make_key, open_cache, plan, weights_fingerprint
from mmkit.errors import ConfigError, MmkitError

TARGETS = [Target("logits", "example", 2, "float32"), Target("tok.h.L1", "token", 3, "float16")]
LENGTHS = np.array([3, 1, 5, 2, 4, 2, 6], dtype=np.int64)


class FakeTeacher:
    """logits[i] = (i, -i); token j of example i has state (i, j, i + j); padding is garbage."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls, self.examples, self.fail_after = 0, 0, fail_after

    def __call__(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        if self.fail_after is not None and self.examples >= self.fail_after:
            raise KeyboardInterrupt  # a kill in the middle of the build
        self.calls += 1
        self.examples += len(rows)
        width = int(LENGTHS[rows].max())
        r = torch.as_tensor(rows, dtype=torch.float32)[:, None]
        j = torch.arange(width, dtype=torch.float32)[None, :].expand(len(rows), -1)
        tok = torch.stack([r.expand(-1, width), j, r + j], -1)
        tok[j >= torch.as_tensor(LENGTHS[rows])[:, None]] = 999.0
        return {"logits": torch.cat([r, -r], 1), "tok.h.L1": tok}


def key(**changes):
    parts = {"teacher": {"id": "t", "weights": {"model.safetensors": "abc"}}, "data": {"sha256": "d"}, "max_len": 8}
    parts.update(changes)
    return make_key("bert-kd", TARGETS, **parts)


def expected_rows(rows):
    return [[[i, j, i + j] for j in range(LENGTHS[i])] for i in rows]


def test_build_once_then_read_shuffled_rows_without_the_teacher(tmp_path):
    teacher = FakeTeacher()
    cache = TeacherCache("bert-kd", key(), tmp_path)
    assert not cache.complete
    cache.build(LENGTHS, teacher, batch_size=2, shard_examples=3)
    assert cache.complete and teacher.examples == len(LENGTHS)
    manifest = json.loads((cache.dir / MANIFEST).read_text())
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 3), (3, 6), (6, 7)]
    assert cache.dir.name == "bert-kd-" + key_digest(key())[:16]

    calls = teacher.calls
    reopened = TeacherCache("bert-kd", key(), tmp_path)  # a later epoch / run: no teacher needed
    assert reopened.complete
    reader = reopened.open()
    rows = [6, 1, 3, 0]  # shuffled, across shards
    got = reader.get(torch.tensor(rows))
    assert got["logits"].tolist() == [[i, -i] for i in rows]
    states = got["tok.h.L1"]
    assert states.shape == (4, 6, 3)  # re-padded to the longest of these rows
    for b, i in enumerate(rows):
        assert states[b, :LENGTHS[i]].tolist() == expected_rows([i])[0]
        assert (states[b, LENGTHS[i]:] == 0).all()
    assert teacher.calls == calls
    in_ram = reopened.open(ram_gb=1.0)
    assert torch.equal(in_ram.get(rows)["tok.h.L1"], states)


def test_key_changes_with_max_len_data_and_teacher_weights(tmp_path):
    assert key_digest(key()) == key_digest(key())
    digests = {key_digest(k) for k in (key(), key(max_len=16), key(data={"sha256": "e"}),
                                       key(teacher={"id": "t", "weights": {"model.safetensors": "abd"}}))}
    assert len(digests) == 4
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights 1")
    first = weights_fingerprint(str(model), None)
    (model / "model.safetensors").write_bytes(b"weights 2")
    assert weights_fingerprint(str(model), None) != first
    assert weights_fingerprint("org/hub-model", "abc123") == {"revision": "abc123"}


def test_a_cache_without_manifest_is_rebuilt(tmp_path):
    cache = TeacherCache("bert-kd", key(), tmp_path)
    cache.build(LENGTHS, FakeTeacher(), batch_size=4)
    (cache.dir / MANIFEST).unlink()
    fresh = TeacherCache("bert-kd", key(), tmp_path)
    assert not fresh.complete
    with pytest.raises(MmkitError, match="incomplete"):
        fresh.open()
    teacher = FakeTeacher()
    fresh.build(LENGTHS, teacher, batch_size=4)
    assert fresh.complete and teacher.examples == len(LENGTHS)


def test_a_killed_build_resumes_from_its_checked_shards(tmp_path):
    cache = TeacherCache("bert-kd", key(), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cache.build(LENGTHS, FakeTeacher(fail_after=3), batch_size=3, shard_examples=3)
    assert not cache.complete and (cache.dir / "manifest.partial.json").is_file()
    teacher = FakeTeacher()
    cache.build(LENGTHS, teacher, batch_size=3, shard_examples=3)
    assert cache.complete and teacher.examples == 4  # shards (3, 6) and (6, 7) only
    assert not (cache.dir / "manifest.partial.json").exists()
    got = cache.open().get(np.arange(7))
    assert got["logits"][:, 0].tolist() == list(range(7))
    cache.verify()
    shard = cache.dir / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(MmkitError, match="does not match its hash"):
        cache.verify()


def test_plan_modes_and_size_estimate():
    size = estimate_bytes(TARGETS, n=7, total_tokens=int(LENGTHS.sum()))
    assert size == 7 * 2 * 4 + 23 * 3 * 2 + 8 * 8
    assert plan("auto", frozen=True, augmented=False, size_bytes=size, max_gb=1) == (True, "")
    use, reason = plan("auto", frozen=True, augmented=False, size_bytes=2 * 1024 ** 3, max_gb=1)
    assert not use and "exceeds cache.max_gb" in reason
    assert plan("auto", frozen=False, augmented=True, size_bytes=0, max_gb=1)[0] is False
    assert plan("off", frozen=True, augmented=False, size_bytes=0, max_gb=1) == (False, "cache.mode is off")
    with pytest.raises(ConfigError, match="cannot be used"):
        plan("on", frozen=True, augmented=False, size_bytes=2 * 1024 ** 3, max_gb=1)


def test_open_cache_builds_once_then_hits_and_keys_only_a_used_cache(tmp_path):
    asked = []

    def key_parts():
        asked.append(1)
        return {"teacher": "fake"}

    teacher = FakeTeacher()
    settings = CacheConfig(mode="auto", dir=str(tmp_path), batch_size=3, verify=True)
    reader, status = open_cache("m", settings, TARGETS, LENGTHS, teacher, key_parts, frozen=False)
    assert (reader, status) == (None, "disabled: the teacher is trained") and asked == [] and teacher.calls == 0
    reader, status = open_cache("m", settings, TARGETS, LENGTHS, teacher, key_parts, frozen=True)
    assert status == "built" and teacher.examples == len(LENGTHS) and len(asked) == 1
    assert reader.get([4])["logits"].tolist() == [[4.0, -4.0]]
    reader, status = open_cache("m", settings, TARGETS, LENGTHS, teacher, key_parts, frozen=True)
    assert status == "hit" and teacher.examples == len(LENGTHS) and len(reader) == len(LENGTHS)
    with pytest.raises(ConfigError, match="the teacher is trained"):
        open_cache("m", CacheConfig(mode="on", dir=str(tmp_path)), TARGETS, LENGTHS, teacher, key_parts, frozen=False)



def test_two_runs_opening_the_same_cache_at_once_build_it_once(tmp_path):
    import threading
    import time

    class SlowTeacher(FakeTeacher):
        def __call__(self, rows):
            time.sleep(0.05)  # keep the first build going while the second run arrives
            return super().__call__(rows)

    teacher = SlowTeacher()
    settings = CacheConfig(mode="on", dir=str(tmp_path), batch_size=2)
    statuses = []

    def one_run():
        reader, status = open_cache("m", settings, TARGETS, LENGTHS, teacher, lambda: {"teacher": "fake"}, frozen=True)
        statuses.append((status, reader.get([6])["logits"].tolist()))

    runs = [threading.Thread(target=one_run) for _ in range(2)]
    for r in runs:
        r.start()
    for r in runs:
        r.join()
    assert teacher.examples == len(LENGTHS)  # one build, not two
    assert sorted(statuses) == [("built", [[6.0, -6.0]]), ("hit", [[6.0, -6.0]])]

@pytest.mark.parametrize("yaml_mode, mode", [("off", "off"), ("on", "on"), ("auto", "auto")])
def test_cache_config_reads_yamls_bare_on_and_off(tmp_path, yaml_mode, mode):
    from mmkit.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(f"mode: {yaml_mode}\n", encoding="utf-8")  # YAML 1.1 reads bare on/off as booleans
    assert load_config(CacheConfig, file=path).mode == mode

