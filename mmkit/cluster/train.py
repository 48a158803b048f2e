"""The SFT comparison recipe (cluster.md section 9): CommonIT batches vs random batches.

One causal LM, the same initial weights, data and hyper-parameters, trained once per ordering
through ``core/train.py`` with a group-pure (or random, same kept set) batch sampler. The loss
falls on the response tokens and their EOS only; padding is masked explicitly, because a
tokenizer whose pad and EOS ids coincide (SmolLM2) would otherwise hide the real EOS.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from mmkit.core.train import TrainConfig
from mmkit.errors import MmkitError
from mmkit.registry import Registry

log = logging.getLogger("mmkit")

IGNORE = -100
DEFAULT_SYSTEM = ("A conversation between a person and an AI assistant. "
                  "The assistant answers the person's questions helpfully and accurately.")
ROLE_NAMES = {"user": "Human", "assistant": "Assistant"}

#: name -> ``fn(tokenizer, conversations, system_prompt) -> list[(ids, labels)]``
TEMPLATES: Registry = Registry("prompt template")

Conversation = Sequence[tuple[str, str]]  # (role, text) with role in user | assistant | system


@TEMPLATES.register("llmzoo")
def encode_llmzoo(tokenizer: Any, conversations: Sequence[Conversation], system_prompt: str
                  ) -> list[tuple[list[int], list[int]]]:
    """``{system}\\n\\nHuman: {text}{eos}\\nAssistant: {text}{eos}...``; labels on assistant text + EOS.

    Every segment of every conversation is tokenised in one batched call.
    """
    eos = tokenizer.eos_token or ""
    lead = _leading_special_ids(tokenizer)
    segments: list[str] = []
    layout: list[list[tuple[int, bool]]] = []  # per conversation: (segment index, trained?)
    for conv in conversations:
        parts = [(system_prompt + "\n\n", False)]
        for role, text in conv:
            if role == "system":
                parts[0] = (text + "\n\n", False)
            elif role == "user":
                parts.append((f"{ROLE_NAMES['user']}: {text}{eos}\n", False))
            else:
                parts += [(f"{ROLE_NAMES['assistant']}: ", False), (f"{text}{eos}", True)]
        layout.append([(len(segments) + i, trained) for i, (_, trained) in enumerate(parts)])
        segments += [p for p, _ in parts]
    ids = tokenizer(segments, add_special_tokens=False)["input_ids"]
    out = []
    for conv_layout in layout:
        input_ids, labels = list(lead), [IGNORE] * len(lead)
        for seg, trained in conv_layout:
            input_ids += ids[seg]
            labels += ids[seg] if trained else [IGNORE] * len(ids[seg])
        out.append((input_ids, labels))
    return out


@TEMPLATES.register("chat")
def encode_chat(tokenizer: Any, conversations: Sequence[Conversation], system_prompt: str
                ) -> list[tuple[list[int], list[int]]]:
    """The tokenizer's chat template; labels on each assistant message up to its end-of-turn token."""
    if not getattr(tokenizer, "chat_template", None):
        raise MmkitError("the tokenizer has no chat template; use --template llmzoo", field="--template")
    end_ids = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if i is not None}
    out = []
    for conv in conversations:
        messages = [{"role": role, "content": text} for role, text in conv]
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system_prompt})
        full = _chat_ids(tokenizer, messages, generation_prompt=False)
        labels = [IGNORE] * len(full)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(_chat_ids(tokenizer, messages[:i], generation_prompt=True))
            stop = len(_chat_ids(tokenizer, messages[:i + 1], generation_prompt=False))
            end = next((j + 1 for j in range(start, stop) if full[j] in end_ids), stop)
            labels[start:end] = full[start:end]
        out.append((full, labels))
    return out


def _chat_ids(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer itself puts before text (e.g. BOS), by its own policy."""
    with_special = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []


def build_examples(tokenizer: Any, conversations: Sequence[Conversation], template: str,
                   system_prompt: str, max_length: int) -> tuple[list[dict], np.ndarray]:
    """Tokenise, right-truncate to ``max_length`` and drop examples with no response token left.

    Returns the examples and the input rows they came from, so group labels stay aligned.
    """
    encoded = TEMPLATES.resolve(template, field="--template")(tokenizer, conversations, system_prompt)
    examples, rows = [], []
    for row, (ids, labels) in enumerate(encoded):
        ids, labels = ids[:max_length], labels[:max_length]
        if any(x != IGNORE for x in labels[1:]):  # position 0 is never predicted
            examples.append({"input_ids": ids, "labels": labels})
            rows.append(row)
    dropped = len(encoded) - len(examples)
    if dropped:
        log.warning("%d record(s) dropped: their response was truncated away at max length %d",
                    dropped, max_length)
    return examples, np.asarray(rows, dtype=np.int64)


@dataclass
class SFTCollator:
    """Right-pads ``input_ids`` with ``pad_id`` and ``labels`` with -100 (explicitly, never by id)."""

    pad_id: int

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_loss(model: Any, batch: dict) -> dict:
    """Token-mean cross-entropy on the response tokens (the model shifts labels itself)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return {"loss": out.loss}


def held_out_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``fraction`` of rows for held-out loss (stream tag 4), the rest for training."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4]))
    n_eval = int(round(n * fraction))
    perm = rng.permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def heldout_loss(model: Any, examples: Sequence[dict], groups: np.ndarray, collate: SFTCollator,
                 batch_size: int) -> dict[str, Any]:
    """Token-weighted held-out loss overall and per group (called under inference mode)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    order = np.argsort([-len(e["input_ids"]) for e in examples], kind="stable")
    loss_sum = np.zeros(int(groups.max()) + 1 if len(groups) else 0)
    tokens = np.zeros_like(loss_sum)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        target = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE,
                              reduction="none")
        np.add.at(loss_sum, groups[rows], nll.sum(1).cpu().numpy())
        np.add.at(tokens, groups[rows], (target != IGNORE).sum(1).cpu().numpy())
    per_group = {str(g): float(loss_sum[g] / tokens[g]) for g in np.flatnonzero(tokens)}
    total = float(loss_sum.sum() / tokens.sum()) if tokens.sum() else math.nan
    return {"heldout_loss": total, "heldout_loss_per_group": per_group}


PRESETS: dict[str, dict[str, Any]] = {
    # scripts/train_7B.sh of the reference: lr 5e-6, 3 epochs, warmup 0.03, linear, wd 0,
    # max length 2048, bf16, per-device batch 8 (on 4 GPUs), no accumulation.
    "paper": {"max_length": 2048, "records": None,
              "train": {"lr": 5e-6, "epochs": 3, "warmup_ratio": 0.03, "scheduler": "linear",
                        "weight_decay": 0.0, "batch_size": 8, "grad_accum": 1, "mixed_precision": "bf16"}},
    # mmkit's choice for a CPU demo: a model this small barely moves at 5e-6.
    "cpu-demo": {"max_length": 512, "records": 2000,
                 "train": {"lr": 5e-5, "max_steps": 200, "epochs": 3, "warmup_ratio": 0.03,
                           "scheduler": "linear", "weight_decay": 0.0, "batch_size": 8, "grad_accum": 1}},
}


@dataclass
class SFTConfig:
    """``mmkit cluster-instructions train`` (cluster.md section 9)."""

    grouped: str = ""
    model: str = "bundled:smollm2"
    gguf_file: str | None = None
    ordering: Literal["commonit", "random", "both"] = "both"
    template: str = "llmzoo"
    system_prompt: str = DEFAULT_SYSTEM
    max_length: int = 2048
    records: int | None = None
    eval_fraction: float = 0.05
    small_groups: Literal["merge", "warn", "drop", "error"] = "merge"
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-6, epochs=3, warmup_ratio=0.03))


ORDERINGS = ("commonit", "random")


def apply_preset(name: str | None) -> dict[str, Any]:
    """The dotted config keys a ``--preset`` sets (explicit flags still override them)."""
    if name is None:
        return {}
    if name not in PRESETS:
        from mmkit.errors import suggest

        raise MmkitError(f"unknown preset {name!r}{suggest(name, PRESETS)}; known: {', '.join(PRESETS)}",
                         field="--preset")
    preset = PRESETS[name]
    return {"max_length": preset["max_length"], "records": preset["records"],
            **{f"train.{k}": v for k, v in preset["train"].items()}}


def _step_group(labels: np.ndarray):
    """A callback noting each optimizer step's group (-1: mixed, the random baseline)."""
    from mmkit.core.train import Callback

    class StepGroups(Callback):
        def __init__(self) -> None:
            self.current: set[int] = set()
            self.steps: list[dict[str, Any]] = []

        def on_batch_end(self, state, batch, outputs) -> None:
            self.current.update(np.unique(labels[batch["index"].numpy()]).tolist())

        def on_step_end(self, state, logs) -> None:
            group = next(iter(self.current)) if len(self.current) == 1 else -1
            self.current = set()
            if state.step % state.config.log_every == 0 or state.step == state.total_steps:
                self.steps.append({"step": state.step, "loss": logs["loss"], "lr": logs["lr"], "group": group})

    return StepGroups()


def run_sft(cfg: SFTConfig, out: str | None, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg.model`` once per ordering from the same initial weights; compare held-out loss."""
    from mmkit.io import start_run

    run = start_run(out, "cluster-instructions", cfg, overwrite=overwrite)
    with run.guard():
        return _train_orderings(cfg, run)


def _train_orderings(cfg: SFTConfig, run: Any) -> dict[str, Any]:
    from mmkit.cluster.groups import GroupInfo
    from mmkit.cluster.records import RecordFields, load_records
    from mmkit.cluster.sampler import GroupedBatchSampler, RandomBatchSampler
    from mmkit.config import config_dict
    from mmkit.core.models import load_model
    from mmkit.core.train import train
    from mmkit.io import fingerprint, write_json, write_results

    records = load_records(cfg.grouped, RecordFields(), grouped=True)
    if cfg.records:
        records = records.subset(np.arange(min(cfg.records, len(records))))
    groups = np.array([rec.require("group", int) for rec in records.records], dtype=np.int64)
    orderings = list(ORDERINGS) if cfg.ordering == "both" else [cfg.ordering]
    samplers = {"commonit": GroupedBatchSampler, "random": RandomBatchSampler}
    summary = Path(cfg.grouped).expanduser().parent / "summary.json"
    info = GroupInfo.from_summary(summary) if summary.exists() else None  # merge small groups as grouped
    results: dict[str, Any] = {}
    loaded = load_model(cfg.model, "causal-lm", gguf_file=cfg.gguf_file, dtype="auto")
    initial = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    tokenizer = loaded.preprocessor
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, rows = build_examples(tokenizer, records.conversations, cfg.template, cfg.system_prompt,
                                    cfg.max_length)
    labels = groups[rows]
    train_idx, eval_idx = held_out_split(len(examples), cfg.eval_fraction, cfg.seed)
    train_set = [examples[i] for i in train_idx]
    eval_set, eval_groups = [examples[i] for i in eval_idx], labels[eval_idx]
    collate = SFTCollator(pad_id=tokenizer.pad_token_id)

    def evaluate(model):
        return heldout_loss(model, eval_set, np.maximum(eval_groups, 0), collate, cfg.train.batch_size)

    for ordering in orderings:
        loaded.model.load_state_dict(initial)  # the same initial weights for every ordering
        sampler = samplers[ordering](labels[train_idx], cfg.train.batch_size, accumulation_steps=cfg.train.grad_accum,
                                     seed=cfg.seed, small_groups=cfg.small_groups, group_info=info)
        steps = _step_group(labels[train_idx])
        result = train(loaded.model, sft_loss, train_set, cfg.train, run / ordering, collate_fn=collate,
                       eval_fn=evaluate if len(eval_set) else None, callbacks=[steps], batch_sampler=sampler,
                       preprocessor=tokenizer)
        final = result.evaluations[-1] if result.evaluations else {}
        metrics = {"ordering": ordering, "steps": result.step, "train_loss": steps.steps,
                   "heldout_loss": final.get("heldout_loss"),
                   "heldout_loss_per_group": final.get("heldout_loss_per_group"),
                   "sampler": {k: v for k, v in sampler.report.items() if k != "merged_from"},
                   "n_train": len(train_set), "n_eval": len(eval_set), "n_dropped_truncated": len(groups) - len(rows)}
        write_json(run / ordering / "metrics.json", metrics)
        results[ordering] = metrics
    comparison = {o: {"heldout_loss": m["heldout_loss"], "steps": m["steps"],
                      "final_train_loss": m["train_loss"][-1]["loss"] if m["train_loss"] else None}
                  for o, m in results.items()}
    write_json(run / "comparison.json", comparison)
    return write_results(run, method=f"sft-{cfg.ordering}", config=config_dict(cfg), seed=cfg.seed,
                         metrics=comparison, models={"model": {"id": cfg.model, "revision": None}},
                         data=fingerprint(cfg.grouped, len(records)), out=str(run.path))
