"""`mmkit evaluate mmr` under 2 CPU processes (torchrun + gloo), as `accelerate launch` runs it on GPUs:
rank r answers requests r, r + 2, ...; rank 0 merges the rank files and scores (evaluate.md §2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.evaluate.test_run import lines_of, write_mmr


def _mmkit(*args: str, launcher: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, "-m", "mmkit", "-q", "evaluate", "mmr", *args], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.slow
def test_two_processes_answer_each_request_once_and_match_one_process(tmp_path, tiny_llava):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    data = write_mmr(tmp_path / "mmr")
    common = ["--model", tiny_llava, "--data", str(data), "--max-new-tokens", "4"]
    one = _mmkit(*common, "--out", str(tmp_path / "one"), launcher=[sys.executable])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _mmkit(*common, "--out", str(tmp_path / "two"),
                 launcher=[torchrun, "--standalone", "--nproc_per_node", "2"])
    assert two.returncode == 0, "\n".join(ln for ln in two.stderr.splitlines() if "rror" in ln)[-3000:]
    lines = lines_of(tmp_path / "two" / "predictions.jsonl")
    assert sorted(ln["uid"] for ln in lines) == sorted(ln["uid"] for ln in lines_of(tmp_path / "one" / "predictions.jsonl"))
    assert len({ln["uid"] for ln in lines}) == len(lines) == 4
    assert not list((tmp_path / "two").glob("predictions.rank*.jsonl"))
    # greedy decoding: the same answers, so the same scores as one process
    single = {ln["uid"]: ln["prediction"] for ln in lines_of(tmp_path / "one" / "predictions.jsonl")}
    assert {ln["uid"]: ln["prediction"] for ln in lines} == single
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert a["metrics"] == b["metrics"] and a["counts"] == b["counts"] and b["counts"]["answered"] == 4
    assert b["complete"] is True
