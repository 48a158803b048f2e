"""The generation-benchmark commands of mmkit/cli/evaluate.py (one factory for mmr, realbench, snare,
mmt, chair, pope) and ``mmkit evaluate aggregate``, through typer's CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mmkit.cli import build_app
from mmkit.cli import evaluate as ev
from mmkit.core.backends import BACKENDS
from mmkit.evaluate import BENCHMARKS
from tests.core.test_backends import FakeServer, _free_port, scripted
from tests.evaluate.test_run import REPO, TOY, Echo, _results, lines_of, write_mmr, write_toy_data

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(build_app(), ["evaluate", *args])


def ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


def one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture
def toy_cli(monkeypatch):
    """A ``toy`` command built by the same factory as the real ones, for this test only."""
    monkeypatch.setitem(BENCHMARKS, "toy", TOY)
    monkeypatch.setitem(BACKENDS, "echo", Echo)
    monkeypatch.setattr(Echo, "asked", [])
    monkeypatch.setattr(Echo, "fail", set())
    monkeypatch.setitem(ev.GENERATION, "toy", ("A toy benchmark.", ("mmkit evaluate toy --data toy.jsonl --upper",)))
    monkeypatch.setattr(ev.app, "registered_commands", list(ev.app.registered_commands))
    ev.app.command("toy", cls=ev.BenchmarkCommand, context_settings={"allow_extra_args": True,
                                                                     "ignore_unknown_options": True})(
        ev.generation_command("toy"))


def test_common_and_benchmark_flags_map_onto_the_config(tmp_path, toy_cli):
    data = write_toy_data(tmp_path / "d")
    out = tmp_path / "run"
    res = ok(invoke("toy", "--backend", "echo", "--model", "m", "--data", data, "--out", str(out),
                    "--max-new-tokens", "5", "--upper", "--seed", "3", "--json"))
    cfg = res["config"]
    assert cfg["upper"] is True and cfg["generation"]["max_new_tokens"] == 5 and cfg["seed"] == 3
    assert cfg["backend"]["kind"] == "echo" and cfg["backend"]["model"] == ["m"]
    assert res["metrics"]["accuracy"] == 0.0  # answers are lower-case: wrong under --upper
    res = ok(invoke("toy", "--backend", "echo", "--model", "m", "--data", data, "--out", str(tmp_path / "r2"),
                    "--set", "upper=false", "--json"))
    assert res["metrics"]["accuracy"] == 100.0 and res["config"]["upper"] is False


def test_unknown_extra_flag_is_one_line_with_a_suggestion(tmp_path, toy_cli):
    line = one_error_line(invoke("toy", "--backend", "echo", "--model", "m", "--data",
                                 write_toy_data(tmp_path / "d"), "--uper"))
    assert "--uper" in line and "did you mean '--upper'" in line


def test_strict_exits_3_when_incomplete_and_0_without(tmp_path, toy_cli):
    data = write_toy_data(tmp_path / "d")
    args = ["toy", "--backend", "echo", "--model", "m", "--data", data, "--limit", "2", "-q"]
    assert invoke(*args, "--out", str(tmp_path / "a")).exit_code == 0
    result = invoke(*args, "--out", str(tmp_path / "b"), "--strict")
    assert result.exit_code == 3 and json.loads((tmp_path / "b" / "results.json").read_text())["complete"] is False


def test_help_lists_the_benchmark_flags_and_an_example(toy_cli):
    result = runner.invoke(build_app(), ["evaluate", "toy", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--upper VALUE" in result.output and "config key upper" in result.output
    assert "mmkit evaluate toy --data toy.jsonl --upper" in result.output
    assert "--max-new-tokens" in result.output and "--answers" in result.output


def test_help_of_one_command_imports_no_other_benchmark_module():
    code = ("import sys; from typer.testing import CliRunner; from mmkit.cli import build_app; "
            "r = CliRunner().invoke(build_app(), ['evaluate', 'mmr', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in sys.modules if m.startswith('mmkit.evaluate.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))  # noqa: S307 - our own printed list
    assert "mmkit.evaluate.mmr" in loaded
    assert not loaded & {"mmkit.evaluate.realbench", "mmkit.evaluate.snare", "mmkit.evaluate.mmt",
                         "mmkit.evaluate.hallucination", "mmkit.evaluate.retrieval", "mmkit.evaluate.run"}


def test_tiny_llava_mmr_run_rerun_refusal_and_overwrite(tmp_path, tiny_llava):
    data, out = write_mmr(tmp_path / "mmr"), tmp_path / "run"
    args = ["mmr", "--model", tiny_llava, "--data", str(data), "--out", str(out), "-q"]
    res = ok(invoke(*args, "--json"))
    assert res["method"] == "mmr" and res["counts"]["requests"] == 4 and res["complete"] is True
    raw = (out / "predictions.jsonl").read_bytes()
    assert len(lines_of(out / "predictions.jsonl")) == 4
    ok(invoke(*args, "--json"))
    assert (out / "predictions.jsonl").read_bytes() == raw  # nothing sent, nothing appended
    line = one_error_line(invoke(*args, "--max-new-tokens", "3"))
    assert "predictions.jsonl" in line and "--overwrite" in line
    res = ok(invoke(*args, "--max-new-tokens", "3", "--overwrite", "--json"))
    assert res["config"]["generation"]["max_new_tokens"] == 3 and len(lines_of(out / "predictions.jsonl")) == 4


def test_openai_401_and_a_dead_server_exit_2_with_one_line(tmp_path, monkeypatch):
    data = str(write_mmr(tmp_path / "mmr"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeServer(scripted((401, {}, {"error": "unauthorized"}))) as server:
        line = one_error_line(invoke("mmr", "--base-url", server.url, "--model", "m", "--data", data,
                                     "--out", str(tmp_path / "a")))
    assert "$OPENAI_API_KEY is not set" in line and not (tmp_path / "a").exists()
    url = f"http://127.0.0.1:{_free_port()}/v1"
    line = one_error_line(invoke("mmr", "--base-url", url, "--model", "m", "--data", data,
                                 "--out", str(tmp_path / "b")))
    assert f"cannot reach the server at {url}" in line and not (tmp_path / "b").exists()


def test_bad_input_is_one_line_and_leaves_no_run_folder(tmp_path):
    line = one_error_line(invoke("mmr", "--model", "m", "--data", str(tmp_path / "nope"), "--out",
                                 str(tmp_path / "run")))
    assert "nope" in line and not (tmp_path / "run").exists()


def test_aggregate_command_prints_mean_and_sample_std(tmp_path):
    dirs = [_results(tmp_path / f"s{i}", {"ra": v}, seed=i) for i, v in enumerate((60.0, 70.0, 80.0))]
    res = ok(invoke("aggregate", *dirs, "--out", str(tmp_path / "agg.json"), "--json"))
    assert res["aggregate"]["ra"] == {"n": 3, "mean": 70.0, "std": 10.0, "min": 60.0, "max": 80.0}
    assert (tmp_path / "agg.json").is_file()
    other = _results(tmp_path / "x", {"ra": 1.0}, sha="f" * 64)
    assert "--force" in one_error_line(invoke("aggregate", dirs[0], other))
