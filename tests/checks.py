"""Helpers shared by the engine's tests: roots that surely fire, and the completeness check."""

from __future__ import annotations

import numpy as np

from circuitlang.models.geometry import attention_geometry
from circuitlang.engine.trace import writer_contributions
from circuitlang.conformance import busiest_roots  # noqa: F401 - the tests' roots that surely fire


def assert_writers_complete(model, acts, events, rtol=1e-4) -> None:
    """Every residual writer's eq. (8) contribution sums to each traced event's signal, on both sides,
    and the signals are positive (every slice term in S_ij is, by the sign convention)."""
    geometry = attention_geometry(model)
    for side, signal in (("d", events.signal_dest), ("s", events.signal_src)):
        parts = writer_contributions(acts, geometry, events, side)
        total = np.sum(list(parts.values()), axis=0)
        np.testing.assert_allclose(total, signal, rtol=rtol, atol=rtol * np.abs(signal).max())
        assert (signal > 0).all()


def positions_run(monkeypatch) -> list[tuple[int, int, bool]]:
    """Spy on the engine's passes: each call appends (rows, positions run, resumed after a cached prefix)."""
    from circuitlang.engine import forward

    calls: list[tuple[int, int, bool]] = []
    real = forward.run_to_final_norm

    def spy(model, tokens, hooks=(), *, start=0, resid=None, cache=None):
        ran = tokens if start == 0 else resid
        calls.append((ran.shape[0], ran.shape[1], cache is not None))
        return real(model, tokens, hooks, start=start, resid=resid, cache=cache)

    monkeypatch.setattr(forward, "run_to_final_norm", spy)
    return calls
