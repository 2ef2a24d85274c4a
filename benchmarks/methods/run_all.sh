#!/usr/bin/env bash
# Fit and evaluate every method on MTD (benchmarks/RESULTS.md section 6), then measure them side by side.
#   bash benchmarks/methods/run_all.sh [OUT_DIR] [METHOD ...]     (default OUT_DIR /tmp/methods, all methods)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-/tmp/methods}"; shift || true
data=../shared/datasets/mtd
names=("$@"); [ ${#names[@]} -gt 0 ] || names=(default patchcore npad padim gaussian cfa patchsvdd patchsvdd-multiscale)
runs=()
for name in "${names[@]}"; do
  config=benchmarks/methods/$name.toml; [ "$name" = default ] && config=config.toml   # default: patchcore + padim
  .venv/bin/lineinspect fit --quiet --good "$data" --config "$config" --out "$out/$name/model"
  .venv/bin/lineinspect evaluate --quiet --model "$out/$name/model" --data "$data" --out "$out/$name/report"
  runs+=(--run "$name=$out/$name/model:$out/$name/report")
done
PYTHONPATH=. .venv/bin/python benchmarks/methods_table.py --data "$data" "${runs[@]}"
