"""The supervised bundle's own code: the labelled training set over contrasts and the ceiling
"detector" (a segmentation network's lesion probability) around MONAI's UNet."""

from pathlib import Path

from scripts.supervised import (
    BestMetricInfoHandler,
    PooledMaxDice,
    SupervisedCeilingMethod,
    contrast_items,
    contrasts_of,
    training_items,
)

BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])

__all__ = ["BUNDLE_ROOT", "BestMetricInfoHandler", "PooledMaxDice", "SupervisedCeilingMethod", "contrast_items",
           "contrasts_of", "training_items"]
