"""The engine: Omega and its slices, decomposition, tracing, interventions, evaluation. It never prints and
never branches on a model family (circuitlang/models says what a family is)."""
