"""The .circ language: every statement, extends, errors (verbatim), robustness, the shipped specs."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitlang.lang import SpecError, check_against_model, format_plan, parse_spec, parse_text
from circuitlang.lang.plan import (
    PAPER_ROOTS,
    AutoRoots,
    EdgeSelector,
    Evaluation,
    FilePrompts,
    InterventionSet,
    IOIPrompts,
    ModelSpec,
    Output,
    Plan,
    READING_SETS,
    Root,
    RootSet,
    SliceRule,
    parse_root,
)

TESTS = Path(__file__).parent
REPO = TESTS.parent


@pytest.fixture(autouse=True)
def in_tests_dir(monkeypatch):
    """Spec paths in messages are relative to here: `specs/base.circ`."""
    monkeypatch.chdir(TESTS)


def unlined(plan: Plan) -> Plan:
    """The plan without its intervene blocks' line numbers (they move when a plan is re-rendered)."""
    return dataclasses.replace(
        plan, interventions=tuple(dataclasses.replace(s, line=0) for s in plan.interventions))


# every statement

FULL = """\
# every statement once
model   openai-community/gpt2 dtype bfloat16 device cuda:0
prompts ioi 128 BABA seed 7
trace   from 9.9 end->IO, 9.6 end-1->S1+1
firing  attention > 0.4
slices  top 3
keep    mass 0.9
show    edges in >= 170 prompts
compare heads 9.9, 10.07
output  runs/full dot svg dot
seed    11

intervene "every selector" {   # a comment inside a block
  edge 8.6 -> 9.9 at S2 s
  edges into 9.6 at end
  edges into root 2 d
  edges from 0.1

  top 10 edges
  boost local against random
}
"""


def test_every_statement():
    plan = parse_text(FULL, "full.circ")
    assert plan.model == ModelSpec("openai-community/gpt2", device="cuda:0", dtype="bfloat16")
    assert plan.prompts == IOIPrompts(128, "BABA", 7)
    assert plan.roots == (Root(9, 9, "end", "IO"), Root(9, 6, "end-1", "S1+1"))
    assert plan.threshold == 0.4
    assert plan.slices == SliceRule("top", 3)
    assert plan.mass == 0.9
    assert plan.show_min_count == 170
    assert plan.compare == ("9.9", "10.7")
    assert plan.output == Output("runs/full", ("dot", "svg"))
    assert plan.seed == 11
    assert plan.sources == ("full.circ",)
    assert plan.interventions == (InterventionSet(
        "every selector",
        (
            EdgeSelector("edge", up=(8, 6), down=(9, 9), role="S2", side="s"),
            EdgeSelector("into", down=(9, 6), role="end"),
            EdgeSelector("into", down=(9, 6), root=2, side="d"),
            EdgeSelector("from", up=(0, 1)),
            EdgeSelector("top", k=10),
        ),
        actions=("boost",),
        places=("local",),
        random_control=True,
        line=13,
    ),)


def test_an_empty_spec_is_the_papers_defaults():
    assert parse_text("# nothing but a comment\n") == Plan()
    plan = Plan()
    assert (plan.threshold, plan.slices, plan.mass) == (0.5, SliceRule("paper"), 0.7)
    assert plan.prompts == IOIPrompts(256, "mixed", 0)


@pytest.mark.parametrize("text, model", [
    ("model gpt2", ModelSpec("gpt2")),
    ("model gemma-3-270m device mps", ModelSpec("gemma-3-270m", device="mps")),
    ('model "/models/my gpt" dtype float16', ModelSpec("/models/my gpt", dtype="float16")),
    ("model EleutherAI/pythia-70m device cuda", ModelSpec("EleutherAI/pythia-70m", device="cuda")),
])
def test_model(text, model):
    assert parse_text(text).model == model


@pytest.mark.parametrize("text, prompts", [
    ("prompts ioi", IOIPrompts()),
    ("prompts ioi 32", IOIPrompts(32)),
    ("prompts ioi ABBA", IOIPrompts(kind="ABBA")),
    ("prompts ioi seed 5", IOIPrompts(seed=5)),
    ("prompts ioi 8 mixed seed 1", IOIPrompts(8, "mixed", 1)),
])
def test_ioi_prompts(text, prompts):
    assert parse_text(text).prompts == prompts


def test_prompts_file_is_relative_to_the_spec_and_allows_the_files_roles():
    plan = parse_spec("specs/file-prompts.circ")
    assert plan.prompts == FilePrompts(str(TESTS / "specs" / "tiny.jsonl"))
    assert plan.roots == (Root(3, 1, "end", "giver"),)


@pytest.mark.parametrize("text, roots", [
    ("trace from auto", AutoRoots(3)),
    ("trace from auto 5", AutoRoots(5)),
    ("trace from 9.9 end->IO, 9.6 end->IO, 10.0 end->IO", PAPER_ROOTS),
    ("trace from 5.5 S2 -> S1+1", (Root(5, 5, "S2", "S1+1"),)),
])
def test_trace(text, roots):
    assert parse_text("model gpt2\n" + text).roots == roots


@pytest.mark.parametrize("text, rule", [
    ("slices paper", SliceRule("paper")), ("slices all", SliceRule("all")), ("slices top 1", SliceRule("top", 1)),
])
def test_slices(text, rule):
    assert parse_text(text).slices == rule


def test_compare_and_output():
    assert parse_text("model gpt2\ncompare known ioi").compare == "ioi"
    assert parse_text('output "runs/x"').output == Output("runs/x")  # formats default
    assert parse_text("output ../elsewhere/x png").output == Output("../elsewhere/x", ("png",))


@pytest.mark.parametrize("line, actions, places, random", [
    ("ablate", ("ablate",), ("global", "local"), False),
    ("global", ("ablate", "boost"), ("global",), False),
    ("boost, ablate local", ("ablate", "boost"), ("local",), False),
    ("against random", ("ablate", "boost"), ("global", "local"), True),
    ("ablate, boost  global, local  against random", ("ablate", "boost"), ("global", "local"), True),
])
def test_actions_line(line, actions, places, random):
    (s,) = parse_text(f'intervene "x" {{\n  top 3 edges\n  {line}\n}}').interventions
    assert (s.actions, s.places, s.random_control) == (actions, places, random)


def test_edges_into_root_with_auto_roots_is_left_to_the_engine():
    (s,) = parse_text('trace from auto 2\nintervene "x" {\n edges into root 2 at end\n ablate\n}').interventions
    assert s.edges == (EdgeSelector("into", root=2, role="end"),)


def test_statements_are_order_free():
    lines = FULL.split("\n\n")[0].splitlines()
    shuffled = "\n".join(lines[::-1]) + "\n\n" + FULL.split("\n\n", 1)[1]
    assert unlined(parse_text(shuffled)) == unlined(parse_text(FULL))


# extends

def test_extends_overrides_whole_statements_and_blocks_by_name():
    base, child = parse_spec("specs/base.circ"), parse_spec("specs/child.circ")
    assert child.model == ModelSpec("gpt2")  # device and dtype not inherited from the base's line
    assert child.mass == 0.8
    assert (child.prompts, child.roots, child.slices, child.show_min_count, child.output) == (
        base.prompts, base.roots, base.slices, base.show_min_count, base.output)
    assert [s.name for s in child.interventions] == ["one edge", "kept", "new"]
    assert child.interventions[0].edges == (EdgeSelector("edge", up=(7, 3), down=(9, 9)),)
    assert child.interventions[1] == base.interventions[1]
    assert child.sources == ("specs/child.circ", "specs/base.circ")


def test_extends_chains():
    plan = parse_spec("specs/grandchild.circ")
    assert plan.slices == SliceRule("all")
    assert plan.mass == 0.8
    assert plan.prompts == IOIPrompts(64, "ABBA", 3)
    assert plan.sources == ("specs/grandchild.circ", "specs/child.circ", "specs/base.circ")


# errors, verbatim

BAD = [
    # syntax
    ("slice paper", 't.circ:1:1: unknown statement "slice"; did you mean "slices"?'),
    ("modle gpt2", 't.circ:1:1: unknown statement "modle"; did you mean "model"?'),
    ("42", 't.circ:1:1: unknown statement "42"; statements are model, task, prompts, trace, firing, slices, '
           "keep, show, compare, output, seed, extends, evaluate, sources, readings or intervene"),
    ("slices papers", 't.circ:1:8: expected "all", "paper" or "top", found "papers"; did you mean "paper"?'),
    # issue 26: the words of sources and readings, not the keywords of other statements
    ("sources", "t.circ:1:8: expected a source (heads, mlp, embed or bias), found end of line"),
    ("sources heads, mlp", 't.circ:1:14: expected a source (heads, mlp, embed or bias) or end of line, found ","'),
    ("readings", "t.circ:1:9: expected a set of readings (circuitlang, paper or authors), found end of line"),
    ("prompts ioi abba", 't.circ:1:13: expected "ABBA", "BABA", "mixed", "seed", a whole number or end of line, '
                         'found "abba"; did you mean "ABBA"?'),
    ("firing attention >= 0.5", 't.circ:1:18: expected ">", found ">="; did you mean ">"?'),
    ("firing attention > -0.5", 't.circ:1:20: expected a number, found "-0.5"'),
    ("keep mass", "t.circ:1:10: expected a number, found end of line"),
    ("trace from 9.9, 9.6", 't.circ:1:15: expected a token role like end or IO, found ","'),
    ("trace from 9 end->IO", 't.circ:1:12: expected "auto", "every", a head like 9.9 or every head of a layer like 9.*, found "9"'),
    ("model gpt2 prompts ioi", 't.circ:1:12: expected "device", "dtype" or end of line, found "prompts"'),
    ('output "runs/ioi json', 't.circ:1:8: unterminated string "runs/ioi; close it with " on the same line'),
    ('intervene "x" {\n  edgs into 9.9\n}', 't.circ:2:3: expected "ablate", "against", "boost", "edge", "edges", "global", '
                                          '"local", "top", "}" or end of line, found "edgs"; did you mean "edges"?'),
    ("edges into 9.9", 't.circ:1:1: "edges" is only allowed inside an intervene block'),
    ('intervene "x" {\n  model gpt2\n}', 't.circ:2:3: statement "model" inside an intervene block; close the block with "}" first'),
    ('intervene "x" {\n  top 3 edges\n  ablate', 't.circ:3:9: unclosed intervene block; end it with a line holding "}"'),
    # meaning
    ("model gpt2\ntrace from 9.9 end->IO2",
     't.circ:2:21: unknown role "IO2"; roles of the ioi prompts are IO, S1, S2, end, verb, punct, IO-1, IO+1, '
     'S1-1, S1+1, S2-1, S2+1, end-1, starts; did you mean "IO"?'),
    ("model gpt2\ntrace from 12.0 end->IO", "t.circ:2:12: head 12.0 is out of range for gpt2 (12 layers x 12 heads: 0.0 to 11.11)"),
    ("compare heads 1.1, 3.4", "t.circ:1:20: head 3.4 is out of range for gemma-3-270m (18 layers x 4 heads: 0.0 to 17.3)"),
    ("compare known ioi", 't.circ:1:1: the known "ioi" list names head 9.9, out of range for gemma-3-270m '
                          "(18 layers x 4 heads: 0.0 to 17.3)"),
    ("compare known iio", 't.circ:1:15: unknown list "iio"; known lists are ioi; did you mean "ioi"?'),
    ("firing attention > 1.5", "t.circ:1:20: the firing threshold must be in (0, 1], got 1.5"),
    ("firing attention > 0", "t.circ:1:20: the firing threshold must be in (0, 1], got 0"),
    ("keep mass 0.0", "t.circ:1:11: the kept mass must be in (0, 1], got 0.0"),
    ("output runs jsn svg", 't.circ:1:13: unknown output format "jsn"; formats are json, graphml, dot, svg, png, html and neuronpedia; '
                            'did you mean "json"?'),
    ("model gpt2 device gpu", 't.circ:1:19: unknown device "gpu"; devices are cpu, cuda, cuda:N and mps; did you mean "cpu"?'),
    ("model gpt2 dtype float61", 't.circ:1:18: unknown dtype "float61"; dtypes are float32, float16 and bfloat16; '
                                 'did you mean "float16"?'),
    ("model gpt2 device cpu device cuda", 't.circ:1:23: "device" is given twice'),
    ("trace from 9.9 end->IO, 9.9 end->IO", "t.circ:1:25: root 9.9 end->IO is given twice"),
    ("seed 1\nmodel gpt2\nseed 2", 't.circ:3:1: duplicate "seed" statement; the first is on line 1'),
    ("slices top 0", "t.circ:1:12: the number of slices must be at least 1, got 0"),
    ("prompts ioi 0", "t.circ:1:13: the number of prompts must be at least 1, got 0"),
    ("trace from auto 0", "t.circ:1:17: the number of roots must be at least 1, got 0"),
    ("show edges in >= 0 prompts", "t.circ:1:18: the prompt count of show must be at least 1, got 0"),
    ('extends "specs/nope.circ"', "t.circ:1:9: can't read specs/nope.circ: no such file or directory"),
    ('prompts file "nope.jsonl"', f"t.circ:1:14: no such prompts file: {TESTS / 'nope.jsonl'}"),
    ('intervene "x" {\n  edges into root 4\n  ablate\n}', "t.circ:2:19: there is no root 4; the trace has 3 roots, numbered from 1"),
    ('trace from 9.9 end->IO\nintervene "x" {\n  edges into root 2\n  ablate\n}',
     "t.circ:3:19: there is no root 2; the trace has 1 root, numbered from 1"),
    ('intervene "x" {\n  top 0 edges\n  ablate\n}', "t.circ:2:7: the number of edges must be at least 1, got 0"),
    ('intervene "x" {\n  edge 9.9 -> 8.6\n  ablate\n}',
     "t.circ:2:8: edge 9.9 -> 8.6 doesn't go downstream: the layer of 9.9 must be below that of 8.6"),
    ('intervene "x" {\n  ablate\n}', 't.circ:1:11: intervene "x" selects no edges; add a line like "edges into 9.9"'),
    ('intervene "x" {\n  top 1 edges\n}', 't.circ:1:11: intervene "x" has no actions line; '
                                        'add one like "ablate, boost  global, local  against random"'),
    ('intervene "x" {\n  top 1 edges\n  ablate\n  boost\n}', "t.circ:4:3: a second actions line; put all actions of a block on one line"),
    ('intervene "x" {\n  top 1 edges\n  ablate\n}\nintervene "x" {\n  top 2 edges\n  boost\n}',
     't.circ:5:1: duplicate intervene "x" block; the first is on line 1'),
    # limits (docs/language.md, "Limits")
    ("prompts ioi 99999999999999999999", "t.circ:1:13: the number of prompts must be at most 100000, got 99999999999999999999"),
    ("prompts ioi 100001", "t.circ:1:13: the number of prompts must be at most 100000, got 100001"),
    ("prompts ioi " + "9" * 5000, "t.circ:1:13: the number of prompts must be at most 100000, got 999999999999... (5000 digits)"),
    ("prompts ioi 8 seed 9223372036854775808", "t.circ:1:20: the seed must be at most 9223372036854775807, got 9223372036854775808"),
    ("seed 9223372036854775808", "t.circ:1:6: the seed must be at most 9223372036854775807, got 9223372036854775808"),
    ("trace from auto 1000", "t.circ:1:17: trace from auto 1000: gemma-3-270m has only 72 heads (18 layers x 4 heads)"),
    ("model gpt2\ntrace from auto 145", "t.circ:2:17: trace from auto 145: gpt2 has only 144 heads (12 layers x 12 heads)"),
    ("model my/model\ntrace from auto 10001", "t.circ:2:17: the number of roots must be at most 10000, got 10001"),
    ("slices top 100001", "t.circ:1:12: the number of slices must be at most 100000, got 100001"),
    ("show edges in >= 100001 prompts", "t.circ:1:18: the prompt count of show must be at most 100000, got 100001"),
    ('intervene "x" {\n  top 1000001 edges\n  ablate\n}', "t.circ:2:7: the number of edges must be at most 1000000, got 1000001"),
    ('intervene "x" {\n  edges into root 99999999999999999999\n  ablate\n}',
     "t.circ:2:19: there is no root 99999999999999999999; the trace has 3 roots, numbered from 1"),
    ("model my/model\ntrace from 100000.0 end->IO", "t.circ:2:12: head 100000.0: layer and head numbers go up to 99999"),
    ("model my/model\ncompare heads 1.1" + "1" * 5000, "t.circ:2:15: head 1." + "1" * 5001 + ": layer and head numbers go up to 99999"),
    # near misses of a built-in model
    ("model gemma-3-27m", 't.circ:1:7: unknown model "gemma-3-27m"; did you mean "gemma-3-270m"? '
                          "(a hub model is named org/name, e.g. openai-community/gpt2)"),
    ("model gemma-3-270M", 't.circ:1:7: unknown model "gemma-3-270M"; did you mean "gemma-3-270m"? '
                           "(a hub model is named org/name, e.g. openai-community/gpt2)"),
    ("model gpt-2", 't.circ:1:7: unknown model "gpt-2"; did you mean "gpt2"? (a hub model is named org/name, e.g. openai-community/gpt2)'),
    ("model gemm\u0430-3-270m", 't.circ:1:11: model name "gemm\u0430-3-270m" has the non-ASCII character "\u0430" (U+0430, '
                               'cyrillic small letter a); hub names are ASCII; did you mean "gemma-3-270m"?'),
    ('model "google/gemm\u0430-3-270m"', 't.circ:1:19: model name "google/gemm\u0430-3-270m" has the non-ASCII character '
                                        '"\u0430" (U+0430, cyrillic small letter a); hub names are ASCII'),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m.split(": ", 1)[1][:40] for _, m in BAD])
def test_bad_spec(text, message):
    with pytest.raises(SpecError) as e:
        parse_text(text, "t.circ")
    assert str(e.value) == message
    assert (e.value.file, e.value.line, e.value.column) == ("t.circ", *map(int, message.split(":")[1:3]))


@pytest.mark.parametrize("path, message", [
    ("specs/cycle-a.circ", "specs/cycle-b.circ:2:9: extends cycle: specs/cycle-a.circ -> specs/cycle-b.circ -> specs/cycle-a.circ"),
    ("specs/nested/gemma-over-base.circ",  # the error is in the base: its file and line, not the child's
     "specs/base.circ:4:14: head 9.9 is out of range for gemma-3-270m (18 layers x 4 heads: 0.0 to 17.3)"),
    ("specs/extends-syntax-base.circ", 'specs/syntax-base.circ:2:1: unknown statement "slice"; did you mean "slices"?'),
    ("specs/missing.circ", "specs/missing.circ: can't read specs/missing.circ: no such file or directory"),
])
def test_bad_spec_file(path, message):
    with pytest.raises(SpecError) as e:
        parse_spec(path)
    assert str(e.value) == message


def test_check_against_model_points_at_the_head():
    plan = parse_text("model my/model\ntrace from 2.0 end->IO\ncompare heads 7.1", "t.circ")  # unknown shape: unchecked
    check_against_model(plan, n_layers=8, n_heads=2)
    with pytest.raises(SpecError, match=r"^t\.circ:3:15: head 7\.1 is out of range for my/model \(4 layers"):
        check_against_model(plan, n_layers=4, n_heads=2)


def test_auto_roots_beyond_the_models_heads_fail_once_its_shape_is_known():
    plan = parse_text("model my/model\ntrace from auto 9", "t.circ")
    check_against_model(plan, n_layers=3, n_heads=3)
    with pytest.raises(SpecError, match=r"^t\.circ:2:1: trace from auto 9: my/model has only 8 heads \(4 layers x 2 heads\)$"):
        check_against_model(plan, n_layers=4, n_heads=2)


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2", "gemma-3-270m", "gpt2-xl", "gpt2-medium", "distilgpt2",
                                  "google/gemma-3-270m", "openai-community/GPT2", "./gemma-3-27m", "/models/gemma-3-270M"])
def test_other_hub_names_and_paths_are_left_to_the_loader(name):
    assert parse_text(f'model "{name}"').model.name == name


def test_every_embedded_model_has_a_known_shape():
    from circuitlang.models.embedded import EMBEDDED
    from circuitlang.lang.compiler import MODEL_SHAPES

    assert set(EMBEDDED) <= set(MODEL_SHAPES)


def test_a_byte_order_mark_is_ignored(tmp_path):
    assert parse_text("\ufeffmodel gpt2\n").model == ModelSpec("gpt2")
    path = tmp_path / "bom.circ"
    path.write_bytes(b"\xef\xbb\xbfmodel gpt2\nslice paper\n")
    assert parse_text("\ufeffmodel gpt2").model.name == "gpt2"
    with pytest.raises(SpecError, match=r"bom\.circ:2:1: unknown statement \"slice\""):  # positions as the editor shows them
        parse_spec(path)


# prompt files: checked by `circ check`, all but the tokens

def prompt_spec(tmp_path, lines: list[str], spec: str = "trace from 1.1 end->giver") -> Path:
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    path = tmp_path / "s.circ"
    path.write_text(f'model my/model\nprompts file "p.jsonl"\n{spec}\n')
    return path


def test_prompt_file_roles_are_checked_against_the_file(tmp_path):
    lines = ['{"text": "Alice gave Bob a book", "roles": {"giver": "Alice", "end": 4, "book": "book"}}',
             '{"text": "Carol gave Dan a pen", "roles": {"giver": "Carol", "end": 4}}']
    assert parse_spec(prompt_spec(tmp_path, lines)).roots == (Root(1, 1, "end", "giver"),)
    with pytest.raises(SpecError, match=r's\.circ:3:21: unknown role "givr"; roles of every prompt of p\.jsonl are giver, '
                                        r'end; did you mean "giver"\?$'):
        parse_spec(prompt_spec(tmp_path, lines, "trace from 1.1 end->givr"))
    with pytest.raises(SpecError, match=r'unknown role "book"; roles of every prompt of p\.jsonl are giver, end$'):
        parse_spec(prompt_spec(tmp_path, lines, "trace from 1.1 end->book"))
    # `at ROLE` needs the role in some prompt (a prompt without it is matched by its token labels)
    block = 'intervene "x" {\n  edges into 1.1 at book\n  ablate\n}'
    assert parse_spec(prompt_spec(tmp_path, lines, block)).interventions[0].edges[0].role == "book"
    with pytest.raises(SpecError, match=r's\.circ:4:21: unknown role "bok"; roles of the prompts of p\.jsonl are book, end, giver'):
        parse_spec(prompt_spec(tmp_path, lines, block.replace("book", "bok")))


@pytest.mark.parametrize("lines, message", [
    (['{"text": "Alice gave Bob a book", "roles": {"giver": "Alise"}}'], r"p\.jsonl:1:45: role 'giver': word 'Alise' not found in the text"),
    (['{"text": "a"}', '{"text": "b",}'], r"p\.jsonl:2:14: bad JSON: Expecting property name enclosed in double quotes"),
    (['# only a comment'], r"p\.jsonl: no prompts in file"),
])
def test_prompt_file_errors_fail_circ_check_with_file_and_line(tmp_path, lines, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(prompt_spec(tmp_path, lines, ""))


def test_prompt_file_not_utf8_or_a_directory(tmp_path):
    spec = prompt_spec(tmp_path, [], "")
    (tmp_path / "p.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(SpecError, match=r"p\.jsonl:2:11: not UTF-8 text \(byte 0xff\); save the file as UTF-8$"):
        parse_spec(spec)
    (tmp_path / "p.jsonl").unlink()
    (tmp_path / "p.jsonl").mkdir()
    with pytest.raises(SpecError, match=r"s\.circ:2:14: .*p\.jsonl is a directory, not a prompts file$"):
        parse_spec(spec)


# format_plan

def test_format_plan_is_a_flat_spec():
    assert format_plan(parse_spec("specs/child.circ")) == """\
# compiled from specs/child.circ, extending specs/base.circ
model   gpt2 device cpu dtype float32
prompts ioi 64 ABBA seed 3
trace   from 9.9 end->IO, 10.0 end->IO
firing  attention > 0.5
slices  top 2
keep    mass 0.8
show    edges in >= 20 prompts
sources heads
readings circuitlang
output  "runs/base" json
seed    0

intervene "one edge" {
  edge 7.3 -> 9.9
  ablate, boost  global, local  against random
}

intervene "kept" {
  top 5 edges
  boost  local
}

intervene "new" {
  edges from 0.1
  ablate, boost  local
}
"""


@pytest.mark.parametrize("text", [FULL, "", 'model "all"\nfiring attention > 0.00001\nprompts file "specs/tiny.jsonl"'])
def test_format_plan_round_trips(text):
    plan = parse_text(text)
    assert unlined(parse_text(format_plan(plan))) == unlined(plan)


# robustness: a mutated spec compiles or raises SpecError, nothing else

SEED_SPEC = """\
extends "base.circ"      # specs/base.circ, as the mutant lives in specs/
model   gpt2 device cpu
prompts ioi 16 mixed seed 2
trace   from 9.9 end->IO, 9.6 end-1->S1+1
firing  attention > 0.5
keep    mass 0.7
compare known ioi
output  runs/m json svg
seed    1

intervene "a" {
  edge 8.6 -> 9.9 at S2 s
  edges into root 2 d
  ablate, boost  global  against random
}

intervene "kept" {
  edges from 0.1 at end
  top 3 edges
  local
}
"""
CHARS = st.one_of(st.sampled_from(list(' \n\t.,->{}"#0123456789adeiorst') + ["IO", "end", "9.9", "top", "at"]),
                  st.characters())


@st.composite
def mutated(draw):
    lines = SEED_SPEC.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["delete", "insert", "replace", "swap", "duplicate"]))
        i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        k = draw(st.integers(0, len(line)))
        if op == "delete":
            lines[i] = line[:k] + line[k + 1:]
        elif op == "insert":
            lines[i] = line[:k] + draw(CHARS) + line[k:]
        elif op == "replace":
            lines[i] = line[:k] + draw(CHARS) + line[k + 1:]
        elif op == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines.insert(j, line)
    return "".join(lines)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated())
def test_mutated_specs_compile_or_raise_spec_error(text):
    try:
        plan = parse_text(text, "specs/mutant.circ")
    except SpecError as e:
        assert len(str(e).splitlines()) == 1
        assert e.file.startswith("specs/") and e.line >= 0 and e.column >= 0
    else:  # whatever compiles renders to a spec that compiles to the same plan
        assert unlined(parse_text(format_plan(plan), "specs/mutant.circ")) == unlined(plan)


def test_the_unmutated_seed_spec_compiles():
    plan = parse_text(SEED_SPEC, "specs/mutant.circ")
    assert [s.name for s in plan.interventions] == ["one edge", "kept", "a"]


# root sets

@pytest.mark.parametrize("text, roots", [
    ("every firing of layers 9-11", (RootSet(9, 11),)),
    ("every firing of layer 9 from end", (RootSet(9, 9, "end"),)),
    ("every firing of layers 9-11 to S2 except source 0", (RootSet(9, 11, None, "S2", 0),)),
    ("every firing of layer 9 from end to S2", (RootSet(9, 9, "end", "S2"),)),  # is `9.* end->S2`
    ("9.* end->S2, 10.0 end->IO", (RootSet(9, 9, "end", "S2"), Root(10, 0, "end", "IO"))),
])
def test_root_sets_compile_print_and_read_back(text, roots):
    plan = parse_text(f"model gpt2\ntrace from {text}\n", "t.circ")
    assert plan.roots == roots
    assert parse_text(format_plan(plan)) == plan
    assert tuple(parse_root(str(r)) for r in roots) == roots  # trace.json keeps str(root)


@pytest.mark.parametrize("text, message", [
    ("trace from every firing of layers 9-12", "t.circ:2:35: every firing of layers 9-12: layer 12 is out of range for gpt2 "
     "(12 layers x 12 heads: 0.0 to 11.11)"),
    ("trace from 12.* end->IO", "t.circ:2:12: 12.* end->IO: layer 12 is out of range for gpt2 (12 layers x 12 heads: 0.0 to 11.11)"),
    ("trace from every firing of layers 11-9", "t.circ:2:35: layers 11-9: the first layer is above the last; write layers 9-11"),
    ("trace from every firing of layers 9-11 from End", 't.circ:2:45: unknown role "End"; roles of the ioi prompts are IO, S1, '
     'S2, end, verb, punct, IO-1, IO+1, S1-1, S1+1, S2-1, S2+1, end-1, starts; did you mean "end"?'),
    ("trace from every firing of layers 9", 't.circ:2:35: expected layers like 9-11, found "9"'),
    ("trace from every firing of layers 9-11 except 0", 't.circ:2:47: expected "source", found "0"'),
    ("trace from 9.* end->IO, 9.* end->IO", "t.circ:2:25: root 9.* end->IO is given twice"),
    ('trace from 9.* end->IO\nintervene "x" {\n  edges into root 1\n  ablate\n}', "t.circ:4:19: root 1 is a set of firings "
     "(9.* end->IO) of several heads; name one: edges into 9.0"),
])
def test_bad_root_sets(text, message):
    with pytest.raises(SpecError) as e:
        parse_text(f"model gpt2\n{text}\n", "t.circ")
    assert str(e.value) == message


def test_labels_is_a_reading():
    assert parse_text("readings authors\n").readings.labels == "authors"
    assert parse_text("readings authors labels circuitlang\n").readings.labels == "circuitlang"
    assert str(parse_text("readings paper labels authors\n").readings) == "paper labels authors"
    with pytest.raises(SpecError, match='reading labels is authors or circuitlang, got "author"'):
        parse_text("readings paper labels author\n", "t.circ")


# the shipped specs

def test_shipped_specs():
    ioi = parse_spec(REPO / "specs" / "ioi.circ")
    assert ioi.model == ModelSpec("gemma-3-270m")
    assert (ioi.prompts, ioi.roots, ioi.show_min_count) == (IOIPrompts(256, "mixed", 0), AutoRoots(3), 200)
    assert (ioi.threshold, ioi.slices, ioi.mass) == (0.3, SliceRule("paper"), 0.7)
    assert ioi.output == Output("runs/ioi", ("json", "graphml", "svg", "png", "html"))
    assert ioi.interventions == (InterventionSet(
        "into the strongest root", (EdgeSelector("into", root=1, role="end"),), line=12),)
    # the default spec evaluates its own circuit: the influence ranking at 5, 10 and 20 heads, no random draws
    assert ioi.evaluate == Evaluation("abc", sizes=(5, 10, 20), random=0, rankings=("influence",))

    gpt2 = parse_spec(REPO / "specs" / "paper" / "gpt2-ioi.circ")
    assert (gpt2.model, gpt2.roots, gpt2.compare, gpt2.threshold) == (ModelSpec("gpt2"), PAPER_ROOTS, "ioi", 0.5)
    assert gpt2.show_min_count == 65
    assert gpt2.output.directory == "runs/gpt2-ioi"
    assert gpt2.interventions[0].edges == (EdgeSelector("into", down=(9, 9), root=1, role="end"),)

    late = parse_spec(REPO / "specs" / "paper" / "gpt2-late-layers.circ")  # the authors' late-layer set-up
    assert (late.model, late.prompts, late.threshold, late.mass) == (ModelSpec("gpt2"), IOIPrompts(256, "mixed", 0), 0.5, 0.7)
    assert late.roots == (RootSet(9, 11, except_source=0),) and late.readings == READING_SETS["authors"]
    assert late.readings.labels == "authors" and late.readings.count == "events"
    assert parse_text(format_plan(late)) == late

    mine = parse_spec(REPO / "specs" / "examples" / "file-prompts.circ")  # the prompt-file example of docs/language.md
    assert mine.prompts == FilePrompts(str(REPO / "specs" / "examples" / "my-task.jsonl"))
    assert mine.interventions[0].edges == (EdgeSelector("into", root=1, role="end"),)

    ablation = parse_spec(REPO / "specs" / "ablations" / "all-slices.circ")
    assert ablation.slices == SliceRule("all")
    assert dataclasses.replace(ablation, slices=ioi.slices, output=ioi.output) == ioi


def test_the_language_never_imports_torch():
    """circuitlang.lang and what it imports, with the top-level package (the engine's API) left out."""
    code = f"""if True:
        import sys, types
        package = types.ModuleType("circuitlang")
        package.__path__ = [{str(REPO / "circuitlang")!r}]
        sys.modules["circuitlang"] = package
        from circuitlang.lang import parse_spec
        parse_spec({str(REPO / "specs" / "paper" / "gpt2-ioi.circ")!r})
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformer_lens", "transformers")))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
