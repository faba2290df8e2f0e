"""Shared test fixtures."""

from pathlib import Path

import pytest

# Vendored in the repository (tests/data/gpt2-tokenizer/README.md: source, licence, checksums): the tests
# read nothing outside it.
GPT2_TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "gpt2-tokenizer"


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """GPT-2's real tokenizer, built offline from tests/data/gpt2-tokenizer (vocab.json + merges.txt)."""
    from transformers import GPT2TokenizerFast

    # from_pretrained on the folder: with transformers 5, GPT2TokenizerFast(vocab_file=..., merges_file=...)
    # silently builds an empty vocabulary.
    tokenizer = GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER_DIR)
    ids = tokenizer("When Mary and John went to the store, John gave a drink to", add_special_tokens=False)
    assert ids["input_ids"] == [2215, 5335, 290, 1757, 1816, 284, 262, 3650, 11, 1757, 2921, 257, 4144, 284]
    return tokenizer
