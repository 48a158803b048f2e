"""The ``unlearn efuf`` run (unlearn.md §1 data flow, §5.0 outputs): images -> ``responses.jsonl``
-> ``objects.jsonl`` -> ``samples.jsonl`` -> ``connector.safetensors`` -> ``results.json``.

Each stage can be supplied instead of computed (``--responses``, ``--samples``) and the run can
stop after one (``--stop-after``). A resumed run (same ``--out``) reuses the stage files it
already wrote, so the training it resumes sees the same samples.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmkit.config import config_dict
from mmkit.core.seeding import stable_rng
from mmkit.errors import DataError, MmkitError
from mmkit.io import RunDir, fingerprint, start_run, write_jsonl, write_results
from mmkit.unlearn.efuf import (LLAVA_SYSTEM_PROMPT, Collate, EfufCallback, EfufConfig, EfufLoss, SampleDataset,
                                SampleEncoder, check_image_tokens, evaluate_nll, save_connector, select_trainable)
from mmkit.unlearn.losses import KINDS, CollapseGuard, ObjectiveConfig
from mmkit.unlearn.samples import Sample, count_kinds, read_samples

log = logging.getLogger("mmkit")

COMMAND = "unlearn efuf"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def run(cfg: EfufConfig, out: str | None = None, overwrite: bool = False, command: str = COMMAND) -> dict[str, Any]:
    """Run ``mmkit unlearn efuf`` (or ``build-samples``, which sets ``stop_after``) into ``out``
    and return ``results.json`` plus the run folder as ``out``."""
    run_dir = start_run(out, command, cfg, overwrite=overwrite)
    with run_dir.guard():
        results = _run(cfg, run_dir)
    return {**results, "out": str(run_dir.path)}


def _run(cfg: EfufConfig, run_dir: RunDir) -> dict[str, Any]:
    metrics: dict[str, Any] = {"n_dropped": {}}
    models: dict[str, Any] = {}
    samples = prepare_samples(cfg, run_dir, metrics, models)
    extra: dict[str, Any] = {}
    if samples is not None:
        if cfg.replay:
            samples = samples + read_replay(cfg.replay)
        metrics["n_samples"] = count_kinds(samples)
        exclude = cfg.samples or str(run_dir / "samples.jsonl")
        before = evaluate_hallucination(cfg, run_dir, "before", exclude) if cfg.eval_images else None
        trained = train_connector(cfg, samples, run_dir, metrics)
        models["model"] = trained.pop("model")
        extra["loss_history"] = trained.pop("loss_history")
        metrics.update(trained)
        if cfg.eval_images:
            metrics["eval"] = {"before": before, "after": evaluate_hallucination(
                cfg, run_dir, "after", exclude, str(run_dir / "connector.safetensors"))}
    data = fingerprint(cfg.samples) if cfg.samples else {"path": cfg.responses or cfg.images}
    return write_results(run_dir, method="efuf", config=config_dict(cfg), metrics=metrics, seed=cfg.train.seed,
                         models=models, data=data, **extra)


# --------------------------------------------------------------------------- data stages (§2)


def prepare_samples(cfg: EfufConfig, run_dir: RunDir, metrics: dict[str, Any],
                    models: dict[str, Any]) -> list[Sample] | None:
    """The training samples, from ``--samples`` or built stage by stage (None after ``--stop-after``)."""
    from mmkit.unlearn.build import read_responses, samples_from_objects

    code = cfg.variant == "code"
    if cfg.samples:
        samples = read_samples(cfg.samples, cfg.images, require_score=code)
        metrics["score_quantiles"] = score_quantiles([s.score for s in samples if s.kind in ("pos", "neg")])
        return samples
    written = run_dir / "samples.jsonl"
    if run_dir.resumed and written.is_file():
        return read_samples(str(written), cfg.images, require_score=code)
    own = run_dir / "responses.jsonl"
    if cfg.responses:
        responses = read_responses(cfg.responses)
    elif run_dir.resumed and own.is_file():
        responses = read_responses(str(own))
    else:
        responses = generate_responses(cfg, own, metrics, models)
    metrics["n_responses"] = len(responses)
    if cfg.stop_after == "responses":
        return None
    objects = score_responses(cfg, responses, run_dir, metrics, models)
    if cfg.stop_after == "objects":
        return None
    samples, ignored = samples_from_objects(responses, objects, cfg.thresholds)
    metrics["n_dropped"]["unlabelled_objects"] = ignored
    write_jsonl(written, (s.record() for s in samples))
    if cfg.stop_after == "samples":
        metrics["n_samples"] = count_kinds(samples)
        return None
    if not samples:
        raise DataError("no samples: no object scored below --t-hal or above --t-real", file=str(written))
    return read_samples(str(written), cfg.images, require_score=code)


def generate_responses(cfg: EfufConfig, path: Path, metrics: dict[str, Any], models: dict[str, Any]) -> list[Any]:
    """§2.1: ``--num-responses`` descriptions per image with the model being unlearned, through a
    ``core/backends.py`` backend (local ``hf`` or an OpenAI-compatible server); written to ``path``."""
    from mmkit.core.backends import GenerationSettings, Request, open_backend, resolve_kind
    from mmkit.unlearn.build import list_images, read_responses, response_records

    root = Path(cfg.images).expanduser()
    images = list_images(cfg.images)
    backend = open_backend(resolve_kind(cfg.backend), cfg.backend, cfg.model, seed=cfg.train.seed)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  n=cfg.num_responses)
    requests = [Request(uid=str(i), text=cfg.instruction, images=(str(root / im),)) for i, im in enumerate(images)]
    answers: dict[str, list[str]] = {}
    try:
        for line in backend.answer(requests, settings):
            if line.get("error"):
                raise MmkitError(f"generation failed: {line['error']}", field=f"image {images[int(line['uid'])]}")
            pred = line["prediction"]
            answers[line["uid"]] = list(pred) if isinstance(pred, list) else [pred]
        models["generator"] = backend.describe()
    finally:
        backend.close()
    records, empty = response_records(images, [answers[str(i)] for i in range(len(images))], cfg.model,
                                      cfg.instruction)
    metrics["n_dropped"]["empty_responses"] = empty
    write_jsonl(path, records)
    return read_responses(str(path))


def score_responses(cfg: EfufConfig, responses: Sequence[Any], run_dir: RunDir, metrics: dict[str, Any],
                    models: dict[str, Any]) -> list[dict[str, Any]]:
    """§2.2-2.3: extract object phrases and score them with CLIP; writes ``objects.jsonl``."""
    from mmkit.core.data import load_image
    from mmkit.unlearn.build import score_objects
    from mmkit.unlearn.objects import ExtractConfig, get_extractor
    from mmkit.unlearn.scoring import ClipScorer

    extractor = get_extractor(cfg.extractor, ExtractConfig(vocab=cfg.vocab, ask=_ask(cfg)))
    scorer = ClipScorer(cfg.clip, device=cfg.device)
    models["clip"] = scorer.loaded.record()
    objects, dropped = score_objects(responses, extractor, scorer.score, lambda im: load_image(im, cfg.images),
                                     scorer.id)
    metrics["n_dropped"]["phrases"] = dropped
    metrics["score_quantiles"] = score_quantiles([o["score"] for rec in objects for o in rec["objects"]])
    write_jsonl(run_dir / "objects.jsonl", objects)
    return objects


def _ask(cfg: EfufConfig):
    """The ``llm`` extractor's text model as ``prompts -> answers`` (greedy), or None."""
    if cfg.extractor != "llm" or not cfg.extractor_model:
        return None
    from mmkit.core.backends import BackendConfig, GenerationSettings, Request, open_backend, resolve_kind

    bcfg = BackendConfig(base_url=cfg.extractor_base_url, model_class=None if cfg.extractor_base_url
                         else "AutoModelForCausalLM")

    def ask(prompts: list[str]) -> list[str]:
        backend = open_backend(resolve_kind(bcfg), bcfg, cfg.extractor_model, seed=cfg.train.seed)
        try:
            got = {line["uid"]: line["prediction"] or "" for line in backend.answer(
                [Request(uid=str(i), text=p) for i, p in enumerate(prompts)],
                GenerationSettings(max_new_tokens=128))}
        finally:
            backend.close()
        return [got[str(i)] for i in range(len(prompts))]

    return ask


def read_replay(path: str) -> list[Sample]:
    """``--replay``: instruction samples in the samples schema, every one of kind ``replay``."""
    replay = read_samples(path)
    bad = next((s for s in replay if s.kind != "replay"), None)
    if bad is not None:
        raise DataError(f"expected kind 'replay' in a --replay file, got {bad.kind!r}", file=path,
                        field=f"sample {bad.id}")
    return replay


def score_quantiles(scores: Sequence[float | None]) -> dict[str, float | None]:
    """Quantiles of object scores (to recalibrate the thresholds for another scorer, §2.3)."""
    values = np.array([s for s in scores if s is not None], dtype=np.float64)
    return {"n": int(len(values)), **{f"q{int(q * 100):02d}": (round(float(np.quantile(values, q)), 4)
                                                               if len(values) else None) for q in QUANTILES}}


# --------------------------------------------------------------------------- evaluation (§5.1-§5.4)


def evaluate_hallucination(cfg: EfufConfig, run_dir: RunDir, stage: str, exclude: str,
                           connector: str | None = None) -> dict[str, Any]:
    """CHAIR (and POPE with ``--eval-pope``) of the base model (``before``) or with the trained
    ``connector`` (``after``), through the evaluate registry and runner; their run folders (with
    the prediction lines) go to ``eval/<stage>/chair`` and ``eval/<stage>/pope``."""
    from mmkit.evaluate import get_benchmark
    from mmkit.evaluate.run import evaluate

    backend = dataclasses.replace(cfg.backend, kind="hf", base_url=None, model=[cfg.model], connector=connector,
                                  revision=cfg.revision, device=None if cfg.device == "auto" else cfg.device,
                                  dtype=None if cfg.dtype == "auto" else cfg.dtype)
    chair = get_benchmark("chair")
    chair_cfg = chair.config_class(backend=backend, image_root=cfg.eval_images, gt=cfg.eval_gt,
                                   annotations=cfg.eval_coco_annotations, exclude=exclude, seed=cfg.train.seed)
    chair_cfg.validate()
    out = dict(evaluate("chair", chair_cfg, run_dir / "eval" / stage / "chair")["metrics"])
    if cfg.eval_pope:
        pope = get_benchmark("pope")
        pope_cfg = pope.config_class(backend=backend, questions=list(cfg.eval_pope), image_root=cfg.eval_images,
                                     seed=cfg.train.seed)
        pope_cfg.validate()
        got = evaluate("pope", pope_cfg, run_dir / "eval" / stage / "pope")
        out["pope"] = {"metrics": got["metrics"], "per_category": got["per_category"]}
    return out


# --------------------------------------------------------------------------- training (§3, §4)


def split_val(samples: Sequence[Sample], frac: float, seed: int) -> tuple[dict[str, list[Sample]],
                                                                          dict[str, list[Sample]]]:
    """Hold out ``floor(frac * n)`` samples of each kind, chosen with a seeded permutation."""
    train: dict[str, list[Sample]] = {}
    val: dict[str, list[Sample]] = {}
    for kind in KINDS:
        items = [s for s in samples if s.kind == kind]
        order = stable_rng(seed, "val", kind).permutation(len(items))
        n_val = int(frac * len(items))
        val[kind] = [items[i] for i in sorted(order[:n_val])]
        train[kind] = [items[i] for i in sorted(order[n_val:])]
    return train, val


def train_connector(cfg: EfufConfig, samples: Sequence[Sample], run_dir: RunDir,
                    metrics: dict[str, Any]) -> dict[str, Any]:
    """Train the connector on ``samples`` with ``core/train.py``; write the connector (and the
    full model with ``--save-full``). Returns the training metrics, the model record and the
    per-step loss history."""
    import torch

    from mmkit.core.models import load_model, resolve_device, resolve_dtype
    from mmkit.core.train import Stream, train

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    lm = load_model(cfg.model, "mllm", dtype=cfg.dtype, device=device, revision=cfg.revision)
    model = lm.model.eval()
    names = select_trainable(model, cfg.trainable)
    params = dict(model.named_parameters())
    for n in names:
        params[n].data = params[n].data.float()  # fp32 master weights (§4 precision)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    system = LLAVA_SYSTEM_PROMPT if cfg.system_prompt == "llava" else cfg.system_prompt
    encoder = SampleEncoder(lm.preprocessor, system)
    counts = encoder.n_target_tokens(samples)
    kept = [s for s, c in zip(samples, counts) if c > 0]
    metrics["n_dropped"]["empty_target"] = len(samples) - len(kept)
    train_sets, val_sets = split_val(kept, cfg.val_frac, cfg.train.seed)
    if not train_sets["neg"]:
        raise DataError("no negative samples to train on (raise --t-hal or check the samples' kinds)",
                        file=cfg.samples or str(run_dir / "samples.jsonl"), field="kind")
    metrics["n_val"] = {k: len(v) for k, v in val_sets.items()}
    data = {k: SampleDataset(v, encoder) for k, v in train_sets.items() if v}
    val_data = {k: SampleDataset(v, encoder) for k, v in val_sets.items() if v}
    check_image_tokens(model, data["neg"][0])
    batch = {"neg": cfg.batch_neg, "pos": cfg.batch_pos, "sent": cfg.batch_sent, "replay": cfg.batch_replay}
    streams = [Stream(k, data[k], batch[k], defines_epoch=k == "neg") for k in KINDS if k in data]

    tau = (cfg.neg_nll_clip if cfg.neg_nll_clip is not None else math.log(model.config.get_text_config().vocab_size)
           ) if cfg.safeguards else math.inf
    guard = CollapseGuard(total=1, rise=cfg.guard_pos_rise, enabled=cfg.safeguards,
                          neg_stop=cfg.neg_stop if cfg.neg_stop is not None else tau)
    objective = ObjectiveConfig(lambda_neg=cfg.lambda_neg, lambda_sent=cfg.lambda_sent, tau=tau,
                                t_hal=cfg.thresholds.t_hal, t_real=cfg.thresholds.t_real)
    loss = EfufLoss(cfg.variant, objective, guard, eval_mode=not cfg.gradient_checkpointing)
    tokenizer = encoder.tokenizer
    collate = Collate(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    eval_fn = (lambda m: evaluate_nll(loss, m, val_data, collate)) if val_data else None

    steps_per_epoch = math.ceil(math.ceil(len(data["neg"]) / cfg.batch_neg) / cfg.train.grad_accum)
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch) if cfg.evals_per_epoch > 0 else 0
    tcfg = dataclasses.replace(cfg.train, mixed_precision="bf16" if dtype == torch.bfloat16 else "no",
                               max_grad_norm=cfg.train.max_grad_norm if cfg.safeguards else 0.0,
                               eval_every=eval_every, save_every=eval_every, log_every=1)
    meta = {"base_model": cfg.model, "revision": lm.revision, "variant": cfg.variant}

    before = _first_eval(cfg, run_dir, eval_fn, model)
    if before is not None:
        guard.update_val(0, before.get("val_nll_pos"), before.get("val_nll_neg"))
    result = train(model, loss, streams, tcfg, run_dir.path, collate_fn=collate, eval_fn=eval_fn,
                   callbacks=[EfufCallback(loss, guard)], final_dir=None,
                   save_fn=lambda m, d: save_connector(m, names, d, dtype, meta),
                   clip_parameters=lambda m: [p for p in m.parameters() if p.requires_grad])
    save_connector(model, names, run_dir.path, dtype, meta)
    if cfg.save_full:
        _save_full(model, names, lm.preprocessor, dtype, run_dir.path / "model")
    after = result.evaluations[-1] if result.evaluations else None
    return {
        "model": lm.record(),
        "val_nll_before": _per_kind(before), "val_nll_after": _per_kind(after),
        "steps": result.step, "guard_triggered_at": guard.triggered_at, "guard_reason": guard.reason,
        "skipped_steps": loss.skipped, "trainable_params": int(sum(params[n].numel() for n in names)),
        "neg_nll_clip": None if math.isinf(tau) else tau,
        "loss_history": [_history_entry(h) for h in result.history],
    }


def _first_eval(cfg: EfufConfig, run_dir: RunDir, eval_fn: Any, model: Any) -> dict[str, Any] | None:
    """The validation before training (kept in ``val_before.json`` so a resumed run reuses it)."""
    import json

    import torch

    from mmkit.io import write_json

    if eval_fn is None or not cfg.first_eval:
        return None
    path = run_dir / "val_before.json"
    if run_dir.resumed and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    with torch.inference_mode():
        before = dict(eval_fn(model))
    write_json(path, before)
    return before


def _per_kind(evaluation: dict[str, Any] | None) -> dict[str, float | None] | None:
    if evaluation is None:
        return None
    return {k: evaluation.get(f"val_nll_{k}") for k in KINDS}


def _history_entry(logs: dict[str, Any]) -> dict[str, Any]:
    """One ``loss_history`` entry; absent or non-finite values are null."""
    def value(key: str) -> float | None:
        v = logs.get(key)
        return None if v is None or not math.isfinite(v) else float(v)

    return {"step": logs["step"], **{k: value(k) for k in ("l_pos", "l_neg", "l_sent", "l_rep", "w_neg")}}


def _save_full(model: Any, names: Sequence[str], processor: Any, dtype: Any, path: Path) -> None:
    """``--save-full``: the whole model (connector cast back to the base dtype) and its processor,
    loadable with ``from_pretrained`` of the model's own class."""
    from mmkit.io import atomic_dir

    params = dict(model.named_parameters())
    for n in names:
        params[n].data = params[n].data.to(dtype)
    with atomic_dir(path, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
