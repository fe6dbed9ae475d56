"""Companion synthetic cohorts: extra lesion subjects for training, never a test subject.

A method that needs lesion subjects for training (SAGAN's unlabeled set, the supervised ceiling's
labelled set) must not take them from the cohort's own validation or test splits. For a synthetic
cohort it gets them from a *companion* cohort: the same generator with another cohort seed
(`COMPANION_SEED_OFFSET` + the cohort's seed), so every subject seed differs from the cohort's,
cached under ``$MEDANOMALY_HOME/cohorts/companion-<preset>-seed<seed>-n<n>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from medanomaly.data.datalist import load_datalist, read_datalist
from medanomaly.data.synth import cohort_root, ensure_cohort

#: Added to the cohort's seed to give the companion cohort's seed (a prime: no small-seed collisions).
COMPANION_SEED_OFFSET = 7919
COMPANION_SPLIT = "validation_lesion"


def synthetic_provenance(datalist: str | Path) -> dict | None:
    """The generator's provenance record of a synthetic cohort's datalist, None for any other datalist."""
    meta = read_datalist(datalist).get("medanomaly")
    return meta if isinstance(meta, Mapping) and meta.get("generator") == "medanomaly.data.synth" else None


def companion_seed(datalist: str | Path) -> int:
    """The cohort seed of the companion of the synthetic cohort at `datalist` (ValueError for a real one)."""
    provenance = synthetic_provenance(datalist)
    if provenance is None:
        raise ValueError(f"Datalist {datalist} is not a synthetic cohort: it has no companion cohort. "
                         "Name a split of lesion subjects with labels in the datalist instead.")
    return COMPANION_SEED_OFFSET + int(provenance.get("seed", 0))


def companion_lesion_cohort(datalist: str | Path, n: int, contrast: str | None = None) -> Path:
    """The datalist (of `contrast`) of a companion cohort of `n` lesion subjects (split
    `COMPANION_SPLIT`) for the synthetic cohort at `datalist`; generated on first use."""
    seed = companion_seed(datalist)
    preset = synthetic_provenance(datalist).get("preset", "custom")
    root = cohort_root(f"companion-{preset}-seed{seed}-n{n}")
    return ensure_cohort({COMPANION_SPLIT: n}, seed=seed, root=root, contrast=contrast)


def companion_lesion_subjects(datalist: str | Path, n: int, contrast: str | None = None) -> list[dict]:
    """The `n` lesion subjects (with their lesion masks) of `datalist`'s companion cohort; [] for n <= 0.
    Their `subject` ids are prefixed with ``companion-`` (the companion numbers its subjects from 1 too)."""
    if n <= 0:
        return []
    items = load_datalist(companion_lesion_cohort(datalist, n, contrast), COMPANION_SPLIT)
    return [{**item, "subject": f"companion-{item['subject']}"} if "subject" in item else item for item in items]
