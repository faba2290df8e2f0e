"""Fuzzing `circ check`: whatever a spec or a prompt file holds, the answer is exit code 0 or 2, never a traceback.

Three sources of input, each run in-process through `circuitlang.cli.main(["check", path])`:
specs built from the grammar's own tokens, the shipped specs mutated byte by byte (insert, delete, swap,
truncate, random bytes), and prompt files (the worked example mutated, and JSON lines generated from the
format's fields). tests/test_lang.py's mutation test covers parse_text and the round trip of what compiles;
this one covers what the command does with a file. Each failure found becomes a regular test (test_lang.py's
BAD, test_data.py's prompt-file cases). Budget: well under a minute on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitlang.cli import main
from circuitlang.data.prompts import PromptFileError, read_prompt_file
from circuitlang.lang.parser import _LITERALS

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.relative_to(REPO / "specs") for p in (REPO / "specs").rglob("*") if p.suffix in (".circ", ".jsonl"))
# CIRCUITLANG_FUZZ_EXAMPLES=5000 for a deeper search than CI's
FUZZ = settings(max_examples=int(os.environ.get("CIRCUITLANG_FUZZ_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of specs/, so that mutants sit where the originals do and their `extends` and files resolve."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(REPO / "specs", root / "specs")
    return root


def check(path: Path) -> int:
    code = main(["check", str(path)])
    assert code in (0, 2), code
    return code


# --- specs from the grammar's tokens ----------------------------------------------------------------------

KEYWORDS = sorted(set(_LITERALS.values()))
TOKENS = st.one_of(
    st.sampled_from(KEYWORDS),
    st.sampled_from(["9.9", "0.5", "1", "0", "12.0", "99999999999999999999", "3", "1.5", "0.00001"]),  # DECIMAL, INT
    st.sampled_from(["IO", "S1", "end", "end-1", "IO+1", "gpt2", "gemma-3-270m", "gemma-3-27m", "my/model", "runs/x",
                     "json", "svg", "html", "ioi", "cuda:0", "float16", "./local", "_x", "\u0430"]),  # WORD-like
    st.sampled_from(['"runs/out"', '"../ioi.circ"', '"ioi.circ"', '"my-task.jsonl"', '"examples/my-task.jsonl"',
                     '"nope.jsonl"', '"', '""']),  # STRING-like, some resolving in the copied specs/
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=3),
)
LINE = st.lists(TOKENS, min_size=1, max_size=8).map(" ".join)
SPEC = st.lists(st.one_of(LINE, st.just(""), st.just("# a comment"), st.just("}")), min_size=1, max_size=12).map("\n".join)


@FUZZ
@given(text=SPEC)
def test_specs_from_the_grammars_tokens(tree, text):
    path = tree / "specs" / "grammar-fuzz.circ"
    path.write_text(text, encoding="utf-8")
    check(path)


# --- the shipped specs, mutated byte by byte --------------------------------------------------------------


@st.composite
def mutant(draw, originals: list[Path]):
    source = draw(st.sampled_from(originals))
    data = bytearray((REPO / "specs" / source).read_bytes())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["insert", "delete", "swap", "truncate", "random"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "insert":
            data[i:i] = draw(st.one_of(st.binary(min_size=1, max_size=8),
                                       st.sampled_from(KEYWORDS).map(lambda w: f" {w} ".encode())))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "swap":  # two lines change places
            lines = bytes(data).split(b"\n")
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[a], lines[b] = lines[b], lines[a]
            data = bytearray(b"\n".join(lines))
        elif op == "truncate":
            del data[i:]
        else:
            data[i:i + 1] = draw(st.binary(min_size=1, max_size=1))
    return source, bytes(data)


@FUZZ
@given(case=mutant([p for p in SHIPPED if p.suffix == ".circ"]))
def test_mutated_shipped_specs(tree, case):
    source, data = case
    path = tree / "specs" / source.parent / f"mutant-{source.name}"
    path.write_bytes(data)
    check(path)


# --- prompt files ------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True), st.text(max_size=8),
              st.sampled_from(["Alice", "to", " Paris", "Paris", "Rome"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["word", "occurrence", "x"]), inner,
                                                                        max_size=2)),
    max_leaves=6,
)
RECORD = st.fixed_dictionaries({}, optional={
    "text": st.one_of(st.just("Alice lives in Paris and Bob lives in Rome. Alice takes the train home to"), JSON_VALUES),
    "roles": st.one_of(st.dictionaries(st.sampled_from(["person", "city", "end", "my role", "", "x+1", "é"]), JSON_VALUES,
                                       max_size=3), JSON_VALUES),
    "target": JSON_VALUES,
    "distractor": JSON_VALUES,
    "txt": JSON_VALUES,
})


@st.composite
def prompt_file(draw) -> bytes:
    if draw(st.booleans()):  # the worked example, mutated
        _, data = draw(mutant([Path("examples/my-task.jsonl")]))
        return data
    lines = draw(st.lists(st.one_of(st.tuples(RECORD, st.booleans()).map(lambda r: json.dumps(r[0], ensure_ascii=r[1])),
                                    st.sampled_from(["", "# comment", "[", "{}", "null", "\ufeff{}", "{\"text\": \"a\"}"])),
                          min_size=0, max_size=5))
    return "\n".join(lines).encode("utf-8")


@FUZZ
@given(data=prompt_file())
def test_prompt_files(tree, data):
    path = tree / "specs" / "examples" / "my-task.jsonl"
    path.write_bytes(data)
    try:
        read_prompt_file(path)
    except PromptFileError as e:
        assert len(str(e).splitlines()) == 1 and str(e).startswith(str(path))
    check(tree / "specs" / "examples" / "file-prompts.circ")


# --- environment variables ------------------------------------------------------------------------------

ENV_TEXT = st.one_of(
    st.sampled_from(["", "0", "-1", "abc", "nan", "inf", "1e308", "0.5", "1", "64", " 12 ", "1_0", "0x10", "file", "dir/sub"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6),
)


class _ModelWouldLoad(Exception):
    pass


@FUZZ
@given(budget=st.none() | ENV_TEXT, cache=st.none() | ENV_TEXT)
def test_environment_variables(tree, monkeypatch, capsys, budget, cache):
    """`circ run` with any $CIRCUITLANG_CHUNK_MB and $CIRCUITLANG_CACHE: one line and exit 2 before the model
    loads, or values the run can use (the chunk budget a whole number of bytes, the cache root a path)."""
    import circuitlang.runner.execute as execute
    from circuitlang.cachefiles import cache_root
    from circuitlang.runner.chunks import default_budget

    (tree / "file").write_text("not a directory")

    def reached(*args, **kwargs):
        assert default_budget() >= 2**20 and cache_root()
        raise _ModelWouldLoad

    monkeypatch.chdir(tree)
    for name, value in (("CIRCUITLANG_CHUNK_MB", budget), ("CIRCUITLANG_CACHE", cache)):
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    monkeypatch.setattr(execute, "run_plan", reached)
    monkeypatch.setattr(execute.rc, "model_identity", lambda *a, **k: None)
    try:
        code = main(["run", str(tree / "specs" / "ioi.circ"), "--quiet", "--out", str(tree / "out")])
    except _ModelWouldLoad:
        capsys.readouterr()
        return
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "$CIRCUITLANG_" in err, (code, err)
