"""mmkit/evaluate/run.py: the generation runner (evaluate.md §1.1-1.3) on a toy benchmark defined
here (registered only for the test) with a counting in-process backend; tiny LLaVA on MMR; a run
killed mid-way against a slow fake server; ``aggregate`` over hand-made results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import pytest

from mmkit.core.backends import BACKENDS, Backend, BackendConfig, GenerationSettings, Request, prediction_line
from mmkit.errors import DataError, MmkitError
from mmkit.evaluate import BENCHMARKS
from mmkit.evaluate.base import EvalConfig, Loaded
from mmkit.io import percent, read_records, sha256_file

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- a toy benchmark


@dataclass
class ToyConfig(EvalConfig):
    """The toy's own option: count an answer right only when it is upper-case (a flag to map)."""

    upper: bool = False


def toy_parse(text: str, request: Optional[Request] = None) -> Optional[str]:
    """The first word, lower-cased; None (unparsed) for an empty answer."""
    words = text.split()
    return words[0].lower() if words else None


class Toy:
    """``{id, question, answer, image?}`` JSONL; uid = id; accuracy in percent."""

    name = "toy"
    version = "1"
    needs = "generate"
    config_class = ToyConfig
    flags = {"--upper": "upper"}
    max_new_tokens = 8

    @staticmethod
    def load(cfg: ToyConfig) -> Loaded:
        if not cfg.data:
            raise DataError("needs --data", field="--data")
        records = list(read_records(cfg.data, format="jsonl", required=("id", "question", "answer")))
        if cfg.limit is not None:
            records = records[:cfg.limit]
        return Loaded(records=records, path=cfg.data, sha256=sha256_file(cfg.data),
                      anomalies=[{"id": r["id"], "problem": "flagged"} for r in records if r.get("flag")])

    @staticmethod
    def prompt(data: Loaded, cfg: ToyConfig) -> list[Request]:
        base = Path(data.path).parent
        return [Request(uid=str(r["id"]), text=r["question"],
                        images=tuple(str(base / im) for im in r.get("images", [])), extras={"topic": "toy"})
                for r in data.records]

    parse = staticmethod(toy_parse)

    @staticmethod
    def score(data: Loaded, answers: Mapping[str, Mapping[str, Any]], cfg: ToyConfig) -> dict[str, Any]:
        right = 0
        for r in data.records:
            line = answers.get(str(r["id"]))
            if line is None or line["error"] is not None:
                continue
            text = line["prediction"]
            right += toy_parse(text) == r["answer"] and (not cfg.upper or text.isupper())
        return {"metrics": {"accuracy": percent(right, len(data.records), "accuracy"), "n": len(data.records)},
                "per_category": {}, "warnings": []}


TOY = Toy()


class Echo(Backend):
    """Answers ``<question's last word> <max tokens>``; records every uid it is asked."""

    kind = "echo"
    asked: list[str] = []
    fail: set[str] = set()

    def __init__(self, cfg: BackendConfig, model: str, *, seed: int = 0) -> None:
        self.model_id = model

    def describe(self) -> dict[str, Any]:
        return {"id": self.model_id, "revision": "r1", "backend": self.kind, "class": "Echo", "dtype": None,
                "server_models": None}

    def answer(self, requests: Sequence[Request], settings: GenerationSettings) -> Iterator[dict[str, Any]]:
        for r in requests:
            Echo.asked.append(r.uid)
            if r.uid in Echo.fail:
                yield prediction_line(r.uid, "", error="HTTP 400: too many images")
                continue
            budget = settings.max_new_tokens or r.max_new_tokens
            yield prediction_line(r.uid, f"{r.text.split()[-1]} {budget}", finish_reason="stop", latency_s=0.0)


@pytest.fixture
def toy(monkeypatch):
    """Register the toy benchmark and the echo backend for one test."""
    monkeypatch.setitem(BENCHMARKS, "toy", TOY)
    monkeypatch.setitem(BACKENDS, "echo", Echo)
    monkeypatch.setattr(Echo, "asked", [])
    monkeypatch.setattr(Echo, "fail", set())
    return TOY


def write_toy_data(folder: Path, n: int = 5, images: bool = False) -> str:
    """n records: question ``q<i> is <word>``, answer ``<word>`` (so Echo is always right)."""
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        from PIL import Image

        Image.new("RGB", (12, 10), (200, 10, 10)).save(folder / "red.png")
    path = folder / "toy.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            rec = {"id": f"t{i}", "question": f"q{i} is w{i}", "answer": f"w{i}", "flag": i == 0}
            if images:
                rec["images"] = ["red.png"]
            fh.write(json.dumps(rec) + "\n")
    return str(path)


def toy_cfg(data: str, **kw: Any) -> ToyConfig:
    backend = kw.pop("backend", BackendConfig(kind="echo", model=["m1"]))
    return ToyConfig(data=data, backend=backend, **kw)


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


SECTION_1_1 = {"mmkit_version", "command", "method", "config", "metrics", "per_category", "seed", "models", "data",
               "started", "finished", "wall_s", "benchmark_version", "complete", "counts", "environment",
               "anomalies", "warnings"}


# --------------------------------------------------------------------------- runner


def test_a_run_writes_every_file_and_field_and_a_rerun_asks_nothing(tmp_path, toy):
    from mmkit.evaluate.run import evaluate

    data, out = write_toy_data(tmp_path / "d"), tmp_path / "run"
    res = evaluate("toy", toy_cfg(data), out)
    assert SECTION_1_1 <= set(res)
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "results.json", "log.txt", "predictions.jsonl",
                                                 "anomalies.jsonl"}
    assert res["command"] == "evaluate toy" and res["method"] == "toy" and res["benchmark_version"] == "1"
    assert res["metrics"]["accuracy"] == 100.0 and res["complete"] is True
    assert res["counts"] == {"records": 5, "requests": 5, "answered": 5, "failed": 0, "unparsed": 0}
    assert res["models"]["model"] == {"id": "m1", "revision": "r1", "backend": "echo", "class": "Echo",
                                      "dtype": None, "server_models": None}
    assert res["data"] == {"path": data, "sha256": sha256_file(data), "n": 5}
    assert set(res["environment"]) == {"python", "torch", "transformers", "device"}
    assert res["anomalies"] == [{"id": "t0", "problem": "flagged"}]
    assert json.loads((out / "results.json").read_text(encoding="utf-8")) == res
    lines = lines_of(out / "predictions.jsonl")
    assert [x["uid"] for x in lines] == [f"t{i}" for i in range(5)]
    first = lines[0]
    assert first["prediction"] == "w0 8" and first["parsed"] == "w0" and first["error"] is None
    assert first["topic"] == "toy" and len(first["config_hash"]) == 64 and first["time"].endswith("+00:00")
    assert {"latency_s", "finish_reason", "usage"} <= set(first)
    assert Echo.asked == [f"t{i}" for i in range(5)]
    Echo.asked.clear()
    again = evaluate("toy", toy_cfg(data), out)
    assert Echo.asked == [] and again["metrics"] == res["metrics"]
    assert len(lines_of(out / "predictions.jsonl")) == 5


def test_changed_settings_refuse_to_resume_and_overwrite_restarts(tmp_path, toy):
    from mmkit.evaluate.run import evaluate

    data, out = write_toy_data(tmp_path / "d"), tmp_path / "run"
    evaluate("toy", toy_cfg(data), out)
    changed = toy_cfg(data)
    changed.generation.max_new_tokens = 4
    with pytest.raises(MmkitError, match="--overwrite") as err:
        evaluate("toy", changed, out)
    assert "predictions.jsonl" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MmkitError, match="--overwrite"):
        evaluate("toy", replace(toy_cfg(data), seed=1), out)
    Echo.asked.clear()
    res = evaluate("toy", changed, out, overwrite=True)
    assert len(Echo.asked) == 5 and res["metrics"]["accuracy"] == 100.0
    assert {x["prediction"] for x in lines_of(out / "predictions.jsonl")} == {f"w{i} 4" for i in range(5)}


def test_a_truncated_last_line_is_dropped_and_answered_again(tmp_path, toy):
    from mmkit.evaluate.run import evaluate

    data, out = write_toy_data(tmp_path / "d"), tmp_path / "run"
    evaluate("toy", toy_cfg(data), out)
    raw = (out / "predictions.jsonl").read_bytes()
    (out / "predictions.jsonl").write_bytes(raw[:-25])  # the crash cut the last line
    Echo.asked.clear()
    res = evaluate("toy", toy_cfg(data), out)
    assert Echo.asked == ["t4"] and res["complete"] is True
    assert sorted(x["uid"] for x in lines_of(out / "predictions.jsonl")) == [f"t{i}" for i in range(5)]


def test_failed_requests_count_as_wrong_and_are_retried_on_resume(tmp_path, toy):
    from mmkit.evaluate.run import evaluate

    data, out = write_toy_data(tmp_path / "d"), tmp_path / "run"
    Echo.fail = {"t1", "t3"}
    res = evaluate("toy", toy_cfg(data), out)
    assert res["complete"] is False and res["metrics"]["accuracy"] == 60.0
    assert res["counts"] == {"records": 5, "requests": 5, "answered": 3, "failed": 2, "unparsed": 0}
    errors = {x["uid"]: x["error"] for x in lines_of(out / "predictions.jsonl")}
    assert errors["t1"] == "HTTP 400: too many images" and errors["t0"] is None
    Echo.fail, Echo.asked = set(), []
    res = evaluate("toy", toy_cfg(data), out)
    assert Echo.asked == ["t1", "t3"] and res["complete"] is True and res["metrics"]["accuracy"] == 100.0


def test_limit_scores_the_first_records_and_is_incomplete(tmp_path, toy):
    from mmkit.evaluate.run import evaluate

    res = evaluate("toy", toy_cfg(write_toy_data(tmp_path / "d"), limit=2), tmp_path / "run")
    assert Echo.asked == ["t0", "t1"] and res["complete"] is False and res["counts"]["records"] == 2


def test_several_models_get_subfolders_and_an_aggregate_block(tmp_path, toy):
    from mmkit.evaluate.run import evaluate

    out = tmp_path / "run"
    res = evaluate("toy", toy_cfg(write_toy_data(tmp_path / "d"), backend=BackendConfig(
        kind="echo", model=["org/m1", "org/m2"])), out)
    assert (out / "org__m1" / "predictions.jsonl").is_file() and (out / "org__m2" / "results.json").is_file()
    assert res["aggregate"]["accuracy"] == {"n": 2, "mean": 100.0, "std": 0.0, "min": 100.0, "max": 100.0}
    assert [r["model"] for r in res["runs"]] == ["org/m1", "org/m2"] and set(res["models"]) == {"org__m1", "org__m2"}


def test_predictions_backend_scores_a_file_and_checks_it(tmp_path, toy):
    from mmkit.evaluate.run import evaluate

    data = write_toy_data(tmp_path / "d", n=3)
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"uid": "t0", "prediction": "w0"}\n{"id": "t1", "prediction": "nope"}\n'
                     '{"uid": "t2", "prediction": "W2"}\n', encoding="utf-8")
    res = evaluate("toy", toy_cfg(data, predictions=str(preds), backend=BackendConfig()), tmp_path / "run")
    assert res["metrics"]["accuracy"] == pytest.approx(200 / 3) and res["models"]["model"]["backend"] == "predictions"
    assert res["models"]["model"]["revision"] == sha256_file(preds)
    preds.write_text('{"uid": "t0", "prediction": "w0"}\n', encoding="utf-8")
    with pytest.raises(MmkitError, match=r"2 request\(s\) have no prediction: t1, t2 .*--allow-missing"):
        evaluate("toy", toy_cfg(data, predictions=str(preds), backend=BackendConfig()), tmp_path / "run2")
    assert not (tmp_path / "run2").exists()  # nothing half-written
    res = evaluate("toy", toy_cfg(data, predictions=str(preds), allow_missing=True, backend=BackendConfig()),
                   tmp_path / "run3")
    assert res["complete"] is False and res["counts"]["failed"] == 2


def test_score_direct_route_needs_no_backend(tmp_path, toy, monkeypatch):
    from mmkit.evaluate.run import evaluate

    monkeypatch.setattr(Toy, "score_direct", staticmethod(
        lambda data, cfg: {"metrics": {"bleu": 12.5}, "warnings": ["direct"]} if cfg.upper else None), raising=False)
    res = evaluate("toy", toy_cfg(write_toy_data(tmp_path / "d"), upper=True), tmp_path / "run")
    assert res["metrics"] == {"bleu": 12.5} and Echo.asked == [] and res["warnings"] == ["direct"]
    assert res["complete"] is True and not (tmp_path / "run" / "predictions.jsonl").exists()


def test_dump_requests_writes_the_rendered_requests_without_a_model(tmp_path, toy):
    from mmkit.evaluate.run import evaluate

    data = write_toy_data(tmp_path / "d", n=2, images=True)
    res = evaluate("toy", toy_cfg(data, dump_requests=str(tmp_path / "req.jsonl"), backend=BackendConfig()))
    assert res["n"] == 2 and Echo.asked == []
    assert lines_of(tmp_path / "req.jsonl")[1] == {"uid": "t1", "text": "q1 is w1",
                                                  "images": [str(tmp_path / "d" / "red.png")]}


def test_a_model_that_cannot_generate_is_a_one_line_error(tmp_path, toy, tiny_clip):
    from mmkit.evaluate.run import evaluate

    with pytest.raises(MmkitError, match=r"toy needs a generate model; .* \(CLIPModel\) offers: nothing"):
        evaluate("toy", toy_cfg(write_toy_data(tmp_path / "d"), backend=BackendConfig(model=[tiny_clip])),
                 tmp_path / "run")


# --------------------------------------------------------------------------- tiny LLaVA on MMR


def write_mmr(folder: Path) -> Path:
    """Two MMR pairs (4 records, the second pair listed NEG first) sharing two generated images."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (pid, order) in enumerate((("attribute/color&texture/01", ("POS", "NEG")),
                                      ("context/expert/02", ("NEG", "POS")))):
        Image.new("RGB", (40, 30), (60 * i, 120, 200)).save(folder / f"{i}.png")
        for qt in order:
            records.append({"id": pid, "image": f"{i}.png", "question_type": qt, "ground_truth": "A",
                            "question": f"what color is the dog ? A. red B. blue C. green D. white ({qt})"})
    (folder / "MMR-benchmark.json").write_text(json.dumps(records), encoding="utf-8")
    return folder


def test_tiny_llava_on_two_mmr_pairs_resumes_and_refuses_changed_settings(tmp_path, tiny_llava, monkeypatch):
    from mmkit.core.backends import HFBackend
    from mmkit.evaluate import get_benchmark
    from mmkit.evaluate.run import evaluate

    mmr = get_benchmark("mmr")
    asked: list[str] = []
    real = HFBackend._generate

    def counting(self, requests, *args, **kwargs):
        asked.extend(r.uid for r in requests)
        return real(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFBackend, "_generate", counting)
    cfg = mmr.config_class(data=str(write_mmr(tmp_path / "mmr")), backend=BackendConfig(model=[tiny_llava]))
    out = tmp_path / "run"
    res = evaluate("mmr", cfg, out)
    lines = lines_of(out / "predictions.jsonl")
    assert len(lines) == 4 and sorted(asked) == sorted(x["uid"] for x in lines)
    assert {x["question_type"] for x in lines} == {"POS", "NEG"} and all(len(x["qhash"]) == 12 for x in lines)
    assert all(x["error"] is None and x["finish_reason"] in {"stop", "length"} for x in lines)
    assert res["models"]["model"]["class"] == "LlavaForConditionalGeneration"
    assert len(res["models"]["model"]["revision"]) == 64 and res["counts"]["requests"] == 4
    assert SECTION_1_1 <= set(res) and {"ra", "misleading_rate", "pos_acc", "neg_acc"} <= set(res["metrics"])
    asked.clear()
    evaluate("mmr", cfg, out)
    assert asked == []
    changed = replace(cfg, generation=GenerationSettings(max_new_tokens=3))
    with pytest.raises(MmkitError, match="--overwrite"):
        evaluate("mmr", changed, out)
    evaluate("mmr", changed, out, overwrite=True)
    assert len(asked) == 4 and all(x["usage"]["completion_tokens"] <= 3 for x in lines_of(out / "predictions.jsonl"))


# --------------------------------------------------------------------------- a killed run


KILLED_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from tests.evaluate.test_run import TOY, toy_cfg
from mmkit.core.backends import BackendConfig
from mmkit.evaluate import BENCHMARKS
from mmkit.evaluate.run import evaluate
BENCHMARKS["toy"] = TOY
evaluate("toy", toy_cfg({data!r}, backend=BackendConfig(kind="openai", base_url={url!r}, model=["m"],
                                                       concurrency=1, max_retries=0)), {out!r})
"""


def test_a_killed_run_resumed_with_the_same_out_answers_each_uid_once(tmp_path, toy):
    from mmkit.evaluate.run import evaluate
    from tests.core.test_backends import FakeServer, ok_reply

    data, out = write_toy_data(tmp_path / "d", n=8), tmp_path / "run"
    with FakeServer(lambda body: ok_reply(body["messages"][0]["content"][-1]["text"].split()[-1]),
                    delay=0.15) as server:
        script = KILLED_SCRIPT.format(repo=str(REPO), data=data, url=server.url, out=str(out))
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        preds = out / "predictions.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if preds.exists() and preds.read_text(encoding="utf-8").count("\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        done_before = {x["uid"] for x in lines_of(preds) if x}
        assert 3 <= len(done_before) < 8
        seen_before = len(server.bodies)
        res = evaluate("toy", toy_cfg(data, backend=BackendConfig(kind="openai", base_url=server.url, model=["m"],
                                                                  concurrency=2)), out)
    asked_after = [b["messages"][0]["content"][-1]["text"] for b in server.bodies[seen_before:]]
    assert not any(q.split()[0] in {u.replace("t", "q") for u in done_before} for q in asked_after)
    uids = [x["uid"] for x in lines_of(preds)]
    assert sorted(uids) == [f"t{i}" for i in range(8)]  # each uid exactly once
    assert res["complete"] is True and res["metrics"]["accuracy"] == 100.0


# --------------------------------------------------------------------------- aggregate


def _results(folder: Path, metrics: dict[str, Any], sha: str = "a" * 64, method: str = "toy", seed: int = 0) -> str:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "mmkit_version": "0", "command": "evaluate toy", "method": method, "metrics": metrics, "seed": seed,
        "models": {"model": {"id": f"m{seed}", "revision": f"r{seed}"}}, "data": {"sha256": sha, "n": 3}}))
    return str(folder)


def test_aggregate_gives_mean_and_sample_std_of_three_runs(tmp_path):
    from mmkit.evaluate.aggregate import aggregate_runs

    dirs = [_results(tmp_path / f"s{i}", {"acc": v, "block": {"f1": f}, "note": "x"}, seed=i)
            for i, (v, f) in enumerate(((30.0, 1.0), (40.0, 2.0), (50.0, 6.0)))]
    res = aggregate_runs(dirs)
    # mean 40, sample std sqrt(((-10)^2 + 0 + 10^2) / 2) = 10; f1: mean 3, std sqrt((4 + 1 + 9) / 2) = sqrt(7)
    assert res["aggregate"]["acc"] == {"n": 3, "mean": 40.0, "std": 10.0, "min": 30.0, "max": 50.0}
    assert res["aggregate"]["block.f1"]["mean"] == 3.0 and res["aggregate"]["block.f1"]["std"] == pytest.approx(7 ** 0.5)
    assert "note" not in res["aggregate"] and res["n"] == 3
    assert [(r["model"], r["revision"], r["seed"]) for r in res["runs"]] == [("m0", "r0", 0), ("m1", "r1", 1), ("m2", "r2", 2)]
    assert json.loads((tmp_path / "aggregate.json").read_text()) == res
    single = aggregate_runs(dirs[:1], out=tmp_path / "one.json")
    assert single["aggregate"]["acc"]["std"] is None


def test_aggregate_refuses_other_data_or_benchmark_unless_forced(tmp_path):
    from mmkit.evaluate.aggregate import aggregate_runs

    a = _results(tmp_path / "a", {"acc": 1.0})
    b = _results(tmp_path / "b", {"acc": 2.0}, sha="b" * 64)
    c = _results(tmp_path / "c", {"acc": 2.0}, method="mmr")
    with pytest.raises(MmkitError, match="data sha256 .* --force"):
        aggregate_runs([a, b])
    with pytest.raises(MmkitError, match="benchmark 'mmr' differs"):
        aggregate_runs([a, c])
    assert aggregate_runs([a, b], force=True)["aggregate"]["acc"]["mean"] == 1.5
    with pytest.raises(MmkitError, match="no results.json"):
        aggregate_runs([a, str(tmp_path)])
