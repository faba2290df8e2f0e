"""The conformance suite (issue: every decoder family traced exactly): a tiny random model of each family,
built from transformers' own config class and loaded as a user's local directory, checked for exactness;
docs/models.md and the status table `circ check` reads must say what the suite measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circuitlang.conformance import FAMILIES, FEATURE_COLUMNS, TOLERANCE, render_markdown, run_suite, status_table
from circuitlang.models.families import describe_model, status_path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


@pytest.fixture(scope="module")
def results(gpt2_tokenizer):
    return {r.family: r for r in run_suite(gpt2_tokenizer)}


def test_the_suite_covers_the_families_the_issue_names():
    assert len(FAMILIES) >= 20
    assert {"gpt2", "gpt_neo", "gptj", "gpt_neox", "opt", "bloom", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
            "gemma2", "gemma3", "phi", "phi3", "olmo", "olmo2", "stablelm", "falcon"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_traced_exactly(results, family):
    r = results[family]
    assert r.error is None, r.error
    assert r.events > 0 and r.edges > 0, "the roots fired and the trace went upstream"
    assert r.score_residual <= TOLERANCE, "the slice terms sum to the model's score (eq. 3)"
    assert r.writer_residual <= TOLERANCE, "every writer's eq. (8) contribution sums to the signal"
    assert r.pattern_error <= TOLERANCE and r.firings_equal, "the captured attention is the Hugging Face model's own"
    assert r.partial_error <= TOLERANCE, "resumed intervention passes equal whole-model passes"
    assert r.authors_edges > 0 and r.sources_edges > 0, "readings authors and sources heads mlp embed bias run"
    assert r.status.startswith("exact")


def test_alibi_is_stated_not_attributed(results):
    """BLOOM's position term lies outside the bilinear form: measured and reported, and only there."""
    assert results["bloom"].position_term > 0 and results["bloom"].status == "exact, position term stated"
    assert all(r.position_term == 0 for f, r in results.items() if f != "bloom")


def test_status_table_is_the_suites(results):
    assert json.loads(status_path().read_text()) == status_table(list(results.values()))


def test_docs_models_md_is_generated_from_the_suite(results):
    """Every row of docs/models.md names the family's features and status as the suite finds them (the
    residual figures may differ in their last digit between machines; each is checked above)."""
    written = DOCS.read_text()
    fresh = render_markdown(list(results.values()))
    rows = lambda text: {line.split(" | ")[0]: line.split(" | ")[: 2 + len(FEATURE_COLUMNS)]  # noqa: E731
                         for line in text.splitlines() if line.startswith("| `")}
    assert rows(written) == rows(fresh)
    assert written.split("| family |")[0] == fresh.split("| family |")[0]


def test_circ_check_names_the_family_and_its_status(tmp_path, results):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gptj"}))
    assert describe_model(str(tmp_path)) == "model " + str(tmp_path) + ": family gptj, exact (docs/models.md)"
    assert "family gemma3_text, exact" in describe_model("gemma-3-270m")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert "not in the conformance suite" in describe_model(str(tmp_path))
    assert "known once it loads" in describe_model("org/some-model")
