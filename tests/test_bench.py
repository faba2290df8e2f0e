"""Smoke test of bench/trace_speed.py at a small size; the per-pair reference doubles as an independent
second implementation of the engine's definitions, so the two must give the same firing statistics
(exactly) and the same graph."""

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


def test_benchmark_runs_and_the_reference_gives_the_engines_statistics_and_graph(cache_dir, capsys):
    results = trace_speed.main(["--prompts", "4", "--cache-dir", cache_dir, *TINY])
    (row,) = results["sizes"]
    assert row["N"] == row["reference_prompts"] == 4
    assert row["traced_events"] > 0 and row["edges"] > 0, "the smoke test must trace something to compare"
    check = row["check"]
    assert check["firing_equal"], check["problems"]
    assert check["graph_equal"], check["problems"]
    assert check["equal"] and "firing_differences" not in check
    assert check["float64"]["equal"], check["float64"]["problems"]  # the engine in float64 too
    assert check["firing_events"] == check["reference_firing_events"] == row["firing_events"]
    assert row["firing_events"] > row["traced_events"], "the statistics must cover firing events the walk does not reach"
    assert check["communication_edges"] > 0 and check["max_rel_total_diff"] <= 1e-4
    for key in ("a", "b", "c", "c_svd", "c_stats", "c_walk"):
        assert row["times"][key]["min"] > 0
    assert row["b_over_a_median"] > 0 and row["c_over_b_min"] > 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "SAME FIRING STATISTICS, SAME GRAPH" in out


def test_reference_on_the_first_k_prompts_and_the_cached_model(cache_dir, capsys):
    # More prompts and a second seed for a stronger cross-check; the reference runs on the first 5 only.
    results = trace_speed.main(["--prompts", "10", "--reference-prompts", "5", "--seed", "1", "--cache-dir", cache_dir, *TINY])
    (row,) = results["sizes"]
    assert row["reference_prompts"] == 5, row
    assert row["check"]["firing_equal"] and row["check"]["graph_equal"], row["check"]["problems"]
    assert row["check"]["float64"]["equal"], row["check"]["float64"]["problems"]
    assert row["check"]["events"] > 0
    assert row["c_over_bK_median"] > 0 and "bK" in row["times"]
    out = capsys.readouterr().out
    assert "first 5 prompts" in out
    # The model built by the first test of this seed is reused, not rebuilt.
    trace_speed.main(["--prompts", "2", "--seed", "1", "--cache-dir", cache_dir, *TINY])
    assert "built " not in capsys.readouterr().out


def test_compare_catches_different_firing_statistics():
    # The check must not be vacuous: one |S_ij| or one slice use changed is a difference.
    import numpy as np
    from reference import compare_firing

    from circuitlang.engine.results import FiringStats

    sizes = ((np.array([3, 1, 2]), np.array([], dtype=np.int64)),)
    a = FiringStats(counts=np.array([[3, 0]]), slice_counts=sizes, slice_usage=np.array([[[2, 3, 1], [0, 0, 0]]]))
    shuffled = FiringStats(counts=a.counts, slice_counts=((np.array([1, 2, 3]), sizes[0][1]),), slice_usage=a.slice_usage)
    assert compare_firing(a, shuffled) == ([], [])
    other_size = FiringStats(counts=a.counts, slice_counts=((np.array([1, 2, 2]), sizes[0][1]),), slice_usage=a.slice_usage)
    problems, heads = compare_firing(a, other_size)
    assert any("slice_counts" in p for p in problems) and heads == [(0, 0)]
    usage = a.slice_usage.copy()
    usage[0, 1, 2] += 1
    problems, heads = compare_firing(a, FiringStats(a.counts, a.slice_counts, usage))
    assert any("slice_usage" in p for p in problems) and heads == [(0, 1)]
    problems, _ = compare_firing(a, FiringStats(a.counts + 1, a.slice_counts, a.slice_usage))
    assert any("counts" in p for p in problems)


def test_the_benchmark_passes_only_exact_statistics_or_float32_ties():
    base = {"graph_equal": True, "firing_equal": False, "counts_equal": True, "float64": {"equal": True}}
    assert trace_speed.row_ok({"check": {**base, "firing_equal": True}})
    assert trace_speed.row_ok({"check": {**base, "firing_differences": [{"explained": True}]}})
    assert not trace_speed.row_ok({"check": {**base, "firing_differences": [{"explained": False}]}})
    assert not trace_speed.row_ok({"check": {**base, "firing_differences": []}})  # differences not found
    assert not trace_speed.row_ok({"check": {**base, "counts_equal": False, "firing_differences": [{"explained": True}]}})
    assert not trace_speed.row_ok({"check": {**base, "firing_equal": True, "float64": {"equal": False}}})
    assert not trace_speed.row_ok({"check": {**base, "firing_equal": True, "graph_equal": False}})
