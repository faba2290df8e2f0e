"""Smoke test of bench/trace_speed.py at a small size; the per-pair reference doubles as an independent
second implementation of the engine's definitions, so the two graphs must agree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import trace_speed  # noqa: E402

TINY = ["--layers", "3", "--heads", "4", "--width", "64", "--qk-scale", "6", "--repeats", "1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench-cache"))


def test_benchmark_runs_and_the_reference_gives_the_engines_graph(cache_dir, capsys):
    results = trace_speed.main(["--prompts", "4", "--cache-dir", cache_dir, *TINY])
    (row,) = results["sizes"]
    assert row["N"] == row["reference_prompts"] == 4
    assert row["traced_events"] > 0 and row["edges"] > 0, "the smoke test must trace something to compare"
    check = row["check"]
    assert check["equal"], check["problems"]
    assert check["communication_edges"] > 0 and check["max_rel_total_diff"] <= 1e-4
    for key in ("a", "b", "c", "c_svd", "c_walk"):
        assert row["times"][key]["min"] > 0
    assert row["b_over_a_median"] > 0 and row["c_over_b_min"] > 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "SAME GRAPH" in out


def test_reference_on_the_first_k_prompts_and_the_cached_model(cache_dir, capsys):
    # More prompts and a second seed for a stronger cross-check; the reference runs on the first 5 only.
    results = trace_speed.main(["--prompts", "10", "--reference-prompts", "5", "--seed", "1", "--cache-dir", cache_dir, *TINY])
    (row,) = results["sizes"]
    assert row["reference_prompts"] == 5 and row["check"]["equal"], row["check"]["problems"]
    assert row["check"]["events"] > 0
    assert row["c_over_bK_median"] > 0 and "bK" in row["times"]
    out = capsys.readouterr().out
    assert "first 5 prompts" in out
    # The model built by the first test of this seed is reused, not rebuilt.
    trace_speed.main(["--prompts", "2", "--seed", "1", "--cache-dir", cache_dir, *TINY])
    assert "built " not in capsys.readouterr().out
