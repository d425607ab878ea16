#!/usr/bin/env bash
# Train PYLON-R18 and its ResNet18 twin from scratch on the real Kaggle chest X-rays (configs/kaggle224_*.yaml),
# then score both on the official 624-image test split; the last lines are one JSON object per model (run,
# training minutes). With RSNA_ROOT, the PYLON run also draws overlays with the official boxes for every DICOM
# there into <run>/predict/: a check of frames and orientation on adult films it never saw.
#
#   bench/real_kaggle.sh KAGGLE_ROOT [--set key=value ...]       # overrides for train.py
#   RSNA_ROOT=/path/to/rsna bench/real_kaggle.sh KAGGLE_ROOT    # also predict on RSNA DICOMs
#   RUNS_DIR=/elsewhere bench/real_kaggle.sh KAGGLE_ROOT         # runs and log there (default runs/)
set -euo pipefail
cd "$(dirname "$0")/.."

root="${1:?usage: bench/real_kaggle.sh KAGGLE_ROOT [--set key=value ...]  (KAGGLE_ROOT holds chest_xray/)}"
shift
[[ -d "$root/chest_xray" ]] || { echo "error: $root/chest_xray not found (see datasets/README.md)" >&2; exit 2; }
python="${PYTHON:-.venv/bin/python}"
export PYTHONUNBUFFERED=1  # epoch lines reach the log as they happen
runs_dir="${RUNS_DIR:-runs}"
mkdir -p "$runs_dir"
log="$runs_dir/real_kaggle-$(date +%Y%m%d-%H%M%S).log"
results=()

for config in kaggle224_pylon_r18.yaml kaggle224_baseline_r18.yaml; do
    echo "=== $config" | tee -a "$log"
    start=$(date +%s)
    summary=$("$python" train.py --config "$config" --set "data.roots.kaggle=$root" "logging.runs_dir=$runs_dir" "$@" 2>>"$log" | tee -a "$log" | tail -n 1)
    seconds=$(( $(date +%s) - start ))
    run=$("$python" -c 'import json, sys; print(json.loads(sys.argv[1])["run"])' "$summary")
    "$python" evaluate.py --run "$run" 2>>"$log" | tee -a "$log"
    if [[ -n "${RSNA_ROOT:-}" && "$config" == *pylon* ]]; then
        "$python" predict.py "$RSNA_ROOT"/stage_2_train_images/*.dcm --run "$run" \
            --boxes-csv "$RSNA_ROOT/stage_2_train_labels.csv" 2>>"$log" | tee -a "$log"
    fi
    results+=("{\"config\": \"$config\", \"run\": \"$run\", \"train_minutes\": $(awk "BEGIN {printf \"%.1f\", $seconds / 60}")}")
done

printf '%s\n' "${results[@]}" | tee -a "$log"
