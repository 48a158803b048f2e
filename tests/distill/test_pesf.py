"""Tests of mmkit/distill/pesf.py (distill.md §2.7) on tiny BERTs: teacher 4 x 32, student 2 x 32."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkit.config import load_config
from mmkit.core import train as T
from mmkit.distill import pesf, textcls
from mmkit.errors import ConfigError

POSITIVE = ["good", "great", "best", "yes", "correct", "true"]
NEGATIVE = ["bad", "wrong", "false", "no", "not", "little"]
FILLER = ["the", "a", "dog", "cat", "car", "tree", "red", "blue", "man", "woman", "sky", "water", "on", "in"]


def write_task(path: Path, n: int, seed: int, regression: bool = False) -> Path:
    """A separable text-classification JSONL: label 1 iff the text holds a positive word (and a
    float score for ``regression``); texts of 3-12 words, so dynamic padding varies per batch."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        y = int(rng.integers(2))
        words = [str(w) for w in rng.choice(FILLER, int(rng.integers(2, 11)))]
        words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(POSITIVE if y else NEGATIVE)))
        label = float(y) + float(rng.normal(0, 0.1)) if regression else y
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pesf-task")
    return write_task(folder / "train.jsonl", 32, 0), write_task(folder / "test.jsonl", 12, 1)


@pytest.fixture(scope="module")
def teacher_path(make_tiny_bert):
    return make_tiny_bert(num_layers=4, classifier=True)


def config(teacher: str, student: str, train: Path, test: Path, *sets: str, **flags) -> pesf.PesfConfig:
    base = {"teacher.id": teacher, "student.id": student, "data.task": str(train), "data.eval_task": str(test),
            "device": "cpu", "cache.mode": "off"}
    return load_config(pesf.PesfConfig, flags={**base, **flags}, sets=list(sets))


def setup_for(cfg: pesf.PesfConfig) -> pesf.Setup:
    torch.manual_seed(cfg.train.seed)
    return pesf.prepare(cfg, None)


def first_batch(setup: pesf.Setup, rows=range(8)) -> dict:
    return textcls_collate(setup)(list(rows))


def textcls_collate(setup: pesf.Setup) -> textcls.Collate:
    extra = {} if setup.shared_tokens else {pesf.TEACHER_PREFIX: setup.t_train}
    return textcls.Collate(setup.s_train, setup.train_set.labels, extra)


def module_for(setup: pesf.Setup, reproduce: bool = False) -> pesf.PesfModule:
    return pesf.PesfModule(setup.student, setup.teacher, setup.adapter, setup.pkd_map, train_teacher=reproduce)


# --------------------------------------------------------------------------- pure functions


def test_sharpness_and_gap_match_hand_values():
    z_t = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    z_s = torch.zeros(2, 2)
    s1 = pesf.sharpness(z_t, 1.0)
    assert torch.allclose(s1, torch.tensor([math.log(4.0), 1.0 + math.log(2.0)]))
    s2 = pesf.sharpness(z_t[:1], 2.0)
    assert s2.item() == pytest.approx(math.log(1.0 + math.sqrt(3.0)), abs=1e-6)
    # gap = mean_b (s(teacher) - s(student)); s(student) = log 2 at every t
    expected = (math.log(4.0) + 1.0 + math.log(2.0)) / 2 - math.log(2.0)
    assert pesf.sharpness_gap(z_t, z_s, 1.0) == pytest.approx(expected, abs=1e-6)
    means = pesf.sharpness_means(z_t.numpy(), 2.0)
    assert means["t1"] == pytest.approx(float(s1.mean()), abs=1e-6)


def test_adapter_has_50884_parameters_for_bert_base_and_bert_init():
    torch.manual_seed(0)
    adapter = pesf.Adapter(768, 2)
    assert pesf.param_count(adapter) == 50_884
    assert adapter.down.weight.shape == (64, 768) and adapter.up.weight.shape == (2, 64)
    assert adapter.linear.weight.shape == (2, 768)
    assert all(torch.count_nonzero(m.bias) == 0 for m in (adapter.linear, adapter.down, adapter.up))
    assert adapter.down.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert adapter.down.weight.mean().abs().item() < 1e-3
    assert pesf.param_count(pesf.Adapter(1024, 3)) == 1024 * 3 + 3 + 1024 * 64 + 64 + 64 * 3 + 3  # d_t from the config


def test_adapted_logits_are_the_teacher_logits_plus_both_branches(task, teacher_path, tiny_bert):
    setup = setup_for(config(teacher_path, tiny_bert, *task))
    batch = first_batch(setup)
    inputs = {k: batch[k] for k in pesf.INPUT_KEYS}
    adapter = setup.adapter
    with torch.no_grad():
        for p in adapter.parameters():  # non-zero biases, so every term is exercised
            p.add_(0.1 * torch.randn_like(p))
        targets = pesf.teacher_targets(setup.teacher, inputs)
        assert torch.allclose(targets["logits"], setup.teacher(**inputs).logits, atol=1e-6)  # the teacher's own logits
        h = targets["pooled"]
        assert h.shape == (8, 32) and adapter(h).shape == (8, 2)
        linear = h @ adapter.linear.weight.T + adapter.linear.bias
        bottleneck = torch.relu(h @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
        adapter.eval()
        z = pesf.adapted_logits(targets["logits"], h, adapter)
        assert torch.allclose(z, targets["logits"] + linear + bottleneck, atol=1e-6)
        adapter.train()  # dropout (p = 0.1) acts on the bottleneck branch only
        torch.manual_seed(1)
        reps = 16
        dropped = (pesf.adapted_logits(targets["logits"].repeat(reps, 1), h.repeat(reps, 1), adapter)
                   - (targets["logits"] + linear).repeat(reps, 1))
        kept = dropped != 0
        assert 0 < (~kept).sum() < kept.sum()
        assert torch.allclose(dropped[kept], (bottleneck.repeat(reps, 1) / 0.9)[kept], atol=1e-6)


def test_soft_loss_matches_hand_value_and_trains_the_adapter():
    z_t = torch.tensor([[0.0, math.log(3.0)]])
    z_s = torch.zeros(1, 2)
    assert pesf.soft_loss(z_t, z_s, 1.0).item() == pytest.approx(0.0625, abs=1e-7)  # (0.75 - 0.5)^2
    p = 1.0 / (1.0 + math.sqrt(3.0))  # softmax([0, ln3] / 2)[0]
    assert pesf.soft_loss(z_t, z_s, 2.0).item() == pytest.approx(4.0 * (p - 0.5) ** 2, abs=1e-7)
    assert pesf.soft_loss(z_s, z_s, 5.0).item() == 0.0

    torch.manual_seed(0)
    adapter = pesf.Adapter(16, 3, r=4)
    h = torch.randn(5, 16)
    student = torch.randn(5, 3, requires_grad=True)
    pesf.soft_loss(pesf.adapted_logits(torch.randn(5, 3), h, adapter), student, 5.0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert student.grad.abs().sum() > 0  # not detached on either side


def test_regression_soft_loss_is_the_mse_of_raw_outputs_not_zero():
    z_t = torch.tensor([[1.0], [2.0]])
    z_s = torch.zeros(2, 1)
    assert pesf.soft_loss(z_t, z_s, 5.0).item() == pytest.approx(2.5)  # (1 + 4) / 2, no T^2
    # the reference's softmax over one logit would be identically 0
    assert (torch.softmax(z_t / 5, -1) - torch.softmax(z_s / 5, -1)).abs().sum() == 0
    labels = torch.tensor([1.0, 1.0])
    assert pesf.ce_pair(z_s, z_t, labels).item() == pytest.approx(1.0 + 0.5)  # MSE(s, y) + MSE(t, y)


def test_ce_pair_is_student_ce_plus_adapted_teacher_ce():
    z_t = torch.tensor([[0.0, math.log(3.0)]])
    z_s = torch.zeros(1, 2)
    y = torch.tensor([1])
    assert pesf.ce_pair(z_s, z_t, y).item() == pytest.approx(math.log(2.0) - math.log(0.75), abs=1e-6)


def test_pkd_layer_map():
    assert pesf.pkd_layer_map(4, 2) == [(1, 2)]
    assert pesf.pkd_layer_map(12, 6) == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]
    assert pesf.pkd_layer_map(6, 3) == [(1, 2), (2, 4)]
    assert pesf.pkd_layer_map(24, 6) == [(1, 4), (2, 8), (3, 12), (4, 16), (5, 20)]
    assert pesf.pkd_layer_map(12, 5) == [(1, 2), (2, 4), (3, 6), (4, 8)]  # g = floor(12 / 5)
    assert pesf.pkd_layer_map(4, 1) == []
    with pytest.raises(ConfigError, match="more layers"):
        pesf.pkd_layer_map(2, 4)


def test_pkd_loss_hand_value_and_epsilon():
    s = torch.tensor([[[3.0, 4.0]]])  # -> (0.6, 0.8)
    t = torch.tensor([[[2.0, 0.0]]])  # -> (1, 0)
    assert pesf.pkd_loss(s, t).item() == pytest.approx((0.4 ** 2 + 0.8 ** 2) / 2)
    zero = pesf.pkd_loss(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))  # no eps: 0/0 = NaN in the reference
    assert zero.item() == 0.0


def test_total_loss_combines_the_terms():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(4, 2), torch.randn(4, 2)
    cls_s, cls_t = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    y = torch.tensor([0, 1, 1, 0])
    out = pesf.pesf_loss(z_s, z_t, y, cls_s, cls_t, alpha=0.7, beta=100.0, temperature=5.0)
    expected = (0.7 * pesf.soft_loss(z_t, z_s, 5.0) + 0.3 * pesf.ce_pair(z_s, z_t, y)
                + 100.0 * pesf.pkd_loss(cls_s, cls_t))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert pesf.pesf_loss(z_s, z_t, y, None, None)["pkd"].item() == 0.0


# --------------------------------------------------------------------------- models and one step


def test_pkd_loss_is_unchanged_between_padding_to_16_and_32(task, teacher_path, tiny_bert):
    setup = setup_for(config(teacher_path, tiny_bert, *task))
    module = module_for(setup).eval()
    tok = setup.student_tokenizer
    texts = setup.train_set.texts[:6]

    def l_pkd(width: int) -> torch.Tensor:
        enc = tok(texts, padding="max_length", max_length=width, truncation=True, return_tensors="pt")
        inputs = {k: enc[k] for k in pesf.INPUT_KEYS}
        assert inputs["input_ids"].shape == (6, width)
        with torch.no_grad():
            out = module(inputs, teacher_inputs=inputs)
        return pesf.pkd_loss(out["cls_student"], out["cls_teacher"])

    assert setup.pkd_map == [(1, 2)]
    a, b = l_pkd(16), l_pkd(32)
    assert a > 0 and torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_student_keeps_the_first_layers_with_a_new_classifier(task, teacher_path, make_tiny_bert):
    from transformers import BertForSequenceClassification

    source = make_tiny_bert(num_layers=4, classifier=True)  # a classifier: its head must not be reused
    cfg = config(teacher_path, source, *task, **{"student.num_layers": 2})
    student, _, record = pesf.build_student(cfg, textcls.load_task(cfg.data)[0])
    original = BertForSequenceClassification.from_pretrained(source)
    assert len(student.bert.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    for i in range(2):
        assert all(torch.equal(p, q) for p, q in zip(student.bert.encoder.layer[i].parameters(),
                                                     original.bert.encoder.layer[i].parameters()))
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, original.bert.embeddings.word_embeddings.weight)
    assert not torch.equal(student.classifier.weight, original.classifier.weight)
    assert torch.count_nonzero(student.classifier.bias) == 0 and record["id"] == source
    with pytest.raises(ConfigError, match="--student-layers 5 but the student has 4 layers"):
        pesf.build_student(config(teacher_path, source, *task, **{"student.num_layers": 5}),
                           textcls.load_task(cfg.data)[0])


def test_faithful_step_gives_gradients_only_to_student_and_adapter(task, teacher_path, tiny_bert):
    setup = setup_for(config(teacher_path, tiny_bert, *task))
    module = module_for(setup).train()
    assert not setup.teacher.training and setup.adapter.training  # adapter dropout active
    assert not any(n.startswith("teacher") for n, _ in module.named_parameters())
    out = pesf.PesfStep(pesf.LossConfig())(module, first_batch(setup))
    out["loss"].backward()
    assert out["pkd"] > 0 and out["soft"] > 0 and out["ce"] > 0
    assert all(p.grad is None for p in setup.teacher.parameters())
    assert all(p.grad is not None for p in setup.adapter.parameters())
    assert all(p.grad is not None for p in setup.student.parameters())
    assert setup.student.classifier.weight.grad.abs().sum() > 0
    assert setup.student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_optimiser_groups_carry_student_and_adapter_rates(task, teacher_path, tiny_bert):
    cfg = config(teacher_path, tiny_bert, *task)
    setup = setup_for(cfg)
    tcfg = dataclasses.replace(cfg.train, param_groups=pesf.param_groups(cfg))
    groups = T.param_groups(module_for(setup), tcfg)
    assert sorted(g["lr"] for g in groups) == [pytest.approx(1e-5), pytest.approx(5e-5)]
    adapter_group = min(groups, key=lambda g: g["lr"])
    assert sorted(adapter_group["names"]) == sorted(f"adapter.{n}" for n, _ in setup.adapter.named_parameters())
    assert all(g["weight_decay"] == 0.0 for g in groups)
    # reproduce mode: the whole teacher joins at teacher.lr (1e-5)
    rcfg = config(teacher_path, tiny_bert, *task, reproduce_released=True)
    rsetup = setup_for(rcfg)
    rgroups = T.param_groups(module_for(rsetup, reproduce=True),
                             dataclasses.replace(rcfg.train, param_groups=pesf.param_groups(rcfg)))
    teacher_names = {n for g in rgroups if abs(g["lr"] - 1e-5) < 1e-12 for n in g["names"] if n.startswith("teacher.")}
    assert teacher_names == {f"teacher.{n}" for n, _ in rsetup.teacher.named_parameters()}


def _train(cfg: pesf.PesfConfig, setup: pesf.Setup, out: Path, reproduce: bool = False, **train_overrides):
    module = module_for(setup, reproduce)
    tcfg = dataclasses.replace(cfg.train, param_groups=pesf.param_groups(cfg), checkpoints=False, **train_overrides)
    step = pesf.PesfStep(cfg.loss, None, "" if setup.shared_tokens else pesf.TEACHER_PREFIX)
    T.train(module, step, textcls.Indices(len(setup.train_set)), tcfg, out, collate_fn=textcls_collate(setup),
            callbacks=[step], final_dir=None,
            clip_parameters=pesf.student_parameters if reproduce else None)
    return module


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_faithful_training_leaves_the_teacher_bit_identical(task, teacher_path, tiny_bert, tmp_path):
    cfg = config(teacher_path, tiny_bert, *task)
    setup = setup_for(cfg)
    teacher0, student0, adapter0 = _snapshot(setup.teacher), _snapshot(setup.student), _snapshot(setup.adapter)
    _train(cfg, setup, tmp_path, max_steps=2)
    assert all(torch.equal(v, setup.teacher.state_dict()[k]) for k, v in teacher0.items())
    assert not torch.equal(adapter0["linear.weight"], setup.adapter.linear.weight)
    assert not torch.equal(adapter0["down.weight"], setup.adapter.down.weight)
    assert not torch.equal(student0["classifier.weight"], setup.student.classifier.weight)
    assert not torch.equal(student0["bert.encoder.layer.0.attention.self.query.weight"],
                           setup.student.bert.encoder.layer[0].attention.self.query.weight)


def test_reproduce_mode_trains_the_teacher_without_adapter_dropout_and_clips_only_the_student(
        task, teacher_path, tiny_bert, tmp_path):
    cfg = config(teacher_path, tiny_bert, *task, reproduce_released=True)
    setup = setup_for(cfg)
    module = module_for(setup, reproduce=True).train()
    assert not setup.adapter.training and not setup.teacher.training and setup.student.training
    teacher0, student0 = _snapshot(setup.teacher), _snapshot(setup.student)
    # Plain SGD with a tiny clip norm: clipped (student) updates are at most lr * 1e-6 in norm,
    # unclipped (teacher) ones are lr * |grad|.
    _train(cfg, setup, tmp_path, reproduce=True, max_steps=1, optimizer="sgd", momentum=0.0, max_grad_norm=1e-6)
    delta = lambda before, model: math.sqrt(sum(float((model.state_dict()[k] - v).pow(2).sum())  # noqa: E731
                                                for k, v in before.items() if v.is_floating_point()))
    assert delta(teacher0, setup.teacher) > 1e-8
    assert delta(student0, setup.student) <= 5e-5 * 1e-6 * 1.01
    assert not torch.equal(teacher0["classifier.weight"], setup.teacher.classifier.weight)
    assert not torch.equal(teacher0["bert.encoder.layer.0.attention.self.query.weight"],
                           setup.teacher.bert.encoder.layer[0].attention.self.query.weight)
    assert module.teacher is setup.teacher


def test_a_teacher_with_its_own_tokenizer_gives_the_same_losses(task, teacher_path, tiny_bert, tmp_path):
    """Unequal tokenizers (here: a different declared padding side) make the collate add the
    teacher's own encoding; it is always right-padded, so [CLS] stays at position 0."""
    import shutil

    other = tmp_path / "teacher"
    shutil.copytree(teacher_path, other)
    tok_cfg = other / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps({**json.loads(tok_cfg.read_text()), "padding_side": "left"}))
    shared = setup_for(config(teacher_path, tiny_bert, *task))
    separate = setup_for(config(str(other), tiny_bert, *task))
    assert shared.shared_tokens and not separate.shared_tokens
    batch = first_batch(separate)
    assert torch.equal(batch["teacher_input_ids"], batch["input_ids"])
    loss = pesf.LossConfig()
    outs = []
    for setup in (shared, separate):
        setup.adapter.load_state_dict(shared.adapter.state_dict())
        module = module_for(setup).eval()
        prefix = "" if setup.shared_tokens else pesf.TEACHER_PREFIX
        outs.append(pesf.PesfStep(loss, None, prefix)(module, first_batch(setup)))
    for k in ("soft", "ce", "pkd"):
        assert outs[0][k].item() == pytest.approx(outs[1][k].item(), rel=1e-6)


def test_regression_task_trains_with_a_nonzero_soft_loss(tmp_path, make_tiny_bert, tiny_bert):
    teacher = make_tiny_bert(num_layers=4, classifier=True, num_labels=1)
    train = write_task(tmp_path / "train.jsonl", 16, 0, regression=True)
    test = write_task(tmp_path / "test.jsonl", 8, 1, regression=True)
    setup = setup_for(config(teacher, tiny_bert, train, test))
    assert setup.train_set.regression and setup.student.config.num_labels == 1
    out = pesf.PesfStep(pesf.LossConfig())(module_for(setup).train(), first_batch(setup))
    assert out["soft"] > 0 and torch.isfinite(out["loss"])


def test_unequal_widths_need_beta_zero(task, make_tiny_bert, tiny_bert):
    wide = make_tiny_bert(num_layers=4, hidden=64, classifier=True)
    with pytest.raises(ConfigError, match="mmkit distill bert-kd"):
        setup_for(config(wide, tiny_bert, *task))
    setup = setup_for(config(wide, tiny_bert, *task, **{"loss.beta": 0.0}))
    assert setup.pkd_map == [] and setup.adapter.linear.in_features == 64
    out = pesf.PesfStep(pesf.LossConfig(beta=0.0))(module_for(setup).train(), first_batch(setup))
    assert out["pkd"].item() == 0.0 and torch.isfinite(out["loss"])


def test_saved_adapter_reloads_and_reproduces_adapted_logits(task, teacher_path, tiny_bert, tmp_path):
    setup = setup_for(config(teacher_path, tiny_bert, *task))
    with torch.no_grad():
        for p in setup.adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pesf.save_adapter(setup.adapter, tmp_path, {"id": teacher_path, "revision": None})
    settings = json.loads((tmp_path / pesf.ADAPTER_CONFIG).read_text())
    assert settings["teacher"]["id"] == teacher_path and (settings["d_t"], settings["r"], settings["num_labels"]) == (
        32, 64, 2) and settings["params"] == pesf.param_count(setup.adapter)
    loaded = pesf.load_adapter(tmp_path)
    batch = first_batch(setup)
    with torch.no_grad():
        t = pesf.teacher_targets(setup.teacher, {k: batch[k] for k in pesf.INPUT_KEYS})
        setup.adapter.eval()
        assert torch.equal(pesf.adapted_logits(t["logits"], t["pooled"], loaded),
                           pesf.adapted_logits(t["logits"], t["pooled"], setup.adapter))


def test_config_rejects_cache_in_reproduce_mode():
    with pytest.raises(ConfigError, match="drop --cache"):
        load_config(pesf.PesfConfig, flags={"teacher.id": "t", "student.id": "s", "data.task": "x",
                                            "reproduce_released": True, "cache.mode": "on"})
    cfg = load_config(pesf.PesfConfig, flags={"teacher.id": "t", "student.id": "s", "data.task": "x"})
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.temperature) == (0.7, 100.0, 5.0)
    assert (cfg.train.lr, cfg.adapter.lr, cfg.train.eps, cfg.train.weight_decay, cfg.train.warmup_ratio) == (
        5e-5, 1e-5, 1e-8, 0.0, 0.0)
    assert (cfg.train.scheduler, cfg.train.max_grad_norm, cfg.train.epochs, cfg.train.batch_size, cfg.train.seed) == (
        "linear", 1.0, 4, 8, 44)
    assert (cfg.data.max_len, cfg.adapter.r, cfg.adapter.dropout) == (128, 64, 0.1)


def test_float32_cache_gives_the_live_losses_without_running_the_teacher(task, teacher_path, tiny_bert, tmp_path):
    cfg = config(teacher_path, tiny_bert, *task, **{"cache.mode": "on", "cache.dtype": "float32",
                                                    "cache.dir": str(tmp_path)})
    setup = setup_for(cfg)
    reader, status = pesf.teacher_cache(cfg, setup)
    assert status == "built" and pesf.teacher_cache(cfg, setup)[1] == "hit"
    module = module_for(setup).eval()
    rows = [5, 0, 17, 3]  # shuffled rows: the cache must return these examples' targets
    batch = dict(first_batch(setup, rows), index=torch.tensor(rows))
    calls = []
    hook = setup.teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    hook_base = setup.teacher.base_model.register_forward_pre_hook(lambda *a: calls.append(1))
    cached = pesf.PesfStep(cfg.loss, reader)(module, batch)
    assert calls == []
    live = pesf.PesfStep(cfg.loss)(module, batch)
    hook.remove(), hook_base.remove()
    assert calls  # the live step did run the teacher
    for k in ("loss", "soft", "ce", "pkd"):
        assert cached[k].item() == pytest.approx(live[k].item(), rel=1e-6, abs=1e-9)
    with pytest.raises(ConfigError, match="the teacher is trained"):
        pesf.teacher_cache(dataclasses.replace(cfg, reproduce_released=True), setup)
