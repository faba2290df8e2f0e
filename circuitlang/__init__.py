"""circuitlang: a declarative language and runner for Singular Vector Tracing of attention circuits.

    import circuitlang as cl
    model = cl.load_model("gpt2")
    prompts = cl.ioi_prompts(model.tokenizer, n=256, prepend_bos=model.prepend_bos)
    t = cl.trace(model, prompts, ["9.9 end->IO", "9.6 end->IO", "10.0 end->IO"])

The names below load lazily, so that the language and the data packages never import torch.
"""

from importlib import import_module

_API = {
    "ioi_prompts": "circuitlang.data.ioi",
    "load_prompt_file": "circuitlang.data.prompts",
    "load_model": "circuitlang.models.model",
    "trace": "circuitlang.engine.trace",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'circuitlang' has no attribute {name!r}")
