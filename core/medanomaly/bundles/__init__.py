"""Find, describe and run MedAnomaly's MONAI bundles.

This package imports no torch: the Slicer module uses it at start-up (launch layer: registry,
runner, progress, outputs, model_info, input_files). The torch side, which the bundle configs
use inside a bundle process (runtime layer), loads on first access:

    volume -> axial slices -> batches -> method -> slices -> volume on the input grid -> files

`inputs.resolve_inputs` gives the items, `medanomaly.data.preprocessing` feeds
`method.ProgressSliceInferer`, which runs the bundle's `method.SliceAnomalyMethod` on batches of
slices; `Invertd` brings the maps back to the input grid (`predictions`), `writing.SaveAnomalyOutputsd`
writes them, and `handlers` report progress, the summary, metrics, thresholds and model_info.json.
`weights` loads the network's weights and finds the checkpoint to resume from; `contrast` checks
that inputs match the contrast the weights were trained on; `distributed` starts the process group
of the multi-process overlays and merges what the ranks collected; `precision` says whether mixed
precision pays on the device.
"""

from medanomaly.bundles.progress import VolumeProgress, format_progress, parse_progress, report_progress
from medanomaly.bundles.registry import (
    BundleInfo,
    BundleNotFound,
    bundle_scripts,
    bundle_search_path,
    find_bundle,
    import_bundle_scripts,
    list_bundles,
)
from medanomaly.bundles.runner import (
    WORKFLOW_CONFIGS,
    BundleProcess,
    BundleRunError,
    ConfigText,
    bundle_command,
    run_bundle,
    start_bundle,
)

__all__ = [
    "BundleInfo", "BundleNotFound", "BundleProcess", "BundleRunError", "ConfigText", "VolumeProgress",
    "WORKFLOW_CONFIGS", "bundle_command", "bundle_scripts", "bundle_search_path", "import_bundle_scripts",
    "find_bundle", "format_progress", "list_bundles", "parse_progress", "report_progress", "run_bundle", "start_bundle",
]


# submodules this package does not import itself; the runtime ones (torch) load only when a bundle
# config asks for them, e.g. `$medanomaly.bundles.weights.load_weights(...)` after `$import medanomaly`
_LAZY_SUBMODULES = ("contrast", "distributed", "handlers", "input_files", "inputs", "method", "precision",
                    "predictions", "weights", "writing")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
