"""An output directory belongs to one run: its manifest names the spec and every file, a run of another spec
is refused (or, with --force, replaces the old run's files), and `circ view` / `circ diff` read only what the
manifest lists (issue 26, item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circuitlang.cli import main
from circuitlang.report.outdir import MANIFEST, file_digest
from tiny_models import build_gpt2

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, gpt2_tokenizer):
    return build_gpt2(tmp_path_factory.mktemp("tiny-outdir"), gpt2_tokenizer, n_layer=2, n_head=2, n_embd=32, seed=4)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITLANG_CACHE", str(tmp_path / "cache"))


def big(tmp_path: Path, tiny: Path) -> Path:
    """specs/ioi.circ (its intervene block, every format) on 16 prompts."""
    path = tmp_path / "big.circ"
    path.write_text(f'extends "{REPO / "specs" / "ioi.circ"}"\nmodel "{tiny}"\nprompts ioi 16 mixed seed 0\n'
                    "show edges in >= 2 prompts\nevaluate faithfulness against abc sizes 1, 2 rank influence random 0\n")  # 4 heads
    return path


def small(tmp_path: Path, tiny: Path) -> Path:
    """Another spec: 8 prompts, no interventions, json only."""
    path = tmp_path / "small.circ"
    path.write_text(f'model "{tiny}"\nprompts ioi 8\ntrace from auto 1\nfiring attention > 0.2\noutput "elsewhere" json\n')
    return path


def test_another_spec_is_refused_then_replaces_the_old_run_with_force(tmp_path, tiny_dir, capsys):
    out = tmp_path / "runs" / "ioi"
    assert main(["run", str(big(tmp_path, tiny_dir)), "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["spec"] == str((tmp_path / "big.circ").resolve())
    assert {"trace.json", "trace.png", "trace.html", "interventions.json"} <= set(manifest["files"])
    assert all(file_digest(out / name) == digest for name, digest in manifest["files"].items())
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    # The reproduction: another spec with --out into that directory, before its model loads.
    assert main(["run", str(small(tmp_path, tiny_dir)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out} holds the outputs of `circ run {(tmp_path / 'big.circ').resolve()}`" in err
    assert "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # untouched

    assert main(["run", str(small(tmp_path, tiny_dir)), "--out", str(out), "--quiet", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "trace.json"])  # the old run's files are gone
    data = json.loads((out / "trace.json").read_text())
    assert len(data["labels"]) == 8
    assert main(["view", str(out), "--no-open"]) == 0
    html = (out / "trace.html").read_text()
    payload = json.loads(html.split('type="application/json">')[1].split("</script>")[0].replace("<\\/", "</"))
    assert payload["n_prompts"] == 8 and payload["interventions"] is None  # none of the 16-prompt run's sets
    assert "trace.html" in json.loads((out / MANIFEST).read_text())["files"]


def test_a_rerun_of_the_same_spec_replaces_its_own_files(tmp_path, tiny_dir, capsys):
    path = small(tmp_path, tiny_dir)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    path.write_text(path.read_text().replace("output \"elsewhere\" json", "output \"elsewhere\" json graphml"))
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "trace.json", "trace.graphml"])
    path.write_text(path.read_text().replace(" graphml", " neuronpedia"))
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert "neuronpedia/graph-metadata.json" in files and "trace.graphml" not in files
    assert all(file_digest(out / name) == digest for name, digest in files.items())
    path.write_text(path.read_text().replace(" neuronpedia", ""))
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "trace.json"])  # no stale graphml or graphs


def test_files_of_a_run_without_manifest_are_never_mixed_in(tmp_path, tiny_dir, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "interventions.json").write_text("{}")
    (out / "trace.py").write_text("# the user's own file, not an output")
    assert main(["run", str(small(tmp_path, tiny_dir)), "--out", str(out), "--quiet"]) == 2
    assert "a run with no manifest (interventions.json)" in capsys.readouterr().err
    assert main(["run", str(small(tmp_path, tiny_dir)), "--out", str(out), "--quiet", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "trace.json", "trace.py"])  # outputs, nothing else
    # An older circuitlang's run directory (no manifest): the viewer shows its trace alone and says why.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "trace.json").write_bytes((out / "trace.json").read_bytes())
    (legacy / "interventions.json").write_text("{}")
    capsys.readouterr()
    assert main(["view", str(legacy), "--no-open"]) == 0
    assert "showing the trace alone" in capsys.readouterr().err


def test_view_and_diff_refuse_a_file_the_manifest_does_not_list(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    assert main(["run", str(small(tmp_path, tiny_dir)), "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "trace.json").read_text())
    data["prompts"] = "edited"
    (out / "trace.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["view", str(out), "--no-open"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not the trace.json its run wrote" in err
    assert main(["diff", str(out / "trace.json"), str(out / "trace.json"), "--out", str(tmp_path / "d")]) == 2
    assert "is not the trace.json its run wrote" in capsys.readouterr().err


def test_view_right_after_a_run_does_not_rewrite_trace_html(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    assert main(["run", str(big(tmp_path, tiny_dir)), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["view", str(out), "--no-open"]) == 0
    assert capsys.readouterr().out.startswith("viewer ")  # item 8: not "wrote"


def test_diffs_replace_diffs_but_not_runs(tmp_path, tiny_dir, capsys):
    run = tmp_path / "run"
    assert main(["run", str(small(tmp_path, tiny_dir)), "--out", str(run), "--quiet"]) == 0
    trace = str(run / "trace.json")
    assert main(["diff", trace, trace, "--out", str(tmp_path / "d")]) == 0
    assert main(["diff", trace, trace, "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / MANIFEST).read_text())["kind"] == "diff"
    capsys.readouterr()
    assert main(["diff", trace, trace, "--out", str(run)]) == 2
    assert "holds the outputs of `circ run" in capsys.readouterr().err


def test_ctrl_c_while_view_traces_a_spec_is_one_line(tmp_path, tiny_dir, capsys, monkeypatch):
    """Issue 26, item 9: `circ view SPEC` interrupted while it traces, as `run` and `diff` are."""
    import circuitlang.runner.execute as execute

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(execute, "cached_run", interrupted)
    path = small(tmp_path, tiny_dir)
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["view", str(path), "--no-open"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped `circ view` (a traceback for the user)")
    assert code == 130 and capsys.readouterr().err.strip() == "interrupted; no output was left half-written"
    assert not (tmp_path / "elsewhere").exists()


def test_view_of_a_spec_never_shows_another_specs_run(tmp_path, tiny_dir, capsys, monkeypatch):
    path = small(tmp_path, tiny_dir)  # its output directory: "elsewhere"
    other = big(tmp_path, tiny_dir)
    out = tmp_path / "elsewhere"
    assert main(["run", str(other), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["view", str(path), "--no-open"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not of this spec" in err
