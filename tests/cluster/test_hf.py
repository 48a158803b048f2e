"""GroupedTrainer and make_grouped_dataloader (cluster.md section 8; section 10, item 13)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkit.cluster import hf
from mmkit.core.models import load_model
from mmkit.errors import MmkitError

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the cat dog sits on a red mat near blue car with small green tree".split()
GROUPS = np.array([0] * 16 + [1] * 12 + [2] * 12)  # 40 records
B, A = 4, 2  # U = 8: per epoch 2 + 1 + 1 = 4 optimizer steps, 8 micro-batches


class Records(torch.utils.data.Dataset):
    """40 short token sequences of different lengths, each carrying its row index."""

    def __init__(self, tokenizer) -> None:
        rng = np.random.default_rng(0)
        texts = [" ".join(rng.choice(WORDS, size=3 + i % 7)) for i in range(len(GROUPS))]
        self.rows = [{"idx": i, "input_ids": tokenizer(t).input_ids + [tokenizer.eos_token_id]}
                     for i, t in enumerate(texts)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from range(len(GROUPS))


class RecordingCollator:
    """Right-pads a batch (labels -100 on padding, set by length, not by pad id) and records
    each batch's row indices."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id, self.seen = pad_id, []

    def __call__(self, features: list[dict]) -> dict:
        self.seen.append([f["idx"] for f in features])
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id)
        labels = torch.full((len(features), width), -100)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = labels[row, :n] = torch.tensor(f["input_ids"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def lm(tiny_causal_lm):
    return load_model(tiny_causal_lm, "causal-lm", device="cpu")


def _args(tmp_path, **overrides):
    from transformers import TrainingArguments

    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=B, gradient_accumulation_steps=A,
                   num_train_epochs=2, learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                   logging_steps=1, seed=0, data_seed=5, remove_unused_columns=False, disable_tqdm=True)
    return TrainingArguments(**{**options, **overrides})


def test_grouped_trainer_follows_the_plan(lm, tmp_path):
    collator = RecordingCollator(lm.preprocessor.pad_token_id)
    trainer = hf.GroupedTrainer(model=lm.model, args=_args(tmp_path), train_dataset=Records(lm.preprocessor),
                                data_collator=collator, groups=GROUPS)
    result = trainer.train()
    sampler = trainer.grouped_sampler
    assert sampler.seed == 5 and sampler.U == B * A and sampler.steps == 4
    expected = [b.tolist() for e in (0, 1) for b in sampler.plan(e)[1].reshape(-1, B)]
    assert collator.seen == expected
    for e in (0, 1):  # every optimizer update is group-pure
        for step in sampler.plan(e)[1]:
            assert len(set(GROUPS[step.reshape(-1)].tolist())) == 1
    assert trainer.state.global_step == 8  # len(dataloader) / A = S per epoch
    assert math.isfinite(result.training_loss)
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    assert sum(isinstance(cb, hf.GroupedEpochCallback) for cb in trainer.callback_handler.callbacks) == 1


def test_grouped_trainer_removes_unused_columns_of_hf_datasets(lm, tmp_path):
    import datasets

    tok = lm.preprocessor
    rows = Records(tok).rows
    ds = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "note": f"row {r['idx']}"} for r in rows])
    seen = []

    def collate(features):
        seen.append(sorted(features[0]))
        return RecordingCollator(tok.pad_token_id)([dict(f, idx=0) for f in features])

    trainer = hf.GroupedTrainer(model=lm.model, args=_args(tmp_path, num_train_epochs=1,
                                                           remove_unused_columns=True),
                                train_dataset=ds, data_collator=collate, groups=GROUPS)
    loader = trainer.get_train_dataloader()
    assert len(loader) == 8 and len(list(loader)) == 8 and seen[0] == ["input_ids"]


def test_grouped_trainer_rejects_misaligned_groups_and_warns_on_accumulation(lm, tmp_path, caplog):
    trainer = hf.GroupedTrainer(model=lm.model, args=_args(tmp_path), train_dataset=Records(lm.preprocessor),
                                data_collator=RecordingCollator(0), groups=GROUPS[:-1])
    with pytest.raises(MmkitError, match="39 group ids for 40 rows"):
        trainer.get_train_dataloader()
    trainer = hf.GroupedTrainer(model=lm.model, args=_args(tmp_path), train_dataset=Records(lm.preprocessor),
                                data_collator=RecordingCollator(0), groups=GROUPS,
                                sampler_kwargs={"accumulation_steps": 1})
    trainer.get_train_dataloader()
    assert "group-pure per micro-batch only" in caplog.text


def test_make_grouped_dataloader_with_and_without_accelerator():
    from accelerate import Accelerator

    data = list(range(len(GROUPS)))
    loader, sampler = hf.make_grouped_dataloader(data, GROUPS, 4, list, seed=2)
    assert sampler.shard == "global" and sampler.world_size == 1
    assert list(loader) == sampler.plan(0)[1].reshape(-1, 4).tolist() and sampler.epoch == 1

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    loader, sampler = hf.make_grouped_dataloader(data, GROUPS, 2, lambda xs: torch.tensor(xs),
                                                 accelerator=accelerator, seed=2)
    assert sampler.accumulation_steps == 2 and sampler.U == 4 and len(loader) == len(sampler)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        assert [b.tolist() for b in loader] == sampler.plan(epoch)[1].reshape(-1, 2).tolist()
    with pytest.raises(MmkitError, match="iterable"):
        hf.make_grouped_dataloader(Stream(), GROUPS, 2, list)
    with pytest.raises(MmkitError, match="one group id per dataset row"):
        hf.make_grouped_dataloader(data[:-1], GROUPS, 2, list)


def test_epoch_callback_floors_the_trainer_epoch():
    from types import SimpleNamespace

    from mmkit.cluster.sampler import GroupedBatchSampler

    sampler = GroupedBatchSampler(GROUPS, 4)
    hf.GroupedEpochCallback(sampler).on_epoch_begin(None, SimpleNamespace(epoch=1.9999999), None)
    assert sampler.epoch == 2


def test_imports_stay_cheap():
    code = ("import sys, mmkit.cluster.sampler, mmkit.cluster.groups, mmkit.cluster.hf; "
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
    with pytest.raises(AttributeError):
        hf.NoSuchThing  # noqa: B018
    assert issubclass(hf.GroupedTrainer, hf.GroupedBatchMixin)
