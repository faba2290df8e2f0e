"""circuitlang: a declarative language and runner for Singular Vector Tracing of attention circuits."""
