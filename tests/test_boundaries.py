"""Boundaries a user hits before or after the work: output paths, hub names, arguments, progress rows."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

from circuitlang.cli import _Bars, main
from circuitlang.report.outdir import OutputDirError, check_writable
from tiny_models import build_gpt2


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITLANG_CACHE", str(tmp_path / "cache"))


def missing_model_spec(tmp_path: Path) -> Path:
    """A spec whose model can't load: had the output path been checked after loading, the error would be the
    model's (exit 1), not the output's (exit 2)."""
    path = tmp_path / "s.circ"
    path.write_text(f'model "{tmp_path / "no-such-model"}"\nprompts ioi 4\ntrace from auto 1\n')
    return path


# --- Output directories, checked before the model loads ---------------------------------------------------


def test_check_writable_accepts_new_and_existing_directories_and_leaves_nothing(tmp_path):
    check_writable(tmp_path)
    check_writable(tmp_path / "a" / "b")
    assert sorted(tmp_path.iterdir()) == []


def test_check_writable_names_the_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirError, match=rf"^cannot write to {tmp_path}/f: {tmp_path}/f is a file$"):
        check_writable(tmp_path / "f")
    with pytest.raises(OutputDirError, match=rf"^cannot write to {tmp_path}/f/sub/x: {tmp_path}/f is a file, so no "
                                             "directory can be made under it$"):
        check_writable(tmp_path / "f" / "sub" / "x")


def test_check_writable_reports_a_refused_write(tmp_path, monkeypatch):
    """What a read-only directory or mount does (root included): the trial write fails."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(OutputDirError, match=f"^cannot write to {tmp_path}: permission denied$"):
        check_writable(tmp_path)
    with pytest.raises(OutputDirError, match=f"^cannot write to {tmp_path}/x: can't create it in {tmp_path}: permission denied$"):
        check_writable(tmp_path / "x")


@pytest.mark.parametrize("out", ["file", "file/under"])
def test_run_refuses_an_unusable_out_before_loading_the_model(tmp_path, capsys, out):
    (tmp_path / "file").write_text("x")
    assert main(["run", str(missing_model_spec(tmp_path)), "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write to {tmp_path / out}: {tmp_path / 'file'} is a file") and len(err.splitlines()) == 1


def test_run_refuses_an_unusable_spec_output(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    path = missing_model_spec(tmp_path)
    path.write_text(path.read_text() + f'output "{tmp_path / "file"}" json\n')
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot write to {tmp_path / 'file'}: ")


@pytest.mark.parametrize("name, value", [("CIRCUITLANG_CHUNK_MB", "abc"), ("CIRCUITLANG_CHUNK_MB", "0"),
                                         ("CIRCUITLANG_CHUNK_MB", "-1"), ("CIRCUITLANG_CACHE", "file")])
def test_environment_variables_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, name, value):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv(name, str(tmp_path / value) if value == "file" else value)
    assert main(["run", str(missing_model_spec(tmp_path)), "--out", str(tmp_path / "out")]) == 2  # not the model's 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: ${name}=") and len(err.splitlines()) == 1


def test_diff_refuses_an_unusable_out_before_reading_its_inputs(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot write to {tmp_path / 'file'}: {tmp_path / 'file'} is a file"


@pytest.mark.parametrize("value", ["0", "-5", "x"])
def test_diff_min_count_below_one_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["diff", "a.json", "b.json", f"--min-count={value}"])
    assert e.value.code == 2
    assert f"argument --min-count: must be a whole number of at least 1, got '{value}'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, gpt2_tokenizer):
    return build_gpt2(tmp_path_factory.mktemp("tiny-boundaries"), gpt2_tokenizer, n_layer=2, n_head=2, n_embd=32, seed=4)


def test_a_failed_write_at_the_end_is_one_line_and_the_rerun_reuses_the_trace(tmp_path, tiny_dir, capsys, monkeypatch):
    import circuitlang.cli as cli

    path = tmp_path / "s.circ"
    path.write_text(f'model "{tiny_dir}"\nprompts ioi 4\ntrace from auto 1\nfiring attention > 0.2\noutput out json\n')

    def disk_full(plan, result, out):
        (out / "trace.json").write_text("half")
        raise OSError(28, "No space left on device", str(tmp_path / "full" / "trace.json"))

    with monkeypatch.context() as m:
        m.setattr(cli, "_write_files", disk_full)
        assert main(["run", str(path), "--out", str(tmp_path / "full"), "--quiet"]) == 1
    assert not (tmp_path / "full").exists()  # nothing of the failed write is left, not even the directory it made
    err = capsys.readouterr().err.strip()
    assert err == (f"error: could not write the results to {tmp_path / 'full'}: No space left on device "
                   f"({tmp_path / 'full' / 'trace.json'}); the trace is in the run cache, so `circ run {path} --out DIR` "
                   "with a writable DIR reuses it at once")
    assert main(["run", str(path), "--out", str(tmp_path / "good"), "--quiet"]) == 0
    assert "reusing cached trace" in capsys.readouterr().err and (tmp_path / "good" / "trace.json").is_file()


# --- Hub names: fail fast when the hub can't be asked ------------------------------------------------------

NOT_CACHED = "circuitlang-test/no-such-model"


def no_boot(monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    def boot(*args, **kwargs):
        raise AssertionError("the model was booted: the hub would be retried for over a minute")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", boot)


def test_offline_mode_fails_at_once_for_a_name_not_in_the_cache(monkeypatch):
    from circuitlang.models import model as model_module
    from circuitlang.models.model import ModelLoadError, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(model_module, "_hub_reachable", lambda *a: pytest.fail("offline mode: no probe"))
    no_boot(monkeypatch)
    with pytest.raises(ModelLoadError, match=rf"^model '{NOT_CACHED}' is not in the local Hugging Face cache and offline "
                                             r"mode is set \(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE\); download it"):
        load_model(NOT_CACHED)


def test_an_unreachable_hub_fails_at_once_with_did_you_mean(monkeypatch):
    from circuitlang.models import model as model_module
    from circuitlang.models.model import ModelLoadError, load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(model_module, "_hub_reachable", lambda *a: False)
    no_boot(monkeypatch)
    with pytest.raises(ModelLoadError, match=r"^model 'gemma-3-27m' is not in the local Hugging Face cache and the hub "
                                             r"\(https?://.*\) cannot be reached; .*; did you mean \"gemma-3-270m\"\?$"):
        load_model("gemma-3-27m")
    with pytest.raises(ModelLoadError, match=r"neither a local directory nor a valid Hugging Face hub name.*; did you mean "
                                             r"\"gemma-3-270m\"\?$"):
        load_model("gemm\u0430-3-270m")  # a Cyrillic a


def test_a_cached_model_loads_offline_when_the_hub_is_unreachable(monkeypatch):
    from huggingface_hub import constants
    from transformer_lens.model_bridge import TransformerBridge

    from circuitlang.models import model as model_module
    from circuitlang.models.model import ModelLoadError, load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(model_module, "_hub_reachable", lambda *a: False)
    monkeypatch.setattr(model_module, "_in_hub_cache", lambda name: True)
    seen = []

    def boot(*args, **kwargs):
        seen.append((constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")))
        raise OSError("stop here")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", boot)
    offline_before = constants.HF_HUB_OFFLINE
    with pytest.raises(ModelLoadError, match="could not be loaded from the Hugging Face hub \\(stop here\\)"):
        load_model(NOT_CACHED)
    assert seen == [(True, "1")] and constants.HF_HUB_OFFLINE == offline_before and "HF_HUB_OFFLINE" not in os.environ


def test_a_name_not_in_the_cache_fails_in_seconds_here(monkeypatch):
    """The real probe: on a machine without the hub it answers in at most HUB_PROBE_TIMEOUT_S; with one, the hub
    answers 404 at once. Either way, not the minute and more of retries."""
    from circuitlang.models.model import ModelLoadError, load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=NOT_CACHED):
        load_model(NOT_CACHED)
    assert time.perf_counter() - start < 30


# --- Progress rows ------------------------------------------------------------------------------------------


def test_model_build_rows_show_done_when_the_next_stage_starts():
    progress = Progress(console=Console(file=io.StringIO()), auto_refresh=False)
    bars = _Bars(progress)
    for stage in ("model: assembling", "model: dequantizing", "model: saving"):
        bars(stage, 0, 1)
    bars("forward", 0, 4)
    rows = {t.description: t for t in progress.tasks}
    assert all(rows[s].finished for s in ("model: assembling", "model: dequantizing", "model: saving"))
    assert not rows["forward"].finished
    assert all(rows[s].finished_time is not None for s in ("model: assembling", "model: saving"))  # the clock stops


def test_run_checks_the_prompt_file_before_loading_the_model(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    path = missing_model_spec(tmp_path)
    path.write_text(path.read_text().replace("prompts ioi 4", 'prompts file "p.jsonl"'))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2  # the model's error would be exit 1
    assert capsys.readouterr().err.strip() == f"error {tmp_path / 'p.jsonl'}:1:14: not UTF-8 text (byte 0xe9); save the file as UTF-8"


def test_a_prompt_files_token_error_is_one_located_line_and_exit_2(tmp_path, tiny_dir, capsys, monkeypatch):
    """Known only once the tokenizer is loaded, yet a mistake in the input: file:line:column relative to where
    `circ` runs, one location, exit 2 (it was `error SPEC: /abs/cf-len.jsonl:2: ...`, exit 1)."""
    good = {"text": "Alice met Bob and Bob thanked", "target": " Alice", "distractor": " Bob",
            "counterfactual": "Alice met Bob and Carl thanked", "roles": {"end": 5}}
    bad = {**good, "counterfactual": "Alice met Bob and Carl Smith thanked"}
    (tmp_path / "cf-len.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    (tmp_path / "s.circ").write_text(f'model "{tiny_dir}"\nprompts file "cf-len.jsonl"\ntrace from 1.0 end->end\n'
                                     "evaluate faithfulness against file\n")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "s.circ", "--quiet", "--no-cache", "--out", "out"]) == 2
    err = capsys.readouterr().err.strip()
    column = json.dumps(bad).index('"counterfactual"') + 1
    assert err == (f"error cf-len.jsonl:2:{column}: counterfactual has 7 tokens and the text 6; they must align token by "
                   "token (change words for words of as many tokens)")


def test_a_circuit_size_past_the_models_heads_points_at_the_number(tmp_path, tiny_dir, capsys):
    path = tmp_path / "s.circ"
    path.write_text(f'model "{tiny_dir}"\nprompts ioi 4\ntrace from auto 1\nevaluate faithfulness against abc sizes 2, 73, 3\n')
    assert main(["run", str(path), "--quiet", "--no-cache", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error {path}:4:44: evaluate: circuit size 73 is more than the 4 heads") and len(err.splitlines()) == 1


def test_a_cache_that_cannot_be_written_is_said_once(tmp_path, tiny_dir, capsys, monkeypatch):
    """Issue 26, item 12: a run against a read-only cache succeeds and says, once, that nothing was stored."""
    import circuitlang.cachefiles as cachefiles

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(cachefiles, "atomic_write", read_only)  # every cache file is written through these two
    monkeypatch.setattr(cachefiles, "atomic_path", read_only)
    path = tmp_path / "s.circ"
    path.write_text(f'model "{tiny_dir}"\nprompts ioi 4\ntrace from auto 1\nfiring attention > 0.2\noutput out json\n')
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning could not write to the cache {tmp_path / 'cache'} (read-only file system); this run's results "
                   "are not stored there, so later runs compute them again"]
    assert (tmp_path / "out" / "trace.json").is_file()
