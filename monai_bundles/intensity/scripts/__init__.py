"""The intensity bundle's own code: the non-learned floor's two rules and the healthy intensity histogram."""

from pathlib import Path

from scripts.intensity import (
    DEFAULT_RULES,
    RULES,
    HealthyIntensityDensity,
    HealthyIntensityFitter,
    IntensityAnomalyMethod,
    SaveHealthyIntensity,
    default_rule,
    load_density,
)

BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])

__all__ = ["BUNDLE_ROOT", "DEFAULT_RULES", "RULES", "HealthyIntensityDensity", "HealthyIntensityFitter",
           "IntensityAnomalyMethod", "SaveHealthyIntensity", "default_rule", "load_density"]
