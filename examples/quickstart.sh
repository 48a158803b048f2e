#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh), then run every built subcommand offline on embedded data:
#   cluster-instructions: 2,000 ShareGPT instructions -> all-MiniLM-L6-v2 embeddings -> k-means
#   groups (k = 8), the group-pure batch order for 2 GPUs, and a short CommonIT-vs-random SFT of
#   SmolLM2-135M (GGUF) on 160 grouped pairs.
# Idempotent: --overwrite restarts each run; embeddings come from the cache the second time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_UPDATE_DOWNLOAD_COUNTS=0 TOKENIZERS_PARALLELISM=false
mmkit=.venv/bin/mmkit
out=runs/quickstart

$mmkit --version
$mmkit cluster-instructions builtin:sharegpt --sample 2000 --metric embedding --k 8 --batch-size 8 \
    --epochs 1 --out $out/cluster --overwrite
$mmkit cluster-instructions order $out/cluster/grouped.jsonl --batch-size 4 --world-size 2 --epochs 1 \
    --out $out/order-w2 --overwrite
$mmkit cluster-instructions train $out/cluster/grouped.jsonl --model bundled:smollm2 --preset cpu-demo \
    --records 160 --max-length 128 --max-steps 2 --batch-size 4 --logging-steps 1 --out $out/sft --overwrite

echo
echo "quickstart done; results:"
echo "  $out/cluster/  grouped.jsonl, summary.json (quality: within-batch cosine grouped vs random), results.json"
echo "  $out/order-w2/ order.jsonl: the same groups planned for 2 GPUs x batch 4"
echo "  $out/sft/      comparison.json: held-out loss after CommonIT vs random batches"
