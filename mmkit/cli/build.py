"""``mmkit build-dataset``: parse, build a recipe config, call the recipe, render its manifest."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mmkit.cli.common import ConfigOpt, SetOpt

app = typer.Typer(
    help="Build datasets: condense (Bunny), ambiguous-mmt (3AM), snare probes, mmr pairs, realbench samples.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

RECIPE_EXAMPLES = """
Recipes (one example each):

  condense       mmkit build-dataset condense --pairs laion.parquet --embeddings laion-emb/ --target 2000000 --out condensed/

  ambiguous-mmt  mmkit build-dataset ambiguous-mmt --captions pool.jsonl --sense-inventory wordnet-dict:wn30/ --top-k 26000 --out my3am/

  snare          mmkit build-dataset snare --relations visual_genome_relation.json --attributes visual_genome_attribution.json --captions coco_karpathy_test.json --out snare/

  mmr            mmkit build-dataset mmr --records vqa_distractors.jsonl --image-root imgs/ --out mmr-train/

  realbench      mmkit build-dataset realbench --folder posts/ --copy-images --out realbench/

Every recipe: --out DIR (published atomically, manifest.json), --config, --set, --seed, --overwrite,
--work-dir, --limit, --dry-run, --json, -q, --num-workers, --device. See docs/build-dataset.md.
"""
app.info.epilog = RECIPE_EXAMPLES

_Str = Optional[str]
_Int = Optional[int]
_Float = Optional[float]
_Out = Annotated[str, typer.Option("--out", help="Output directory (published atomically; holds manifest.json).")]
_Fields = Annotated[Optional[list[str]], typer.Option("--field", help="Map an input column: dst=src (repeatable).")]
_ImageRoot = Annotated[_Str, typer.Option(help="Relative image paths live here [default: the input file's dir].")]
_HashImages = Annotated[bool, typer.Option("--hash-images", help="Fingerprint every image in the manifest.")]
_WorkDir = Annotated[_Str, typer.Option(help="Resumable state and log.txt [default: <out>.work].")]
_CleanWork = Annotated[bool, typer.Option("--clean-work", help="Delete the work dir after publishing.")]
_Limit = Annotated[_Int, typer.Option(help="Use only the first N input records.")]
_DryRun = Annotated[bool, typer.Option("--dry-run", help="Read and validate the inputs, print counts; write nothing.")]
_Seed = Annotated[_Int, typer.Option(help="Seed of every random choice [default: 0].")]
_Workers = Annotated[_Int, typer.Option(help="Worker processes [default: 1].")]
_Device = Annotated[_Str, typer.Option(help="auto | cpu | cuda")]
_Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")]
_Json = Annotated[bool, typer.Option("--json", help="Print manifest.json to stdout.")]
_Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
_Config = ConfigOpt
_Set = SetOpt
_OnInvalid = Annotated[_Str, typer.Option(help="error | skip: stop at, or drop and count, invalid content.")]
_CopyImages = Annotated[bool, typer.Option("--copy-images", help="Copy the images into <out>/images/.")]
_LinkImages = Annotated[bool, typer.Option("--link-images", help="Symlink the images into <out>/images/.")]
#: command parameters that steer the run rather than set a config key
_RUN_KEYS = {"out", "overwrite", "json_", "quiet", "config", "set_", "field"}


def _run_recipe(name: str, given: dict, **renamed: object) -> None:
    """Shared body of the record recipes: flags (+ ``renamed`` config keys) -> config -> run -> render."""
    from mmkit.build import RECIPES
    from mmkit.cli.common import finish
    from mmkit.config import load_config
    from mmkit.errors import ConfigError
    from mmkit.progress import set_quiet

    if given["quiet"]:
        set_quiet(True)
    mapping = {}
    for item in given["field"] or []:
        dst, sep, src = item.partition("=")
        if not sep or not dst or not src:
            raise ConfigError(f"expected dst=src, got {item!r}", field="--field")
        mapping[dst] = src
    recipe = RECIPES.resolve(name)
    flags = {k: (None if v is False else v) for k, v in given.items() if k not in _RUN_KEYS}
    flags.update(fields=mapping or None, **renamed)
    cfg = load_config(recipe.config, file=given["config"], flags=flags, sets=given["set_"] or [])
    finish(recipe.run(cfg, given["out"], given["overwrite"]), given["json_"], _render_stages)


@app.command("ambiguous-mmt", help="3AM: check and copy the release (--import-release) or select ambiguous "
             "en->zh captions (--captions) with a labelled stand-in ambiguity scorer; writes {split}.en, "
             "{split}.zh, images-{split}.txt.",
             epilog="Examples:\n\n  mmkit build-dataset ambiguous-mmt --import-release 3AM/data --image-dir "
             "3am-images/ --out 3am/\n\n  mmkit build-dataset ambiguous-mmt --captions pool.jsonl "
             "--sense-inventory wordnet-dict:wn30/ --word-score entropy --aggregate max --top-k 26000 --out my3am/")
def ambiguous_mmt(
    out: _Out,
    import_release: Annotated[_Str, typer.Option(help="A 3AM release data/ folder to check and copy.")] = None,
    image_dir: Annotated[_Str, typer.Option(help="Check (and with --copy/--link-images place) the images.")] = None,
    no_expect_counts: Annotated[bool, typer.Option("--no-expect-counts",
                                                   help="Do not require 23,931/1,000/1,000 lines.")] = False,
    captions: Annotated[_Str, typer.Option(help="Pool of {id, image, en, zh, source?} records.")] = None,
    sense_inventory: Annotated[_Str, typer.Option(
        help="wordnet-dict:DIR | tsv:FILE | classifier:MODULE:FUNC")] = None,
    pos: Annotated[_Str, typer.Option(help="Parts of speech, comma list [default: n,v,a].")] = None,
    word_score: Annotated[_Str, typer.Option(help="senses | entropy  [default: entropy]")] = None,
    aggregate: Annotated[_Str, typer.Option(help="max | mean  [default: max]")] = None,
    smoothing: Annotated[_Float, typer.Option(help="Entropy smoothing alpha [default: 1.0].")] = None,
    stopwords: Annotated[_Str, typer.Option(help="Stopword file, one per line [default: built-in].")] = None,
    threshold: Annotated[_Float, typer.Option(help="Keep captions scoring >= X.")] = None,
    top_fraction: Annotated[_Float, typer.Option(help="Keep the top F of the ranking.")] = None,
    top_k: Annotated[_Int, typer.Option(help="Keep the top K [default: 26000].")] = None,
    image_name: Annotated[_Str, typer.Option(help="Output image name [default: {source}_{basename}].")] = None,
    val_size: Annotated[_Int, typer.Option(help="[default: 1000]")] = None,
    test_size: Annotated[_Int, typer.Option(help="[default: 1000]")] = None,
    split_unit: Annotated[_Str, typer.Option(help="image | caption  [default: image]")] = None,
    copy_images: _CopyImages = False,
    link_images: _LinkImages = False,
    image_root: _ImageRoot = None,
    field: _Fields = None,
    hash_images: _HashImages = False,
    work_dir: _WorkDir = None,
    clean_work: _CleanWork = False,
    limit: _Limit = None,
    dry_run: _DryRun = False,
    seed: _Seed = None,
    num_workers: _Workers = None,
    device: _Device = None,
    overwrite: _Overwrite = False,
    json_: _Json = False,
    quiet: _Quiet = False,
    config: _Config = None,
    set_: _Set = None,
) -> None:
    given = dict(locals())
    no_counts = given.pop("no_expect_counts")
    _run_recipe("ambiguous-mmt", given, expect_counts=False if no_counts else None)


@app.command("snare", help="SNARE probes from ARO relation/attribution items, captions or scene-graph triples: "
             "negation, attribute ownership, relation composition, (opt-in) spatial, semantic structure; "
             "correct caption first. Writes probes.jsonl for 'mmkit evaluate snare'.",
             epilog="Examples:\n\n  mmkit build-dataset snare --relations visual_genome_relation.json "
             "--attributes visual_genome_attribution.json --captions coco_karpathy_test.json --out snare/\n\n"
             "  mmkit build-dataset snare --triples graphs.jsonl --tasks attribute_ownership,relationship_composition "
             "--out snare-triples/")
def snare(
    out: _Out,
    relations: Annotated[_Str, typer.Option(help="ARO relation items (visual_genome_relation.json).")] = None,
    attributes: Annotated[_Str, typer.Option(help="ARO attribution items (visual_genome_attribution.json).")] = None,
    captions: Annotated[_Str, typer.Option(help="Records with image plus caption or captions.")] = None,
    triples: Annotated[_Str, typer.Option(help="Scene-graph records {image, subject, relation, object, ...}.")] = None,
    tasks: Annotated[_Str, typer.Option(help="Comma list [default: every task whose input is given; "
                                             "spatial_relationship is opt-in].")] = None,
    negation_from: Annotated[_Str, typer.Option(help="attributes | captions (adds copula negation of captions).")] = None,
    structure_variant: Annotated[_Str, typer.Option(help="snare | order  [default: snare]")] = None,
    max_words: Annotated[_Int, typer.Option(help="Cut options to N words [default: 30].")] = None,
    keep_degenerate: Annotated[bool, typer.Option("--keep-degenerate", help="Keep probes with repeated options.")] = False,
    pos_tagger: Annotated[_Str, typer.Option(help="auto | rules | spacy:MODEL | records  [default: auto]")] = None,
    caption_source: Annotated[_Str, typer.Option(help="Structure subtask name [default: the record's source "
                                                      "or the captions file name].")] = None,
    materialize_crops: Annotated[bool, typer.Option("--materialize-crops", help="Write box crops to images/.")] = False,
    image_root: _ImageRoot = None,
    field: _Fields = None,
    hash_images: _HashImages = False,
    work_dir: _WorkDir = None,
    clean_work: _CleanWork = False,
    limit: _Limit = None,
    dry_run: _DryRun = False,
    seed: _Seed = None,
    num_workers: _Workers = None,
    device: _Device = None,
    overwrite: _Overwrite = False,
    json_: _Json = False,
    quiet: _Quiet = False,
    config: _Config = None,
    set_: _Set = None,
) -> None:
    _run_recipe("snare", dict(locals()))


@app.command("mmr", help="MMR paired training data: per record a positive and a leading-negative LLaVA "
             "conversation sharing id and image, from templates or an OpenAI-compatible LLM server; refusals "
             "filtered with the pairs kept aligned; validated before writing.",
             epilog="Examples:\n\n  mmkit build-dataset mmr --records vqa_distractors.jsonl --image-root imgs/ "
             "--out mmr-train/\n\n  mmkit build-dataset mmr --records vqa_distractors.jsonl --mode llm --llm-vision "
             "--llm-base-url http://127.0.0.1:8000/v1 --llm-model qwen2-vl-7b --pairs-per-item 8 --out mmr-train/")
def mmr(
    out: _Out,
    records: Annotated[_Str, typer.Option(help="{id, image, question, answer, distractor?, premise?, ...}")] = None,
    mode: Annotated[_Str, typer.Option(help="template | llm  [default: template]")] = None,
    pairs_per_item: Annotated[_Int, typer.Option(help="LLM pairs per side and image [default: 1].")] = None,
    llm_base_url: Annotated[_Str, typer.Option(help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")] = None,
    llm_model: Annotated[_Str, typer.Option(help="Model name on the server.")] = None,
    llm_api_key_env: Annotated[_Str, typer.Option(help="Env var holding the API key [default: OPENAI_API_KEY].")] = None,
    llm_vision: Annotated[bool, typer.Option("--llm-vision", help="Send the image as a data-URL part.")] = False,
    llm_max_tokens: Annotated[_Int, typer.Option(help="[default: 1024]")] = None,
    llm_concurrency: Annotated[_Int, typer.Option(help="Requests in flight [default: 4].")] = None,
    on_invalid: _OnInvalid = None,
    image_root: _ImageRoot = None,
    field: _Fields = None,
    hash_images: _HashImages = False,
    work_dir: _WorkDir = None,
    clean_work: _CleanWork = False,
    limit: _Limit = None,
    dry_run: _DryRun = False,
    seed: _Seed = None,
    num_workers: _Workers = None,
    device: _Device = None,
    overwrite: _Overwrite = False,
    json_: _Json = False,
    quiet: _Quiet = False,
    config: _Config = None,
    set_: _Set = None,
) -> None:
    _run_recipe("mmr", dict(locals()))


@app.command("realbench", help="RealBench-style Chinese multi-image samples: validate against the evaluator's "
             "schema plus image, text, CJK-ratio and jieba checks; write samples.jsonl (by id), stats.json, "
             "stats.md and PNG histograms.",
             epilog="Examples:\n\n  mmkit build-dataset realbench --folder posts/ --copy-images --out realbench/\n\n"
             "  mmkit build-dataset realbench --samples raw.jsonl --image-root photos/ --on-invalid skip --out rb/")
def realbench(
    out: _Out,
    samples: Annotated[_Str, typer.Option(help="Sample records (JSONL, JSON, ...).")] = None,
    folder: Annotated[_Str, typer.Option(help="One subdirectory per sample: sample.json plus its images.")] = None,
    min_images: Annotated[_Int, typer.Option(help="[default: 2]")] = None,
    max_images: Annotated[_Int, typer.Option(help="[default: 20]")] = None,
    min_side: Annotated[_Int, typer.Option(help="Minimum image side in px [default: 32].")] = None,
    min_cjk_ratio: Annotated[_Float, typer.Option(help="Question ideographs / letters [default: 0.5].")] = None,
    min_tokens: Annotated[_Int, typer.Option(help="Question jieba tokens [default: 2].")] = None,
    jieba_dict: Annotated[_Str, typer.Option(help="A jieba main dictionary file.")] = None,
    copy_images: _CopyImages = False,
    link_images: _LinkImages = False,
    on_invalid: _OnInvalid = None,
    image_root: _ImageRoot = None,
    field: _Fields = None,
    hash_images: _HashImages = False,
    work_dir: _WorkDir = None,
    clean_work: _CleanWork = False,
    limit: _Limit = None,
    dry_run: _DryRun = False,
    seed: _Seed = None,
    num_workers: _Workers = None,
    device: _Device = None,
    overwrite: _Overwrite = False,
    json_: _Json = False,
    quiet: _Quiet = False,
    config: _Config = None,
    set_: _Set = None,
) -> None:
    _run_recipe("realbench", dict(locals()))

CONDENSE_EXAMPLES = """
Examples:

  mmkit build-dataset condense --pairs laion.parquet --image-root /data/laion --clip openai/clip-vit-large-patch14 --target 2000000 --out condensed/

  mmkit build-dataset condense --pairs laion.parquet --embeddings laion-emb/ --clusters 100000 --dedup-threshold 0.86 --representative middle --clip-band 0.4 0.6 --centroid-band 0.15 0.35 --target 2000000 --format llava --out condensed/

  accelerate launch -m mmkit build-dataset condense --pairs laion.parquet --stages embed --out condensed/

Peak memory ~ max(one embedding shard (--shard-rows x d x 2 B), the k-means sample (64 x k x d x 4 B), the largest bucket, the band columns (12 B per survivor, or a 65,536-bin histogram above --max-memory)) + centroids (k x d x 4 B) + 17 B per input pair.
"""


@app.command("condense", help="Bunny-style condensation of image-text pairs: CLIP embed, k-means, near-duplicate "
             "removal, clip-score and centroid bands, seeded sample; writes data + funnel + manifest.json.",
             epilog=CONDENSE_EXAMPLES)
def condense(
    out: _Out,
    pairs: Annotated[Optional[str], typer.Option(help="Records with key, image, caption (file, dir or hub id).")] = None,
    embeddings: Annotated[Optional[str], typer.Option(help="Skip embedding: mmkit shards or clip-retrieval layout.")] = None,
    image_root: Annotated[Optional[str], typer.Option(help="Images are relative to this [default: the pairs' dir].")] = None,
    field: _Fields = None,
    clip: Annotated[Optional[str], typer.Option(help="CLIP model id or dir [default: openai/clip-vit-large-patch14].")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Model revision.")] = None,
    centroids: Annotated[Optional[str], typer.Option(help="k x d centroids (npy/safetensors): skips k-means.")] = None,
    shard_rows: Annotated[Optional[int], typer.Option(help="Rows per embedding shard [default: 1000000].")] = None,
    store_text_emb: Annotated[bool, typer.Option("--store-text-emb", help="Also store text embeddings.")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="Embedding batch size [default: 64].")] = None,
    clusters: Annotated[Optional[str], typer.Option(help="k, or auto = clamp(round(N/20000), 1, 100000).")] = None,
    kmeans_points_per_centroid: Annotated[Optional[int], typer.Option(help="[default: 64]")] = None,
    kmeans_iters: Annotated[Optional[int], typer.Option(help="[default: 20]")] = None,
    kmeans_epochs: Annotated[Optional[int], typer.Option(help="Fresh sample per epoch, warm start [default: 1].")] = None,
    kmeans_spherical: Annotated[bool, typer.Option("--kmeans-spherical", help="Cosine k-means.")] = False,
    max_cluster_size: Annotated[Optional[int], typer.Option(help="Giant-cluster size [default: 1000000].")] = None,
    giant_cluster: Annotated[Optional[str], typer.Option(help="split | drop | keep  [default: split]")] = None,
    buckets: Annotated[Optional[int], typer.Option(help="Dedup buckets [default: ceil(N/500000)].")] = None,
    dedup_threshold: Annotated[Optional[float], typer.Option(help="Link when cosine > this [default: 0.86].")] = None,
    dedup_tile: Annotated[Optional[int], typer.Option(help="Similarity tile rows [default: 8192].")] = None,
    representative: Annotated[Optional[str], typer.Option(
        help="middle | far | near | inner-middle | clip-max | random | semdedup  [default: middle]")] = None,
    clip_band: Annotated[Optional[tuple[float, float]], typer.Option(help="LO HI rank band of clip score [0.4 0.6].")] = None,
    centroid_band: Annotated[Optional[tuple[float, float]], typer.Option(
        help="LO HI rank band of cosine to centroid [0.15 0.35].")] = None,
    clip_min: Annotated[Optional[float], typer.Option(help="Drop clip scores below this first.")] = None,
    clip_max: Annotated[Optional[float], typer.Option(help="Drop clip scores above this first.")] = None,
    max_memory: Annotated[Optional[str], typer.Option(help="Band sort budget [default: 4GiB].")] = None,
    target: Annotated[Optional[int], typer.Option(help="Pairs to keep [default: 2000000].")] = None,
    format: Annotated[Optional[str], typer.Option("--format", help="parquet | jsonl | llava  [default: parquet]")] = None,
    llava_prompt: Annotated[Optional[list[str]], typer.Option(help="LLaVA prompt (repeatable; one picked per row).")] = None,
    stages: Annotated[Optional[str], typer.Option(help="Run only these stages, e.g. embed or kmeans,assign.")] = None,
    from_stage: Annotated[Optional[str], typer.Option(help="Recompute from this stage on.")] = None,
    hash_images: _HashImages = False,
    work_dir: _WorkDir = None,
    clean_work: _CleanWork = False,
    limit: _Limit = None,
    dry_run: _DryRun = False,
    seed: _Seed = None,
    num_workers: Annotated[Optional[int], typer.Option(help="Dedup buckets in parallel [default: 1].")] = None,
    device: _Device = None,
    overwrite: _Overwrite = False,
    json_: _Json = False,
    quiet: _Quiet = False,
    config: _Config = None,
    set_: _Set = None,
) -> None:
    _run_recipe("condense", dict(locals()), stages=stages.split(",") if stages else None,
                clusters=int(clusters) if clusters and clusters.isdigit() else clusters)


def _render_stages(manifest: dict) -> None:
    """The per-stage table: stage, in, kept, % kept (stderr)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{manifest['method']}{' (dry run)' if manifest.get('dry_run') else ''}")
    for col in ("stage", "in", "kept", "% kept"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in manifest["metrics"]["stages"]:
        pct = f"{100 * s['kept'] / s['in']:.1f}" if s["in"] else "-"
        table.add_row(s["name"], f"{s['in']:,}", f"{s['kept']:,}", pct)
    console = Console(stderr=True)
    console.print(table)
    for warning in manifest.get("warnings", []):
        console.print(f"warning: {warning}")
