"""Benchmark: length-sorted vs input-order batching in ``mmkit.core.embed.encode_texts``.

Encodes a seeded sample of ShareGPT instructions (``builtin:sharegpt``, offline) with the bundled
all-MiniLM-L6-v2 (``bundled:minilm``) twice in one run, with the same batch size and the cache
off: batches of texts sorted by token count (longest first, the default) and batches in input
order (each padded to its longest text). It checks that both give the same embeddings, prints
the speed-up ``unsorted_time / sorted_time`` and writes the section
``## Text encoding (core/embed.py)`` of ``docs/performance.md`` (other sections are kept).

    python benchmarks/embed.py [--n 600] [--batch-size 128] [--mode interleaved|whole] [--repeats 1]
                               [--seed 0] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, write_section  # noqa: E402

from mmkit.core import embed as E  # noqa: E402
from mmkit.core.data import (input_order_batches, length_sorted_batches,  # noqa: E402
                             tokenize_flat)

HEADING = "## Text encoding (core/embed.py)"
GOAL = 1.5


def sample_texts(n: int, seed: int) -> list[str]:
    from mmkit.io import read_records

    texts = [r["instruction"] for r in read_records("builtin:sharegpt")]
    if n > len(texts):
        raise SystemExit(f"--n {n} is more than the {len(texts)} ShareGPT instructions available")
    idx = np.random.default_rng(seed).choice(len(texts), size=n, replace=False)
    return [texts[i] for i in idx]


def padded_tokens(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    return int(sum(len(b) * lengths[b].max() for b in batches))


def interleaved(loaded, texts: list[str], length: int, batch_size: int):
    """Time both modes batch by batch, alternating which mode goes first.

    Both modes have the same number of batches; batch i of the sorted plan and batch i of the
    input-order plan run back to back, so load from other processes on a shared machine hits
    both modes alike. Each total includes the (shared) tokenisation once. The batches run
    through the same function ``encode_texts`` uses (``_run_text_batches``).
    """
    tok = loaded.preprocessor
    t0 = time.perf_counter()
    tokens = tokenize_flat(tok, texts, max_length=length)
    t_tok = time.perf_counter() - t0
    plans = {True: length_sorted_batches(tokens.lengths, batch_size),
             False: input_order_batches(len(texts), batch_size)}
    pool = E.POOLINGS.resolve("mean")
    pad_id = E._pad_id(tok)
    out = {mode: np.empty((len(texts), loaded.model.config.hidden_size), np.float32) for mode in plans}
    total = {True: t_tok, False: t_tok}
    for i in range(len(plans[True])):
        for mode in ((True, False) if i % 2 == 0 else (False, True)):
            rows = plans[mode][i]
            t0 = time.perf_counter()
            emb = E._run_text_batches(loaded.model, tokens, [rows], pad_id, pool, "cpu", None, True, False, "")
            total[mode] += time.perf_counter() - t0
            out[mode][rows] = emb[rows]
    return (total[True], total[False]), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600,
                    help="number of ShareGPT instructions (default 600: about 1.5 min on 2 CPU cores)")
    ap.add_argument("--batch-size", type=int, default=128, help="texts per batch (default 128)")
    ap.add_argument("--mode", choices=("interleaved", "whole"), default="interleaved",
                    help="interleaved (default): alternate the two modes batch by batch, robust to other "
                         "load on the machine; whole: two complete encode_texts calls per repeat")
    ap.add_argument("--repeats", type=int, default=1, help="with --mode whole: runs of each mode; the best is kept")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--model", default="bundled:minilm", help="encoder (default bundled:minilm)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "performance.md"), help="markdown file to update")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch the markdown file")
    args = ap.parse_args(argv)

    from mmkit.core.models import load_model

    texts = sample_texts(args.n, args.seed)
    loaded = load_model(args.model, "encoder", device="cpu")
    common = dict(loaded=loaded, batch_size=args.batch_size, use_cache=False, progress=False)

    # Padding statistics (what sorting saves), from the same tokenisation encode_texts does.
    length = E.resolve_max_length(loaded.path, loaded.model.config, loaded.preprocessor, None)
    lengths = tokenize_flat(loaded.preprocessor, texts, max_length=length).lengths
    real = int(lengths.sum())
    pad_sorted = padded_tokens(lengths, length_sorted_batches(lengths, args.batch_size))
    pad_unsorted = padded_tokens(lengths, input_order_batches(len(texts), args.batch_size))

    # Warm-up (thread pools, kernels), then both modes side by side.
    warm = texts[:16]
    E.encode_texts(warm, sorted_by_length=True, **common)
    E.encode_texts(warm, sorted_by_length=False, **common)
    if args.mode == "whole":
        times = {True: [], False: []}
        out = {}
        for _ in range(args.repeats):
            for mode in (True, False):
                t0 = time.perf_counter()
                out[mode] = E.encode_texts(texts, sorted_by_length=mode, **common)
                times[mode].append(time.perf_counter() - t0)
        t_sorted, t_unsorted = min(times[True]), min(times[False])
    else:
        (t_sorted, t_unsorted), out = interleaved(loaded, texts, length, args.batch_size)
    diff = float(np.abs(out[True] - out[False]).max())
    ratio = t_unsorted / t_sorted
    ok_equal = diff < 1e-4

    info = machine_info()
    print(f"machine: {info}")
    print(f"texts: {len(texts)} ShareGPT instructions (seed {args.seed}), model {args.model}, "
          f"max length {length}, batch size {args.batch_size}")
    print(f"tokens: {real:,} real; padded to {pad_sorted:,} sorted vs {pad_unsorted:,} unsorted")
    print(f"sorted   {t_sorted:8.2f} s  ({len(texts) / t_sorted:7.1f} texts/s)")
    print(f"unsorted {t_unsorted:8.2f} s  ({len(texts) / t_unsorted:7.1f} texts/s)")
    print(f"speed-up unsorted/sorted = {ratio:.2f}x (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'})")
    print(f"max |sorted - unsorted| = {diff:.2e} ({'ok' if ok_equal else 'MISMATCH'}, limit 1e-4)")

    if not args.no_write:
        mode_flag = "" if args.mode == "interleaved" else f" --mode whole --repeats {args.repeats}"
        how = ("The two modes run interleaved batch by batch (the i-th batch of each plan back to back, "
               "alternating which goes first), so other load on a shared machine hits both alike; each "
               "time is the sum of its batches plus the shared tokenisation."
               if args.mode == "interleaved" else
               f"Each mode is one complete `encode_texts` call; best of {args.repeats} run(s) each.")
        body = f"""
Measured {time.strftime("%Y-%m-%d")} with `python benchmarks/embed.py --n {args.n} --batch-size {args.batch_size}{mode_flag}`: it encodes {len(texts):,} ShareGPT
instructions (`builtin:sharegpt`, seeded sample, seed {args.seed}) with `{args.model}`
(all-MiniLM-L6-v2, max length {length}), cache off, on the CPU, once with batches sorted by token
count (longest first, `encode_texts`' default) and once with batches in input order, both with
batch size {args.batch_size}, after a warm-up, in the same process. {how}

| | batches sorted by length | batches in input order |
|---|---|---|
| time | {t_sorted:.2f} s | {t_unsorted:.2f} s |
| texts/s | {len(texts) / t_sorted:.1f} | {len(texts) / t_unsorted:.1f} |
| tokens run (incl. padding) | {pad_sorted:,} | {pad_unsorted:,} |

- Real tokens: {real:,}; padding is {100 * (pad_sorted - real) / pad_sorted:.1f}% of the sorted
  batches and {100 * (pad_unsorted - real) / pad_unsorted:.1f}% of the input-order batches.
- **Speed-up (input-order time / sorted time): {ratio:.2f}x** (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'not met'}).
- Same embeddings either way: max absolute difference {diff:.1e} (limit 1e-4).
- Machine: {info}.
"""
        write_section(Path(args.out), HEADING, body)
        print(f"wrote the section {HEADING!r} of {args.out}")
    return 0 if ok_equal else 1


if __name__ == "__main__":
    sys.exit(main())
