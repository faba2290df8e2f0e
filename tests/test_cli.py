"""`circ` end to end: specs/ioi.circ, pointed at a tiny offline model, through run, check, plan and diff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circuitlang.cli import main
from tiny_models import build_gpt2

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, gpt2_tokenizer):
    return build_gpt2(tmp_path_factory.mktemp("tiny-cli"), gpt2_tokenizer, n_layer=3, n_head=4, n_embd=64, seed=4)


def spec(directory: Path, tiny: Path, name: str = "tiny.circ", extra: str = "") -> Path:
    """specs/ioi.circ with only the model and the prompt count changed (the `show` filter and the evaluated
    circuit sizes scaled: the tiny model has 12 heads)."""
    path = directory / name
    path.write_text(
        f'extends "{REPO / "specs" / "ioi.circ"}"\n'
        f'model "{tiny}"\n'
        "prompts ioi 16 mixed seed 0\n"
        "show edges in >= 2 prompts\n"
        "evaluate faithfulness against abc sizes 2, 5 rank influence random 0\n" + extra
    )
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITLANG_CACHE", str(tmp_path / "cache"))


def test_run_writes_every_output_and_the_same_trace_twice(tmp_path, tiny_dir, capsys):
    path = spec(tmp_path, tiny_dir)
    assert main(["run", str(path), "--out", str(tmp_path / "a"), "--no-cache"]) == 0
    out = capsys.readouterr().out
    for title in ("Roots chosen by direct effect", "Summary", "Firing counts per head", "Top edges by count",
                  "|S_ij| per head", "F(X) = logit(target) - logit(distractor)"):
        assert title in out
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"trace.json", "trace.graphml", "trace.dot", "trace.svg", "trace.png", "interventions.json"} <= files
    assert (tmp_path / "a" / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "a" / "trace.json").read_text())
    assert data["events"]["prompt"] and data["graph"]["edges"]
    # The intervene block of specs/ioi.circ ran (section 5.4) and its report joined the output.
    assert "into the strongest root" in out
    # so did its evaluate statement: the influence ranking's circuits of 5, 10 and 20 heads
    assert "Faithfulness against abc" in out and "SVT influence (trace)" in out and "faithfulness.json" in files
    first = (tmp_path / "a" / "trace.json").read_bytes()
    assert main(["run", str(path), "--out", str(tmp_path / "a"), "--no-cache", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "a" / "trace.json").read_bytes() == first  # same spec, same seed: the same bytes


def test_second_run_reuses_the_cached_trace(tmp_path, tiny_dir, capsys):
    path = spec(tmp_path, tiny_dir, extra="output \"out\" json\n")
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "reusing" not in capsys.readouterr().err
    first = (tmp_path / "out" / "trace.json").read_bytes()
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "reusing cached trace" in capsys.readouterr().err
    assert (tmp_path / "out" / "trace.json").read_bytes() == first


def test_check_plan_and_bad_specs(tmp_path, tiny_dir, capsys):
    path = spec(tmp_path, tiny_dir)
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: ok\nmodel {tiny_dir}: family gpt2, exact (docs/models.md)"
    assert main(["plan", str(path)]) == 0
    plan = capsys.readouterr().out
    assert "firing  attention > 0.3" in plan and "prompts ioi 16 mixed seed 0" in plan
    bad = tmp_path / "bad.circ"
    bad.write_text("model gpt2\nslices papers\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f'error {bad}:2:8: expected "all", "paper" or "top", found "papers"; did you mean "paper"?'
    # A head out of range is only known once the model is loaded: still one line and exit code 2.
    far = spec(tmp_path, tiny_dir, "far.circ", "trace from 7.0 end->IO\n")
    assert main(["run", str(far), "--quiet", "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "7.0" in err and err.startswith(f"error {far}:")


def test_diff_of_two_specs(tmp_path, tiny_dir, capsys):
    a = spec(tmp_path, tiny_dir, "a.circ")
    b = spec(tmp_path, tiny_dir, "b.circ", "keep mass 0.95\n")
    assert main(["diff", str(a), str(b), "--out", str(tmp_path / "diff")]) == 0
    data = json.loads((tmp_path / "diff" / "diff.json").read_text())
    assert data["edges"]["only_a"] == [] and data["edges"]["only_b"]
    assert (tmp_path / "diff" / "diff.png").exists()
