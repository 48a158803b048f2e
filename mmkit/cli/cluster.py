"""``mmkit cluster-instructions``: parse, build a config, call mmkit.cluster, render the result."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from mmkit.cli.common import (ConfigOpt, DefaultCommandGroup, JsonOpt, OutOpt, OverwriteOpt, SeedOpt, SetOpt,
                              finish)

EXAMPLES = """
Examples:

  mmkit cluster-instructions data.jsonl --metric embedding --k 16 --out runs/cit-emb

  mmkit cluster-instructions flan.jsonl --metric task --task-field task --batch-size 8 --world-size 4 --out runs/cit-task

  mmkit cluster-instructions alpaca.json --metric length --k 8 --tokenizer bundled:smollm2 --out runs/cit-len

  mmkit cluster-instructions builtin:sharegpt --sample 20000 --batch-size 8 --out runs/demo --json | jq .metrics.quality

  mmkit cluster-instructions data.jsonl --metric length --tokenizer whitespace --out - | jq -c '{_row, group}'

  mmkit cluster-instructions order runs/demo/grouped.jsonl --batch-size 8 --world-size 4 --epochs 3 --out runs/demo-w4

  mmkit cluster-instructions train runs/demo/grouped.jsonl --model bundled:smollm2 --ordering both --out runs/cit-sft
"""

app = typer.Typer(
    cls=DefaultCommandGroup,
    help="CommonIT: group instruction data by task, embedding or length so every batch comes from one group. "
    "Example: mmkit cluster-instructions data.jsonl --metric embedding --k 16 --out runs/cit",
    epilog=EXAMPLES,
    no_args_is_help=True,
    rich_markup_mode=None,
)

Str = Optional[str]
NOT_CONFIG = {"out", "json_", "overwrite", "config", "set_"}  # run options, not config keys
Int = Optional[int]


def _flags(**values: object) -> dict[str, object]:
    """Flags the user gave (a bool flag counts only when set), for load_config."""
    return {k: (True if v is True else None if v is False else v) for k, v in values.items()}


@app.command("run", help="Group DATA (JSONL/JSON/parquet/HF dir/hub id/builtin:sharegpt/-) by a metric. "
             "The grouping is mmkit's definition: the paper did not publish it (see docs/cluster.md).",
             epilog=EXAMPLES)
def run(
    data: Annotated[str, typer.Argument(help="Records: a file, a directory of files, a hub id, builtin:sharegpt or -.")],
    metric: Annotated[Str, typer.Option(help="task | embedding | length  [default: embedding]")] = None,
    k: Annotated[Int, typer.Option(help="Groups (embedding default 16, length default 8; not with task).")] = None,
    out: OutOpt = None,
    grouped_format: Annotated[Str, typer.Option(help="jsonl | json | parquet | hf")] = None,
    format: Annotated[Str, typer.Option(help="Input format: auto | jsonl | json | parquet | hf | dir")] = None,
    split: Annotated[Str, typer.Option(help="Split of a DatasetDict or hub dataset.")] = None,
    instruction_field: Annotated[Str, typer.Option()] = None,
    input_field: Annotated[Str, typer.Option()] = None,
    output_field: Annotated[Str, typer.Option()] = None,
    conversations_field: Annotated[Str, typer.Option()] = None,
    role_field: Annotated[Str, typer.Option()] = None,
    content_field: Annotated[Str, typer.Option()] = None,
    user_roles: Annotated[Str, typer.Option(help="Comma list [default: human,user]")] = None,
    assistant_roles: Annotated[Str, typer.Option(help="Comma list [default: gpt,assistant]")] = None,
    task_field: Annotated[Str, typer.Option()] = None,
    task_from: Annotated[Str, typer.Option(help="field | file (directory input: one task per file)")] = None,
    group_field: Annotated[Str, typer.Option(help="Name of the output group column.")] = None,
    embed_text: Annotated[Str, typer.Option(help="instruction | instruction+input")] = None,
    encoder: Annotated[Str, typer.Option(help="HF encoder id or dir [default: all-MiniLM-L6-v2]")] = None,
    max_seq_len: Annotated[Int, typer.Option()] = None,
    embed_batch_size: Annotated[Int, typer.Option()] = None,
    device: Annotated[Str, typer.Option(help="auto | cpu | cuda")] = None,
    kmeans_backend: Annotated[Str, typer.Option(help="auto | faiss | sklearn")] = None,
    kmeans_init: Annotated[Str, typer.Option(help="kmeans++ | random")] = None,
    kmeans_iters: Annotated[Int, typer.Option()] = None,
    kmeans_redo: Annotated[Int, typer.Option()] = None,
    spherical: Annotated[bool, typer.Option("--spherical", help="Renormalise centroids.")] = False,
    tokenizer: Annotated[Str, typer.Option(help="Length metric: id, dir, bundled:smollm2 or whitespace.")] = None,
    gguf_file: Annotated[Str, typer.Option()] = None,
    length_of: Annotated[Str, typer.Option(help="response | prompt | total")] = None,
    length_edges: Annotated[Str, typer.Option(help="Fixed bucket edges, e.g. 64,256,1024 (overrides --k).")] = None,
    batch_size: Annotated[Int, typer.Option(help="Per-device batch B: checks small groups, writes order.jsonl.")] = None,
    world_size: Annotated[Int, typer.Option()] = None,
    grad_accum: Annotated[Int, typer.Option()] = None,
    epochs: Annotated[Int, typer.Option(help="Epochs in order.jsonl [default: 3]")] = None,
    small_groups: Annotated[Str, typer.Option(help="merge | warn | drop | error  [default: merge]")] = None,
    merge_encoder: Annotated[bool, typer.Option("--merge-encoder", help="Merge small tasks by mean embedding.")] = False,
    sample: Annotated[Int, typer.Option(help="Draw N records uniformly (seeded).")] = None,
    seed: SeedOpt = None,
    on_invalid: Annotated[Str, typer.Option(help="error | skip")] = None,
    cache_dir: Annotated[Str, typer.Option(help="Cache root [default: $MMKIT_CACHE or ~/.cache/mmkit]")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the embedding cache.")] = False,
    json_: JsonOpt = False,
    overwrite: OverwriteOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    flags = _flags(**{k: v for k, v in locals().items() if k not in NOT_CONFIG})
    from mmkit.cluster.grouping import ClusterConfig, run_grouping
    from mmkit.config import load_config

    cfg = load_config(ClusterConfig, file=config, flags=flags, sets=set_ or [])
    finish(run_grouping(cfg, out, overwrite=overwrite, argv=sys.argv), json_, _render)


def _render(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['method']} groups (k = {results['metrics']['k_effective']})")
    for col in ("group", "size", "share"):
        table.add_column(col)
    for name, row in results["per_category"].items():
        table.add_row(name, str(row["size"]), f"{row['share']:.1%}")
    console = Console(stderr=True)
    console.print(table)
    quality = results["metrics"]["quality"]
    cos = quality.get("within_batch_cosine") or {}
    if cos.get("grouped") is not None:
        console.print(f"within-batch cosine (B={cos['batch_size']}): grouped {cos['grouped']:.3f} "
                      f"vs random {cos['random']:.3f}")
    console.print(f"results in {results['out']}")


@app.command("order", help="Rebuild order.jsonl from a grouped file for another batch size, world size or "
             "accumulation, without clustering again.")
def order(
    grouped: Annotated[str, typer.Argument(help="grouped.jsonl (or .json/.parquet/HF dir) of a grouping run.")],
    batch_size: Annotated[Int, typer.Option()] = None,
    world_size: Annotated[Int, typer.Option()] = None,
    grad_accum: Annotated[Int, typer.Option()] = None,
    epochs: Annotated[Int, typer.Option()] = None,
    small_groups: Annotated[Str, typer.Option(help="merge | warn | drop | error")] = None,
    group_field: Annotated[Str, typer.Option()] = None,
    materialize: Annotated[Str, typer.Option(help="Write epoch 0's rows in yield order to this JSONL.")] = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    json_: JsonOpt = False,
    overwrite: OverwriteOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    flags = _flags(**{k: v for k, v in locals().items() if k not in NOT_CONFIG})
    from mmkit.cluster.grouping import OrderConfig, run_order
    from mmkit.config import load_config

    finish(run_order(load_config(OrderConfig, file=config, flags=flags, sets=set_ or []), out, overwrite), json_)


@app.command("train", help="SFT a causal LM on a grouped file with CommonIT batches, random batches, or both "
             "(same weights, data and steps), through mmkit's training loop.")
def train(
    grouped: Annotated[str, typer.Argument(help="grouped.jsonl of a grouping run.")],
    model: Annotated[Str, typer.Option(help="Causal LM id/dir or bundled:smollm2 [default: bundled:smollm2]")] = None,
    gguf_file: Annotated[Str, typer.Option()] = None,
    ordering: Annotated[Str, typer.Option(help="commonit | random | both  [default: both]")] = None,
    preset: Annotated[Str, typer.Option(help="paper | cpu-demo (sets lr, steps, max length, records)")] = None,
    template: Annotated[Str, typer.Option(help="llmzoo | chat  [default: llmzoo]")] = None,
    system_prompt: Annotated[Str, typer.Option()] = None,
    max_length: Annotated[Int, typer.Option()] = None,
    records: Annotated[Int, typer.Option(help="Use the first N records of the grouped file.")] = None,
    eval_fraction: Annotated[Optional[float], typer.Option()] = None,
    small_groups: Annotated[Str, typer.Option(help="merge | warn | drop | error")] = None,
    lr: Annotated[Optional[float], typer.Option()] = None,
    epochs: Annotated[Int, typer.Option()] = None,
    max_steps: Annotated[Int, typer.Option()] = None,
    batch_size: Annotated[Int, typer.Option(help="Per-device batch.")] = None,
    grad_accum: Annotated[Int, typer.Option()] = None,
    logging_steps: Annotated[Int, typer.Option()] = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    json_: JsonOpt = False,
    overwrite: OverwriteOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    from mmkit.cluster.train import SFTConfig, apply_preset, run_sft
    from mmkit.config import load_config

    flags = _flags(grouped=grouped, model=model, gguf_file=gguf_file, ordering=ordering, template=template,
                   system_prompt=system_prompt, max_length=max_length, records=records,
                   eval_fraction=eval_fraction, small_groups=small_groups, seed=seed,
                   **{"train.lr": lr, "train.epochs": epochs, "train.max_steps": max_steps,
                      "train.batch_size": batch_size, "train.grad_accum": grad_accum,
                      "train.log_every": logging_steps, "train.seed": seed})
    given = {k: v for k, v in flags.items() if v is not None}  # explicit flags override the preset
    cfg = load_config(SFTConfig, file=config, flags={**apply_preset(preset), **given}, sets=set_ or [])
    finish(run_sft(cfg, out, overwrite=overwrite), json_)
