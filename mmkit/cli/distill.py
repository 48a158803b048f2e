"""``mmkit distill``: parse, build a config, call the method module, render the result.

Each method is a sibling command of this group: ``dcd``, ``bert-kd``, ``pesf`` (and ``build-cache``).
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Mapping, Optional, Sequence

import typer

from mmkit.cli.common import ConfigOpt, JsonOpt, OutOpt, OverwriteOpt, SeedOpt, SetOpt, finish

DCD_EXAMPLES = """
Examples:

  mmkit distill dcd --teacher ./vilt-f30k --data f30k_train.jsonl --eval-data f30k_test.jsonl --image-root imgs/ --negatives 63 --out runs/dcd

  mmkit distill dcd --eval-only --student runs/dcd/student --teacher ./vilt-f30k --eval-data f30k_test.jsonl --mode rerank --shortlist openai/clip-vit-base-patch16 --rerank-k 128

  mmkit distill dcd --config run.yaml --set alpha=0.5 --epochs 2 --json | jq .metrics.student
"""

app = typer.Typer(
    help="Knowledge distillation: dcd (an image-text matching model into a shallower fusion student), bert-kd "
    "(a BERT teacher into a smaller BERT, with a CCA diagnostic), pesf (a student-friendly teacher through a "
    "small adapter), build-cache (fill a teacher cache). "
    "Example: mmkit distill dcd --teacher ./vilt --data train.jsonl --eval-data test.jsonl --out runs/dcd",
    no_args_is_help=True,
    rich_markup_mode=None,
)

Str = Optional[str]
Int = Optional[int]
Float = Optional[float]

# Options several commands share.
TaskOpt = Annotated[Str, typer.Option(help="GLUE name (sst2, mrpc, qqp, stsb, mnli, qnli, rte, cola, wnli), "
                                      "builtin:sharegpt-match (offline; evaluated on its test split) or a "
                                      "JSONL/CSV/parquet file with text, text_pair?, label.")]
TextFieldOpt = Annotated[Str, typer.Option(help="Text field  [default: text]")]
TextPairFieldOpt = Annotated[Str, typer.Option(help="Second-text field  [default: text_pair when present]")]
LabelFieldOpt = Annotated[Str, typer.Option(help="Label field  [default: label]")]
MaxLenOpt = Annotated[Int, typer.Option(help="Max tokens per example  [default: 128]")]
PrecisionOpt = Annotated[Str, typer.Option(help="fp32 | bf16 | fp16  [default: fp32]")]
CacheDirOpt = Annotated[Str, typer.Option(help="Teacher cache folder  [default: <cache root>/teacher]")]
CacheVerifyOpt = Annotated[bool, typer.Option("--cache-verify", help="Re-hash every cache shard.")]

#: flag name -> dotted config key (flags not listed map to the key of the same name)
KEYS = {
    "teacher": "teacher.id", "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr",
    "max_len": "data.max_len", "precision": "train.mixed_precision", "seed": "train.seed", "cache": "cache.mode",
    "cache_dir": "cache.dir", "cache_verify": "cache.verify",
}
DCD_KEYS = {**KEYS, "data": "data.path", "image_root": "data.image_root", "eval_data": "data.eval_path",
            "image_size": "data.image_size", "mode": "eval.modes", "shortlist": "eval.shortlist",
            "rerank_k": "eval.rerank_k"}
TEXTCLS_KEYS = {**KEYS, "student": "student.id", "student_layers": "student.num_layers", "task": "data.task",
                "eval_data": "data.eval_task", "text_field": "data.text_field",
                "text_pair_field": "data.text_pair_field", "label_field": "data.label_field"}
BERT_KD_KEYS = {**TEXTCLS_KEYS, "student_init": "student.init", "temperature": "loss.kd.temperature"}
PESF_KEYS = {**TEXTCLS_KEYS, "alpha": "loss.alpha", "beta": "loss.beta", "temperature": "loss.temperature",
             "adapter_lr": "adapter.lr"}
NOT_CONFIG = {"out", "overwrite", "json_", "config", "set_"}
_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def _precision(value: str) -> str:
    from mmkit.errors import ConfigError, suggest

    if value not in _PRECISION:
        raise ConfigError(f"expected fp32, bf16 or fp16, got {value!r}{suggest(value, _PRECISION)}", field="--precision")
    return _PRECISION[value]


#: flags whose value the config spells otherwise (``--no-cache`` counts: it is not an unset bool flag)
CONVERT: dict[str, Callable[[Any], Any]] = {
    "precision": _precision, "cache": lambda on: "on" if on else "off",
    "mode": lambda mode: [mode] if mode else None,
}


def _flags(values: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, Any]:
    """The config flags (dotted keys) a command was given: ``None`` and an unset bool flag do not count."""
    flags = {}
    for name, value in values.items():
        if name in NOT_CONFIG or value is None or (value is False and name not in CONVERT):
            continue
        flags[keys.get(name, name)] = CONVERT[name](value) if name in CONVERT else value
    return flags


def _run(values: Mapping[str, Any], keys: Mapping[str, str], config_cls: type, run: Callable[..., dict],
         render: Callable[[Any, dict], None]) -> None:
    """Build the method's config from the flags, run it, render its metrics on stderr (unless
    --quiet) and print results.json for --json."""
    from rich.console import Console

    from mmkit.config import load_config

    def summary(results: Mapping[str, Any]) -> None:
        console = Console(stderr=True)
        render(console, results["metrics"])
        console.print(f"results in {results['out']}")

    cfg = load_config(config_cls, file=values["config"], flags=_flags(values, keys), sets=values["set_"] or [])
    finish(run(cfg, values["out"], overwrite=values["overwrite"]), values["json_"], summary)


def _table(title: str, columns: Sequence[str]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    return table


def _task_table(metrics: Mapping[str, Any], rows: Sequence[str]) -> Any:
    """The task metrics of the models ``rows`` (two decimals); None when there are none."""
    names = sorted({k for who in rows for k in metrics.get(who, {})})
    if not names:
        return None
    table = _table("task metrics (accuracy/F1 in %)", ("model", *names))
    for who in rows:
        row = metrics.get(who, {})
        table.add_row(who, *("-" if row.get(k) is None else f"{row[k]:.2f}" for k in names))
    return table


def _losses(loss_final: Mapping[str, float]) -> str:
    return "final losses: " + ", ".join(f"{k} {v:.4f}" for k, v in loss_final.items())


@app.command("dcd", help="DCD: train a student with fewer fusion layers from an ITM teacher (ViLT or BLIP "
             "retrieval model), with teacher-picked hard negatives and entropy-based per-example weights; "
             "then evaluate teacher and student in full and re-rank modes.", epilog=DCD_EXAMPLES)
def dcd(
    teacher: Annotated[Str, typer.Option(help="Teacher ITM model: hub id or save_pretrained dir.")] = None,
    data: Annotated[Str, typer.Option(help="Training set: JSONL {image, captions, group?} or Karpathy JSON.")] = None,
    image_root: Annotated[Str, typer.Option(help="Folder relative image paths resolve under.")] = None,
    eval_data: Annotated[Str, typer.Option(help="Evaluation set (same formats); no evaluation without it.")] = None,
    negatives: Annotated[Int, typer.Option(help="N random negatives per example  [default: 15]")] = None,
    topk: Annotated[Int, typer.Option(help="K candidates the student sees, positive first  [default: 8]")] = None,
    student_layers: Annotated[Str, typer.Option(help="Teacher fusion layers to keep, 0-based, e.g. 0,3,5 "
                                                "[default: ceil(n/2) evenly spaced]")] = None,
    alpha: Annotated[Float, typer.Option(help="Weight of L_KD; L_hard gets 1 - alpha  [default: 0.2]")] = None,
    temperature: Annotated[Float, typer.Option(help="KD temperature T  [default: 1]")] = None,
    epochs: Annotated[Int, typer.Option(help="[default: 10]")] = None,
    batch_size: Annotated[Int, typer.Option(help="Examples per micro-batch  [default: 32, x16 accumulation]")] = None,
    lr: Annotated[Float, typer.Option(help="Base learning rate  [default: 5e-6]")] = None,
    max_len: Annotated[Int, typer.Option(help="Max caption tokens  [default: 40]")] = None,
    image_size: Annotated[Int, typer.Option(help="Image size [default: the processor's own]")] = None,
    reproduce_released: Annotated[bool, typer.Option("--reproduce-released", help="Restore the released "
                                                     "code's bugs 1, 2, 4 and dropout (distill.md 3.6).")] = False,
    eval_only: Annotated[bool, typer.Option("--eval-only", help="Evaluate a saved --student; no training.")] = False,
    student: Annotated[Str, typer.Option(help="Saved student directory (with --eval-only).")] = None,
    mode: Annotated[Str, typer.Option(help="full | rerank  [default: both when a shortlist exists]")] = None,
    shortlist: Annotated[Str, typer.Option(help="Dual encoder for the rerank shortlist "
                                           "[default: the teacher's contrastive head]")] = None,
    rerank_k: Annotated[Str, typer.Option(help="Shortlist items re-scored per query, or all  [default: 128]")] = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    values = dict(locals())
    from mmkit.distill.dcd import DcdConfig, run

    _run(values, DCD_KEYS, DcdConfig, run, _render_dcd)


def _render_dcd(console: Any, metrics: dict) -> None:
    train = metrics.get("train")
    if train:
        console.print(f"trained {train['steps']} steps on {train['examples']} examples; student layers "
                      f"{train['student_layers']} of {train['teacher_fusion_layers']}; teacher ranked the "
                      f"positive first for {_pct(train['teacher_positive_first_pct'])} of examples")
    modes = metrics.get("modes") or []
    if modes:
        table = _table("retrieval (R@K in %)",
                       ("model", "mode", "i2t R@1", "i2t R@5", "t2i R@1", "t2i R@5", "RSUM", "ms/query", "speed-up"))
        timing = metrics["timing"]
        for name in ("teacher", "student"):
            for mode in modes:
                row = metrics.get(name, {}).get(mode)
                if row is None:
                    continue
                t = timing[f"{name}_{mode}"]
                ratio = timing["ratios"].get(f"teacher_full/{name}_{mode}")
                table.add_row(name, mode, *(f"{row[k]:.1f}" for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum")),
                              f"{t['ms_per_query']:.2f}", "1.0x" if name == "teacher" and mode == "full"
                              else (f"{ratio:.1f}x" if ratio else "-"))
        console.print(table)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


BERT_KD_EXAMPLES = """
Examples:

  mmkit distill bert-kd --teacher ./sst2-bert-large --student bert-base-uncased --student-layers 6 --task sst2 --out runs/kd-large

  mmkit distill bert-kd --teacher bundled:minilm --student-init teacher_layers --student-layers 3 --task pairs.jsonl --eval-data test.jsonl --out runs/kd

  mmkit distill bert-kd --config examples/distill_bert_kd.yaml --set loss.cca.weight=0 --epochs 2

  mmkit distill bert-kd --teacher T --student S --task data.jsonl --diagnose-only   # CCA grid only
"""


@app.command("bert-kd", help="BERT KD: a fine-tuned BERT teacher (fine-tuned first when it has no head for the "
             "task) into a smaller BERT with CE, logit KD, hidden-state MSE, attention transfer and a CCA-alignment "
             "term, plus a CCA/SVCCA/PWCCA/CKA diagnostic before and after. The paper's own method (Fan et al., "
             "ACL 2025) is unpublished and NOT implemented: the CCA term is mmkit's stand-in for it.",
             epilog=BERT_KD_EXAMPLES)
def bert_kd(
    teacher: Annotated[Str, typer.Option(help="Teacher: hub id, save_pretrained dir or bundled:minilm.")] = None,
    student: Annotated[Str, typer.Option(help="Student (student.init pretrained): hub id or dir.")] = None,
    student_layers: Annotated[Int, typer.Option(help="Student layers L_s (pretrained: keep the first N).")] = None,
    student_init: Annotated[Str, typer.Option(help="pretrained | teacher_layers | config  [default: pretrained]")] = None,
    task: TaskOpt = None,
    eval_data: Annotated[Str, typer.Option(help="Evaluation set [default: the GLUE validation split or a "
                                                 "built-in task's test split; none for files]")] = None,
    text_field: TextFieldOpt = None,
    text_pair_field: TextPairFieldOpt = None,
    label_field: LabelFieldOpt = None,
    layer_map: Annotated[Str, typer.Option(help="uniform, or teacher layers per student layer, e.g. 2,4,6")] = None,
    temperature: Annotated[Float, typer.Option(help="KD temperature T  [default: 2]")] = None,
    epochs: Annotated[Int, typer.Option(help="[default: 3]")] = None,
    batch_size: Annotated[Int, typer.Option(help="[default: 32]")] = None,
    lr: Annotated[Float, typer.Option(help="Student (and projection) learning rate  [default: 5e-5]")] = None,
    max_len: MaxLenOpt = None,
    precision: PrecisionOpt = None,
    cache: Annotated[Optional[bool], typer.Option("--cache/--no-cache", help="Teacher cache on (fail if it cannot "
                                                  "be used) / off  [default: auto]")] = None,
    cache_dir: CacheDirOpt = None,
    cache_verify: CacheVerifyOpt = False,
    diagnose_only: Annotated[bool, typer.Option("--diagnose-only", help="Only the CCA diagnostic; no training.")] = False,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    values = dict(locals())
    from mmkit.distill.bert_kd import BertKdConfig, run

    _run(values, BERT_KD_KEYS, BertKdConfig, run, _render_bert_kd)


def _render_bert_kd(console: Any, metrics: dict) -> None:
    params = metrics["params"]
    console.print(f"student {params['student']:,} params = {100 * params['ratio']:.1f}% of the teacher; layer map "
                  f"{metrics['layer_map']}; attention {metrics['attention_mode']}; teacher cache "
                  f"{metrics.get('cache', 'not used')}")
    if "loss_final" in metrics:
        console.print(_losses(metrics["loss_final"]) + f"; CCA term skipped in {metrics['cca_skipped_batches']} "
                      f"batches (CCA term: {metrics['cca_term']})")
    table = _task_table(metrics, ("teacher", "student"))
    if table is not None:
        console.print(table)
    before, after = metrics.get("cca_mapped_mean_before"), metrics.get("cca_mapped_mean_after")
    if before:
        table = _table("mapped-layer similarity (mean over mapped pairs)", ("metric", "before", "after"))
        for k, v in before.items():
            table.add_row(k, f"{v:.3f}", f"{after[k]:.3f}" if after else "-")
        console.print(table)


@app.command("build-cache", help="Fill the teacher cache of a distillation config and exit (the method comes from "
             "the config's `method` key; default bert-kd). Example: mmkit distill build-cache --config run.yaml")
def build_cache(
    cache_dir: CacheDirOpt = None,
    cache_verify: CacheVerifyOpt = False,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    values = dict(locals())
    from pathlib import Path

    import yaml

    from mmkit.distill.teacher_cache import CACHE_BUILDERS

    method = "bert-kd"
    if config and Path(config).is_file():
        data = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
        method = data.get("method", method) if isinstance(data, dict) else method
    builder = CACHE_BUILDERS.resolve(method, field="method")
    results = builder(file=config, sets=set_ or [], flags=_flags(values, KEYS), out=out, overwrite=overwrite)
    finish(results, json_, lambda r: typer.echo(f"teacher cache {r['metrics']['cache']} ({r['metrics']['examples']} "
                                                f"examples); results in {r['out']}", err=True))


PESF_EXAMPLES = """
Examples:

  mmkit distill pesf --teacher ./sst2-bert-base --student bert-base-uncased --student-layers 6 --task sst2 --out runs/pesf

  mmkit distill pesf --teacher bundled:minilm --student bundled:minilm --student-layers 3 --task pairs.jsonl --eval-data test.jsonl --out runs/pesf-minilm

  mmkit distill pesf --teacher ./sst2-bert-base --student bert-base-uncased --student-layers 6 --task sst2 --reproduce-released
"""


@app.command("pesf", help="PESF-KD: a small adapter on a frozen fine-tuned BERT teacher (fine-tuned first when it "
             "has no head for the task) is trained jointly with the student so the teacher's soft labels become "
             "smoother (student-friendly); soft loss, both cross-entropies and patient KD on [CLS]; the sharpness "
             "gap before and after training.", epilog=PESF_EXAMPLES)
def pesf(
    teacher: Annotated[Str, typer.Option(help="Teacher classifier: hub id, save_pretrained dir or bundled:minilm.")] = None,
    student: Annotated[Str, typer.Option(help="Pretrained student: hub id or dir (a new classifier is added).")] = None,
    student_layers: Annotated[Int, typer.Option(help="Keep the student's first N layers  [default: all]")] = None,
    task: TaskOpt = None,
    eval_data: Annotated[Str, typer.Option(help="Evaluation set  [default: the GLUE validation split; required "
                                           "for files]")] = None,
    text_field: TextFieldOpt = None,
    text_pair_field: TextPairFieldOpt = None,
    label_field: LabelFieldOpt = None,
    alpha: Annotated[Float, typer.Option(help="L = alpha L_soft + (1 - alpha) L_ce + beta L_pkd  [default: 0.7]")] = None,
    beta: Annotated[Float, typer.Option(help="Weight of the patient-KD [CLS] loss  [default: 100]")] = None,
    temperature: Annotated[Float, typer.Option(help="Soft-loss temperature T  [default: 5]")] = None,
    adapter_lr: Annotated[Float, typer.Option(help="Adapter learning rate  [default: 1e-5]")] = None,
    reproduce_released: Annotated[bool, typer.Option("--reproduce-released", help="Mimic the released code: the whole "
                                                     "teacher trains at teacher.lr (1e-5), adapter dropout off, only "
                                                     "student gradients clipped (distill.md 2.5).")] = False,
    epochs: Annotated[Int, typer.Option(help="[default: 4]")] = None,
    batch_size: Annotated[Int, typer.Option(help="[default: 8]")] = None,
    lr: Annotated[Float, typer.Option(help="Student learning rate  [default: 5e-5]")] = None,
    max_len: MaxLenOpt = None,
    precision: PrecisionOpt = None,
    cache: Annotated[Optional[bool], typer.Option("--cache/--no-cache", help="Teacher cache on (fail if it cannot "
                                                  "be used) / off  [default: auto; never with "
                                                  "--reproduce-released]")] = None,
    cache_dir: CacheDirOpt = None,
    cache_verify: CacheVerifyOpt = False,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    values = dict(locals())
    from mmkit.distill.pesf import PesfConfig, run

    _run(values, PESF_KEYS, PesfConfig, run, _render_pesf)


def _render_pesf(console: Any, m: dict) -> None:
    console.print(f"pesf ({m['mode']}): {m['steps']} steps; adapter {m['adapter_params']:,} params; student "
                  f"{m['params']['student']:,} params = {100 * m['params']['ratio']:.1f}% of the teacher; PKD map "
                  f"{m['pkd_map']}; teacher cache {m['cache']}")
    console.print(_losses(m["loss_final"]))
    console.print(_task_table(m, ("teacher", "teacher_adapted", "student_init", "student")))
    sharp = m["sharpness"]
    table = _table("sharpness: mean log-sum-exp of logits / t", ("model", "t=1", f"t={sharp['temperature']:g}"))
    for who in ("teacher", "teacher_adapted", "student_init", "student_final"):
        table.add_row(who, f"{sharp[who]['t1']:.4f}", f"{sharp[who]['tT']:.4f}")
    for gap in ("gap_before", "gap_after", "gap_after_original_teacher"):
        table.add_row(gap, f"{m[gap]['t1']:.4f}", f"{m[gap]['tT']:.4f}")
    console.print(table)
