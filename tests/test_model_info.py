"""model_info.json, the record of what trained weights are: read tolerantly, merged atomically."""

from __future__ import annotations

import json

import pytest

from medanomaly.bundles.model_info import (
    ModelInfoError,
    has_weights,
    load_threshold,
    read_model_info,
    trained_with_demo_config,
    update_model_info,
    weights_contrasts,
    weights_file,
)


def test_model_info_merges_and_threshold_falls_back_loudly(tmp_path, caplog):
    assert load_threshold(tmp_path, default=0.3) == 0.3
    assert "No calibrated threshold" in caplog.text
    update_model_info(tmp_path, variant="demo")
    update_model_info(tmp_path, threshold=0.125)
    assert json.loads((tmp_path / "model_info.json").read_text()) == {"variant": "demo", "threshold": 0.125}
    assert load_threshold(tmp_path) == 0.125


def test_a_missing_model_info_reads_as_nothing_recorded(tmp_path):
    assert read_model_info(tmp_path / "nowhere") == {}
    assert weights_contrasts(tmp_path) == () and not trained_with_demo_config(tmp_path)
    assert not has_weights(tmp_path)
    weights_file(tmp_path).write_bytes(b"weights")
    assert has_weights(tmp_path) and weights_file(tmp_path).name == "model.pt"


@pytest.mark.parametrize("text", ['{"variant": "demo"', "[1, 2]"])
def test_a_damaged_model_info_is_named(tmp_path, text):
    (tmp_path / "model_info.json").write_text(text)
    with pytest.raises(ModelInfoError, match="model_info.json"):
        read_model_info(tmp_path)


def test_recorded_contrasts_and_variant(tmp_path):
    update_model_info(tmp_path, variant="demo", contrast=["T1w", "T2w"])
    assert weights_contrasts(tmp_path) == ("T1w", "T2w") and trained_with_demo_config(tmp_path)
