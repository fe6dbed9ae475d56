#!/usr/bin/env bash
# Trains a bundle's demo weights the way the committed ones were made, then installs them
# into the bundle (models/model.pt + models/model_info.json) and evaluates them.
#   benchmarks/train_demo_weights.sh dae [--set num_iterations=6000 ...]
# Runs anywhere `python -m medanomaly.cli` works; a GPU makes it minutes instead of an hour.
set -euo pipefail
bundle=${1:?usage: $0 BUNDLE [extra medanomaly train arguments]}
shift
python=${PYTHON:-python}
run_dir=${RUN_DIR:-runs/${bundle}-demo}
repo=$(cd "$(dirname "$0")/.." && pwd)

$python -m medanomaly.cli synth --preset demo
$python -m medanomaly.cli train "$bundle" --demo --datalist demo --output-dir "$run_dir" "$@"
cp "$run_dir/models/model.pt" "$run_dir/models/model_info.json" "$repo/monai_bundles/$bundle/models/"
$python -m medanomaly.cli evaluate "$bundle" --demo --datalist demo --output-dir "$run_dir/evaluate"
