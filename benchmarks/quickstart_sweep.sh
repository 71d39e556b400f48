#!/usr/bin/env bash
# 3 seeds x {simplecil, finetune, joint} on the offline quickstart stream (EfficientNet-Lite0, Animal-MNIST B0-Inc2),
# then the paper-style table. Finished seeds are skipped, so re-running only completes what is missing.
#   bash benchmarks/quickstart_sweep.sh [OUT_ROOT]        (about 30 minutes on 2 free CPU cores)
set -euo pipefail
root=${1:-runs/sweep}
seeds=(1993 1994 1995)
for config in quickstart quickstart_finetune quickstart_joint; do
  cil run --config "configs/experiments/$config.yaml" --seeds "${seeds[@]}" --out "$root/$config" --logger none
done
cil table "$root" --metrics avg_incremental_acc last_acc avg_forgetting
cil plot "$root" --out "$root/overview.png"
