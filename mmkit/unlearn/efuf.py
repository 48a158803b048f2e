"""EFUF training (unlearn.md §3-§5.0): label masking, the connector-only recipe on
``core/train.py``, safeguards, connector checkpoints, and the whole ``unlearn efuf`` run.

Sequence construction (§3.1): ``prefix = prompt_text + " " + context``, ``full = prefix +
target``; both go through the processor with the image, the labelled positions are those after
the longest common prefix of the two id sequences (plus one EOS for ``sent``/``replay``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np

from mmkit.core.backends import BackendConfig
from mmkit.core.train import Callback, TrainConfig
from mmkit.errors import ConfigError, MmkitError
from mmkit.unlearn.build import Thresholds
from mmkit.unlearn.losses import KINDS, OBJECTIVES
from mmkit.unlearn.samples import INSTRUCTION, Sample

log = logging.getLogger("mmkit")

IGNORE = -100
#: Module-name suffixes that mark a connector (LLaVA in transformers; the original LLaVA code).
CONNECTOR_NAMES = ("multi_modal_projector", "mm_projector")
#: The LLaVA v1 system sentence the reference prepended (``--system-prompt llava``).
LLAVA_SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                       "gives helpful, detailed, and polite answers to the human's questions.")
MAX_CONSECUTIVE_SKIPS = 10


def _train_defaults() -> TrainConfig:
    """§4 optimiser and schedule: AdamW lr 1e-5, wd 0.05, constant, no warmup, 1 epoch, clip 1.0."""
    return TrainConfig(lr=1e-5, weight_decay=0.05, scheduler="constant", warmup_ratio=0.0, epochs=1,
                       max_grad_norm=1.0, log_every=1, no_decay=[])


@dataclass
class EfufConfig:
    """``mmkit unlearn efuf`` (unlearn.md §7); ``train`` holds the loop's settings."""

    model: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = "auto"  # bf16 on GPU, fp32 on CPU (frozen weights); the connector trains in fp32
    device: str = "auto"
    images: Optional[str] = None
    responses: Optional[str] = None
    samples: Optional[str] = None
    num_responses: int = 1
    instruction: str = INSTRUCTION
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 200
    clip: str = "openai/clip-vit-base-patch32"
    extractor: str = "vocab"
    vocab: Optional[str] = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    variant: str = "paper"
    lambda_neg: float = 0.3
    lambda_sent: float = 0.2
    safeguards: bool = True
    neg_nll_clip: Optional[float] = None  # default ln |V|
    guard_pos_rise: float = 1.0
    neg_stop: Optional[float] = None  # default: the clip
    trainable: Optional[str] = None
    replay: Optional[str] = None
    batch_neg: int = 1
    batch_pos: int = 1
    batch_sent: int = 1
    batch_replay: int = 1
    val_frac: float = 0.05
    first_eval: bool = True
    evals_per_epoch: int = 4
    gradient_checkpointing: bool = False
    system_prompt: Optional[str] = None
    save_full: bool = False
    stop_after: Optional[Literal["responses", "objects", "samples"]] = None
    eval_images: Optional[str] = None
    eval_gt: Optional[str] = None
    eval_coco_annotations: Optional[str] = None
    eval_pope: list[str] = field(default_factory=list)
    extractor_model: Optional[str] = None  # the llm extractor's text model (hf id, or a server's model name)
    extractor_base_url: Optional[str] = None
    backend: BackendConfig = field(default_factory=BackendConfig)  # caption generation (§2.1)
    train: TrainConfig = field(default_factory=_train_defaults)

    def validate(self) -> None:
        if not self.model and not (self.responses and self.stop_after in ("objects", "samples")):
            raise ConfigError("expected a model (hub id or save_pretrained folder)", field="--model")
        if not self.images and not self.samples:
            raise ConfigError("expected --images DIR or --samples FILE", field="--images")
        OBJECTIVES.resolve(self.variant, field="--variant")
        if not 0 <= self.val_frac < 1:
            raise ConfigError(f"expected a fraction in [0, 1), got {self.val_frac}", field="--val-frac")
        for name in ("batch_neg", "batch_pos", "batch_sent", "batch_replay", "num_responses"):
            if getattr(self, name) < 1:
                raise ConfigError(f"expected an integer >= 1, got {getattr(self, name)}", field=name)
        if self.eval_images and not (self.eval_gt or self.eval_coco_annotations):
            raise ConfigError("--eval-images needs --eval-gt or --eval-coco-annotations", field="--eval-images")
        self.train.validate()


# --------------------------------------------------------------------------- sequences (§3.1)


def prompt_text(processor: Any, instruction: str, system_prompt: str | None = None) -> str:
    """The chat template applied to one user turn (image + instruction), generation prompt added."""
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def target_labels(prefix_ids: Sequence[int], full_ids: Sequence[int],
                  eos_id: int | None = None) -> tuple[list[int], list[int]]:
    """§3.1: ``(input_ids, labels)``: -100 before the longest common prefix ``n`` of the two
    tokenisations, the ids after it, and one labelled ``eos_id`` appended when given."""
    n = common_prefix_length(prefix_ids, full_ids)
    ids = list(full_ids) + ([eos_id] if eos_id is not None else [])
    labels = [IGNORE] * n + ids[n:]
    return ids, labels


def needs_eos(kind: str) -> bool:
    """``sent`` and ``replay`` targets end the response: one EOS; ``pos``/``neg`` fragments none."""
    return kind in ("sent", "replay")


class SampleEncoder:
    """Turns a :class:`Sample` into model inputs with §3.1 labels (two processor calls, image included)."""

    def __init__(self, processor: Any, system_prompt: str | None = None) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.system_prompt = system_prompt
        self._prompts: dict[str, str] = {}
        if self.tokenizer.eos_token_id is None:
            raise MmkitError("the tokenizer has no EOS token", field="--model")

    def texts(self, sample: Sample) -> tuple[str, str]:
        """``(prefix, full)`` of §3.1."""
        if sample.instruction not in self._prompts:
            self._prompts[sample.instruction] = prompt_text(self.processor, sample.instruction, self.system_prompt)
        prefix = self._prompts[sample.instruction] + " " + sample.context
        return prefix, prefix + sample.target

    def n_target_tokens(self, samples: Sequence[Sample]) -> list[int]:
        """Target tokens (EOS not counted) of every sample, from the text alone (the image
        placeholder expands before the target, so the boundary is the same)."""
        prefixes, fulls = zip(*(self.texts(s) for s in samples))
        p = self.tokenizer(list(prefixes), add_special_tokens=True)["input_ids"]
        f = self.tokenizer(list(fulls), add_special_tokens=True)["input_ids"]
        return [len(b) - common_prefix_length(a, b) for a, b in zip(p, f)]

    def encode(self, sample: Sample, image: Any) -> dict[str, Any]:
        import torch

        prefix, full = self.texts(sample)
        pre = self.processor(text=prefix, images=image, return_tensors="pt")
        enc = self.processor(text=full, images=image, return_tensors="pt")
        ids, labels = target_labels(pre["input_ids"][0].tolist(), enc["input_ids"][0].tolist(),
                                    self.tokenizer.eos_token_id if needs_eos(sample.kind) else None)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "pixel_values": enc["pixel_values"][0],
                "score": float("nan") if sample.score is None else sample.score, "kind": sample.kind}


class SampleDataset:
    """Map-style dataset of encoded samples; images are opened when an item is read."""

    def __init__(self, samples: Sequence[Sample], encoder: SampleEncoder) -> None:
        self.samples, self.encoder = list(samples), encoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from mmkit.core.data import load_image

        return self.encoder.encode(self.samples[i], load_image(self.samples[i].image))


class Collate:
    """Right-pads a list of encoded samples (``attention_mask`` 0 and labels -100 on padding);
    ``kind`` lists each row's kind (the training loop's ``stream`` column, also without streams)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        from mmkit.core.data import pad_batch

        ids, mask = pad_batch([it["input_ids"].tolist() for it in items], self.pad_id, side="right")
        labels, _ = pad_batch([it["labels"].tolist() for it in items], IGNORE, side="right")
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "pixel_values": torch.stack([it["pixel_values"] for it in items]),
                "score": torch.tensor([it["score"] for it in items], dtype=torch.float32),
                "kind": [it["kind"] for it in items]}


def check_image_tokens(model: Any, item: Mapping[str, Any]) -> None:
    """§3.1: the image placeholder tokens must equal the image features the model produces (old
    ``transformers`` expanded inside the model, which would misalign the labels)."""
    import torch

    cfg = model.config
    token = getattr(cfg, "image_token_id", None)
    if token is None:
        token = getattr(cfg, "image_token_index", None)
    n_tokens = int((item["input_ids"] == token).sum())
    with torch.inference_mode():
        feats = model.get_image_features(
            pixel_values=item["pixel_values"][None].to(model.device, model.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = getattr(feats, "pooler_output", feats)
    n_feats = sum(int(f.shape[-2]) for f in feats) if isinstance(feats, (list, tuple)) else int(feats.shape[-2])
    if n_tokens != n_feats:
        raise MmkitError(f"the processor gives {n_tokens} image tokens but the model produces {n_feats} image "
                         "features; upgrade transformers (the processor must expand <image>)", field="--model")


# --------------------------------------------------------------------------- trainable parameters (§4)


def select_trainable(model: Any, pattern: str | None = None) -> list[str]:
    """Freeze every parameter except the connector's (module name ending in
    :data:`CONNECTOR_NAMES`) or, with ``pattern``, those whose name matches it (``re.search``)."""
    names = [n for n, _ in model.named_parameters()]
    if pattern:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"not a regular expression: {exc}", field="--trainable") from None
        chosen = [n for n in names if rx.search(n)]
    else:
        prefixes = tuple(m + "." for m, _ in model.named_modules() if m.split(".")[-1] in CONNECTOR_NAMES)
        chosen = [n for n in names if n.startswith(prefixes)] if prefixes else []
    if not chosen:
        what = f"matches {pattern!r}" if pattern else f"belongs to a module named {' or '.join(CONNECTOR_NAMES)}"
        raise MmkitError(f"no parameter {what}; pass --trainable REGEX (parameter names like {names[0]!r})",
                         field="--trainable")
    keep = set(chosen)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    return chosen


def save_connector(model: Any, names: Sequence[str], directory: Path, dtype: Any,
                   meta: Mapping[str, Any]) -> None:
    """§5.0: ``connector.safetensors`` (the trained tensors by parameter name, in ``dtype``) and
    ``connector.json`` (``param_names``, ``shapes`` and ``meta``) in ``directory``."""
    from safetensors.torch import save

    from mmkit import __version__
    from mmkit.io import atomic_write, write_json

    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().to(dtype).contiguous().cpu() for n in names}
    with atomic_write(directory / "connector.safetensors", "wb") as fh:
        fh.write(save(tensors))
    write_json(directory / "connector.json", {**meta, "param_names": list(names),
                                              "shapes": {n: list(t.shape) for n, t in tensors.items()},
                                              "mmkit_version": __version__})


# --------------------------------------------------------------------------- the loss hook (§3, §3.5)


class EfufLoss:
    """``loss(model, batch)`` for :func:`mmkit.core.train.train`: one forward over a batch mixing
    kinds (``batch["kind"]``), per-sample NLLs, the variant's objective, guards and skips.

    ``step``/``total`` (the schedule's ``t`` and ``T``) are kept current by :class:`EfufCallback`.
    A non-finite loss returns a leaf zero: no parameter gets a gradient, so the optimizer leaves
    every parameter untouched (no update, no weight decay); 10 in a row abort the run.
    """

    def __init__(self, variant: str, objective: Any, guard: Any, eval_mode: bool = True) -> None:
        self.objective_fn = OBJECTIVES.resolve(variant, field="--variant")
        self.objective, self.guard, self.eval_mode = objective, guard, eval_mode
        self.step, self.total = 0, 1
        self.skipped = self.consecutive = 0

    def nll(self, model: Any, batch: Mapping[str, Any]):
        """Per-sample NLL (§3.2) of a collated batch."""
        from mmkit.unlearn.losses import per_sample_nll

        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], use_cache=False)
        return per_sample_nll(out.logits, batch["labels"])

    def __call__(self, model: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        from mmkit.unlearn.losses import LossInput

        if self.eval_mode:
            model.eval()  # §4: no dropout (the loop switches to train mode)
        nll = self.nll(model, batch)
        terms = self.objective_fn(LossInput(nll, batch["kind"], batch["score"].to(nll.device), self.step,
                                            self.total), self.objective, self.guard.neg_enabled)
        out: dict[str, Any] = {k: v.detach() for k in ("l_pos", "l_neg", "l_sent", "l_rep")
                               if (v := getattr(terms, k)) is not None}
        out["w_neg"] = torch.tensor(terms.w_neg)
        loss = terms.loss
        if torch.isfinite(loss):
            self.consecutive = 0
        else:
            self.skipped += 1
            self.consecutive += 1
            log.warning("step %d: non-finite loss, update skipped (%d in a row)", self.step + 1, self.consecutive)
            if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
                raise MmkitError(f"{MAX_CONSECUTIVE_SKIPS} consecutive non-finite losses; lower --lr or check "
                                 "the samples", field="loss")
            loss = torch.zeros((), device=nll.device, requires_grad=True)
        out["loss"] = loss
        return out


def evaluate_nll(loss: EfufLoss, model: Any, datasets: Mapping[str, Any], collate: Collate,
                 batch_size: int = 4) -> dict[str, float | None]:
    """Mean per-kind NLL on the held-out samples (``val_nll_<kind>``; None without samples)."""
    import torch

    out: dict[str, float | None] = {}
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for kind in KINDS:
            data = datasets.get(kind)
            if not data or len(data) == 0:
                out[f"val_nll_{kind}"] = None
                continue
            values = [loss.nll(model, _to(collate([data[j] for j in range(i, min(i + batch_size, len(data)))]),
                                          model))
                      for i in range(0, len(data), batch_size)]
            out[f"val_nll_{kind}"] = float(torch.cat(values).float().mean())
    model.train(was_training)
    return out


def _to(batch: dict[str, Any], model: Any) -> dict[str, Any]:
    device = next(model.parameters()).device
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


class EfufCallback(Callback):
    """Keeps the loss's schedule position current, feeds the collapse guard, and saves/restores
    the guard and skip counters with every checkpoint (so a resumed run behaves the same)."""

    STATE = "efuf_state.json"

    def __init__(self, loss: EfufLoss, guard: Any) -> None:
        self.loss, self.guard = loss, guard

    def on_train_begin(self, state: Any) -> None:
        from mmkit.core.train import latest_checkpoint

        self.loss.step, self.loss.total = state.step, max(1, state.total_steps)
        self.guard.total = self.loss.total
        ckpt = latest_checkpoint(state.out) if state.step else None
        if ckpt is not None and (ckpt / self.STATE).is_file():
            saved = json.loads((ckpt / self.STATE).read_text())
            self.guard.load(saved["guard"])
            self.loss.skipped = saved["skipped"]

    def on_step_end(self, state: Any, logs: Mapping[str, float]) -> None:
        was = self.guard.triggered_at
        self.guard.update_train(state.step, logs.get("l_pos"))
        self._report(was)
        self.loss.step = state.step

    def on_evaluate(self, state: Any, metrics: Mapping[str, Any]) -> None:
        was = self.guard.triggered_at
        self.guard.update_val(state.step, metrics.get("val_nll_pos"), metrics.get("val_nll_neg"))
        self._report(was)

    def _report(self, was: int | None) -> None:
        if was is None and self.guard.triggered_at is not None:
            log.warning("step %d: collapse guard (%s): negative weight set to 0 for the rest of the run",
                        self.guard.triggered_at, self.guard.reason)

    def on_save(self, state: Any, checkpoint: Path) -> None:
        from mmkit.io import write_json

        write_json(checkpoint / self.STATE, {"guard": self.guard.state(), "skipped": self.loss.skipped})
