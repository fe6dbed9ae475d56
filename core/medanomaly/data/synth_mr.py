"""MR signal of the synthetic cohort: tissue relaxation times and the sequence equations.

Every tissue and lesion compartment has a longitudinal relaxation time T1 (ms), a transverse
relaxation time T2 (ms) and a relative proton density PD. A subject's values are drawn around
typical 3 T values from the MR literature (rounded; ranges in `RELAXATION`):

* white matter, cortical grey matter, CSF: Wansapura et al., JMRI 1999 (T1 and T2 at 3 T);
  Stanisz et al., MRM 2005; proton density from Whittall et al., MRM 1997 / Neeb et al. 2006;
* deep grey nuclei (putamen, pallidum, thalamus): shorter T1 and T2 than cortex (iron, myelin),
  Wansapura 1999 and Gelman et al., Radiology 1999;
* vasogenic oedema and non-enhancing tumour: long T1 and T2 (more free water); necrosis and a
  chronic infarct cavity near CSF; an enhancing tumour rim with T1 shortened by gadolinium (as in
  post-contrast T1w, the BraTS T1ce convention); acute infarct with moderately long T1 and T2;
  gliosis around a chronic cavity; white-matter hyperintensities with a longer T2 and slightly
  longer T1 than normal white matter (e.g. Bastin et al., 2009; Wardlaw et al., Lancet Neurol 2013).

Signals (magnitude, arbitrary units) follow the textbook steady-state equations:

* ``T1w`` (MPRAGE-like inversion-prepared gradient echo, short TE):
  S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)|
* ``T2w`` (turbo spin echo): S = PD (1 - exp(-TR/T1)) exp(-TE/T2)
* ``FLAIR`` (inversion recovery spin echo; TI chosen to null the subject's CSF):
  S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)

so white matter is bright and CSF dark on T1w, CSF brightest on T2w, and CSF dark with oedema
and WMH bright on FLAIR, as in real scans.
"""

from __future__ import annotations

import numpy as np

from medanomaly.data.contrast import CONTRASTS

#: (low, high) of each compartment's T1 (ms), T2 (ms) and PD; a subject draws uniformly within.
RELAXATION: dict[str, dict[str, tuple[float, float]]] = {
    "wm": {"T1": (800.0, 880.0), "T2": (72.0, 84.0), "PD": (0.67, 0.71)},
    "gm": {"T1": (1280.0, 1400.0), "T2": (98.0, 112.0), "PD": (0.78, 0.82)},
    "csf": {"T1": (3900.0, 4300.0), "T2": (1700.0, 2200.0), "PD": (0.98, 1.0)},
    "deep_gm": {"T1": (1050.0, 1150.0), "T2": (62.0, 75.0), "PD": (0.74, 0.78)},
    "oedema": {"T1": (1450.0, 1900.0), "T2": (150.0, 230.0), "PD": (0.84, 0.9)},
    "tumour_core": {"T1": (1700.0, 2200.0), "T2": (110.0, 160.0), "PD": (0.82, 0.88)},
    "necrosis": {"T1": (2600.0, 3600.0), "T2": (500.0, 1200.0), "PD": (0.93, 0.98)},
    "enhancing_rim": {"T1": (600.0, 800.0), "T2": (90.0, 120.0), "PD": (0.8, 0.86)},
    "acute_infarct": {"T1": (1400.0, 1750.0), "T2": (130.0, 190.0), "PD": (0.84, 0.9)},
    "chronic_cavity": {"T1": (3300.0, 4100.0), "T2": (1000.0, 1800.0), "PD": (0.95, 1.0)},
    "gliosis": {"T1": (1300.0, 1600.0), "T2": (140.0, 200.0), "PD": (0.82, 0.88)},
    "wmh": {"T1": (1000.0, 1250.0), "T2": (115.0, 150.0), "PD": (0.74, 0.8)},
}
HEALTHY_TISSUES = ("wm", "gm", "csf", "deep_gm")

#: (low, high) of each sequence's timing parameters (ms); FLAIR's TI follows from CSF's T1.
SEQUENCES: dict[str, dict[str, tuple[float, float]]] = {
    "T1w": {"TR": (2000.0, 2500.0), "TI": (880.0, 1100.0)},
    "T2w": {"TR": (4000.0, 6500.0), "TE": (80.0, 110.0)},
    "FLAIR": {"TR": (8000.0, 10000.0), "TE": (100.0, 130.0)},
}


def _draw(rng: np.random.Generator, ranges: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {k: round(float(rng.uniform(lo, hi)), 4) for k, (lo, hi) in ranges.items()}


def draw_tissues(rng: np.random.Generator, compartments=HEALTHY_TISSUES) -> dict[str, dict[str, float]]:
    """One subject's T1 / T2 / PD of each compartment in `compartments`."""
    return {name: _draw(rng, RELAXATION[name]) for name in compartments}


def flair_null_ti(t1_csf: float, tr: float) -> float:
    """The inversion time (ms) that nulls a tissue of longitudinal relaxation `t1_csf`."""
    return float(t1_csf * np.log(2.0 / (1.0 + np.exp(-tr / t1_csf))))


def draw_sequences(rng: np.random.Generator, t1_csf: float) -> dict[str, dict[str, float]]:
    """One subject's sequence parameters for every contrast (FLAIR nulls that subject's CSF)."""
    params = {name: _draw(rng, SEQUENCES[name]) for name in CONTRASTS}
    params["FLAIR"]["TI"] = round(flair_null_ti(t1_csf, params["FLAIR"]["TR"]), 4)
    return params


def signal(contrast: str, tissue: dict[str, float], sequence: dict[str, float]) -> float:
    """The magnitude signal of one tissue (T1, T2, PD) in `contrast` with `sequence` timings."""
    t1, t2, pd = tissue["T1"], tissue["T2"], tissue["PD"]
    if contrast == "T1w":
        return float(pd * abs(1.0 - 2.0 * np.exp(-sequence["TI"] / t1) + np.exp(-sequence["TR"] / t1)))
    if contrast == "T2w":
        return float(pd * (1.0 - np.exp(-sequence["TR"] / t1)) * np.exp(-sequence["TE"] / t2))
    if contrast == "FLAIR":
        recovery = abs(1.0 - 2.0 * np.exp(-sequence["TI"] / t1) + np.exp(-sequence["TR"] / t1))
        return float(pd * recovery * np.exp(-sequence["TE"] / t2))
    raise ValueError(f"Unknown contrast {contrast!r}; choose one of {', '.join(CONTRASTS)}.")


def signals(contrast: str, tissues: dict[str, dict[str, float]], sequence: dict[str, float]) -> dict[str, float]:
    """The signal of every compartment in `tissues`, scaled so that the brightest healthy tissue is 1."""
    raw = {name: signal(contrast, values, sequence) for name, values in tissues.items()}
    scale = max(raw[name] for name in HEALTHY_TISSUES if name in raw)
    return {name: value / scale for name, value in raw.items()}
