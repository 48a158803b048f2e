#!/usr/bin/env bash
# Set up ./.venv (scripts/setup.sh), then run every built subcommand offline on embedded data:
#   cluster-instructions: 2,000 ShareGPT instructions -> all-MiniLM-L6-v2 embeddings -> k-means
#   groups (k = 8), the group-pure batch order for 2 GPUs, and a short CommonIT-vs-random SFT of
#   SmolLM2-135M (GGUF) on 160 grouped pairs.
#   prune-data: 12 epochs of an MLP on scikit-learn digits, dynamic-uncertainty scores, keep 75 %.
#   evaluate retrieval: Recall@K and RSUM from a small embeddings file (seeded, planted answer).
#   distill bert-kd: a 400/100-row ShareGPT question/answer matching set (the project's own task),
#   all-MiniLM-L6-v2 fine-tuned on it (it has no classification head), then distilled into 2 of its
#   own layers for one epoch, with the CCA/CKA diagnostic before and after.
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
$mmkit prune-data digits --method dyn-unc --epochs 12 --window 5 --keep 0.75 --out $out/prune-digits --overwrite
.venv/bin/python examples/retrieval_embeddings.py $out/retrieval_embeddings.safetensors
$mmkit evaluate retrieval --embeddings $out/retrieval_embeddings.safetensors --out $out/retrieval --overwrite
# Smoke-sized (about 70 s on 2 idle CPU cores): the teacher reaches about 70 % on the 100 test rows, the
# student stays near chance after 25 steps; docs/distill.md "The offline matching task" has the full set.
.venv/bin/python examples/build_sharegpt_match.py $out/sharegpt-match --train 400 --test 100
$mmkit distill bert-kd --teacher bundled:minilm --student-init teacher_layers --student-layers 2 \
    --task $out/sharegpt-match/train.jsonl --eval-data $out/sharegpt-match/test.jsonl \
    --epochs 1 --batch-size 16 --lr 1e-4 --max-len 48 --set teacher.finetune=auto \
    --set teacher.train.epochs=1 --set teacher.train.batch_size=16 --set teacher.train.lr=1e-4 \
    --set 'diagnostic.metrics=[cca,cka]' --out $out/bert-kd --overwrite

echo
echo "quickstart done; results:"
echo "  $out/cluster/  grouped.jsonl, summary.json (quality: within-batch cosine grouped vs random), results.json"
echo "  $out/order-w2/ order.jsonl: the same groups planned for 2 GPUs x batch 4"
echo "  $out/sft/      comparison.json: held-out loss after CommonIT vs random batches"
echo "  $out/prune-digits/ scores.csv, kept_indices.txt, scores_hist.png, pruned/data.npz, results.json"
echo "  $out/retrieval/ results.json: i2t/t2i Recall@1/5/10 and RSUM"
echo "  $out/bert-kd/   results.json: teacher vs 2-layer student accuracy on ShareGPT matching, CCA/CKA before/after; checkpoint/"
