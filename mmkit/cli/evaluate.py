"""``mmkit evaluate``: parse, build a config, call the benchmark module, render the result."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mmkit.cli.common import ConfigOpt, JsonOpt, OutOpt, OverwriteOpt, SeedOpt, SetOpt, finish

RETRIEVAL_EXAMPLES = """
Examples:

  mmkit evaluate retrieval --model openai/clip-vit-base-patch32 --dataset flickr30k --split test --data dataset_flickr30k.json --image-root IMG

  mmkit evaluate retrieval --model ckpt1 --model ckpt2 --model ckpt3 --dataset coco --data dataset_coco.json --image-root IMG --out runs/ret

  mmkit evaluate retrieval --model openai/clip-vit-base-patch16 --rerank-model Salesforce/blip-itm-base-coco --rerank-k 128 --dataset coco --data dataset_coco.json --image-root IMG

  mmkit evaluate retrieval --embeddings scores.safetensors --dataset custom --out runs/ret-pre --json | jq .metrics.rsum

  mmkit evaluate retrieval --model ./clip --data pairs.jsonl --recall-k 50 --protocol 1k --sim-chunk-mb 64
"""

app = typer.Typer(
    help="Benchmarks: image-text retrieval and representation similarity (built); MMR, RealBench, SNARE, MMT "
    "and CHAIR/POPE are planned. Example: mmkit evaluate retrieval --model M --data pairs.jsonl",
    no_args_is_help=True,
    rich_markup_mode=None,
)

Str = Optional[str]
Int = Optional[int]
NOT_CONFIG = {"out", "json_", "overwrite", "config", "set_"}  # run options, not config keys


@app.command("list", help="List the registered benchmarks, the capability each needs and its hooks.")
def list_benchmarks() -> None:
    from mmkit.evaluate import BENCHMARKS, get_benchmark, hooks

    for name in sorted(BENCHMARKS):
        bench = get_benchmark(name)
        typer.echo(f"{name}\tneeds {bench.needs}\thooks {','.join(hooks(bench))}\tversion {bench.version}")


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
