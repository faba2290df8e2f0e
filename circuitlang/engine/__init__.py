"""The engine: model access, Omega and its slices, decomposition, tracing. It never prints."""
