"""``mmkit unlearn``: parse, build a config, call mmkit.unlearn, render the result."""

from __future__ import annotations

from typing import Annotated, Any, Mapping, Optional

import typer

from mmkit.cli.common import ConfigOpt, JsonOpt, OutOpt, OverwriteOpt, SeedOpt, SetOpt, finish

app = typer.Typer(help="EFUF: fine-grained unlearning of object hallucinations in multimodal LLMs. "
                  "Example: mmkit unlearn efuf --model llava-hf/llava-1.5-7b-hf --images coco/train2014 --out runs/efuf",
                  no_args_is_help=True, rich_markup_mode=None)

EFUF_EXAMPLES = """
Examples:

  mmkit unlearn efuf --model llava-hf/llava-1.5-7b-hf --images coco/train2014 --out runs/efuf

  mmkit unlearn efuf --model llava-hf/llava-1.5-7b-hf --samples runs/efuf/samples.jsonl --images coco/train2014 --variant code --out runs/efuf-code

  mmkit unlearn efuf --model llava-hf/llava-1.5-7b-hf --images imgs/ --responses responses.jsonl --stop-after samples --json | jq .metrics.n_samples
"""

BUILD_EXAMPLES = """
Examples:

  mmkit unlearn build-samples --responses responses.jsonl --images coco/train2014 --out runs/samples

  mmkit unlearn build-samples --model llava-hf/llava-1.5-7b-hf --images coco/train2014 --base-url http://localhost:8000/v1 --out runs/samples
"""

Str = Optional[str]
Int = Optional[int]
Float = Optional[float]

#: flag name -> dotted config key (flags not listed map to the key of the same name)
KEYS = {"t_hal": "thresholds.t_hal", "t_real": "thresholds.t_real", "t_sent": "thresholds.t_sent",
        "lr": "train.lr", "weight_decay": "train.weight_decay", "epochs": "train.epochs", "seed": "train.seed",
        "grad_accum": "train.grad_accum", "max_grad_norm": "train.max_grad_norm", "base_url": "backend.base_url",
        "no_safeguards": "safeguards", "no_first_eval": "first_eval"}
#: boolean "--no-x" flags: given means the config key is False
NEGATED = {"no_safeguards", "no_first_eval"}
NOT_CONFIG = {"out", "overwrite", "json_", "config", "set_"}

# Options both commands share.
ModelOpt = Annotated[Str, typer.Option(help="The MLLM to unlearn (hub id or save_pretrained folder).")]
ImagesOpt = Annotated[Str, typer.Option(help="Image folder (recursive; .jpg .jpeg .png .webp); image paths in "
                                        "the records are relative to it.")]
ResponsesOpt = Annotated[Str, typer.Option(help="responses.jsonl to use instead of generating descriptions.")]
ClipOpt = Annotated[Str, typer.Option(help="CLIP-like scorer  [default: openai/clip-vit-base-patch32]")]
ExtractorOpt = Annotated[Str, typer.Option(help="vocab | llm | given  [default: vocab]")]
VocabOpt = Annotated[Str, typer.Option(help="Synonym table for the vocab extractor  [default: COCO]")]
THalOpt = Annotated[Float, typer.Option(help="Object is hallucinated if S < this  [default: 23]")]
TRealOpt = Annotated[Float, typer.Option(help="Object is real if S > this  [default: 32]")]
TSentOpt = Annotated[Float, typer.Option(help="Sentence sample if every S > t-hal and mean S > this  [default: 27.5]")]
NumResponsesOpt = Annotated[Int, typer.Option(help="Descriptions per image  [default: 1]")]
BaseUrlOpt = Annotated[Str, typer.Option(help="Generate descriptions on an OpenAI-compatible server (vLLM).")]
ExtractorModelOpt = Annotated[Str, typer.Option(help="Text LLM for --extractor llm (hub id, or the server's "
                                                "model name with --extractor-base-url).")]
ExtractorBaseUrlOpt = Annotated[Str, typer.Option(help="OpenAI-compatible server for --extractor llm.")]
DeviceOpt = Annotated[Str, typer.Option(help="cpu | cuda | auto  [default: auto]")]


def _flags(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config flags (dotted keys) a command was given: None and unset bool flags do not count."""
    flags: dict[str, Any] = {}
    for name, value in values.items():
        if name in NOT_CONFIG or value is None or value is False or value == []:
            continue
        flags[KEYS.get(name, name)] = False if name in NEGATED else value
    return flags


def _run(values: Mapping[str, Any], command: str, **forced: Any) -> None:
    from mmkit.config import load_config
    from mmkit.unlearn.efuf import EfufConfig
    from mmkit.unlearn.pipeline import run

    cfg = load_config(EfufConfig, file=values["config"], flags={**_flags(values), **forced},
                      sets=values["set_"] or [])
    finish(run(cfg, values["out"], overwrite=values["overwrite"], command=command), values["json_"], _render)


def _render(results: Mapping[str, Any]) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    m = results["metrics"]
    if "n_samples" in m:
        console.print("samples: " + ", ".join(f"{k} {v}" for k, v in m["n_samples"].items()))
    if "steps" in m:
        last = (results.get("loss_history") or [{}])[-1]
        losses = ", ".join(f"{k} {last[k]:.4f}" for k in ("l_pos", "l_neg", "l_sent") if last.get(k) is not None)
        at, reason = m["guard_triggered_at"], m["guard_reason"]
        guard = "not triggered" if at is None else f"triggered at step {at} ({reason})"
        console.print(f"trained {m['steps']} steps ({m['trainable_params']} connector parameters); last step: "
                      f"{losses or 'n/a'}; skipped {m['skipped_steps']}; guard {guard}")
    console.print(f"results in {results['out']}")


@app.command("efuf", help="EFUF: build positive/negative/sentence samples from the model's own descriptions "
             "(objects scored by CLIP), then fine-tune only the vision-language connector: likelihood on "
             "positives and sentences, bounded gradient ascent on hallucinated fragments.", epilog=EFUF_EXAMPLES)
def efuf(
    model: ModelOpt = None,
    images: ImagesOpt = None,
    responses: ResponsesOpt = None,
    samples: Annotated[Str, typer.Option(help="samples.jsonl: skip data construction (images resolve next to "
                                         "it unless --images).")] = None,
    clip: ClipOpt = None,
    extractor: ExtractorOpt = None,
    vocab: VocabOpt = None,
    extractor_model: ExtractorModelOpt = None,
    extractor_base_url: ExtractorBaseUrlOpt = None,
    num_responses: NumResponsesOpt = None,
    base_url: BaseUrlOpt = None,
    variant: Annotated[Str, typer.Option(help="paper | code (released-code weights and schedules)  "
                                         "[default: paper]")] = None,
    lambda_neg: Annotated[Float, typer.Option(help="Weight of L_neg  [default: 0.3]")] = None,
    lambda_sent: Annotated[Float, typer.Option(help="Weight of L_sent  [default: 0.2]")] = None,
    t_hal: THalOpt = None,
    t_real: TRealOpt = None,
    t_sent: TSentOpt = None,
    lr: Annotated[Float, typer.Option(help="[default: 1e-5]")] = None,
    weight_decay: Annotated[Float, typer.Option(help="[default: 0.05]")] = None,
    epochs: Annotated[Int, typer.Option(help="Passes over the negatives  [default: 1]")] = None,
    grad_accum: Annotated[Int, typer.Option(help="[default: 1]")] = None,
    max_grad_norm: Annotated[Float, typer.Option(help="Gradient clipping; 0 disables  [default: 1.0]")] = None,
    batch_neg: Annotated[Int, typer.Option(help="Negatives per step  [default: 1]")] = None,
    batch_pos: Annotated[Int, typer.Option(help="Positives per step  [default: 1]")] = None,
    batch_sent: Annotated[Int, typer.Option(help="Sentence samples per step  [default: 1]")] = None,
    batch_replay: Annotated[Int, typer.Option(help="Replay samples per step  [default: 1]")] = None,
    trainable: Annotated[Str, typer.Option(help="Regex of trainable parameter names  [default: the connector]")] = None,
    replay: Annotated[Str, typer.Option(help="Instruction data (samples schema, kind replay) for --variant code.")] = None,
    no_safeguards: Annotated[bool, typer.Option("--no-safeguards", help="No NLL clip, guards or gradient "
                                                "clipping (exact reference behaviour).")] = False,
    neg_nll_clip: Annotated[Float, typer.Option(help="Per-sample NLL clip tau  [default: ln |V|]")] = None,
    guard_pos_rise: Annotated[Float, typer.Option(help="Collapse-guard rise of L_pos in nats  [default: 1.0]")] = None,
    neg_stop: Annotated[Float, typer.Option(help="Stop ascent above this validation negative NLL  "
                                            "[default: tau]")] = None,
    val_frac: Annotated[Float, typer.Option(help="Held-out fraction of each kind  [default: 0.05]")] = None,
    no_first_eval: Annotated[bool, typer.Option("--no-first-eval", help="No validation before training.")] = False,
    evals_per_epoch: Annotated[Int, typer.Option(help="[default: 4]")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing",
                                                         help="Non-reentrant checkpointing on the LM.")] = False,
    system_prompt: Annotated[Str, typer.Option(help="System prompt; 'llava' = the LLaVA v1 sentence.")] = None,
    dtype: Annotated[Str, typer.Option(help="Frozen weights: auto | bf16 | fp16 | fp32  [default: auto]")] = None,
    device: DeviceOpt = None,
    save_full: Annotated[bool, typer.Option("--save-full", help="Also save the whole model (save_pretrained).")] = False,
    stop_after: Annotated[Str, typer.Option(help="responses | objects | samples: end after that stage.")] = None,
    eval_images: Annotated[Str, typer.Option(help="Images for CHAIR before and after training.")] = None,
    eval_gt: Annotated[Str, typer.Option(help="CHAIR ground truth JSONL for --eval-images.")] = None,
    eval_coco_annotations: Annotated[Str, typer.Option(help="COCO annotations folder for --eval-images.")] = None,
    eval_pope: Annotated[Optional[list[str]], typer.Option(help="POPE question file (repeatable).")] = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    _run(dict(locals()), "unlearn efuf")


@app.command("build-samples", help="Build EFUF samples only (responses -> CLIP-scored objects -> samples.jsonl), "
             "the same as 'efuf --stop-after samples'; train on them later with 'efuf --samples'.",
             epilog=BUILD_EXAMPLES)
def build_samples(
    images: ImagesOpt = None,
    responses: ResponsesOpt = None,
    model: ModelOpt = None,
    clip: ClipOpt = None,
    extractor: ExtractorOpt = None,
    vocab: VocabOpt = None,
    extractor_model: ExtractorModelOpt = None,
    extractor_base_url: ExtractorBaseUrlOpt = None,
    num_responses: NumResponsesOpt = None,
    base_url: BaseUrlOpt = None,
    t_hal: THalOpt = None,
    t_real: TRealOpt = None,
    t_sent: TSentOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = None,
    json_: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    _run(dict(locals()), "unlearn build-samples", stop_after="samples")
