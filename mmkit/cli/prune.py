"""``mmkit prune-data``: parse, build a config, call mmkit.prune, render the result."""

from __future__ import annotations

from typing import Annotated, Any, Callable, Optional

import typer

from mmkit.cli.common import (ConfigOpt, DefaultCommandGroup, JsonOpt, OutOpt, OverwriteOpt, SeedOpt, SetOpt,
                              finish)

EXAMPLES = """
Examples:

  mmkit prune-data digits --epochs 12 --window 5 --keep 0.75 --out runs/digits

  mmkit prune-data imagenet --data-dir /data/imagenet --method dyn-unc --keep 0.75 --out runs/in1k

  accelerate launch -m mmkit prune-data imagenet --data-dir /data/imagenet --out runs/in1k

  mmkit prune-data images/ --model small-cnn --image-size 32 --method forgetting --prune 0.3 --out runs/f

  mmkit prune-data score --dynamics runs/in1k/dynamics --method aum --keep 0.5 --out runs/aum

  mmkit prune-data select --scores runs/in1k/scores.csv --keep 0.5 --strategy ccs --out runs/ccs

  mmkit prune-data apply images/ --indices runs/ccs/kept_indices.txt --materialize symlink --out runs/pruned

  mmkit prune-data experiment --preset mnist5k --out runs/prune-mnist
"""

app = typer.Typer(
    cls=DefaultCommandGroup,
    help="Dataset pruning by dynamic uncertainty (and EL2N, forgetting, AUM, entropy, cartography, random, "
    "CCS). Example: mmkit prune-data digits --keep 0.75 --out runs/digits",
    epilog=EXAMPLES,
    no_args_is_help=True,
    rich_markup_mode=None,
)

Str = Optional[str]
Int = Optional[int]
Float = Optional[float]

#: flag name -> dotted config key (flags not listed map to the key of the same name)
KEYS = {
    "data_dir": "data.data_dir", "format": "data.format", "split": "data.split", "image_column": "data.image_column",
    "label_column": "data.label_column", "path_column": "data.path_column", "classes": "data.classes",
    "image_size": "data.image_size",
    "model": "proxy.model", "init": "proxy.init", "batch_size": "proxy.batch_size", "lr": "proxy.lr",
    "record_mode": "proxy.record_mode", "channels": "proxy.channels", "dtype": "proxy.dtype",
    "num_workers": "proxy.num_workers", "mixed_precision": "proxy.mixed_precision",
    "window": "score.window", "drop_last_window": "score.drop_last_window", "el2n_epochs": "score.el2n_epochs",
    "entropy_epochs": "score.entropy_epochs", "carto_mode": "score.carto_mode", "aum_space": "score.aum_space",
    "keep": "select.keep", "prune": "select.prune", "n_keep": "select.n_keep", "strategy": "select.strategy",
    "balance": "select.balance", "tie_break": "select.tie_break", "nan_policy": "select.nan_policy",
    "ccs_hard_fraction": "select.ccs_hard_fraction", "ccs_strata": "select.ccs_strata",
    "ccs_cutoff_score": "select.ccs_cutoff_score",
}
LISTS = {"channels", "classes", "el2n_epochs", "entropy_epochs"}
NOT_CONFIG = {"out", "json_", "overwrite", "config", "set_"}

# Options several commands share.
DatasetArg = Annotated[str, typer.Argument(help="digits | mnist5k | imagenet | cifar10 | cifar100 | an ImageFolder "
                                           "| a save_to_disk dir | a CSV/JSONL of (path, label) | a hub id.")]
MethodOpt = Annotated[Str, typer.Option(help="dyn-unc | random | el2n | forgetting | aum | entropy | cartography "
                                        "[default: dyn-unc]")]
KeepOpt = Annotated[Float, typer.Option(help="Fraction kept, in (0, 1] [default: 0.75].")]
PruneOpt = Annotated[Float, typer.Option(help="Fraction pruned (= 1 - keep).")]
NKeepOpt = Annotated[Int, typer.Option(help="Examples kept (overrides --keep/--prune).")]
WindowOpt = Annotated[Int, typer.Option(help="Dyn-unc window J [default: 10].")]
StrategyOpt = Annotated[Str, typer.Option(help="topk | ccs | random [default: topk]")]
BalanceOpt = Annotated[Str, typer.Option(help="none | class [default: none]")]
TieOpt = Annotated[Str, typer.Option(help="random | index [default: random]")]
NanOpt = Annotated[Str, typer.Option(help="NaN scores (never seen): keep | drop | error [default: keep]")]
HardOpt = Annotated[Str, typer.Option(help="CCS hard cut-off fraction beta, or auto [default: auto]")]
StrataOpt = Annotated[Int, typer.Option(help="CCS strata B [default: 50]")]
CutoffOpt = Annotated[Str, typer.Option(help="CCS cut-off score method [default: the method's own]")]
DropLastOpt = Annotated[bool, typer.Option("--drop-last-window", help="Average K-J windows (reference parity).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Accept a dataset fingerprint mismatch.")]
MaterializeOpt = Annotated[Str, typer.Option(help="ImageFolder output: list | symlink | copy [default: list]")]
EpochsOpt = Annotated[Int, typer.Option(help="Epochs K recorded [default: 20 for digits/mnist5k, else 90].")]
ModelOpt = Annotated[Str, typer.Option(help="mlp | small-cnn | resnet-50 | convnext-tiny | swin-tiny | a "
                                       "classifier id/path [default: the preset's]")]
RecordModeOpt = Annotated[Str, typer.Option(help="eval-pass | inline | train-forward [default: eval-pass]")]
ChannelsOpt = Annotated[Str, typer.Option(help="Comma list [default: p_true,correct,margin,el2n,entropy]")]
ListOpt = Annotated[Str, typer.Option(help="Comma list of recorded epoch numbers.")]


def _config(values: dict[str, Any], config: str | None, sets: list[str] | None):
    """The PruneConfig from the flags the user gave (a bool flag counts only when set)."""
    from mmkit.config import load_config
    from mmkit.prune.pipeline import PruneConfig

    flags: dict[str, Any] = {}
    for name, value in values.items():
        if name in NOT_CONFIG or value is None or value is False:
            continue
        if name in LISTS and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        flags[KEYS.get(name, name)] = value
    return load_config(PruneConfig, file=config, flags=flags, sets=sets or [])


def _summary(results: dict) -> None:
    from rich.console import Console

    m = results["metrics"]
    line = ", ".join(f"{k} {m[k]:.4g}" if isinstance(m.get(k), float) else f"{k} {m[k]}"
                     for k in ("method", "N", "n_keep", "keep", "nan_count") if k in m)
    Console(stderr=True).print(f"[bold]prune-data[/bold] {line}")


def _call(fn: Callable[..., dict], values: dict[str, Any], out: str | None, overwrite: bool, json_: bool,
          config: str | None, set_: list[str] | None) -> None:
    cfg = _config(values, config, set_)
    finish(fn(cfg, out, overwrite=overwrite), json_, _summary)


@app.command("run", help="Train a proxy, record its dynamics, score, select and write the pruned dataset.",
             epilog=EXAMPLES)
def run(
    dataset: DatasetArg,
    method: MethodOpt = None, keep: KeepOpt = None, prune: PruneOpt = None, n_keep: NKeepOpt = None,
    window: WindowOpt = None, drop_last_window: DropLastOpt = False, epochs: EpochsOpt = None,
    model: ModelOpt = None,
    init: Annotated[Str, typer.Option(help="scratch | pretrained [default: scratch]")] = None,
    record_mode: RecordModeOpt = None, channels: ChannelsOpt = None,
    dtype: Annotated[Str, typer.Option(help="float16 | float32 [default: float16]")] = None,
    batch_size: Int = None, lr: Float = None, num_workers: Int = None,
    mixed_precision: Annotated[Str, typer.Option(help="auto | no | fp16 | bf16")] = None,
    strategy: StrategyOpt = None, balance: BalanceOpt = None, tie_break: TieOpt = None, nan_policy: NanOpt = None,
    ccs_hard_fraction: HardOpt = None, ccs_strata: StrataOpt = None, ccs_cutoff_score: CutoffOpt = None,
    el2n_epochs: ListOpt = None, entropy_epochs: ListOpt = None,
    carto_mode: Annotated[Str, typer.Option(help="ambiguous | hard | easy")] = None,
    data_dir: Annotated[Str, typer.Option(help="Local ImageFolder for a hub preset.")] = None,
    format: Annotated[Str, typer.Option(help="auto | builtin | preset | hf | imagefolder | table | hub")] = None,
    split: Str = None, image_column: Str = None, label_column: Str = None, path_column: Str = None,
    classes: Annotated[Str, typer.Option(help="Comma list of class names (labels outside it are errors).")] = None,
    image_size: Int = None, materialize: MaterializeOpt = None, force: ForceOpt = False,
    seed: SeedOpt = None, out: OutOpt = None, json_: JsonOpt = False, overwrite: OverwriteOpt = False,
    config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    values = dict(locals())
    from mmkit.prune.pipeline import run_all

    _call(run_all, values, out, overwrite, json_, config, set_)


@app.command("record", help="Train the proxy and record its training dynamics only (dynamics/).", epilog=EXAMPLES)
def record(
    dataset: DatasetArg, epochs: EpochsOpt = None, model: ModelOpt = None,
    init: Annotated[Str, typer.Option(help="scratch | pretrained")] = None,
    record_mode: RecordModeOpt = None, channels: ChannelsOpt = None,
    dtype: Annotated[Str, typer.Option(help="float16 | float32")] = None,
    batch_size: Int = None, lr: Float = None, num_workers: Int = None,
    mixed_precision: Annotated[Str, typer.Option(help="auto | no | fp16 | bf16")] = None,
    data_dir: Str = None, format: Str = None, split: Str = None, image_column: Str = None,
    label_column: Str = None, path_column: Str = None, classes: Str = None, image_size: Int = None,
    force: ForceOpt = False, seed: SeedOpt = None, out: OutOpt = None, json_: JsonOpt = False,
    overwrite: OverwriteOpt = False, config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    values = dict(locals())
    from mmkit.prune.pipeline import run_record

    _call(run_record, values, out, overwrite, json_, config, set_)


@app.command("score", help="Score recorded dynamics (mmkit's directory, .npy/.npz/.safetensors [K, N], CSV, "
             "baai-txt); selects too when --keep/--prune/--n-keep is given.", epilog=EXAMPLES)
def score(
    dynamics: Annotated[list[str], typer.Option("--dynamics", help="Dynamics source; repeat for several runs.")],
    method: MethodOpt = None, window: WindowOpt = None, drop_last_window: DropLastOpt = False,
    dynamics_format: Annotated[Str, typer.Option("--format", help="auto | native | npy | npz | safetensors | "
                                                 "csv | baai-txt")] = None,
    transpose: Annotated[bool, typer.Option("--transpose", help="Arrays are [N, K].")] = False,
    allow_gaps: Annotated[bool, typer.Option("--allow-gaps", help="Accept missing epochs.")] = False,
    allow_nan: Annotated[bool, typer.Option("--allow-nan", help="NaN in imported arrays means unseen.")] = False,
    labels: Annotated[Str, typer.Option(help="Labels: .npy or one integer per line.")] = None,
    keep: KeepOpt = None, prune: PruneOpt = None, n_keep: NKeepOpt = None,
    strategy: StrategyOpt = None, balance: BalanceOpt = None, tie_break: TieOpt = None, nan_policy: NanOpt = None,
    ccs_hard_fraction: HardOpt = None, ccs_strata: StrataOpt = None, ccs_cutoff_score: CutoffOpt = None,
    el2n_epochs: ListOpt = None, entropy_epochs: ListOpt = None,
    carto_mode: Annotated[Str, typer.Option(help="ambiguous | hard | easy")] = None,
    scores_format: Annotated[Str, typer.Option(help="csv | npy | both")] = None,
    mem_limit_mb: Annotated[Int, typer.Option(help="Working-set budget of the scorer [default: 1024].")] = None,
    seed: SeedOpt = None, out: OutOpt = None, json_: JsonOpt = False, overwrite: OverwriteOpt = False,
    config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    values = dict(locals())
    from mmkit.prune.pipeline import run_score

    _call(run_score, values, out, overwrite, json_, config, set_)


@app.command("select", help="Choose the kept set from saved importances (scores.npy or scores.csv).",
             epilog=EXAMPLES)
def select_(
    scores: Annotated[str, typer.Option("--scores", help="scores.npy or scores.csv")],
    labels: Annotated[Str, typer.Option(help="Labels for --balance class: .npy or one per line.")] = None,
    keep: KeepOpt = None, prune: PruneOpt = None, n_keep: NKeepOpt = None,
    strategy: StrategyOpt = None, balance: BalanceOpt = None, tie_break: TieOpt = None, nan_policy: NanOpt = None,
    ccs_hard_fraction: HardOpt = None, ccs_strata: StrataOpt = None,
    seed: SeedOpt = None, out: OutOpt = None, json_: JsonOpt = False, overwrite: OverwriteOpt = False,
    config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    values = dict(locals())
    from mmkit.prune.pipeline import run_select

    _call(run_select, values, out, overwrite, json_, config, set_)


@app.command("apply", help="Write the kept examples of DATASET in its own format (pruned/).", epilog=EXAMPLES)
def apply(
    dataset: DatasetArg,
    indices: Annotated[str, typer.Option("--indices", help="kept_indices.txt, .npy, scores.csv or a file list.")],
    materialize: MaterializeOpt = None, force: ForceOpt = False,
    data_dir: Str = None, format: Str = None, split: Str = None, image_column: Str = None,
    label_column: Str = None, path_column: Str = None, classes: Str = None, image_size: Int = None,
    out: OutOpt = None, json_: JsonOpt = False, overwrite: OverwriteOpt = False,
    config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    values = dict(locals())
    from mmkit.prune.pipeline import run_apply

    _call(run_apply, values, out, overwrite, json_, config, set_)


@app.command("experiment", help="The small real experiment: record dynamics, prune with each method at each "
             "kept fraction, retrain from scratch with each seed, report mean +- std test accuracy.",
             epilog=EXAMPLES)
def experiment(
    preset: Annotated[Str, typer.Option(help="mnist5k | digits [default: mnist5k]")] = None,
    methods: Annotated[Str, typer.Option(help="Comma list; ccs:M wraps M in CCS [default: random,el2n,forgetting,"
                                         "aum,entropy,dyn-unc,cartography,ccs:dyn-unc,ccs:aum]")] = None,
    keeps: Annotated[Str, typer.Option(help="Comma list [default: 0.9,0.75,0.5,0.3]")] = None,
    seeds: Annotated[Str, typer.Option(help="Comma list [default: 0,1,2]")] = None,
    epochs: Annotated[Int, typer.Option(help="Epochs recorded and retrained [default: 20]")] = None,
    window: WindowOpt = None,
    budget: Annotated[Str, typer.Option(help="epochs | iterations [default: epochs]")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="2 seeds, keep 0.5, random vs dyn-unc.")] = False,
    jobs: Annotated[Int, typer.Option(help="Seeds run in parallel processes [default: 1]")] = None,
    out: OutOpt = None, json_: JsonOpt = False, overwrite: OverwriteOpt = False,
    config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    from mmkit.config import load_config
    from mmkit.prune.experiment import ExperimentConfig, run_experiment

    flags = {"preset": preset, "epochs": epochs, "window": window, "budget": budget, "quick": quick or None,
             "jobs": jobs,
             **{k: v.split(",") for k, v in (("methods", methods), ("keeps", keeps), ("seeds", seeds)) if v}}
    cfg = load_config(ExperimentConfig, file=config, flags=flags, sets=set_ or [])
    finish(run_experiment(cfg, out, overwrite=overwrite), json_)
