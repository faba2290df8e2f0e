"""circuitlang: a declarative language and runner for Singular Vector Tracing of attention circuits.

    import circuitlang as cl
    model = cl.load_model("gpt2")
    prompts = cl.ioi_prompts(model.tokenizer, n=256, prepend_bos=model.prepend_bos)
    t = cl.trace(model, prompts, ["9.9 end->IO", "9.6 end->IO", "10.0 end->IO"])
"""

from circuitlang.data.ioi import ioi_prompts
from circuitlang.data.prompts import load_prompt_file
from circuitlang.engine.model import load_model
from circuitlang.engine.trace import trace

__all__ = ["ioi_prompts", "load_prompt_file", "load_model", "trace"]
