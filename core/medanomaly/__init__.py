"""MedAnomaly: unsupervised lesion detection in brain MRI.

Importing the package is cheap (no torch): the Slicer module imports `medanomaly.bundles`
at start-up. Submodules load on first attribute access, so a bundle config can write
`$import medanomaly` and then use `medanomaly.data.preprocessing(...)`.
"""

import importlib

__version__ = "0.1.0"
_SUBMODULES = {"anomalies", "benchmark", "bundles", "cli", "data", "demo", "io", "latent", "masking",
               "metrics", "scoring", "visualize"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
