"""Tests of the CLI root (mmkit/cli/__init__.py): version, help, lazy imports, error handling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mmkit
from mmkit.cli import SUBCOMMANDS, app

HERE = Path(__file__).parent
runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"mmkit {mmkit.__version__}"


def test_help_lists_every_built_subcommand():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name, _ in SUBCOMMANDS:
        assert name in result.stdout


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, mmkit.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_python_dash_m_mmkit():
    out = subprocess.run([sys.executable, "-m", "mmkit", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"mmkit {mmkit.__version__}"


def test_accelerate_launch_dash_m_mmkit():
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not on PATH")
    out = subprocess.run([accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmkit", "--version"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == f"mmkit {mmkit.__version__}"


# ---------------------------------------------------------------- user mistakes: exit 2, one line


def invoke_toy(args: list[str]) -> subprocess.CompletedProcess:
    """Run the toy command in a real process so stderr and the exit code are the user's."""
    code = "import sys; from toy_command import mounted; mounted()(args=sys.argv[1:], prog_name='mmkit')"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code, "toy", *args], capture_output=True, text=True, env=env)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith(("WARNING", "INFO"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def no_output(out: Path) -> bool:
    return not out.exists() or not any(p.name != ".mmkit-run" for p in out.iterdir())


def test_malformed_jsonl_line_names_file_and_line(tmp_path, tiny_bert):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a dog"}\n{"text": "a cat"\n')
    proc = invoke_toy([str(data), "--model", tiny_bert, "--out", str(tmp_path / "run")])
    assert_user_error(proc, f"{data}:2: json: malformed JSON")
    assert no_output(tmp_path / "run")


def test_missing_field_names_field_and_line(tmp_path, tiny_bert):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a dog"}\n{"txt": "a cat"}\n')
    proc = invoke_toy([str(data), "--model", tiny_bert, "--out", str(tmp_path / "run")])
    line = assert_user_error(proc, f"{data}:2: text: missing field")
    assert "did you mean 'txt'" in line
    assert no_output(tmp_path / "run")


def test_unknown_config_key_is_named_with_a_suggestion(tmp_path, tiny_bert):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a dog"}\n')
    cfg = tmp_path / "run.yaml"
    cfg.write_text("batch_size: 8\nmodel:\n  kind: encoder\n  pth: x\n")
    proc = invoke_toy([str(data), "--model", tiny_bert, "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert_user_error(proc, f"{cfg}:4: model.pth: unknown key (did you mean 'path'?)")
    proc = invoke_toy([str(data), "--model", tiny_bert, "--set", "batch_sise=3"])
    assert_user_error(proc, "--set batch_sise: unknown key (did you mean 'batch_size'?)")
    assert no_output(tmp_path / "run")


def test_path_with_no_model(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a dog"}\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = invoke_toy([str(data), "--model", str(empty), "--out", str(tmp_path / "run")])
    assert_user_error(proc, f"{empty}: model: no model here: expected config.json")
    assert no_output(tmp_path / "run")


def test_success_writes_results_and_resumes_same_folder(tmp_path, tiny_bert):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a dog"}\n{"text": "a cat"}\n')
    out = tmp_path / "run"
    for _ in range(2):
        proc = invoke_toy([str(data), "--model", tiny_bert, "--out", str(out)])
        assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"] == {"n": 2} and results["data"]["n"] == 2
    assert results["models"]["model"]["id"] == tiny_bert
    assert (out / "config.yaml").exists()


def test_a_bug_is_a_traceback_with_exit_1(tmp_path):
    code = ("import typer; from mmkit.cli import build_app\n"
            "root = build_app()\n"
            "@root.command()\ndef boom(): raise RuntimeError('bug')\n"
            "root(args=['boom'], prog_name='mmkit')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: bug" in proc.stderr


def test_plugin_modules_are_imported_and_bad_ones_are_user_errors(tmp_path, monkeypatch):
    from mmkit.core.models import MODEL_KINDS
    from mmkit.errors import MmkitError
    from mmkit.registry import load_plugins

    (tmp_path / "my_kinds.py").write_text(
        "from mmkit.core.models import ModelKind, register_kind\n"
        "register_kind(ModelKind('my-kind', 'AutoModel', 'tokenizer', 'a plugin kind'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugins(["my_kinds"])
    assert "my-kind" in MODEL_KINDS
    del MODEL_KINDS["my-kind"]
    with pytest.raises(MmkitError, match="no_such_module_xyz"):
        load_plugins(["no_such_module_xyz"])
