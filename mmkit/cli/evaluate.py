"""``mmkit evaluate``: parse, build a config, call the benchmark module, render the result."""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Optional

import click
import typer
from typer.core import TyperCommand

from mmkit.cli.common import ConfigOpt, JsonOpt, OutOpt, OverwriteOpt, SeedOpt, SetOpt, finish
from mmkit.errors import EXIT_INCOMPLETE, ConfigError, MmkitError, suggest

RETRIEVAL_EXAMPLES = """
Examples:

  mmkit evaluate retrieval --model openai/clip-vit-base-patch32 --dataset flickr30k --split test --data dataset_flickr30k.json --image-root IMG

  mmkit evaluate retrieval --model ckpt1 --model ckpt2 --model ckpt3 --dataset coco --data dataset_coco.json --image-root IMG --out runs/ret

  mmkit evaluate retrieval --model openai/clip-vit-base-patch16 --rerank-model Salesforce/blip-itm-base-coco --rerank-k 128 --dataset coco --data dataset_coco.json --image-root IMG

  mmkit evaluate retrieval --embeddings scores.safetensors --dataset custom --out runs/ret-pre --json | jq .metrics.rsum

  mmkit evaluate retrieval --model ./clip --data pairs.jsonl --recall-k 50 --protocol 1k --sim-chunk-mb 64
"""

app = typer.Typer(
    help="Benchmarks: MMR, RealBench, SNARE, MMT (3AM), CHAIR and POPE through a local model, an "
    "OpenAI-compatible server or a predictions file; image-text retrieval and representation similarity; "
    "aggregate over runs. Example: mmkit evaluate mmr --model llava-hf/llava-1.5-7b-hf --data DIR",
    no_args_is_help=True,
    rich_markup_mode=None,
)

Str = Optional[str]
Int = Optional[int]
Float = Optional[float]
NOT_CONFIG = {"out", "json_", "overwrite", "config", "set_"}  # run options, not config keys

@app.command("list", help="List the registered benchmarks (the capability each needs, its hooks) and backends.")
def list_benchmarks() -> None:
    from mmkit.core.backends import BACKENDS
    from mmkit.evaluate import BENCHMARKS, get_benchmark, hooks

    for name in sorted(BENCHMARKS):
        bench = get_benchmark(name)
        typer.echo(f"{name}\tneeds {bench.needs}\thooks {','.join(hooks(bench))}\tversion {bench.version}")
    typer.echo(f"backends: {', '.join(sorted(BACKENDS))}")


@app.command("retrieval", help="Image-text retrieval: Recall@1/5/10 both ways, RSUM, MedR, MeanR; full "
             "ranking or COCO 1k folds; a dual encoder, ITM re-ranking of its shortlist, or precomputed "
             "embeddings/scores.", epilog=RETRIEVAL_EXAMPLES)
def retrieval(
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", help="Dual encoder id or dir; repeat for several checkpoints/seeds (mean +- std).")] = None,
    data: Annotated[Str, typer.Option(help="mmkit JSONL {image, captions, group?}, Karpathy JSON, or a hub id.")] = None,
    image_root: Annotated[Str, typer.Option(help="Folder of relative image paths (default: the data file's folder).")] = None,
    dataset: Annotated[Str, typer.Option(help="flickr30k | coco | custom  [default: custom]")] = None,
    split: Annotated[Str, typer.Option(help="Karpathy / hub split [default: test]")] = None,
    protocol: Annotated[Str, typer.Option(help="auto | full | 5k | 1k  [default: auto = both for coco]")] = None,
    captions_per_image: Annotated[Str, typer.Option(help="First k captions per image, or all "
                                                    "[default: 5 for flickr30k/coco, all for custom]")] = None,
    image_field: Annotated[Str, typer.Option(help="Image field of hub records [default: image]")] = None,
    captions_field: Annotated[Str, typer.Option(help="Captions field of hub records [default: captions]")] = None,
    embeddings: Annotated[Str, typer.Option(
        "--embeddings", "--predictions",
        help="safetensors: image_embeds + text_embeds, or sims; with text_to_image.")] = None,
    ensemble: Annotated[Str, typer.Option(help="More dual encoders, comma-separated: mean of their scores.")] = None,
    rerank_model: Annotated[Str, typer.Option(help="ITM model (BLIP ITM, ViLT, a dcd student) re-ranking the "
                                              "shortlist.")] = None,
    rerank_k: Annotated[Str, typer.Option(help="Shortlist size per query, or all  [default: 128]")] = None,
    itm_score: Annotated[Str, typer.Option(help="BLIP re-ranking score: logit (the match logit, as BLIP's own "
                                           "evaluation and distill dcd) | prob (its softmax) [default: logit]")] = None,
    recall_k: Annotated[Str, typer.Option(help="Extra K values besides 1,5,10, comma-separated.")] = None,
    sim_chunk_mb: Annotated[Optional[float], typer.Option(help="Score block budget in MB [default: 256]")] = None,
    batch_size: Annotated[Int, typer.Option(help="Encoder / ITM batch size [default: 64]")] = None,
    device: Annotated[Str, typer.Option(help="auto | cpu | cuda")] = None,
    dtype: Annotated[Str, typer.Option(help="auto | float32 | bfloat16 | float16")] = None,
    revision: Annotated[Str, typer.Option(help="Model revision (hub commit).")] = None,
    cache_dir: Annotated[Str, typer.Option(help="Cache root [default: $MMKIT_CACHE or ~/.cache/mmkit]")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the embedding cache.")] = False,
    save_topk: Annotated[Int, typer.Option(help="Write top-K gallery ids per query to predictions.jsonl.")] = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    json_: JsonOpt = False,
    overwrite: OverwriteOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    flags = {k: v for k, v in locals().items() if k not in NOT_CONFIG}
    flags["no_cache"] = True if no_cache else None  # a bool flag counts only when given
    from mmkit.config import load_config
    from mmkit.evaluate.retrieval import RetrievalConfig, run

    cfg = load_config(RetrievalConfig, file=config, flags=flags, sets=set_ or [])
    finish(run(cfg, out, overwrite=overwrite), json_, _render)


def _render(results: dict) -> None:
    """A rich table of the main metrics on stderr (two decimals), then the run folder."""
    from rich.console import Console
    from rich.table import Table

    metrics, agg = results["metrics"], results.get("aggregate")
    columns = [("all" if results.get("protocol") != "1k" else "1k (fold mean)", metrics)]
    if "coco_1k" in metrics:
        columns = [("5k", metrics), ("1k (fold mean)", metrics["coco_1k"])]
    n_models = len(results.get("runs") or []) or 1
    table = Table(title="retrieval" + (f", mean ± std over {n_models} models" if agg else ""))
    table.add_column("metric")
    for name, _ in columns:
        table.add_column(name, justify="right")
    keys = [k for k in metrics if k.startswith(("i2t_", "t2i_")) or k == "rsum"]
    for key in keys:
        cells = []
        for prefix, (_, block) in zip(("", "coco_1k."), columns):
            value = block.get(key)
            cell = "n/a" if value is None else str(value) if isinstance(value, int) else f"{value:.2f}"
            if agg and agg.get(prefix + key, {}).get("std") is not None:
                cell += f" ± {agg[prefix + key]['std']:.2f}"
            cells.append(cell)
        table.add_row(key, *cells)
    console = Console(stderr=True)
    console.print(table)
    console.print(f"{results['counts']['images']} images, {results['counts']['captions']} captions, "
                  f"protocol {results['protocol']}")
    if results.get("rerank"):
        r = results["rerank"]
        console.print(f"re-ranked the top {r['k']} of {', '.join(r['shortlist'])} with {r['reranker']}")
    console.print(f"results in {results['out']}")


REPRESENTATION_EXAMPLES = """
Examples:

  mmkit evaluate representation --model-a bundled:minilm --model-b ./student --data dev.jsonl --out runs/sim

  mmkit evaluate representation --model-a teacher --model-b student --data dev.jsonl --layers-a 0,6,12 --layers-b 0,3,6 --pairs diagonal

  mmkit evaluate representation --model-a A --model-b B --data pairs.csv --text-field sentence1 --text-pair-field sentence2 --unit cls

  mmkit evaluate representation --acts-a A.safetensors --acts-b B.safetensors --metrics cca,cka --json | jq '.metrics.pairs[0]'
"""


@app.command("representation", help="Layer-by-layer similarity of two models (or two activation files): "
             "mean CCA, SVCCA, PWCCA and linear CKA for every (layer_a, layer_b) pair, with one heatmap per "
             "metric.", epilog=REPRESENTATION_EXAMPLES)
def representation(
    model_a: Annotated[Str, typer.Option(help="Text encoder A (hub id, folder, bundled:minilm).")] = None,
    model_b: Annotated[Str, typer.Option(help="Text encoder B (may equal A).")] = None,
    data: Annotated[Str, typer.Option(help="Records with a text field: JSONL, JSON, CSV, parquet, HF folder.")] = None,
    text_field: Annotated[Str, typer.Option(help="Text field of the records [default: text]")] = None,
    text_pair_field: Annotated[Str, typer.Option(help="Second text of a pair, encoded with the first.")] = None,
    acts_a: Annotated[Str, typer.Option(help="safetensors of [N, D] activations, one tensor per layer "
                                        "(instead of the models).")] = None,
    acts_b: Annotated[Str, typer.Option(help="The same samples' activations of the other side.")] = None,
    layers: Annotated[Str, typer.Option(help="Layers on both sides, comma-separated (0 = embeddings) "
                                        "[default: all]")] = None,
    layers_a: Annotated[Str, typer.Option(help="Layers of side A [default: all]")] = None,
    layers_b: Annotated[Str, typer.Option(help="Layers of side B [default: all]")] = None,
    pairs: Annotated[Str, typer.Option(help="all (every layer_a x layer_b) | diagonal (i-th with i-th) "
                                       "[default: all]")] = None,
    metrics: Annotated[Str, typer.Option(help="Comma-separated subset of cca,svcca,pwcca,cka [default: all]")] = None,
    unit: Annotated[Str, typer.Option(help="token (every non-pad token; one tokenizer for both) | cls | mean "
                                      "[default: token]")] = None,
    max_samples: Annotated[Int, typer.Option(help="Seeded subsample of rows [default: 10000]")] = None,
    max_length: Annotated[Int, typer.Option(help="Token limit per text [default: the models' own, at most 512]")] = None,
    batch_size: Annotated[Int, typer.Option(help="Forward batch size [default: 32]")] = None,
    eps: Annotated[Optional[float], typer.Option(help="CCA ridge, relative to the mean variance [default: 1e-6]")] = None,
    svcca_keep: Annotated[Optional[float], typer.Option(help="SVCCA variance kept [default: 0.99]")] = None,
    svcca_dims: Annotated[Int, typer.Option(help="SVCCA: a fixed number of directions instead.")] = None,
    device: Annotated[Str, typer.Option(help="auto | cpu | cuda")] = None,
    dtype: Annotated[Str, typer.Option(help="auto | float32 | bfloat16 | float16")] = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    json_: JsonOpt = False,
    overwrite: OverwriteOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    flags = {k: v for k, v in locals().items() if k not in NOT_CONFIG}
    from mmkit.config import load_config
    from mmkit.evaluate.representation import RepresentationConfig, run

    cfg = load_config(RepresentationConfig, file=config, flags=flags, sets=set_ or [])
    finish(run(cfg, out, overwrite=overwrite), json_, _render_representation)


def _render_representation(results: dict) -> None:
    """A rich table of every pair's scores on stderr (two decimals), then the run folder."""
    from rich.console import Console
    from rich.table import Table

    pairs = results["metrics"]["pairs"]
    names = list(results["config"]["metrics"])
    table = Table(title="representation similarity")
    for column in ("layer_a", "layer_b", *names):
        table.add_column(column, justify="right")
    for p in pairs:
        table.add_row(str(p["layer_a"]), str(p["layer_b"]), *("n/a" if p[m] is None else f"{p[m]:.2f}" for m in names))
    console = Console(stderr=True)
    console.print(table)
    unit = f" ({results['unit']})" if results.get("unit") else ""
    console.print(f"{results['counts']['samples']} samples{unit}, {len(pairs)} layer pairs")
    console.print(f"results in {results['out']}")


# --------------------------------------------------------------------------- generation benchmarks

#: Generation benchmarks with a command each: name -> (one-line help, example lines).
GENERATION: dict[str, tuple[str, tuple[str, ...]]] = {
    "mmr": ("MMR: robustness to leading questions (RA, misleading rate, POS/NEG accuracy).",
            ("mmkit evaluate mmr --model llava-hf/llava-1.5-7b-hf --data DIR --out runs/mmr-llava --parse-rule first",
             "mmkit evaluate mmr --backend openai --base-url http://127.0.0.1:8000/v1 --model served-name --data DIR",
             "mmkit evaluate mmr --predictions preds.jsonl --data DIR")),
    "realbench": ("RealBench: Chinese multi-image understanding (retrieval, ranking, extraction, reasoning).",
                  ("mmkit evaluate realbench --model Qwen/Qwen2-VL-7B-Instruct --data samples.jsonl "
                   "--tasks ranking,extraction --image-mode tile --word-f1",)),
    "snare": ("SNARE: multimodal alignment probes (accuracy, top-2, winner distribution).",
              ("mmkit evaluate snare --model openai/clip-vit-base-patch32 --data probes.jsonl --score cosine",
               "mmkit evaluate snare --model llava-hf/llava-1.5-7b-hf --data probes.jsonl --score yesno")),
    "mmt": ("MMT (3AM): image-aided English-to-Chinese translation, BLEU and METEOR.",
            ("mmkit evaluate mmt --model Qwen/Qwen2-VL-7B-Instruct --data 3am/ --split test --image-root IMG",
             "mmkit evaluate mmt --hyp hyp.zh --ref 3am/test.zh")),
    "chair": ("CHAIR: object hallucination in detailed captions (CHAIR_i, CHAIR_s, BLEU, length).",
              ("mmkit evaluate chair --model llava-hf/llava-1.5-7b-hf --images val2014/ --coco-annotations annotations/",
               "mmkit evaluate chair --predictions captions.jsonl --gt gt.jsonl")),
    "pope": ("POPE: yes/no object probing (accuracy, precision, recall, F1, yes ratio per split).",
             ("mmkit evaluate pope --model llava-hf/llava-1.5-7b-hf --images val2014/ --questions pope_random.jsonl",
              "mmkit evaluate pope --answers answers.jsonl --questions pope_random.jsonl")),
}

#: Common option (parameter name) -> config key (evaluate.md §8).
COMMON_KEYS = {
    "model": "backend.model", "backend": "backend.kind", "revision": "backend.revision",
    "connector": "backend.connector", "model_class": "backend.model_class", "device": "backend.device",
    "dtype": "backend.dtype", "batch_size": "backend.batch_size", "system_prompt": "backend.system_prompt",
    "chat_template": "backend.chat_template", "trust_remote_code": "backend.trust_remote_code",
    "image_mode": "backend.image_mode", "tile_size": "backend.tile_size", "base_url": "backend.base_url",
    "api_key_env": "backend.api_key_env", "concurrency": "backend.concurrency", "timeout": "backend.timeout",
    "max_retries": "backend.max_retries", "max_image_side": "backend.max_image_side",
    "logprobs": "backend.logprobs", "max_new_tokens": "generation.max_new_tokens",
    "temperature": "generation.temperature", "top_p": "generation.top_p", "data": "data", "limit": "limit",
    "seed": "seed", "predictions": "predictions", "allow_missing": "allow_missing",
    "ignore_extra": "ignore_extra", "dump_requests": "dump_requests", "strict": "strict",
}


class BenchmarkCommand(TyperCommand):
    """A generation benchmark's command: its own flags and examples in the help epilog, read from the
    benchmark only when help is shown (so one command's help imports one benchmark module)."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.epilog = benchmark_epilog(self.name)
        super().format_help(ctx, formatter)


def benchmark_epilog(name: str) -> str:
    """The help epilog of ``name``: each of its own flags with the config key and default, then examples."""
    from mmkit.evaluate import get_benchmark
    from mmkit.evaluate.base import option_default

    lines = [f"{name} options (besides the common ones above; also settable as config keys):"]
    try:
        bench = get_benchmark(name)
        for flag, key in bench.flags.items():
            default = option_default(bench, key)
            shown = "see docs" if default is dataclasses.MISSING else default
            lines.append(f"  {flag} VALUE   (config key {key}; default: {shown})")
    except (MmkitError, ImportError) as exc:
        lines.append(f"  (unavailable: {exc})")
    lines += ["Examples:"] + [f"  {example}" for example in GENERATION[name][1]]
    return "\n\n".join(lines)


def _quiet() -> None:
    """``-q`` after the subcommand: as the root's ``-q`` (no progress, warnings only on the console)."""
    import logging

    from mmkit.progress import set_quiet

    set_quiet(True)
    for handler in logging.getLogger("mmkit").handlers:
        if getattr(handler, "_mmkit_console", False):
            handler.setLevel(logging.WARNING)


def benchmark_flags(bench: Any, args: list[str]) -> dict[str, Any]:
    """A benchmark's own flags (its ``flags`` dict: flag -> config field) from the extra arguments:
    ``--flag VALUE`` or ``--flag=VALUE``; a bool field takes no value; a list field may repeat."""
    hints = typing.get_type_hints(bench.config_class)
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if flag not in bench.flags:
            known = [*bench.flags, *(f"--{k.replace('_', '-')}" for k in COMMON_KEYS)]
            raise ConfigError(f"no such option for 'evaluate {bench.name}'{suggest(flag, known)}", field=args[i])
        key = bench.flags[flag]
        hint = hints.get(key)
        if hint is bool and not eq:
            out[key] = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError("expected a value", field=flag)
            value = args[i + 1]
            i += 1
        i += 1
        is_list = list in (typing.get_origin(hint), *(typing.get_origin(a) for a in typing.get_args(hint)))
        out[key] = [*out[key], value] if is_list and key in out else [value] if is_list else value
    return out


def generation_command(name: str):
    """The command function of generation benchmark ``name`` (one factory for every benchmark)."""

    def command(
        ctx: typer.Context,
        model: Annotated[Optional[list[str]], typer.Option(
            "--model", help="Model id or folder (hf), served name (openai); repeat for several models.")] = None,
        backend: Annotated[Str, typer.Option(help="hf | openai | predictions  [default: hf; openai with "
                                             "--base-url, predictions with --predictions]")] = None,
        revision: Annotated[Str, typer.Option(help="Model revision for from_pretrained (hub commit).")] = None,
        connector: Annotated[Str, typer.Option(help="Connector safetensors applied after loading.")] = None,
        model_class: Annotated[Str, typer.Option(help="transformers class overriding config.architectures.")] = None,
        data: Annotated[Str, typer.Option(help="The benchmark's data file or folder.")] = None,
        limit: Annotated[Int, typer.Option(help="Score only the first N records (complete: false).")] = None,
        device: Annotated[Str, typer.Option(help="auto | cpu | cuda")] = None,
        dtype: Annotated[Str, typer.Option(help="auto | float32 | bfloat16 | float16")] = None,
        batch_size: Annotated[Int, typer.Option(help="hf batch size [default: 8 on GPU, 1 on CPU]")] = None,
        max_new_tokens: Annotated[Int, typer.Option(help="New-token budget [default: the benchmark's]")] = None,
        temperature: Annotated[Float, typer.Option(help="Sampling temperature [default: 0 = greedy]")] = None,
        top_p: Annotated[Float, typer.Option(help="Nucleus sampling mass [default: 1]")] = None,
        system_prompt: Annotated[Str, typer.Option(help="A system turn before each request [default: none]")] = None,
        chat_template: Annotated[Str, typer.Option(help="Jinja chat template file for a model without one.")] = None,
        trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own code (off by default).")] = False,
        image_mode: Annotated[Str, typer.Option(help="auto | interleave | tile (several images, §2.4)")] = None,
        tile_size: Annotated[Int, typer.Option(help="Tile square side in pixels [default: 448]")] = None,
        base_url: Annotated[Str, typer.Option(help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")] = None,
        api_key_env: Annotated[Str, typer.Option(help="Environment variable holding the API key "
                                                 "[default: OPENAI_API_KEY]")] = None,
        concurrency: Annotated[Int, typer.Option(help="HTTP requests in flight [default: 8]")] = None,
        timeout: Annotated[Float, typer.Option(help="Seconds per HTTP request [default: 120]")] = None,
        max_retries: Annotated[Int, typer.Option(help="HTTP retries [default: 5]")] = None,
        max_image_side: Annotated[Int, typer.Option(help="Downsize images sent over HTTP to this side.")] = None,
        logprobs: Annotated[bool, typer.Option(help="Ask the server for first-token log-probs (SNARE yes/no).")] = False,
        predictions: Annotated[Str, typer.Option("--predictions", "--answers",
                                                 help="Score this JSONL {uid, prediction} without a model.")] = None,
        allow_missing: Annotated[bool, typer.Option(help="Score uids missing from --predictions as wrong.")] = False,
        ignore_extra: Annotated[bool, typer.Option(help="Skip --predictions lines naming no request.")] = False,
        dump_requests: Annotated[Str, typer.Option(help="Write the rendered requests to this JSONL and stop.")] = None,
        strict: Annotated[bool, typer.Option(help="Exit 3 when some requests failed or --limit was given.")] = False,
        seed: SeedOpt = None,
        out: OutOpt = None,
        json_: JsonOpt = False,
        overwrite: OverwriteOpt = False,
        config: ConfigOpt = None,
        set_: SetOpt = None,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info lines.")] = False,
    ) -> None:
        from mmkit.config import load_config
        from mmkit.evaluate import get_benchmark
        from mmkit.evaluate.run import evaluate

        if quiet:
            _quiet()
        bench = get_benchmark(name)
        params = ctx.params
        flags = {key: (params[p] if not isinstance(params[p], bool) else params[p] or None)
                 for p, key in COMMON_KEYS.items()}
        flags.update(benchmark_flags(bench, list(ctx.args)))
        cfg = load_config(bench.config_class, file=config, flags=flags, sets=set_ or [])
        results = evaluate(name, cfg, out, overwrite=overwrite)
        finish(results, json_, _render_generation)
        if cfg.strict and results.get("complete") is False:
            raise typer.Exit(EXIT_INCOMPLETE)

    command.__doc__ = GENERATION[name][0]
    return command


for _name, (_help, _examples) in GENERATION.items():
    app.command(_name, cls=BenchmarkCommand, help=_help + " Benchmark options are listed below.",
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(generation_command(_name))


@app.command("aggregate", help="Mean, sample std (ddof 1), min and max of every numeric metric over finished "
             "runs of one benchmark on the same data (aggregate.json).",
             epilog="Example:\n\n  mmkit evaluate aggregate runs/ret/seed0 runs/ret/seed1 runs/ret/seed2 --json")
def aggregate_command(
    run_dirs: Annotated[list[str], typer.Argument(metavar="RUN_DIR...", help="Finished run folders.")],
    out: Annotated[Str, typer.Option(help="aggregate.json path or folder [default: the runs' common folder]")] = None,
    force: Annotated[bool, typer.Option(help="Aggregate runs whose benchmark, protocol or data differ.")] = False,
    json_: JsonOpt = False,
) -> None:
    from mmkit.evaluate.aggregate import aggregate_runs

    finish(aggregate_runs(run_dirs, out, force=force), json_, _render_aggregate)


def _cell(value: Any) -> str:
    return "n/a" if value is None else str(value) if isinstance(value, int) else f"{value:.2f}"


def _render_generation(results: dict) -> None:
    """A rich table of the numeric metrics (two decimals, ± std over several models), counts, the run folder."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    if "requests" in results:
        console.print(f"wrote {results['n']} requests to {results['requests']}")
        return
    agg = results.get("aggregate") or {}
    table = Table(title=results["method"] + (f", mean ± std over {len(results.get('runs', []))} models" if agg else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results["metrics"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) or value is None:
            std = agg.get(key, {}).get("std")
            table.add_row(key, _cell(value) + (f" ± {std:.2f}" if std is not None else ""))
    console.print(table)
    c = results["counts"]
    console.print(f"{c['records']} records, {c['answered']} answered, {c['failed']} failed, {c['unparsed']} unparsed"
                  + ("" if results["complete"] else " (incomplete)"))
    console.print(f"results in {results['out']}")


def _render_aggregate(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['method']} over {results['n']} runs")
    for column in ("metric", "mean", "std", "min", "max"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, s in results["aggregate"].items():
        table.add_row(key, *(_cell(s[k]) for k in ("mean", "std", "min", "max")))
    console = Console(stderr=True)
    console.print(table)
    console.print(f"written to {results['out']}")
