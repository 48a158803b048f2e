"""End-to-end tests of `mmkit unlearn` (mmkit/cli/unlearn.py) on the tiny LLaVA and CLIP (unlearn.md §8 item 13)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmkit.cli import app
from tests.unlearn.conftest import (image_name, images, make_images, responses_file,  # noqa: F401 (fixtures)
                                    samples_file, write_jsonl)

runner = CliRunner()
# Thresholds for the random tiny CLIP (its scores on the generated images lie in about -28..-6).
THRESHOLDS = ["--t-hal", "-22", "--t-real", "-10", "--t-sent", "-25"]


def invoke(*args: str):
    return runner.invoke(app, ["unlearn", *args])


def _error_line(result) -> str:
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_efuf_end_to_end_from_responses(tiny_llava, tiny_clip, images, responses_file, tmp_path):
    out = tmp_path / "run"
    result = invoke("efuf", "--model", tiny_llava, "--images", str(images), "--responses", responses_file,
                    "--clip", tiny_clip, *THRESHOLDS, "--device", "cpu", "--no-safeguards", "--val-frac", "0.5",
                    "--save-full", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    names = {p.name for p in out.iterdir()}
    assert {"objects.jsonl", "samples.jsonl", "connector.safetensors", "connector.json", "results.json",
            "config.yaml", "log.txt", "model", "checkpoints"} <= names
    assert "responses.jsonl" not in names  # given, not generated
    objects = [json.loads(ln) for ln in (out / "objects.jsonl").read_text().splitlines()]
    assert [o["score_mode"] for o in objects] == ["windows", "windows", "whole", "windows", "windows"]
    assert [o["phrase"] for o in objects[2]["objects"]] == ["dogs", "teddy bear", "bed"]
    m = results["metrics"]
    assert m["n_samples"]["neg"] >= 2 and m["n_samples"]["pos"] >= 1 and m["n_samples"]["sent"] >= 1
    assert m["n_responses"] == 5 and m["score_quantiles"]["n"] == 15
    assert len(results["loss_history"]) == m["steps"] >= 1
    assert all({"l_pos", "l_neg", "l_sent"} <= set(h) for h in results["loss_history"])
    assert set(m["val_nll_before"]) == {"pos", "neg", "sent", "replay"}
    tensors = load_file(str(out / "connector.safetensors"))
    assert sorted(tensors) == ["model.multi_modal_projector.linear_1.bias", "model.multi_modal_projector.linear_1.weight",
                               "model.multi_modal_projector.linear_2.bias", "model.multi_modal_projector.linear_2.weight"]
    from transformers import LlavaForConditionalGeneration

    assert isinstance(LlavaForConditionalGeneration.from_pretrained(out / "model"), LlavaForConditionalGeneration)


def test_samples_without_images_resolve_next_to_the_file(tiny_llava, samples_file, tmp_path):
    result = invoke("efuf", "--model", tiny_llava, "--samples", samples_file, "--device", "cpu",
                    "--set", "train.max_steps=1", "--out", str(tmp_path / "run"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["steps"] == 1


def test_build_samples_needs_no_model(tiny_clip, images, responses_file, tmp_path):
    result = invoke("build-samples", "--images", str(images), "--responses", responses_file, "--clip", tiny_clip,
                    *THRESHOLDS, "--device", "cpu", "--out", str(tmp_path / "run"), "--json")
    assert result.exit_code == 0, result.output
    samples = [json.loads(ln) for ln in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert json.loads(result.stdout)["metrics"]["n_samples"]["neg"] == sum(s["kind"] == "neg" for s in samples)
    assert all(not Path(s["image"]).is_absolute() for s in samples)


@pytest.mark.parametrize("change,match", [
    ({"kind": None}, r"samples\.jsonl:2: kind: missing field"),
    ({"kind": "hallucinated"}, r"samples\.jsonl:2: kind: expected one of pos, neg, sent, replay"),
])
def test_bad_sample_lines(tiny_llava, images, tmp_path, change, match):
    good = {"image": image_name(0), "target": " a cat", "kind": "neg"}
    bad = {k: v for k, v in {**good, **change}.items() if v is not None}
    path = write_jsonl(images / "samples.jsonl", [good, bad])
    line = _error_line(invoke("efuf", "--model", tiny_llava, "--samples", path, "--device", "cpu",
                              "--out", str(tmp_path / "run")))
    assert re.search(match, line), line
    assert not (tmp_path / "run").exists()


def test_image_that_cannot_be_opened(tiny_llava, tmp_path):
    images = make_images(tmp_path / "imgs")
    (images / "broken.jpg").write_bytes(b"not an image")
    path = write_jsonl(images / "samples.jsonl", [{"image": "broken.jpg", "target": " a cat", "kind": "neg"}])
    line = _error_line(invoke("efuf", "--model", tiny_llava, "--samples", path, "--device", "cpu",
                              "--out", str(tmp_path / "run")))
    assert "broken.jpg" in line and "cannot decode the image" in line


def test_no_parameter_matches_trainable(tiny_llava, samples_file, tmp_path):
    line = _error_line(invoke("efuf", "--model", tiny_llava, "--samples", samples_file, "--device", "cpu",
                              "--trainable", "^adapter\\.", "--out", str(tmp_path / "run")))
    assert "--trainable" in line and "no parameter matches" in line


def test_help_shows_examples():
    result = invoke("efuf", "--help")
    assert result.exit_code == 0 and "mmkit unlearn efuf --model llava-hf/llava-1.5-7b-hf" in result.output
    assert "--no-safeguards" in result.output


def test_eval_images_give_before_and_after(tiny_llava, samples_file, images, tmp_path):
    gt = write_jsonl(tmp_path / "gt.jsonl", [{"image_id": str(i), "objects": ["dog", "bed"]} for i in range(10, 14)])
    eval_images = make_images(tmp_path / "eval_imgs", first_id=10)
    (eval_images / image_name(10)).rename(eval_images / image_name(0))  # a training image: excluded
    out = tmp_path / "run"
    result = invoke("efuf", "--model", tiny_llava, "--samples", samples_file, "--device", "cpu",
                    "--set", "train.max_steps=1", "--eval-images", str(eval_images), "--eval-gt", gt,
                    "--set", "backend.batch_size=4", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    ev = json.loads(result.stdout)["metrics"]["eval"]
    assert ev["before"]["n_captions"] == ev["after"]["n_captions"] == 3
    assert {"chair_i", "chair_s", "bleu1", "mean_words"} <= set(ev["before"]) and "pope" not in ev["before"]
    assert (out / "eval" / "before" / "chair" / "predictions.jsonl").is_file()
    assert (out / "eval" / "after" / "chair" / "predictions.jsonl").is_file()


class Killed(Exception):
    """Simulates a kill right after a checkpoint is written."""


def test_a_killed_run_resumes_to_the_uninterrupted_connector(tiny_llava, samples_file, tmp_path, monkeypatch):
    from mmkit.unlearn.efuf import EfufCallback

    args = ["efuf", "--model", tiny_llava, "--samples", samples_file, "--device", "cpu", "--epochs", "2",
            "--no-safeguards", "--seed", "3"]
    straight = invoke(*args, "--out", str(tmp_path / "a"), "--json")
    assert straight.exit_code == 0, straight.output
    save = EfufCallback.on_save

    def kill_at_2(self, state, checkpoint):
        save(self, state, checkpoint)
        if state.step == 2:
            raise Killed

    monkeypatch.setattr(EfufCallback, "on_save", kill_at_2)
    killed = invoke(*args, "--out", str(tmp_path / "b"))
    assert isinstance(killed.exception, Killed) and not (tmp_path / "b" / "results.json").exists()
    monkeypatch.setattr(EfufCallback, "on_save", save)
    steps, step_end = [], EfufCallback.on_step_end
    monkeypatch.setattr(EfufCallback, "on_step_end", lambda self, state, logs: (steps.append(state.step),
                                                                               step_end(self, state, logs)))
    resumed = invoke(*args, "--out", str(tmp_path / "b"), "--json")
    assert resumed.exit_code == 0, resumed.output
    assert steps == [3, 4]  # resumed after the checkpoint of step 2, not restarted
    a, b = json.loads(straight.stdout), json.loads(resumed.stdout)
    assert a["metrics"]["steps"] == b["metrics"]["steps"] == 4
    assert [h["step"] for h in b["loss_history"]] == [1, 2, 3, 4]
    for key in ("l_pos", "l_neg", "l_sent"):
        assert [h[key] for h in b["loss_history"]] == pytest.approx([h[key] for h in a["loss_history"]], rel=1e-5)
    ta, tb = load_file(str(tmp_path / "a" / "connector.safetensors")), load_file(str(tmp_path / "b" / "connector.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


def test_eval_pope_gives_before_and_after_per_split(tiny_llava, samples_file, tmp_path):
    gt = write_jsonl(tmp_path / "gt.jsonl", [{"image_id": str(i), "objects": ["dog"]} for i in range(10, 15)])
    eval_images = make_images(tmp_path / "eval_imgs", first_id=10)
    questions = write_jsonl(tmp_path / "pope_random.jsonl", [
        {"question_id": 1, "image": image_name(10), "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": image_name(11), "text": "Is there a cat in the image?", "label": "no"},
        {"question_id": 3, "image": image_name(11), "text": "Is there a dog in the image?", "label": "yes"}])
    out = tmp_path / "run"
    result = invoke("efuf", "--model", tiny_llava, "--samples", samples_file, "--device", "cpu",
                    "--set", "train.max_steps=1", "--eval-images", str(eval_images), "--eval-gt", gt,
                    "--eval-pope", questions, "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    ev = json.loads(result.stdout)["metrics"]["eval"]
    for stage in ("before", "after"):
        pope = ev[stage]["pope"]
        assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(pope["metrics"])
        lines = (out / "eval" / stage / "pope" / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == 3
        # the tiny random model's answers, parsed by POPE's own rule by hand, give the accuracy it reports
        answers = {a["uid"]: a["prediction"] for a in map(json.loads, lines)}
        said = ["no" if {"no", "No", "not"} & set(answers[u].split(".", 1)[0].replace(",", "").split(" ")) else "yes"
                for u in sorted(answers)]
        labels = ["yes", "no", "yes"]
        assert pope["metrics"]["accuracy"] == pytest.approx(100 * sum(a == b for a, b in zip(said, labels)) / 3)


def test_the_model_describes_the_images_when_no_responses_are_given(tiny_llava, images, tmp_path):
    out = tmp_path / "run"
    result = invoke("efuf", "--model", tiny_llava, "--images", str(images), "--device", "cpu",
                    "--num-responses", "2", "--set", "max_new_tokens=6",
                    "--stop-after", "responses", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(ln) for ln in (out / "responses.jsonl").read_text().splitlines()]
    metrics = json.loads(result.stdout)["metrics"]
    n_images = len(list(images.glob("*.jpg")))
    # two sampled descriptions per image, empty ones dropped and counted
    assert len(lines) + metrics["n_dropped"]["empty_responses"] == 2 * n_images == 8
    assert metrics["n_responses"] == len(lines)
    assert {ln["image"] for ln in lines} <= {p.name for p in images.glob("*.jpg")}
    assert all(ln["response"] and "\n" not in ln["response"] for ln in lines)
