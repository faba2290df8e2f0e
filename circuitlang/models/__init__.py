"""Model access: loading (hub names, local directories, the embedded model), the processed-weights cache, and
what each model family is: how its attention reads in the paper's coordinates (`geometry.AttentionGeometry`).
Everything family-specific lives here; the engine asks for a geometry and never branches on a family."""
