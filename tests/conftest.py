"""Shared fixtures: one tiny synthetic cohort per test session, and the repository's bundles."""

from __future__ import annotations

import locale
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "monai_bundles"


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """Cohorts and caches of the tests live in a temporary MEDANOMALY_HOME."""
    home = tmp_path_factory.mktemp("medanomaly_home")
    previous = os.environ.get("MEDANOMALY_HOME")
    os.environ["MEDANOMALY_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("MEDANOMALY_HOME", None)
    else:
        os.environ["MEDANOMALY_HOME"] = previous


@pytest.fixture(autouse=True)
def keep_the_locale():
    """Writing DICOM with SimpleITK (GDCM) switches the process locale to "C", after which Python
    opens text files as ASCII; every test starts from the locale the session started with."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != saved:
        locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The `tiny` preset (14 subjects), generated once per session; returns its datalist."""
    from medanomaly.data import generate_cohort

    root = tmp_path_factory.mktemp("synth") / "tiny"
    return generate_cohort(root, "tiny", seed=0, workers=2, progress=False)


@pytest.fixture(scope="session")
def tiny_preset(tiny) -> str:
    """The session's tiny cohort as the preset `tiny` (its per-contrast datalists, e.g. for bundles that
    read several contrasts), linked into the session's MEDANOMALY_HOME instead of generated again."""
    from medanomaly.data import cohort_root

    root = cohort_root("tiny")
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(Path(tiny).parent, root, target_is_directory=True)
    return "tiny"


@pytest.fixture
def no_process(monkeypatch) -> list[list[str]]:
    """Bundle processes are not started; the list collects the commands that would have run."""
    from medanomaly.bundles import runner

    from checks import NoProcess

    NoProcess.started = []
    monkeypatch.setattr(runner.subprocess, "Popen", NoProcess)
    return NoProcess.started
