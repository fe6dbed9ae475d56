"""From a heatmap to what the module shows: the segmentation at a threshold, the threshold
slider's range, the heatmap's display window, and the segment's name, colour and terminology;
and how results enter the scene whole or not at all (`SceneTransaction`).

numpy only (Slicer ships it); works on arrays in any axis order, so the module passes
``slicer.util.arrayFromVolume`` arrays (K, J, I) and the tests pass (X, Y, Z) arrays. The scene
helpers only call MRML methods on the objects they get, so the tests pass stand-ins.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np

SEGMENT_NAME = "Anomaly"
# The colour medanomaly.io.write_segmentation gives the segment (so file and scene agree).
SEGMENT_COLOR = (0.95, 0.25, 0.2)
# DICOM / SNOMED CT: category "Morphologically Altered Structure", type "Lesion", in the brain.
TERMINOLOGY_CONTEXT = "Segmentation category and type - MedAnomaly"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
CATEGORY = ("SCT", "49755003", "Morphologically Altered Structure")
TYPE = ("SCT", "52988006", "Lesion")
REGION = ("SCT", "12738006", "Brain")
# Heat colour tables of Slicer, best first (MRML node IDs of its built-in colour nodes).
HEAT_COLOR_NODE_IDS = ("vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeFileInferno.txt",
                       "vtkMRMLColorTableNodeRainbow")


def terminology_entry(context: str = TERMINOLOGY_CONTEXT) -> str:
    """The segment's ``TerminologyEntry`` tag in Slicer's serialised form:
    context~category~type~type modifier~anatomic context~region~region modifier."""
    triple = "^".join
    return "~".join([context, triple(CATEGORY), triple(TYPE), "^^", ANATOMIC_CONTEXT, triple(REGION), "^^"])


def _check_threshold(threshold) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"The threshold must be a number, not {threshold!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"The threshold must be a finite number >= 0, not {threshold}.")
    return value


def threshold_to_labelmap(heatmap, threshold, brain=None) -> np.ndarray:
    """uint8 label array: 1 where the anomaly score exceeds `threshold` (and, given a brain
    mask of the same shape, inside the brain), 0 elsewhere. Strictly greater than, like the
    bundles' own segmentation, so a threshold of 0 never marks the background."""
    heatmap = np.asarray(heatmap)
    threshold = _check_threshold(threshold)
    if not np.issubdtype(heatmap.dtype, np.number):
        raise ValueError(f"The heatmap must be numeric, not {heatmap.dtype}.")
    labelmap = heatmap > threshold
    if brain is not None:
        brain = np.asarray(brain)
        if brain.shape != heatmap.shape:
            raise ValueError(f"The brain mask has shape {brain.shape}, the heatmap {heatmap.shape}.")
        labelmap &= brain > 0
    return labelmap.astype(np.uint8)


def brain_values(heatmap, brain=None) -> np.ndarray:
    """The heatmap's values inside the brain (given), else its non-zero values (the bundles
    write exactly 0 outside the brain)."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    inside = np.asarray(brain) > 0 if brain is not None else heatmap > 0
    values = heatmap[inside]
    return values[np.isfinite(values)]


def suggest_threshold(heatmap, brain=None, quantile: float = 0.99) -> float:
    """A threshold when the method has no calibrated one: the `quantile` of the scores inside
    the brain (flags about 1 % of the brain)."""
    values = brain_values(heatmap, brain)
    return float(np.quantile(values, quantile)) if values.size else 0.0


def slider_range(threshold: float | None, heatmap_max: float | None = None) -> tuple[float, float, float, int]:
    """(minimum, maximum, step, decimals) of the threshold slider: from 0 to beyond both twice
    the threshold and the largest score (1 when neither is known), in 1000 to 10000 steps of a
    power of ten, with as many decimals as the step needs."""
    top = max(2.0 * float(threshold or 0.0), float(heatmap_max or 0.0))
    if not math.isfinite(top) or top <= 0:
        top = 1.0
    exponent = math.floor(math.log10(top / 1000.0))
    step = 10.0 ** exponent
    maximum = math.ceil(round(top / step, 6) / 10) * step * 10
    return 0.0, float(round(maximum, max(0, -exponent))), float(step), max(0, -exponent)


def display_window(heatmap, threshold: float | None = None, brain=None) -> tuple[float, float]:
    """(low, high) of the heatmap's colour window: 0 to the 99.9th percentile of brain scores,
    and at least twice the threshold, so the threshold sits inside the colour ramp."""
    values = brain_values(heatmap, brain)
    high = float(np.quantile(values, 0.999)) if values.size else 0.0
    if threshold is not None:
        high = max(high, 2.0 * float(threshold))
    return 0.0, high if high > 0 else 1.0


def voxel_count(labelmap) -> int:
    return int(np.count_nonzero(np.asarray(labelmap)))


def check_heatmap(heatmap) -> None:
    """Raises ValueError unless `heatmap` is a non-empty numeric array of finite scores."""
    heatmap = np.asarray(heatmap)
    if heatmap.size == 0 or not np.issubdtype(heatmap.dtype, np.number):
        raise ValueError(f"The heatmap is empty or not numeric ({heatmap.dtype}, shape {heatmap.shape}).")
    if not np.all(np.isfinite(heatmap)):
        raise ValueError("The heatmap holds values that are not finite numbers (NaN or infinity): the method failed.")


# ---------------------------------------------------------------------------------------------
# results into the scene, whole or not at all


def scene_nodes(scene) -> list:
    """The nodes of an MRML scene, in the order they were added."""
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]


def node_with_display_and_storage(node) -> list:
    """`node`, then its display nodes and its storage node (what loading a file adds)."""
    nodes = [node]
    for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
        nodes.append(node.GetNthDisplayNode(i))
    if hasattr(node, "GetStorageNode"):
        nodes.append(node.GetStorageNode())
    return [n for n in nodes if n is not None]


def remove_nodes(scene, nodes) -> int:
    """Removes those of `nodes` still in the scene, in the given order; returns how many."""
    removed = 0
    for node in nodes:
        if node is not None and scene.IsNodePresent(node):
            scene.RemoveNode(node)
            removed += 1
    return removed


class SceneTransaction:
    """One change of an MRML scene that happens whole or not at all.

    ``with SceneTransaction(scene) as transaction:`` records the scene's nodes. If the block
    raises (an error, a cancel, KeyboardInterrupt), the changes made to nodes that existed before
    are undone (the steps registered with `on_undo`, newest first), then every node added to the
    scene since the start is removed, newest first. Singleton nodes (a module's parameter node,
    created on first use) are left. Register the undo step of a node *before* changing it.
    """

    def __init__(self, scene):
        self.scene = scene
        self._before: set[str] = set()
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> "SceneTransaction":
        self._before = {node.GetID() for node in scene_nodes(self.scene)}
        self._undo = []
        return self

    def on_undo(self, step: Callable[[], None]) -> None:
        self._undo.append(step)

    def added_nodes(self) -> list:
        """Nodes added since the start (not singletons), oldest first."""
        return [node for node in scene_nodes(self.scene)
                if node.GetID() not in self._before and not node.GetSingletonTag()]

    def rollback(self) -> None:
        for step in reversed(self._undo):
            try:
                step()
            except Exception:  # undo as much as possible; the original error is what the user sees
                logging.exception("MedAnomaly: undoing a change of the scene failed")
        self._undo = []
        remove_nodes(self.scene, list(reversed(self.added_nodes())))

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is not None:
            self.rollback()
        return False
