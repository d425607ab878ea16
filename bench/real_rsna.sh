#!/usr/bin/env bash
# Real localization, the recommended recipes (docs/RESULTS.md): each config trained, evaluated with --localization,
# then one table of every heatmap method (bench/results_table.py) and one JSON line of the runs by role, e.g.
#   {"pylon": "runs/real_rsna_pylon-...", "baseline": ..., "merged_pylon": ..., "merged_baseline": ...}
#
#   bench/real_rsna.sh KAGGLE_ROOT RSNA_ROOT [--set key=value ...]            # overrides for train.py
#   CONFIGS="real_merged_pylon_r18" bench/real_rsna.sh KAGGLE_ROOT RSNA_ROOT   # other configs
#   RUNS_DIR=/elsewhere bench/real_rsna.sh ...                                 # runs and log there (default runs/)
#   PRETRAINED_DIR=/weights bench/real_rsna.sh ...  # offline: <backbone>_imagenet.pt encoder state dicts
#
# The recommended configs split RSNA by person with RSNA_ROOT/nih_patient_map.csv (without it add
# --set "data.patient_maps={}"); datasets/README.md lays out both roots. Log: <RUNS_DIR>/real_rsna-<time>.log.
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
configs="${CONFIGS:-real_rsna_pylon real_rsna_baseline real_merged_pylon real_merged_baseline}"
mkdir -p "$runs_dir"
log="$runs_dir/real_rsna-$(date +%Y%m%d-%H%M%S).log"
runs=()

for config in $configs; do
    echo "=== $config" | tee -a "$log"
    start=$(date +%s)
    weights=()
    backbone=$("$python" -c 'import sys; from pylon.config import load_config
model = load_config(sys.argv[1]).model
print(model.backbone if model.weights == "imagenet" else "")' "$config.yaml")
    if [[ -n "$backbone" && -n "${PRETRAINED_DIR:-}" ]]; then
        weights=("model.weights=$PRETRAINED_DIR/${backbone}_imagenet.pt")
    fi
    summary=$("$python" train.py --config "$config.yaml" --set "data.roots.kaggle=$kaggle" "data.roots.rsna=$rsna" \
        "logging.runs_dir=$runs_dir" "${weights[@]}" "$@" 2>>"$log" | tee -a "$log" | tail -n 1)
    run=$("$python" -c 'import json, sys; print(json.loads(sys.argv[1])["run"])' "$summary")
    echo "$config trained in $(( ($(date +%s) - start) / 60 )) min: $run" | tee -a "$log"
    "$python" evaluate.py --run "$run" --localization 2>>"$log" | tee -a "$log"
    runs+=("$run")
done

"$python" bench/results_table.py "${runs[@]}" | tee -a "$log"
# the JSON line: each run under its config's role (real_rsna_pylon -> pylon, real_merged_baseline -> merged_baseline)
"$python" -c 'import json, re, sys
names, runs = sys.argv[1].split(), sys.argv[2:]
print(json.dumps({re.sub(r"^real_(rsna_)?", "", n): r for n, r in zip(names, runs)}))' "$configs" "${runs[@]}" | tee -a "$log"
