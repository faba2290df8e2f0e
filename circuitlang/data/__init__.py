"""Prompt data: the IOI prompt set of Wang et al. (2023) and user prompt files. Pure Python (no torch)."""

from circuitlang.data.ioi import IOI_ROLES, ioi_prompts, known_heads
from circuitlang.data.prompts import (
    MAX_PROMPTS,
    DataError,
    Prompt,
    PromptFileError,
    PromptSet,
    load_prompt_file,
    read_prompt_file,
)

__all__ = ["DataError", "IOI_ROLES", "MAX_PROMPTS", "Prompt", "PromptFileError", "PromptSet", "ioi_prompts", "known_heads",
           "load_prompt_file", "read_prompt_file"]
