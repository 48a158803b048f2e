"""``mmkit distill``: parse, build a config, call the method module, render the result.

Each method is a sibling command of this group (``dcd`` here; ``bert-kd`` and ``pesf`` join it).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mmkit.cli.common import ConfigOpt, JsonOpt, OutOpt, OverwriteOpt, SeedOpt, SetOpt, print_results

DCD_EXAMPLES = """
Examples:

  mmkit distill dcd --teacher ./vilt-f30k --data f30k_train.jsonl --eval-data f30k_test.jsonl --image-root imgs/ --negatives 63 --out runs/dcd

  mmkit distill dcd --eval-only --student runs/dcd/student --teacher ./vilt-f30k --eval-data f30k_test.jsonl --mode rerank --shortlist openai/clip-vit-base-patch16 --rerank-k 128

  mmkit distill dcd --config run.yaml --set alpha=0.5 --epochs 2 --json | jq .metrics.student
"""

app = typer.Typer(
    help="Knowledge distillation: dcd (an image-text matching model into a shallower fusion student). "
    "Example: mmkit distill dcd --teacher ./vilt --data train.jsonl --eval-data test.jsonl --out runs/dcd",
    no_args_is_help=True,
    rich_markup_mode=None,
)

Str = Optional[str]
Int = Optional[int]
Float = Optional[float]


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
    from mmkit.config import load_config
    from mmkit.distill.dcd import DcdConfig, run

    flags = {
        "teacher.id": teacher, "data.path": data, "data.image_root": image_root, "data.eval_path": eval_data,
        "negatives": negatives, "topk": topk, "student_layers": student_layers, "alpha": alpha,
        "temperature": temperature, "train.epochs": epochs, "train.batch_size": batch_size, "train.lr": lr,
        "data.max_len": max_len, "data.image_size": image_size,
        "reproduce_released": True if reproduce_released else None, "eval_only": True if eval_only else None,
        "student": student, "eval.modes": [mode] if mode else None, "eval.shortlist": shortlist,
        "eval.rerank_k": rerank_k, "train.seed": seed,
    }
    cfg = load_config(DcdConfig, file=config, flags=flags, sets=set_ or [])
    results = run(cfg, out, overwrite=overwrite)
    _render(results)
    if json_:
        print_results(results)


def _render(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from mmkit.progress import is_quiet

    if is_quiet():
        return
    metrics = results["metrics"]
    console = Console(stderr=True)
    train = metrics.get("train")
    if train:
        console.print(f"trained {train['steps']} steps on {train['examples']} examples; student layers "
                      f"{train['student_layers']} of {train['teacher_fusion_layers']}; teacher ranked the "
                      f"positive first for {_pct(train['teacher_positive_first_pct'])} of examples")
    modes = metrics.get("modes") or []
    if modes:
        table = Table(title="retrieval (R@K in %)")
        for col in ("model", "mode", "i2t R@1", "i2t R@5", "t2i R@1", "t2i R@5", "RSUM", "ms/query", "speed-up"):
            table.add_column(col)
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
    console.print(f"results in {results['out']}")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"
