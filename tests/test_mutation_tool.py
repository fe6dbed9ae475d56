"""tools/mutation_testing.py: the staged tree and the summary of mutmut's results."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutation_testing", REPO / "tools" / "mutation_testing.py")
mutation_testing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation_testing)


def test_the_staged_tree_has_the_src_layout_mutmut_imports_and_mutates_only_the_chosen_modules(tmp_path):
    mutation_testing.stage(tmp_path, ["masking", "anomalies"])
    assert (tmp_path / "src" / "medanomaly" / "__init__.py").is_file()  # the whole package: tests import it
    assert (tmp_path / "src" / "medanomaly" / "anomalies" / "poisson.py").is_file()
    assert sorted(p.name for p in (tmp_path / "tests").iterdir()) == [
        "checks.py", "conftest.py", "test_anomalies.py", "test_masking.py"]
    settings = tomllib.loads((tmp_path / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert settings["source_paths"] == ["src/medanomaly"]
    assert settings["only_mutate"] == ["src/medanomaly/masking.py", "src/medanomaly/anomalies/*"]
    assert settings["pytest_add_cli_args_test_selection"] == ["tests/test_anomalies.py", "tests/test_masking.py"]


def test_the_summary_counts_killed_and_surviving_mutants_per_module():
    statuses = {
        "medanomaly.masking.x_dilate_mask__mutmut_1": "killed",
        "medanomaly.masking.x_dilate_mask__mutmut_2": "survived",
        "medanomaly.masking.x_dilate_mask__mutmut_3": "timeout",
        "medanomaly.anomalies.poisson.x_poisson_blend__mutmut_1": "killed",
        "medanomaly.anomalies.poisson.x_poisson_blend__mutmut_2": "no tests",
    }
    table = mutation_testing.summarise(statuses)
    assert table["masking"] == {"killed": 2, "survived": ["medanomaly.masking.x_dilate_mask__mutmut_2"], "not_run": 0}
    assert table["anomalies"] == {"killed": 1, "survived": [], "not_run": 1}
    text = mutation_testing.markdown(table, "cmd")
    assert "| masking | 3 | 2 | 1 | 66.7 % |" in text and "| anomalies | 1 | 1 | 0 | 100.0 % |" in text
    assert "- `medanomaly.masking.x_dilate_mask__mutmut_2`" in text
