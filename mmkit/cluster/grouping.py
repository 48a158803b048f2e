"""The grouping run and the order plan (cluster.md sections 6-7), called by the thin CLI.

records -> metric -> small-group policy -> grouped records + summary.json + centroids
(+ order.jsonl with a batch size) in a run directory, or grouped JSONL on stdout (``--out -``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from mmkit.cluster.groups import GroupInfo, apply_small_groups, group_sizes
from mmkit.cluster.metrics import DEFAULT_K, METRICS, MetricOptions, MetricResult
from mmkit.cluster.records import InstructionRecords, RecordFields, load_records
from mmkit.cluster.sampler import GroupedBatchSampler, RandomBatchSampler, load_groups, plan_epoch
from mmkit.cluster.summary import DEFAULT_BATCH_SIZE, build_summary, length_stats
from mmkit.config import config_dict
from mmkit.errors import MmkitError
from mmkit.io import (RunDir, atomic_write, fingerprint, read_records, start_run, write_json, write_jsonl, write_records,
                      write_results)

log = logging.getLogger("mmkit")
COMMAND = "cluster-instructions"


@dataclass
class ClusterConfig:
    """``mmkit cluster-instructions DATA`` (cluster.md section 7; defaults as listed there)."""

    data: str = ""
    metric: Literal["task", "embedding", "length"] = "embedding"
    k: int | None = None
    grouped_format: Literal["jsonl", "json", "parquet", "hf"] = "jsonl"
    format: Literal["auto", "jsonl", "json", "parquet", "hf", "dir"] = "auto"
    split: str = "train"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    conversations_field: str = "conversations"
    role_field: str = "from"
    content_field: str = "value"
    user_roles: list[str] = field(default_factory=lambda: ["human", "user"])
    assistant_roles: list[str] = field(default_factory=lambda: ["gpt", "assistant"])
    task_field: str = "task"
    task_from: Literal["field", "file"] = "field"
    group_field: str = "group"
    embed_text: Literal["instruction", "instruction+input"] = "instruction+input"
    encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    max_seq_len: int | None = None
    embed_batch_size: int = 128
    device: str = "auto"
    kmeans_backend: Literal["auto", "faiss", "sklearn"] = "auto"
    kmeans_init: Literal["kmeans++", "random"] = "kmeans++"
    kmeans_iters: int = 20
    kmeans_redo: int = 1
    spherical: bool = False
    tokenizer: str | None = None
    gguf_file: str | None = None
    length_of: Literal["response", "prompt", "total"] = "response"
    length_edges: list[float] | None = None
    batch_size: int | None = None
    world_size: int = 1
    grad_accum: int = 1
    epochs: int = 3
    small_groups: Literal["merge", "warn", "drop", "error"] = "merge"
    merge_encoder: bool = False
    sample: int | None = None
    seed: int = 0
    on_invalid: Literal["error", "skip"] = "error"
    cache_dir: str | None = None
    no_cache: bool = False

    def validate(self) -> None:
        if not self.data:
            raise MmkitError("a data file, directory, hub id, builtin:sharegpt or - is required", field="DATA")
        if self.k is not None and self.metric == "task":
            raise MmkitError("has no meaning with --metric task (the groups are the task labels)", field="--k")
        for name in ("world_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                raise MmkitError(f"expected an integer >= 1, got {getattr(self, name)}", field=f"--{name.replace('_', '-')}")

    def fields(self) -> RecordFields:
        return RecordFields(instruction=self.instruction_field, input=self.input_field, output=self.output_field,
                            conversations=self.conversations_field, role=self.role_field,
                            content=self.content_field, user_roles=tuple(self.user_roles),
                            assistant_roles=tuple(self.assistant_roles), task=self.task_field,
                            task_from=self.task_from, embed_text=self.embed_text, group_field=self.group_field)

    def metric_options(self) -> MetricOptions:
        return MetricOptions(k=self.k, seed=self.seed, encoder=self.encoder, max_seq_len=self.max_seq_len,
                             embed_batch_size=self.embed_batch_size, device=self.device, cache_dir=self.cache_dir,
                             use_cache=not self.no_cache, kmeans_backend=self.kmeans_backend,
                             kmeans_init=self.kmeans_init, kmeans_iters=self.kmeans_iters,
                             kmeans_redo=self.kmeans_redo, spherical=self.spherical, tokenizer=self.tokenizer,
                             gguf_file=self.gguf_file, length_of=self.length_of,
                             length_edges=tuple(self.length_edges) if self.length_edges else None)


@dataclass
class Grouping:
    """The final groups (after the small-group policy) and what the summary needs."""

    records: InstructionRecords
    metric: MetricResult
    labels: np.ndarray
    names: list[str]
    merged_from: list[list[int]]
    centroids: np.ndarray | None
    report: dict[str, Any]
    U: int | None
    load_s: float


def group_records(cfg: ClusterConfig) -> Grouping:
    """Read, sample, group, then apply the small-group policy when a batch size gives U."""
    t0 = time.perf_counter()
    records = load_records(cfg.data, cfg.fields(), format=cfg.format, split=cfg.split,
                           on_invalid=cfg.on_invalid, need_task=cfg.metric == "task")
    load_s = time.perf_counter() - t0
    if cfg.sample:
        records = records.sample(cfg.sample, cfg.seed)
    result = METRICS.resolve(cfg.metric, field="--metric")(records, cfg.metric_options())
    if cfg.metric == "task" and cfg.merge_encoder:
        result.centroids = _task_centroids(records, result.labels, len(result.names), cfg)
    U = cfg.batch_size * cfg.world_size * cfg.grad_accum if cfg.batch_size else None
    if U is None:
        ids, sizes = group_sizes(result.labels)
        report = {"U": None, "policy": cfg.small_groups, "groups": {}, "examples": 0,
                  "sizes": dict(zip(ids.tolist(), sizes.tolist()))}
        return Grouping(records, result, result.labels, list(result.names), [[i] for i in range(len(result.names))],
                        result.centroids, report, None, load_s)
    info = group_info(cfg.metric, result.labels, result.names, result.centroids, result.extra.get("lengths"))
    small = apply_small_groups(result.labels, U, cfg.small_groups, info)
    return Grouping(records, result, small.labels, small.names, small.merged_from,
                    _merged_centroids(result, small.merged_from), small.report, U, load_s)


def group_info(metric: str, labels: np.ndarray, names: Sequence[str], centroids: np.ndarray | None,
               lengths: np.ndarray | None) -> GroupInfo:
    """What the merge policy needs: centroids (embedding), medians of ordered buckets (length)."""
    medians = None
    if metric == "length":
        stats = length_stats(lengths, labels, len(names))
        medians = np.array([s["median"] if s else np.nan for s in stats], dtype=np.float64)
    return GroupInfo(names=list(names), centroids=centroids, ordered=metric == "length", medians=medians,
                     kind=metric)


def _merged_centroids(result: MetricResult, merged_from: list[list[int]]) -> np.ndarray | None:
    """Size-weighted mean of the member centroids of each final group (section 4)."""
    if result.centroids is None:
        return None
    sizes = np.bincount(result.labels[result.labels >= 0], minlength=len(result.names)).astype(np.float64)
    out = np.stack([np.average(result.centroids[m], axis=0, weights=sizes[m]) for m in merged_from])
    return out.astype(np.float32)


def _task_centroids(records: InstructionRecords, labels: np.ndarray, k: int, cfg: ClusterConfig) -> np.ndarray:
    """``--merge-encoder``: each task's mean instruction embedding, so tasks merge like clusters."""
    from mmkit.core.embed import encode_texts

    emb = encode_texts(records.instruction_text, cfg.encoder, max_length=cfg.max_seq_len,
                       batch_size=cfg.embed_batch_size, device=cfg.device, text_mode=cfg.embed_text,
                       cache_dir=cfg.cache_dir, use_cache=not cfg.no_cache)
    sums = np.zeros((k, emb.shape[1]))
    np.add.at(sums, labels, emb)
    return (sums / np.bincount(labels, minlength=k)[:, None]).astype(np.float32)


def grouped_rows(g: Grouping) -> list[dict[str, Any]]:
    """Every input record unchanged, in input order, plus ``group``, ``group_name``, ``_row``."""
    out = []
    for i, rec in enumerate(g.records.records):
        label = int(g.labels[i])
        row = dict(rec)
        row[g.records.fields.group_field] = label
        row["group_name"] = g.names[label] if label >= 0 else None
        row["_row"] = int(g.records.rows[i])
        if g.records.source_file is not None:
            row["source_file"] = g.records.source_file[i]
        out.append(row)
    return out


def quality_batches(labels: np.ndarray, batch_size: int, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Epoch-0 per-device batches (W = 1) of the CommonIT and random samplers, for the summary."""
    kept = labels >= 0
    if not kept.any() or group_sizes(labels)[1].max() < batch_size:
        return None, None
    grouped = plan_epoch(labels, batch_size, 1, 1, seed, 0)[1]
    random = RandomBatchSampler(labels, batch_size, world_size=1, rank=0, seed=seed, small_groups="drop").plan(0)[1]
    return grouped.reshape(-1, batch_size), random.reshape(-1, batch_size)


def run_grouping(cfg: ClusterConfig, out: str | None, overwrite: bool = False, argv: Sequence[str] = ()) -> dict:
    """The whole grouping run; returns ``results.json`` (or, with ``out == "-"``, streams records)."""
    t0 = time.perf_counter()
    if out == "-" and cfg.batch_size:
        raise MmkitError("streams records only; --batch-size needs a run directory for order.jsonl",
                         field="--out -")
    if out == "-":
        write_jsonl("-", grouped_rows(group_records(cfg)))
        return {}
    run = start_run(out, COMMAND, cfg, overwrite=overwrite)
    with run.guard():
        g = group_records(cfg)
    extra = g.metric.extra
    timings = {"load": g.load_s, **extra.get("timings", {})}
    t_summary = time.perf_counter()
    qb = cfg.batch_size or DEFAULT_BATCH_SIZE
    grouped_b, random_b = quality_batches(g.labels, qb, cfg.seed)
    summary_args = dict(
        records=g.records, metric=cfg.metric, labels=g.labels, names=g.names,
        k_requested=cfg.k or DEFAULT_K.get(cfg.metric), params=config_dict(cfg), small_groups=g.report,
        merged_from=g.merged_from, centroids=g.centroids, embeddings=extra.get("embeddings"),
        lengths=extra.get("lengths"), grouped_batches=grouped_b, random_batches=random_b, batch_size=qb,
        inertia=extra.get("inertia"), kmeans=extra.get("kmeans"), argv=argv, seed=cfg.seed)
    summary = build_summary(**summary_args, timings=timings)
    timings["summary"] = time.perf_counter() - t_summary
    t_write = time.perf_counter()
    grouped_path = write_records(run / "grouped", grouped_rows(g), cfg.grouped_format)
    if g.centroids is not None and cfg.metric == "embedding":
        _write_centroids(run / "centroids.safetensors", g.centroids)
    if cfg.batch_size:
        write_order(run / "order.jsonl", g.labels, cfg.batch_size, cfg.world_size, cfg.grad_accum, cfg.epochs,
                    cfg.seed, cfg.small_groups,
                    group_info(cfg.metric, g.labels, g.names, g.centroids, extra.get("lengths")))
    timings["write"] = time.perf_counter() - t_write
    timings["total"] = time.perf_counter() - t0
    summary["timings_s"] = {k: round(v, 3) for k, v in timings.items() if v is not None}
    write_json(run / "summary.json", summary)
    sizes = [grp["size"] for grp in summary["groups"]]
    models = {"encoder": {"id": cfg.encoder, "revision": None}} if cfg.metric == "embedding" else {}
    log.info("grouped %d records into %d groups in %.1f s; %s", len(g.records), len(g.names),
             timings["total"], grouped_path)
    return write_results(
        run, method=cfg.metric, config=config_dict(cfg), seed=cfg.seed, models=models,
        data=fingerprint(cfg.data, len(g.records)),
        metrics={"k_requested": summary["k_requested"], "k_effective": summary["k_effective"],
                 "group_sizes": sizes, "small_groups": summary["small_groups"], "quality": summary["quality"]},
        per_category={grp["name"]: {"size": grp["size"], "share": grp["share"]} for grp in summary["groups"]},
        outputs={"grouped": grouped_path.name, "summary": "summary.json",
                 "order": "order.jsonl" if cfg.batch_size else None}, out=str(run.path))


def _write_centroids(path: Path, centroids: np.ndarray) -> None:
    from safetensors.numpy import save

    with atomic_write(path, "wb") as fh:
        fh.write(save({"centroids": np.ascontiguousarray(centroids, dtype=np.float32)}))


def write_order(path: Path, labels: np.ndarray, B: int, W: int, A: int, epochs: int, seed: int,
                small_groups: str, info: GroupInfo | None) -> dict[str, Any]:
    """``order.jsonl``: a header line, then ``plan_epoch`` for every epoch, one line per step."""
    sampler = GroupedBatchSampler(labels, B, world_size=W, rank=0, accumulation_steps=A, seed=seed,
                                  small_groups=small_groups, group_info=info)
    header = {"B": B, "W": W, "A": A, "U": sampler.U, "seed": seed, "epochs": epochs,
              "steps_per_epoch": sampler.steps, "kept_per_epoch": sampler.report["kept"],
              "dropped_small": sampler.report["small_groups"]["examples"], "numpy_version": np.__version__}

    def lines():
        yield {"header": header}
        for e in range(epochs):
            step_groups, batches = sampler.plan(e)
            for t in range(len(step_groups)):
                yield {"epoch": e, "step": t, "group": int(step_groups[t]), "batches": batches[t].tolist()}

    write_jsonl(path, lines())
    return header


@dataclass
class OrderConfig:
    """``mmkit cluster-instructions order GROUPED`` (section 7)."""

    grouped: str = ""
    batch_size: int = 8
    world_size: int = 1
    grad_accum: int = 1
    epochs: int = 3
    seed: int = 0
    small_groups: Literal["merge", "warn", "drop", "error"] = "merge"
    group_field: str = "group"
    materialize: str | None = None


def run_order(cfg: OrderConfig, out: str | None, overwrite: bool = False) -> dict:
    """Rebuild the plan for another B, W or A from a grouped file, without clustering again."""
    labels = load_groups(cfg.grouped, field=cfg.group_field)
    summary = Path(cfg.grouped).expanduser().parent / "summary.json"
    info = GroupInfo.from_summary(summary) if summary.exists() else None
    run: RunDir = start_run(out, COMMAND, cfg, overwrite=overwrite)
    with run.guard():
        header = write_order(run / "order.jsonl", labels, cfg.batch_size, cfg.world_size, cfg.grad_accum,
                             cfg.epochs, cfg.seed, cfg.small_groups, info)
    if cfg.materialize:
        rows = list(read_records(cfg.grouped))
        sampler = GroupedBatchSampler(labels, cfg.batch_size, world_size=cfg.world_size, rank=0,
                                      accumulation_steps=cfg.grad_accum, seed=cfg.seed,
                                      small_groups=cfg.small_groups, group_info=info)
        order = sampler.plan(0)[1].reshape(-1)
        write_jsonl(cfg.materialize, (dict(rows[i]) for i in order))
    return write_results(run, method="order", config=asdict(cfg), seed=cfg.seed, metrics=header,
                         data=fingerprint(cfg.grouped, len(labels)))
