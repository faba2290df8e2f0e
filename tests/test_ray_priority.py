"""`circ run --ray` with no cluster starts a local Ray instance whose workers run at this process's priority:
Ray's default, niceness 15, left each about 1% of a core beside other work (issue 26, item 7). A module of its
own: it needs Ray not yet started, which tests/test_ray.py's instance is for the whole of that module."""

from __future__ import annotations

import os

import pytest

import test_runner
from circuitlang.runner.distributed import Cluster, RayChunks, RayWarning
from test_ray import plan_for

ray = pytest.importorskip("ray", reason='the Ray tests need the extra: pip install "circuitlang[ray]"')

tiny, private_cache = test_runner.tiny, test_runner.private_cache


def test_a_local_instance_runs_its_workers_at_the_drivers_priority(tiny, recwarn):
    assert not ray.is_initialized()
    stages = []
    with RayChunks(Cluster(workers=1), plan_for(tiny, interventions=False), None, lambda *a: stages.append(a), {}) as chunks:
        assert ray.get(chunks.actors[0].__ray_call__.remote(lambda _: os.nice(0))) == os.nice(0)
    assert not ray.is_initialized()  # the instance it started is stopped with it
    assert not [w for w in recwarn if issubclass(w.category, RayWarning)]
    assert stages[0] == ("workers loaded", 0, 1) and stages[-1] == ("workers loaded", 1, 1)  # on screen while loading
