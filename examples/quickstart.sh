#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh) and run the quickstart offline on embedded data:
# ShareGPT instructions -> all-MiniLM-L6-v2 embeddings -> k-means groups, in runs/quickstart/.
# Idempotent: rerunning rewrites the same results (the embeddings come from the cache).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_UPDATE_DOWNLOAD_COUNTS=0 TOKENIZERS_PARALLELISM=false

.venv/bin/mmkit --version
.venv/bin/python examples/quickstart.py --n 2000 --k 8 --out runs/quickstart
echo "quickstart done: results in runs/quickstart/ (results.json, clusters.jsonl, config.yaml, log.txt)"
