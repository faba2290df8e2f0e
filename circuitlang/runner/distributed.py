"""Prompt chunks on Ray: the same trace as one process, from workers on a cluster.

Each worker is a Ray actor that loads the model once and does the work of the chunks it is sent, through
the same `ChunkWork` methods as one process; the driver (`RayChunks`) keeps every worker busy with one
chunk at a time, and returns each pass's results in chunk order, so that `run_plan` merges them exactly
as it merges its own. A worker that dies is restarted by Ray and its chunk run again (`max_restarts`,
`max_task_retries`); a chunk that fails `Cluster.attempts` times fails the run with one line. An error
raised by a chunk's own code (a bad root, say) is the error one process would raise, and is raised as is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from circuitlang.cachefiles import caches_on, use_caches
from circuitlang.engine.roots import RootEvidence
from circuitlang.lang.plan import Plan, Root
from circuitlang.runner.chunks import ChunkTrace
from circuitlang.runner.execute import ChunkWork, InterventionJob, Progress, _ticker, resolve_model

INSTALL = 'Ray is not installed: pip install "circuitlang[ray]"'


class RayWarning(UserWarning):
    """Something about the Ray workers that slows the run (the CLI prints it as one line)."""


class DistributedError(RuntimeError):
    """The run could not finish on Ray: no Ray, no cluster, or a chunk that failed every attempt."""


@dataclass(frozen=True)
class Cluster:
    """Where `run_plan` runs its chunks.

    address: an existing cluster's ("ray://host:10001", "host:6379", "auto"); None: the Ray instance this
    process is connected to, else a local one started for the run (and stopped after it). workers: actors
    (default: one per GPU of the cluster when the device is cuda, else one per CPU). attempts: runs of a
    chunk before the run fails (a worker that dies takes its chunk's attempt with it).
    """

    address: str | None = None
    workers: int | None = None
    attempts: int = 3

    def __post_init__(self) -> None:
        _ray()  # a missing Ray is one line before the model loads, not after


class ChunkWorker:
    """A Ray actor: loads the model once, then does the work of the chunks it is sent. caches: whether the
    driver runs inside `use_caches()` (a CLI run): then the worker reads and writes its node's caches too."""

    def __init__(self, plan: Plan, device: str | None, threads: int, caches: bool):
        import torch

        torch.set_num_threads(threads)  # Ray's CPU share, not the whole machine's cores per worker
        self.caches = caches
        with self._caches():
            self.work = ChunkWork.of(plan, resolve_model(plan.model, device))

    def _caches(self) -> contextlib.AbstractContextManager:
        return use_caches() if self.caches else contextlib.nullcontext()

    def evidence(self, start: int, stop: int) -> RootEvidence:
        with self._caches():
            return self.work.evidence(self.work.forward(start, stop), start, stop)

    def trace(self, start: int, stop: int, roots: Sequence[Root]) -> ChunkTrace:
        with self._caches():
            return self.work.trace(self.work.forward(start, stop), start, stop, roots)

    def intervene(self, ids: np.ndarray, job: InterventionJob) -> dict[str, list]:
        with self._caches():
            return self.work.intervene(ids, job)


def _ray():
    try:
        import ray
    except ImportError:
        raise DistributedError(INSTALL) from None
    return ray


class RayChunks:
    """The chunks of a run on Ray workers (the counterpart of execute.LocalChunks), as a context: the workers
    start on entry and are stopped on exit, with the local Ray instance if this started one."""

    def __init__(self, cluster: Cluster, plan: Plan, device: str | None, progress: Progress | None, timings: dict[str, float]):
        self.cluster, self.plan, self.progress, self.timings = cluster, plan, progress, timings
        self.device = device or plan.model.device
        self.ray = _ray()
        self.started = False
        self.actors: list = []

    def __enter__(self) -> RayChunks:
        try:
            return self._start()
        except BaseException:  # no workers, nor a local Ray instance, left behind
            self.__exit__()
            raise

    def _start(self) -> RayChunks:
        ray = self.ray
        if not ray.is_initialized():
            if self.cluster.address:
                _check_reachable(self.cluster.address)
            # A local instance runs its workers at this process's priority; Ray's default, niceness 15, starved
            # them beside other work (each about 1% of a core, still loading the model after 11 minutes).
            local = {} if self.cluster.address else {"_system_config": {"worker_niceness": os.nice(0)}}
            try:
                ray.init(address=self.cluster.address, include_dashboard=False, logging_level=logging.ERROR,
                         log_to_driver=False, **local)
            except Exception as err:  # Ray raises several kinds (ConnectionError, RuntimeError, ValueError)
                where = f"the Ray cluster at {self.cluster.address}" if self.cluster.address else "a local Ray instance"
                raise DistributedError(f"could not start or reach {where}: {_first_line(err)}") from None
            self.started = True
        gpu = self.device.startswith("cuda")
        have = ray.cluster_resources()
        kind = "GPU" if gpu else "CPU"
        if int(have.get(kind, 0)) < 1:
            raise DistributedError(f"the Ray cluster has no {kind} for device {self.device}")
        count = self.cluster.workers or int(have[kind])
        options = {"num_cpus": 1, "num_gpus": 1} if gpu else {"num_cpus": 1}
        # Ray restarts a dead worker (anywhere it has room) and runs its chunk again, `attempts` runs in all.
        actor = ray.remote(max_restarts=-1, max_task_retries=self.cluster.attempts - 1, **options)(ChunkWorker)
        self.actors = [actor.remote(self.plan, self.device, 1, caches_on()) for _ in range(count)]
        t0 = time.perf_counter()
        tick = _ticker(self.progress, "workers loaded", count)  # on screen from the start: 0/N while they load
        tick(0)
        loading = [a.__ray_ready__.remote() for a in self.actors]
        while loading:
            (ref,), loading = ray.wait(loading, num_returns=1)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as err:
                raise DistributedError(f"a Ray worker could not load the model: {_first_line(err)}") from None
            tick(1)
        self.timings["workers"] = time.perf_counter() - t0
        nicest = max(ray.get([a.__ray_call__.remote(lambda _: os.nice(0)) for a in self.actors]))
        if nicest > os.nice(0):
            warnings.warn(RayWarning(f"the Ray workers run at niceness {nicest}, this process at {os.nice(0)}: beside other "
                                     f"work they get a small share of the cores; start the cluster with "
                                     f"RAY_worker_niceness={os.nice(0)} (docs/scaling.md)"), stacklevel=2)
        return self

    def __exit__(self, *exc) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started:
            self.ray.shutdown()

    def evidence(self, bounds: Sequence[tuple[int, int]]) -> list[RootEvidence]:
        return self._map("roots", "evidence", [(start, stop) for start, stop in bounds], bounds)

    def trace(self, bounds: Sequence[tuple[int, int]], roots: Sequence[Root]) -> list[ChunkTrace]:
        roots = self.ray.put(list(roots))
        return self._map("trace", "trace", [(start, stop, roots) for start, stop in bounds], bounds)

    def intervene(self, ids: Sequence[np.ndarray], job: InterventionJob, passes: int) -> list[dict[str, list]]:
        shared = self.ray.put(job)  # sent once, not once per chunk
        return self._map("interventions", "intervene", [(chunk, shared) for chunk in ids],
                         [(int(chunk[0]), int(chunk[-1]) + 1) for chunk in ids])

    def _map(self, stage: str, method: str, calls: list[tuple], spans: Sequence[tuple[int, int]]) -> list:
        """calls[k] on the workers, one chunk per worker at a time; the results in the order of calls."""
        ray = self.ray
        t0 = time.perf_counter()
        tick = _ticker(self.progress, f"{stage} (chunks)", len(calls))
        tick(0)
        results: list = [None] * len(calls)
        waiting = list(reversed(range(len(calls))))
        idle = list(self.actors)
        running: dict = {}  # a failure leaves the other chunks running: __exit__ stops their workers
        while waiting or running:
            while idle and waiting:
                k, actor = waiting.pop(), idle.pop()
                running[getattr(actor, method).remote(*calls[k])] = (k, actor)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            k, actor = running.pop(ref)
            try:
                results[k] = ray.get(ref)
            except ray.exceptions.RayTaskError as err:  # the chunk's own code raised: as one process would
                raise (err.cause if isinstance(err.cause, Exception) else err) from None
            except ray.exceptions.RayError as err:
                start, stop = spans[k]
                raise DistributedError(f"{stage}: chunk {k + 1} of {len(calls)} (prompts {start}-{stop - 1}) failed "
                                       f"{self.cluster.attempts} times on the Ray workers; the last time: "
                                       f"{_first_line(err)}") from None
            idle.append(actor)
            tick(1)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0
        return results


def _check_reachable(address: str) -> None:
    """Ray retries an address that does not answer for minutes, logging every try: say so at once, in one line."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():  # "auto", or a form only Ray resolves
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise DistributedError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__

