"""Prompt chunks on Ray workers: the same roots, trace and intervention numbers as one process, also when a
worker dies mid-run; a chunk that fails every attempt ends `circ run` with one line and no output; so does a
cluster that does not answer (a missing Ray: tests/test_runner.py)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from circuitlang.cli import main
from circuitlang.lang import parse_text
from circuitlang.runner import distributed
from circuitlang.runner.distributed import ChunkWorker, Cluster
from circuitlang.runner.execute import run_plan
import test_runner
from test_runner import SPEC, assert_same_trace

ray = pytest.importorskip("ray", reason='the Ray tests need the extra: pip install "circuitlang[ray]"')

tiny, private_cache = test_runner.tiny, test_runner.private_cache  # the runner's tiny model and private cache

CHUNK = 7  # 20 prompts: chunks 0-6, 7-13, 14-19


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             _system_config={"worker_niceness": os.nice(0)})  # as `circ run --ray` starts one
    # The workers below are defined here: Ray's workers cannot import this test module, so send them whole.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def plan_for(tiny, roots="auto 2", interventions=True):
    text = SPEC.format(model=tiny[0], roots=roots)
    return parse_text(text if interventions else text[: text.index("intervene")])


class DiesOnce(ChunkWorker):
    """Exits on its first chunk of the trace, once in the whole run (the marker file outlives the worker)."""

    marker = ""

    def trace(self, start, stop, roots):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return super().trace(start, stop, roots)


class AlwaysDies:
    """A worker that exits on every chunk (and loads nothing: Ray restarts it at once, each time)."""

    def __init__(self, *args):
        pass

    def evidence(self, *args):
        os._exit(1)


def test_ray_gives_one_process_roots_trace_and_interventions_even_when_a_worker_dies(local_ray, tiny, tmp_path, monkeypatch):
    plan = plan_for(tiny)
    whole = run_plan(plan, model=tiny[1], chunk=CHUNK)
    monkeypatch.setattr(DiesOnce, "marker", str(tmp_path / "died"))
    monkeypatch.setattr(distributed, "ChunkWorker", DiesOnce)
    on_ray = run_plan(plan, model=tiny[1], chunk=CHUNK, cluster=Cluster(workers=2))
    assert (tmp_path / "died").exists()  # a worker did die mid-run, and Ray ran its chunk again
    assert on_ray.roots == whole.roots and len(whole.roots) == 2
    assert [(c.root, c.fired) for c in on_ray.auto_roots] == [(c.root, c.fired) for c in whole.auto_roots]
    assert [c.direct_effect for c in on_ray.auto_roots] == [c.direct_effect for c in whole.auto_roots]
    assert_same_trace(on_ray.trace, whole.trace)
    assert on_ray.logit_diff == whole.logit_diff
    a, b = on_ray.interventions.rows, whole.interventions.rows
    assert len(a) == len(b) > 0 and a.prompt.tolist() == b.prompt.tolist() and a.set.tolist() == b.set.tolist()
    for f in ("f_after", "score_after", "cosine", "norm_ratio", "delta_f"):
        assert np.array_equal(getattr(a, f), getattr(b, f), equal_nan=True), f


BYTES_SPEC = SPEC + """evaluate faithfulness against abc sizes 2, 5 rank influence random 2
output "{out}" json
"""


@pytest.fixture(scope="module", params=["gpt2", "gemma3"])
def byte_model(request, tiny, tmp_path_factory, gpt2_tokenizer):
    """The runner's tiny GPT-2, and a tiny Gemma 3 (rotary: Omega's cores per offset, the case that differed)."""
    if request.param == "gpt2":
        return tiny[0]
    from tiny_models import build_rotary

    return build_rotary(tmp_path_factory.mktemp("gemma3"), gpt2_tokenizer, "gemma3", seed=3)


def test_every_executor_and_chunk_size_writes_the_same_bytes(local_ray, byte_model, tmp_path):
    """Issue 22: one process, chunks of 1 and 7 prompts, and 2 Ray workers (chunks of 7, and one chunk each)
    write byte-identical trace.json, interventions.json and faithfulness.json: every floating reduction over
    events sums in an order that does not depend on which prompts share a chunk, a batch or a worker."""
    out = tmp_path / "out"
    spec = tmp_path / "tiny.circ"
    spec.write_text(BYTES_SPEC.format(model=byte_model, roots="auto 2", out=out))
    names = ("trace.json", "interventions.json", "faithfulness.json")
    written = {}
    for how in ([], ["--chunk", "1"], ["--chunk", str(CHUNK)], ["--ray", "--chunk", str(CHUNK)], ["--ray", "--chunk", "3"]):
        assert main(["run", str(spec), "--quiet", "--no-cache", *how]) == 0
        written[" ".join(how) or "one process"] = [(out / name).read_bytes() for name in names]
    first = written.pop("one process")
    assert all(len(b) > 0 for b in first)
    for how, files in written.items():
        for name, a, b in zip(names, first, files):
            assert a == b, f"{name}: `{how}` differs from one process"


def test_a_chunk_that_always_fails_ends_the_run_with_one_line_and_no_output(local_ray, tiny, tmp_path, monkeypatch, capsys):
    spec = tmp_path / "tiny.circ"
    spec.write_text(SPEC.format(model=tiny[0], roots="auto 2"))
    monkeypatch.setattr(distributed, "ChunkWorker", AlwaysDies)
    out = tmp_path / "out"
    code = main(["run", str(spec), "--ray", "--quiet", "--no-cache", "--chunk", str(CHUNK), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and not out.exists()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "roots: chunk" in err and "failed 3 times on the Ray workers" in err, err


def test_a_cluster_that_does_not_answer_is_one_line_at_once(tiny, tmp_path, monkeypatch, capsys):
    spec = tmp_path / "tiny.circ"
    spec.write_text(SPEC.format(model=tiny[0], roots="auto 2"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a fresh `circ run` process
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not be asked to connect"))
    code = main(["run", str(spec), "--ray", "127.0.0.1:1", "--quiet", "--no-cache", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and not (tmp_path / "out").exists()
    assert len(err.splitlines()) == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in err, err


def test_workers_at_a_lower_priority_are_said_once_the_model_is_loaded(local_ray, tiny, monkeypatch):
    """Issue 26, item 7: workers nicer than this process (a cluster started with Ray's default, niceness 15) are
    said; here this process pretends to run at -5, the workers at its real niceness."""
    from circuitlang.runner.distributed import RayChunks, RayWarning

    real = os.nice(0)
    monkeypatch.setattr(os, "nice", lambda increment: -5)
    with pytest.warns(RayWarning, match=rf"niceness {real}, this process at -5: .*RAY_worker_niceness=-5"):
        with RayChunks(Cluster(workers=1), plan_for(tiny, interventions=False), None, None, {}):
            pass
