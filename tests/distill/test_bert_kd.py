"""Tests of mmkit/distill/bert_kd.py on tiny BERTs: a 4 x 64 teacher (4 heads) and a 2 x 32 student."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmkit.config import load_config
from mmkit.distill import bert_kd
from mmkit.distill.bert_kd import BertKdConfig, resolve_layer_map, uniform_layer_map
from mmkit.errors import ConfigError

WORDS = "man woman dog cat car tree sky water road bus train horse".split()


def write_task(path: Path, n: int, seed: int, regression: bool = False) -> str:
    """A separable pair task: label pos when the first text mentions a dog (``regression``: the
    float number of dogs it mentions)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        b = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        label = float(a.split().count("dog")) if regression else "pos" if "dog" in a.split() else "neg"
        rows.append({"text": a, "text_pair": b, "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert-kd-task")
    return write_task(folder / "train.jsonl", 96, 0), write_task(folder / "test.jsonl", 32, 1)


@pytest.fixture(scope="session")
def teacher(make_tiny_bert):
    return make_tiny_bert(num_layers=4, hidden=64, classifier=True, num_attention_heads=4)


@pytest.fixture(scope="session")
def student(make_tiny_bert):
    return make_tiny_bert(num_layers=2, hidden=32)


def make_config(teacher: str, task, student: str | None = None, **sets) -> BertKdConfig:
    flags = {"teacher.id": teacher, "student.id": student, "data.task": task[0], "data.eval_task": task[1],
             "train.batch_size": 16, "train.epochs": 1, "loss.attention.relation_heads": 4,
             "diagnostic.enabled": False, "teacher.finetune": False}
    return load_config(BertKdConfig, flags=flags, sets=[f"{k}={v}" for k, v in sets.items()])


# --------------------------------------------------------------------------- layer map


@pytest.mark.parametrize("l_s, l_t, expected", [
    (2, 4, [2, 4]), (3, 12, [4, 8, 12]), (6, 12, [2, 4, 6, 8, 10, 12]), (6, 24, [4, 8, 12, 16, 20, 24]),
    (5, 12, [2, 5, 7, 10, 12]), (4, 4, [1, 2, 3, 4]),
])
def test_uniform_layer_map(l_s, l_t, expected):
    assert uniform_layer_map(l_s, l_t) == expected
    assert resolve_layer_map("uniform", l_s, l_t) == expected


def test_uniform_layer_map_rounds_halves_up_not_to_even():
    # 2 <- 5: j=1 gives 2.5 -> 3 (Python's round would give 2), j=2 gives 5.
    assert uniform_layer_map(2, 5) == [3, 5]


@pytest.mark.parametrize("layers, message", [
    ([2, 4, 6], "expected 2 teacher layers"), ([0, 4], "teacher layer 0 is out of range 1..4"),
    ([2, 5], "teacher layer 5 is out of range 1..4"), ([3, 3], "strictly increasing"), ([4, 2], "strictly increasing"),
])
def test_explicit_layer_maps_are_validated(layers, message):
    with pytest.raises(ConfigError, match=message):
        resolve_layer_map(layers, 2, 4)
    assert resolve_layer_map([1, 3], 2, 4) == [1, 3]


def test_layer_map_from_a_comma_list_in_the_config(teacher, task, student):
    cfg = make_config(teacher, task, student, layer_map="1,3")
    assert cfg.layer_map == [1, 3]


def test_two_stage_schedule_trains_token_terms_first_then_logits(teacher, task, student):
    cfg = make_config(teacher, task, student, schedule="two_stage", stage1_epochs=1, **{"train.epochs": 3})
    plan = bert_kd.make_plan(cfg, [2, 4], type("S", (), {"num_attention_heads": 2, "hidden_size": 32})(),
                             type("T", (), {"num_attention_heads": 4, "hidden_size": 64})())
    assert plan.stage_weights(0) == {"ce": 0.0, "kd": 0.0, "hid": 1.0, "att": 1.0, "cca": 0.1}
    assert plan.stage_weights(2) == {"ce": 0.5, "kd": 0.5, "hid": 0.0, "att": 0.0, "cca": 0.0}
    assert plan.hidden_pairs == [(0, 0), (1, 2), (2, 4)] and plan.att_mode == "relation"
    with pytest.raises(ConfigError, match="stage1_epochs"):
        make_config(teacher, task, student, schedule="two_stage", stage1_epochs=1)  # 1 epoch in all


# --------------------------------------------------------------------------- teacher targets and losses


def first_batch(setup, rows=range(16)):
    """A batch as the training loop builds it (the collate's tensors plus example ``index``)."""
    batch = bert_kd.textcls.Collate(setup.s_train, setup.train_set.labels)(list(rows))
    batch["index"] = torch.tensor(list(rows))
    return batch


def test_attention_maps_recomputed_from_q_and_k_equal_eager_attentions(teacher, task):
    from mmkit.core.models import load_model

    lm = load_model(teacher, "sequence-classifier", attn_implementation="eager", device="cpu")
    model = lm.model.eval()
    capture = bert_kd.QkvCapture(model, [1, 4], "qk")
    enc = lm.preprocessor(["a man riding a horse", "the dog"], ["a dog", "cat sits on a bed"], padding=True,
                          return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_attentions=True)
    values = capture.pop()
    mask = enc["attention_mask"]
    valid = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
    for layer in (1, 4):
        maps = bert_kd.attention_probs(values[("q", layer)], values[("k", layer)], mask, 4)
        assert torch.allclose(maps[valid.expand_as(maps)], out.attentions[layer - 1][valid.expand_as(maps)], atol=1e-6)


def test_a_student_equal_to_the_teacher_has_zero_kd_hidden_and_attention_losses(teacher, task):
    cfg = make_config(teacher, task, **{"student.init": "teacher_layers", "student.num_layers": 4,
                                        "loss.cca.weight": 0, "loss.ce.weight": 0})
    setup = bert_kd.prepare(cfg, None)
    assert setup.plan.att_mode == "mse" and setup.layer_map == [1, 2, 3, 4]
    module = bert_kd.KdStudent(setup.models.student, 64, 64, 1).eval()
    assert len(module.projections) == 0  # equal widths: no W_h
    live = bert_kd.TeacherTargets(setup.models.teacher, setup.plan)
    batch = first_batch(setup)
    terms, _ = bert_kd.kd_terms(setup.plan, module, batch, live(batch), setup.plan.weights)
    assert set(terms) == {"kd", "hid", "att"}
    for name, value in terms.items():
        assert float(value.detach()) == pytest.approx(0.0, abs=1e-5), name


def test_relation_attention_runs_for_different_head_counts(teacher, task, student):
    cfg = make_config(teacher, task, student)
    setup = bert_kd.prepare(cfg, None)
    plan = setup.plan
    assert plan.att_mode == "relation" and plan.relation_heads == 4 and plan.layer_map == [2, 4]
    module = bert_kd.KdStudent(setup.models.student, 32, 64, 1, qkv_layers=[1, 2])
    live = bert_kd.TeacherTargets(setup.models.teacher, plan)
    batch = first_batch(setup)
    terms, skipped = bert_kd.kd_terms(plan, module, batch, live(batch), plan.weights)
    assert set(terms) == {"ce", "kd", "hid", "att", "cca"} and not skipped
    loss = sum(terms.values())
    loss.backward()
    assert torch.isfinite(loss) and module.projections[0].weight.grad is not None
    assert all(p.grad is None for p in setup.models.teacher.parameters())



def test_closing_the_live_teacher_detaches_its_hooks(teacher, task, student):
    cfg = make_config(teacher, task, student)
    setup = bert_kd.prepare(cfg, None)
    model = setup.models.teacher

    def hooks() -> int:
        return sum(len(m._forward_hooks) for m in model.modules())

    before = hooks()
    live = bert_kd.TeacherTargets(model, setup.plan)
    assert hooks() == before + 3 * len(live.att_layers)  # relation: q, k, v of each mapped layer
    live.close()
    assert hooks() == before and live.capture.values == {}

def test_cca_term_is_skipped_when_a_batch_has_too_few_tokens(teacher, task, student):
    cfg = make_config(teacher, task, student, **{"loss.cca.min_ratio": 1000})
    setup = bert_kd.prepare(cfg, None)
    module = bert_kd.KdStudent(setup.models.student, 32, 64, 1, qkv_layers=[1, 2])
    batch = first_batch(setup)
    terms, skipped = bert_kd.kd_terms(setup.plan, module, batch, bert_kd.TeacherTargets(
        setup.models.teacher, setup.plan)(batch), setup.plan.weights)
    assert skipped and "cca" not in terms


@pytest.mark.parametrize("dtype, rel", [("float32", 1e-6), ("float16", 1e-3)])
def test_teacher_cache_one_pass_then_no_teacher_and_losses_equal_live(teacher, task, student, tmp_path, dtype, rel):
    cfg = make_config(teacher, task, student, **{"cache.mode": "on", "cache.dir": str(tmp_path),
                                                 "cache.dtype": dtype, "cache.batch_size": 32})
    setup = bert_kd.prepare(cfg, None)
    calls = []
    setup.models.teacher.register_forward_hook(lambda *args: calls.append(1))
    source, status, live = bert_kd.teacher_source(cfg, setup)
    assert status == "built" and len(calls) == 3  # 96 examples in batches of 32: one pass
    module = bert_kd.KdStudent(setup.models.student, 32, 64, 1, qkv_layers=[1, 2]).eval()
    batches = [first_batch(setup, rows) for rows in (list(range(40, 56)), [5, 90, 17, 33, 64, 2])]
    with torch.no_grad():
        cached = [bert_kd.kd_terms(setup.plan, module, b, source(b), setup.plan.weights)[0]
                  for _ in range(2) for b in batches]  # two more epochs, shuffled rows, from the cache
    assert len(calls) == 3
    again, status, _ = bert_kd.teacher_source(cfg, setup)
    assert status == "hit" and len(calls) == 3
    if dtype == "float32":  # the stored rows are the teacher's own outputs for those examples
        rows = [2, 90]
        exact = live(first_batch(setup, rows))
        stored = again.reader.get(rows)
        mask = first_batch(setup, rows)["attention_mask"].bool()
        for name, value in exact.items():
            got = stored[name][mask] if name.startswith("tok.") else stored[name]
            assert torch.allclose(got, value[mask] if name.startswith("tok.") else value, atol=1e-5), name
    with torch.no_grad():
        live_terms = [bert_kd.kd_terms(setup.plan, module, b, live(b), setup.plan.weights)[0] for b in batches]
    for got, reference in zip(cached, live_terms * 2):
        assert set(got) == set(reference)
        for name in reference:
            # The build ran length-sorted batches of 32, these live batches pad differently: the teacher's
            # states differ in the last bits, which CCA's whitening amplifies (a float32 cache is exact).
            tol = max(rel, 1e-3) if name == "cca" else rel  # 1.3e-4 seen on one CPU
            assert float(got[name]) == pytest.approx(float(reference[name]), rel=tol, abs=1e-7), name


def test_ce_alone_never_runs_the_teacher(teacher, task, student, tmp_path):
    zero = {f"loss.{k}.weight": 0 for k in ("kd", "hidden", "attention", "cca")}
    cfg = make_config(teacher, task, student, **zero, **{"cache.mode": "auto", "cache.dir": str(tmp_path)})
    setup = bert_kd.prepare(cfg, None)
    calls = []
    setup.models.teacher.register_forward_hook(lambda *args: calls.append(1))
    source, status, _ = bert_kd.teacher_source(cfg, setup)
    assert status.startswith("disabled") and source(first_batch(setup)) == {}
    assert calls == [] and not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- end to end


E2E = {"train.epochs": 2, "train.batch_size": 16, "train.lr": 1e-3, "train.log_every": 1, "train.save_every": 10,
       "cache.mode": "off"}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoint" / "model.safetensors")


def test_distil_end_to_end_losses_fall_and_the_checkpoint_reloads(teacher, student, task, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from mmkit.io import start_run

    cfg = make_config(teacher, (write_task(tmp_path / "train.jsonl", 240, 3), task[1]), student, **E2E)
    run_dir = start_run(tmp_path / "run", bert_kd.COMMAND, cfg)
    setup = bert_kd.prepare(cfg, run_dir.path)
    metrics = bert_kd.distil(cfg, setup, run_dir)
    assert metrics["steps"] == 30 and metrics["cache"] == "disabled: cache.mode is off"
    assert set(metrics["loss_final"]) == {"loss", "ce", "kd", "hid", "att", "cca"}
    assert metrics["cca_skipped_batches"] == 0 and metrics["cca_batches"] == 30
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert len(log) == 30 and last < 0.8 * first
    assert {"accuracy"} == set(metrics["student"]) == set(metrics["teacher"])

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "checkpoint").eval()
    trained = setup.models.student.eval()
    batch = first_batch(setup)
    inputs = {k: batch[k] for k in bert_kd.INPUT_KEYS}
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, trained(**inputs).logits)
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.id2label == {0: "neg", 1: "pos"}
    heads = load_file(tmp_path / "run" / bert_kd.HEADS_FILE)
    assert torch.equal(heads["projections.0.weight"], bert_kd_projection(setup, trained, tmp_path))


def bert_kd_projection(setup, trained, tmp_path):
    """W_h as the accelerate state of the last checkpoint stored it (the resume copy)."""
    from mmkit.core.train import latest_checkpoint

    state = load_file(latest_checkpoint(tmp_path / "run") / "state" / "model.safetensors")
    return state["projections.0.weight"]


class Stop(Exception):
    pass


def test_a_killed_run_resumes_to_the_uninterrupted_weights(teacher, student, task, tmp_path, monkeypatch):
    from mmkit.core.train import Callback

    cfg = make_config(teacher, task, student, **{**E2E, "data.max_examples": 128})
    whole = bert_kd.run(cfg, str(tmp_path / "whole"))

    class Kill(Callback):
        def on_save(self, state, checkpoint):
            if state.step == 10:
                raise Stop

    real_train = bert_kd.train
    monkeypatch.setattr(bert_kd, "train", lambda *a, callbacks=(), **k: real_train(*a, callbacks=[*callbacks, Kill()], **k))
    with pytest.raises(Stop):
        bert_kd.run(cfg, str(tmp_path / "killed"))
    monkeypatch.setattr(bert_kd, "train", real_train)
    resumed = bert_kd.run(cfg, str(tmp_path / "killed"))
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["metrics"]["steps"] == whole["metrics"]["steps"] == 12  # killed at step 10, mid-epoch
    assert resumed["metrics"]["loss_final"] == pytest.approx(whole["metrics"]["loss_final"])

    results = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert {"mmkit_version", "command", "method", "config", "metrics", "per_category", "seed", "models", "data",
            "started", "finished", "wall_s"} <= set(results)
    assert results["command"] == "distill bert-kd" and results["method"] == "bert-kd" and results["seed"] == 42
    assert results["cca_term"] == results["metrics"]["cca_term"] == "mmkit stand-in"
    assert results["metrics"]["params"]["ratio"] == pytest.approx(
        results["metrics"]["params"]["student"] / results["metrics"]["params"]["teacher"])
    assert results["data"]["train"]["n"] == 96 and results["models"]["teacher"]["id"] == teacher
    assert json.loads((tmp_path / "whole" / "layer_map.json").read_text())["map"] == [2, 4]


def test_a_bare_encoder_teacher_is_fine_tuned_first_and_a_config_student_built(make_tiny_bert, task, tmp_path):
    encoder = make_tiny_bert(num_layers=4, hidden=64, num_attention_heads=4)
    cfg = make_config(encoder, task, **{**E2E, "teacher.finetune": "auto", "teacher.train.epochs": 1,
                                        "student.init": "config", "student.num_layers": 2,
                                        "student.config": "{hidden_size: 32, num_attention_heads: 2, "
                                                          "intermediate_size: 64}",
                                        "train.epochs": 1, "train.batch_size": 8, "data.max_examples": 32,
                                        "diagnostic.enabled": True,
                                        "diagnostic.plots": False})
    results = bert_kd.run(cfg, str(tmp_path / "run"))
    metrics = results["metrics"]
    assert metrics["teacher_finetune"]["steps"] == 4  # 32 examples, batch 8, 1 epoch
    assert (tmp_path / "run" / "teacher_finetune" / "model" / "config.json").is_file()
    assert results["models"]["teacher_finetuned"]["id"].endswith("teacher_finetune/model")
    assert metrics["attention_mode"] == "relation" and metrics["params"]["ratio"] < 0.5
    before = json.loads((tmp_path / "run" / "cca_before.json").read_text())
    assert before["mapped_pairs"] == [[0, 0], [1, 2], [2, 4]] and len(before["cca"]) == 3 and len(before["cca"][0]) == 5
    assert set(metrics["cca_mapped_mean_after"]) == {"cca", "svcca", "pwcca", "cka"}


def test_a_regression_task_fine_tunes_the_teacher_and_distils_a_one_output_student(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    task = (write_task(tmp_path / "train.jsonl", 32, 4, regression=True),
            write_task(tmp_path / "test.jsonl", 16, 5, regression=True))
    cfg = make_config(tiny_bert, task, tiny_bert, **{**E2E, "teacher.finetune": "auto", "teacher.train.epochs": 1,
                                                     "train.epochs": 1, "train.batch_size": 8})
    metrics = bert_kd.run(cfg, str(tmp_path / "run"))["metrics"]
    assert metrics["teacher_finetune"]["steps"] == 4  # 32 examples, batch 8, 1 epoch
    assert set(metrics["teacher"]) == set(metrics["student"]) == {"pearson", "spearman"}
    for folder in ("teacher_finetune/model", "checkpoint"):
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / folder)
        assert model.classifier.out_features == model.config.num_labels == 1, folder
        assert model.config.problem_type == "regression", folder
