"""Tests of mmkit/core/train.py: resume, accumulation, schedules, groups, streams, callbacks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmkit.core import train as T
from mmkit.core.models import load_model
from mmkit.errors import MmkitError


class Stop(Exception):
    """Simulates a kill right after a checkpoint is written."""


class StopAfterSave(T.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, state, checkpoint):
        if state.step == self.step:
            raise Stop


class Recorder(T.Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int], list[str] | None]] = []
        self.steps: list[dict] = []
        self.epochs: list[int] = []

    def on_batch_end(self, state, batch, outputs):
        self.batches.append((state.epoch, batch["index"].tolist(), batch.get("stream")))

    def on_step_end(self, state, logs):
        self.steps.append(dict(logs))

    def on_epoch_end(self, state):
        self.epochs.append(state.epoch)


def toy_data(n: int = 40, seq: int = 8, vocab: int = 30, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def classifier_loss(model, batch):
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    return {"loss": out.loss, "logits": out.logits}


def run(path: str, out, cfg: T.TrainConfig, callbacks=(), data=None):
    torch.manual_seed(0)
    model = load_model(path, "sequence-classifier", device="cpu", preprocessor=False).model
    result = T.train(model, classifier_loss, data or toy_data(), cfg, out, callbacks=callbacks)
    return result, model


RESUME_CFG = dict(epochs=3, batch_size=8, grad_accum=2, lr=1e-3, save_every=2, scheduler="cosine",
                  warmup_ratio=0.1, log_every=1)


def test_resume_after_kill_matches_uninterrupted(tiny_bert_classifier, tmp_path):
    """A run stopped after a mid-epoch checkpoint and rerun with the same command ends bitwise
    equal to an uninterrupted run (dropout is active, so RNG state must be restored too)."""
    cfg = T.TrainConfig(**RESUME_CFG)
    _, straight = run(tiny_bert_classifier, tmp_path / "a", cfg)
    with pytest.raises(Stop):
        run(tiny_bert_classifier, tmp_path / "b", cfg, [StopAfterSave(4)])
    assert T.latest_checkpoint(tmp_path / "b").name == "step-00000004"
    result, resumed = run(tiny_bert_classifier, tmp_path / "b", cfg)
    assert result.resumed_from.name == "step-00000004"
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The training log has one line per step, with no duplicates from the killed run.
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, result.step + 1))


def test_final_weights_load_with_from_pretrained(tiny_bert_classifier, tmp_path):
    from transformers import BertForSequenceClassification

    result, model = run(tiny_bert_classifier, tmp_path, T.TrainConfig(epochs=1, batch_size=8))
    assert (result.model_dir / "model.safetensors").exists()
    back = BertForSequenceClassification.from_pretrained(result.model_dir)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    # Every checkpoint holds safetensors weights and accelerate state; only the newest 2 kept.
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "model" / "model.safetensors").exists()
    assert (ckpts[0] / "state").is_dir()


def test_epoch_orders_cover_data_once_and_differ(tiny_bert_classifier, tmp_path):
    rec = Recorder()
    run(tiny_bert_classifier, tmp_path, T.TrainConfig(epochs=2, batch_size=8), [rec])
    by_epoch = {e: sum((ix for ep, ix, _ in rec.batches if ep == e), []) for e in (0, 1)}
    assert sorted(by_epoch[0]) == list(range(40)) == sorted(by_epoch[1])
    assert by_epoch[0] != by_epoch[1]
    assert rec.epochs == [0, 1]


def test_grad_accumulation_counts_optimizer_steps(tiny_bert_classifier, tmp_path):
    # 40 examples / batch 8 = 5 micro-batches per epoch; accumulating 2 -> 3 steps (the last
    # step closes the epoch with one micro-batch).
    rec = Recorder()
    result, _ = run(tiny_bert_classifier, tmp_path, T.TrainConfig(epochs=2, batch_size=8, grad_accum=2), [rec])
    assert result.step == 6 and len(rec.steps) == 6 and len(rec.batches) == 10


def test_max_steps_stops_early(tiny_bert_classifier, tmp_path):
    result, _ = run(tiny_bert_classifier, tmp_path, T.TrainConfig(epochs=5, batch_size=8, max_steps=3))
    assert result.step == 3


def test_accumulated_step_equals_big_batch_step(tmp_path):
    """Two accumulated micro-batches of 4 give the same update as one batch of 8 (SGD, no
    momentum, no dropout, mean loss): the loop scales each micro-loss by 1/accumulation."""
    data = [{"x": torch.tensor([float(i), 1.0]), "y": torch.tensor(float(i % 3))} for i in range(8)]

    def loss(model, batch):
        return {"loss": ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()}

    finals = []
    for bs, accum in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        cfg = T.TrainConfig(epochs=1, batch_size=bs, grad_accum=accum, optimizer="sgd", momentum=0.0,
                            lr=0.01, scheduler="constant", max_grad_norm=0)
        T.train(model, loss, data, cfg, tmp_path / f"{bs}")
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(T.SCHEDULERS))
def test_schedules_warm_up_then_follow_their_shape(name):
    fn = T.SCHEDULERS.resolve(name)
    warmup, total = 10, 110
    ramp = [fn(s, warmup, total) for s in range(warmup)]
    assert ramp == sorted(ramp) and ramp[0] > 0 and ramp[-1] < 1
    assert fn(warmup, warmup, total) == pytest.approx(1.0)
    expected_mid = {"constant": 1.0, "linear": 0.5, "cosine": 0.5}[name]
    assert fn(60, warmup, total) == pytest.approx(expected_mid)
    assert fn(total, warmup, total) == pytest.approx({"constant": 1.0, "linear": 0.0, "cosine": 0.0}[name])


def test_cosine_quarter_point():
    assert T.cosine_schedule(25, 0, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("name", sorted(T.OPTIMIZERS))
def test_optimizers_build_from_groups(name):
    model = torch.nn.Linear(3, 2)
    cfg = T.TrainConfig(optimizer=name, lr=0.1)
    opt = T.OPTIMIZERS.resolve(name)(T.param_groups(model, cfg), cfg)
    assert isinstance(opt, torch.optim.Optimizer)


def test_param_groups_lr_mult_and_no_decay():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    cfg = T.TrainConfig(lr=1.0, weight_decay=0.1, no_decay=["bias", "1.weight"],
                        param_groups=[T.ParamGroup(pattern=r"^2\.", lr_mult=10.0)])
    groups = {name: (g["lr"], g["weight_decay"]) for g in T.param_groups(model, cfg) for name in g["names"]}
    assert "0.weight" not in groups  # frozen parameters are not optimised
    assert groups["0.bias"] == (1.0, 0.0)
    assert groups["1.weight"] == (1.0, 0.0)
    assert groups["2.weight"] == (10.0, 0.1)
    assert groups["2.bias"] == (10.0, 0.0)


def test_no_trainable_parameters_is_a_user_error():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(MmkitError, match="no trainable parameters"):
        T.param_groups(model, T.TrainConfig())


def test_streams_fill_each_batch_and_resume_exactly(tmp_path):
    """One stream defines the epoch; the endless one reshuffles when exhausted; the order is a
    pure function of (seed, epoch, batch), so a fresh sampler resumed mid-way agrees."""
    main = T.Stream("neg", list(range(6)), per_step=2, defines_epoch=True)
    side = T.Stream("pos", list(range(3)), per_step=2)
    sampler = T.StreamBatchSampler([main, side], seed=0, drop_last=False)
    seen_pos = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == 3
        assert sorted(i for b in batches for s, i in b if s == 0) == list(range(6))
        seen_pos += [i for b in batches for s, i in b if s == 1]
    # 12 draws from a 3-item endless stream: every block of 3 is a permutation.
    assert all(sorted(seen_pos[k:k + 3]) == [0, 1, 2] for k in range(0, 12, 3))
    again = T.StreamBatchSampler([main, side], seed=0, drop_last=False)
    again.set_epoch(1)
    sampler.set_epoch(1)
    assert list(again) == list(sampler)


def test_streams_through_the_loop_add_a_stream_column(tmp_path):
    rec = Recorder()

    def loss(model, batch):
        assert len(batch["stream"]) == batch["x"].shape[0]
        return {"loss": model(batch["x"]).pow(2).mean()}

    main = T.Stream("neg", [{"x": torch.ones(2) * i} for i in range(4)], per_step=2, defines_epoch=True)
    side = T.Stream("pos", [{"x": torch.zeros(2)} for _ in range(3)], per_step=1)
    T.train(torch.nn.Linear(2, 1), loss, [main, side], T.TrainConfig(epochs=1), tmp_path, callbacks=[rec])
    assert [b[2] for b in rec.batches] == [["neg", "neg", "pos"]] * 2


def test_exactly_one_epoch_stream():
    with pytest.raises(MmkitError, match="exactly one stream"):
        T.StreamBatchSampler([T.Stream("a", [1], 1), T.Stream("b", [1], 1)], 0, False)


def test_eval_runs_in_inference_mode_each_epoch(tmp_path):
    calls = []

    def evaluate(model):
        calls.append((torch.is_inference_mode_enabled(), model.training))
        return {"val_loss": 1.0}

    data = [{"x": torch.ones(2)} for _ in range(4)]
    result = T.train(torch.nn.Linear(2, 1), lambda m, b: {"loss": m(b["x"]).sum()}, data,
                     T.TrainConfig(epochs=2, batch_size=2), tmp_path, eval_fn=evaluate)
    assert calls == [(True, False), (True, False)]
    assert [e["epoch"] for e in result.evaluations] == [0, 1]
    assert len((tmp_path / "eval_log.jsonl").read_text().splitlines()) == 2


def test_config_validation():
    from mmkit.config import load_config

    with pytest.raises(MmkitError, match="unknown scheduler 'cosin'.*'cosine'"):
        load_config(T.TrainConfig, sets=["scheduler=cosin"])
    cfg = load_config(T.TrainConfig, sets=["param_groups=[{pattern: head, lr_mult: 10}]"])
    assert cfg.param_groups == [T.ParamGroup(pattern="head", lr_mult=10.0)]


def test_preprocessor_is_saved_with_the_weights(tiny_bert_classifier, tmp_path):
    from transformers import AutoTokenizer

    loaded = load_model(tiny_bert_classifier, "sequence-classifier", device="cpu")
    result = T.train(loaded.model, classifier_loss, toy_data(), T.TrainConfig(epochs=1), tmp_path,
                     preprocessor=loaded.preprocessor)
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    assert tok("a dog")["input_ids"] == loaded.preprocessor("a dog")["input_ids"]


def test_logged_lr_is_the_rate_each_step_used(tmp_path):
    data = [{"x": torch.ones(2)} for _ in range(8)]
    rec = Recorder()
    cfg = T.TrainConfig(epochs=1, batch_size=1, lr=1.0, scheduler="linear", warmup_ratio=0.25, log_every=1)
    T.train(torch.nn.Linear(2, 1), lambda m, b: {"loss": m(b["x"]).sum()}, data, cfg, tmp_path, callbacks=[rec])
    expected = [T.linear_schedule(s, 2, 8) for s in range(8)]
    assert [s["lr"] for s in rec.steps] == pytest.approx(expected)


def test_resume_tolerates_a_cut_off_log_line_and_max_steps_evaluates_last(tmp_path):
    data = [{"x": torch.ones(2)} for _ in range(8)]
    cfg = T.TrainConfig(epochs=1, batch_size=1, max_steps=5, save_every=2, log_every=1)

    def go(callbacks=()):
        return T.train(torch.nn.Linear(2, 1), lambda m, b: {"loss": m(b["x"]).sum()}, data, cfg, tmp_path,
                       eval_fn=lambda m: {"v": 0.0}, callbacks=callbacks)

    with pytest.raises(Stop):
        go([StopAfterSave(2)])
    with open(tmp_path / "train_log.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')
    result = go()
    assert result.step == 5
    assert [e["step"] for e in result.evaluations] == [5]  # stopped mid-epoch: still evaluated
    steps = [json.loads(x)["step"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_bf16_mixed_precision_trains_on_cpu(tiny_bert_classifier, tmp_path):
    cfg = T.TrainConfig(epochs=1, batch_size=8, mixed_precision="bf16", lr=1e-3, log_every=1)
    before = load_model(tiny_bert_classifier, "sequence-classifier", device="cpu", preprocessor=False).model
    result, model = run(tiny_bert_classifier, tmp_path, cfg)
    assert result.step == 5 and all(math.isfinite(h["loss"]) for h in result.history)
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))


def test_a_custom_batch_sampler_drives_the_epochs_and_resumes(tmp_path):
    """A caller's batch sampler (pure in its epoch) replaces the loop's shuffling, and a run
    killed mid-epoch resumes into the same batches."""

    class Reversed:
        def __init__(self, n):
            self.n, self.epoch = n, 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return self.n // 2

        def __iter__(self):
            order = list(range(self.n))[::-1] if self.epoch % 2 else list(range(self.n))
            return iter([order[i:i + 2] for i in range(0, self.n, 2)])

    data = [{"x": torch.tensor([float(i), 1.0])} for i in range(6)]

    def go(out, callbacks):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        T.train(model, lambda m, b: {"loss": m(b["x"]).pow(2).mean()}, data,
                T.TrainConfig(epochs=2, lr=0.01, save_every=1), out, callbacks=callbacks,
                batch_sampler=Reversed(6))
        return model

    rec = Recorder()
    straight = go(tmp_path / "a", [rec])
    assert [ix for _, ix, _ in rec.batches] == [[0, 1], [2, 3], [4, 5], [5, 4], [3, 2], [1, 0]]
    with pytest.raises(Stop):
        go(tmp_path / "b", [StopAfterSave(4)])
    rec2 = Recorder()
    resumed = go(tmp_path / "b", [rec2])
    assert [ix for _, ix, _ in rec2.batches] == [[3, 2], [1, 0]]
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))
