#!/usr/bin/env bash
# Real localization: PYLON-R18 and its ResNet18 twin from scratch, on RSNA films alone and on
# Kaggle merged with RSNA; each evaluated with --localization on its test split, then one table
# of every heatmap method (pylon, cam, gradcam, gradcam++, and the image-blind prior and center).
#
#   bench/real_rsna.sh KAGGLE_ROOT RSNA_ROOT [--set key=value ...]
#   CONFIGS="real_merged_pylon_r18" bench/real_rsna.sh KAGGLE_ROOT RSNA_ROOT   # a subset
#   RUNS_DIR=/elsewhere bench/real_rsna.sh ...                                 # runs and log there
#
# KAGGLE_ROOT holds chest_xray/{train,test}/{NORMAL,PNEUMONIA}; RSNA_ROOT holds
# stage_2_train_labels.csv and stage_2_train_images/. Each config (configs/real_*_r18.yaml)
# trains in under 45 minutes on 2 CPU cores; extra arguments go to train.py as overrides.
# Everything is logged to <RUNS_DIR>/real_rsna-<time>.log; the tables (bench/results_table.py)
# come last.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: bench/real_rsna.sh KAGGLE_ROOT RSNA_ROOT [--set key=value ...]"
kaggle="${1:?$usage}"
rsna="${2:?$usage}"
shift 2
[[ -d "$kaggle/chest_xray" ]] || { echo "error: $kaggle/chest_xray not found (see datasets/README.md)" >&2; exit 2; }
[[ -f "$rsna/stage_2_train_labels.csv" ]] || { echo "error: $rsna/stage_2_train_labels.csv not found (see datasets/README.md)" >&2; exit 2; }
python="${PYTHON:-.venv/bin/python}"
export PYTHONUNBUFFERED=1  # epoch lines reach the log as they happen
runs_dir="${RUNS_DIR:-runs}"
configs="${CONFIGS:-real_rsna_pylon_r18 real_rsna_baseline_r18 real_merged_pylon_r18 real_merged_baseline_r18}"
mkdir -p "$runs_dir"
log="$runs_dir/real_rsna-$(date +%Y%m%d-%H%M%S).log"
runs=()

for config in $configs; do
    echo "=== $config" | tee -a "$log"
    start=$(date +%s)
    summary=$("$python" train.py --config "$config.yaml" --set "data.kaggle_root=$kaggle" "data.rsna_root=$rsna" \
        "logging.runs_dir=$runs_dir" "$@" 2>>"$log" | tee -a "$log" | tail -n 1)
    run=$("$python" -c 'import json, sys; print(json.loads(sys.argv[1])["run"])' "$summary")
    echo "$config trained in $(( ($(date +%s) - start) / 60 )) min: $run" | tee -a "$log"
    "$python" evaluate.py --run "$run" --localization 2>>"$log" | tee -a "$log"
    runs+=("$run")
done

"$python" bench/results_table.py "${runs[@]}" | tee -a "$log"
