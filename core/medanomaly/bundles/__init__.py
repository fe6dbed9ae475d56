"""Find, describe and run MedAnomaly's MONAI bundles.

This package imports no torch: the Slicer module uses it at start-up. The torch side of the
shared inference plumbing is `medanomaly.bundles.engine`, imported by the bundle configs.
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
    "BundleInfo", "BundleNotFound", "BundleProcess", "BundleRunError", "ConfigText", "VolumeProgress", "WORKFLOW_CONFIGS",
    "bundle_command", "bundle_scripts", "bundle_search_path", "import_bundle_scripts", "find_bundle", "format_progress", "list_bundles", "parse_progress",
    "report_progress", "run_bundle", "start_bundle",
]


def __getattr__(name: str):
    # `medanomaly.bundles.engine` and `.contrast` (torch) load only when a bundle config asks for them.
    if name in ("engine", "contrast"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
