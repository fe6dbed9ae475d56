#!/usr/bin/env bash
# Trains a bundle's demo weights the way the committed ones were made (`medanomaly train` also runs
# the bundle's post-train workflows, e.g. scrps' latent repository, and calibrates), then installs them
# into the bundle (models/model.pt + models/model_info.json) and evaluates them.
#   benchmarks/train_demo_weights.sh dae [--contrast T2w] [--set num_iterations=6000 ...]
# A variant of a bundle with its own shipped weights (e.g. sagan's brainomaly switch) installs
# into a subfolder of models/ and is evaluated with the same switch:
#   INSTALL_SUBDIR=brainomaly benchmarks/train_demo_weights.sh sagan --set model=brainomaly
# Runs anywhere `python -m medanomaly.cli` works; a GPU makes it minutes instead of an hour.
set -euo pipefail
bundle=${1:?usage: $0 BUNDLE [extra medanomaly train arguments]}
shift
python=${PYTHON:-python}
run_dir=${RUN_DIR:-runs/${bundle}${INSTALL_SUBDIR:+-$INSTALL_SUBDIR}-demo}
repo=$(cd "$(dirname "$0")/.." && pwd)
install_dir="$repo/monai_bundles/$bundle/models${INSTALL_SUBDIR:+/$INSTALL_SUBDIR}"
# the --set switches (and --contrast) of the training also select the variant (and datalist) for
# evaluation; training-only settings (init_from, num_iterations, ...) are not evaluation settings
evaluation_keys=$($python -c "from medanomaly.bundles import find_bundle; from medanomaly.bundles.runner import config_keys; print(' '.join(config_keys(find_bundle('$bundle'), 'evaluate', demo=False)))")
switches=()
for ((i = 1; i <= $#; i++)); do
  j=$((i + 1))
  if [[ "${!i}" == "--contrast" ]]; then switches+=("${!i}" "${!j}"); fi
  if [[ "${!i}" == "--set" && " $evaluation_keys " == *" ${!j%%[=#]*} "* ]]; then switches+=("${!i}" "${!j}"); fi
done

$python -m medanomaly.cli synth --preset demo
$python -m medanomaly.cli train "$bundle" --demo --datalist demo --output-dir "$run_dir" "$@"
mkdir -p "$install_dir"
cp "$run_dir/models/model.pt" "$run_dir/models/model_info.json" "$install_dir/"
# what a bundle keeps beside its weights (scrps: the latent repository its post-train workflow built)
for extra in repository.pt; do
  if [[ -f "$run_dir/models/$extra" ]]; then cp "$run_dir/models/$extra" "$install_dir/"; fi
done
$python -m medanomaly.cli evaluate "$bundle" --demo --datalist demo --output-dir "$run_dir/evaluate" ${switches[@]+"${switches[@]}"}
