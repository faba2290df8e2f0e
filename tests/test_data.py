"""Tests of circuitlang.data: the IOI prompt set (Wang et al., 2023) and user prompt files."""

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from circuitlang.data import (
    IOI_ROLES,
    DataError,
    PromptFileError,
    PromptSet,
    ioi_prompts,
    known_heads,
    load_prompt_file,
    read_prompt_file,
)


class WordTokenizer:
    """A tiny fake tokenizer: one token per word (with its leading space) or punctuation mark, except the
    words in ``split``, which become two tokens."""

    bos_token_id = 0

    def __init__(self, split=()):
        self.split = set(split)
        self.vocab = {"<bos>": 0}

    def __call__(self, text, add_special_tokens=False):
        pieces = []
        for piece in re.findall(r" ?\w+| ?[^\w\s]", text):
            pieces += [piece[:-3], piece[-3:]] if piece.strip() in self.split else [piece]
        return {"input_ids": [self.vocab.setdefault(p, len(self.vocab)) for p in pieces]}

    def decode(self, ids):
        words = {i: w for w, i in self.vocab.items()}
        return "".join(words[i] for i in ids)


@pytest.fixture(scope="module")
def mixed(gpt2_tokenizer):
    return ioi_prompts(gpt2_tokenizer)


def test_deterministic_for_a_seed_and_different_across_seeds(gpt2_tokenizer):
    a = ioi_prompts(gpt2_tokenizer, n=32, seed=0)
    assert a == ioi_prompts(gpt2_tokenizer, n=32, seed=0)
    other = ioi_prompts(gpt2_tokenizer, n=32, seed=1)
    assert [p.text for p in a] != [p.text for p in other]
    assert a.description == "ioi 32 mixed seed 0"


def test_roles_point_at_the_right_tokens(mixed, gpt2_tokenizer):
    decode = lambda i: gpt2_tokenizer.decode([i])  # noqa: E731
    assert len(mixed) == 256 and mixed.role_names == IOI_ROLES
    for p in mixed:
        ids, io, s = p.token_ids, decode(p.target), decode(p.distractor)
        assert p.target != p.distractor and io != s
        assert decode(ids[p.role("IO")]) == io
        assert decode(ids[p.role("S1")]) == s and decode(ids[p.role("S2")]) == s
        assert p.role("S1") < p.role("S2") and p.role("IO") < p.role("S2")
        # The text ends with the IO name; 'end' is the token just before it and the last one fed.
        assert p.text.endswith(io) and p.role("end") == len(ids) - 1
        assert gpt2_tokenizer(p.text)["input_ids"] == [*ids, p.target]
        assert ids.count(p.target) == 1 and ids.count(p.distractor) == 2
        assert decode(ids[p.role("verb")]) in {" gave", " give", " said"}
        assert decode(ids[p.role("punct")]) in {",", "."}
        assert max(p.role("IO"), p.role("S1")) < p.role("punct") < p.role("S2")
        for name in ("IO", "S1", "S2", "end"):
            assert p.role(f"{name}-1") == p.role(name) - 1
            if name != "end":
                assert p.role(f"{name}+1") == p.role(name) + 1
        assert p.role("starts") == 0


def test_abba_and_baba_order_the_first_clause(gpt2_tokenizer):
    abba = ioi_prompts(gpt2_tokenizer, n=256, kind="ABBA")
    baba = ioi_prompts(gpt2_tokenizer, n=256, kind="BABA")
    assert all(p.role("IO") < p.role("S1") for p in abba)
    assert all(p.role("S1") < p.role("IO") for p in baba)
    assert {dict(p.meta)["kind"] for p in abba} == {"ABBA"}
    # A single form draws from all 15 templates (as the reference generator does).
    assert {int(dict(p.meta)["template"]) for p in abba} == set(range(15))
    first = next(p for p in abba if dict(p.meta)["template"] == "0")
    io, s = gpt2_tokenizer.decode([first.target]), gpt2_tokenizer.decode([first.distractor])
    assert first.text.startswith(f"Then,{io} and{s} went to the ")
    assert re.fullmatch(rf"Then,{io} and{s} went to the \w+\.{s} gave a \w+ to{io}", first.text)


def test_mixed_uses_both_forms_and_only_the_first_seven_templates(mixed, gpt2_tokenizer):
    metas = [dict(p.meta) for p in mixed]
    assert Counter(m["kind"] for m in metas).keys() == {"ABBA", "BABA"}
    assert {int(m["template"]) for m in metas} == set(range(7))
    wide = ioi_prompts(gpt2_tokenizer, all_templates=True)
    assert max(int(dict(p.meta)["template"]) for p in wide) > 6
    assert wide.description == "ioi 256 mixed seed 0, all templates"


def test_prompt_lengths_match_the_paper_up_to_end(mixed):
    # The paper gives lengths 14-20 tokens: that is the prompt up to 'end' (where IO is predicted).
    # The model is fed exactly that: the final IO name is the answer, not an input.
    through_end = [p.role("end") + 1 for p in mixed]
    assert (min(through_end), max(through_end)) == (14, 20)
    assert [len(p.token_ids) for p in mixed] == through_end


def test_labels(mixed, gpt2_tokenizer):
    for p in mixed:
        assert len(p.labels) == len(p.token_ids)
        for name in ("IO", "S1", "S2", "end"):
            assert p.labels[p.role(name)] == name
        assert p.labels[-1] == "end"
    p = mixed[0]
    unroled = set(range(len(p.token_ids))) - {pos for _, pos in p.roles}
    assert unroled and all(re.fullmatch(r"'\S+'", p.labels[i]) for i in unroled)


# The keys of the authors' IOIDataset.word_idx (ioi_dataset.get_idx_dict), in their order; their idx_to_gram maps
# each key's position to the key in turn, so the last key at a position names it.
WORD_IDX_KEYS = ["IO", "IO-1", "IO+1", "S1", "S1-1", "S1+1", "S2", "S2-1", "S2+1", "end", "end-1", "starts", "punct", "verb"]


def test_authors_labels_are_their_idx_to_gram(gpt2_tokenizer):
    """Under `readings authors` (labels authors) the IOI prompts label each role position as the authors' idx_to_gram
    does; the rest of the prompt is as before. The plan's reading reaches the prompts the run builds."""
    from types import SimpleNamespace

    from circuitlang.lang import parse_text
    from circuitlang.runner.execute import build_prompts

    ours = ioi_prompts(gpt2_tokenizer, n=8)
    theirs = ioi_prompts(gpt2_tokenizer, n=8, labels="authors")
    model = SimpleNamespace(tokenizer=gpt2_tokenizer, prepend_bos=False)
    assert build_prompts(parse_text("model gpt2\nprompts ioi 8\nreadings authors\n"), model).prompts == theirs.prompts
    assert build_prompts(parse_text("model gpt2\nprompts ioi 8\nreadings authors labels circuitlang\n"), model).prompts == ours.prompts
    changed = 0
    for mine, authors in zip(ours, theirs):
        idx_to_gram = {}
        for key in WORD_IDX_KEYS:
            idx_to_gram[mine.role(key)] = key
        assert all(authors.labels[i] == label for i, label in idx_to_gram.items())
        assert all(authors.labels[i] == mine.labels[i] for i in range(len(mine.labels)) if i not in idx_to_gram)
        assert dict(authors.roles) == dict(mine.roles) and authors.token_ids == mine.token_ids
        changed += sum(authors.labels[i] != mine.labels[i] for i in idx_to_gram)
    assert changed == 9  # of the 89 role positions of these prompts (issue 22: IO+1 where theirs is S1-1, ...)
    with pytest.raises(DataError, match="unknown labels 'theirs'"):
        ioi_prompts(gpt2_tokenizer, n=8, labels="theirs")


def test_prepend_bos_shifts_every_role_by_one(gpt2_tokenizer, mixed):
    bos = ioi_prompts(gpt2_tokenizer, prepend_bos=True)
    assert bos.description == "ioi 256 mixed seed 0, BOS"
    for plain, shifted in zip(mixed, bos):
        assert shifted.token_ids == (gpt2_tokenizer.bos_token_id, *plain.token_ids)
        assert shifted.roles == tuple((name, pos + 1) for name, pos in plain.roles)
        assert shifted.labels == ("BOS", *plain.labels)


def test_multitoken_names_raise_or_are_dropped():
    with pytest.raises(DataError, match="names not single tokens for this tokenizer: ' Anderson', ' Crystal'"):
        ioi_prompts(WordTokenizer(split={"Anderson", "Crystal"}), n=4)
    tok = WordTokenizer(split={"Anderson", "Crystal"})
    kept = ioi_prompts(tok, n=200, drop_multitoken_names=True)
    assert kept.description == "ioi 200 mixed seed 0, dropped 2 multi-token names"
    assert not any("Anderson" in p.text or "Crystal" in p.text for p in kept)


def test_bad_arguments_and_unknown_roles(mixed, gpt2_tokenizer):
    with pytest.raises(DataError, match="unknown IOI kind 'AABB'"):
        ioi_prompts(gpt2_tokenizer, kind="AABB")
    with pytest.raises(DataError, match="n must be a positive integer"):
        ioi_prompts(gpt2_tokenizer, n=0)
    with pytest.raises(DataError, match="unknown role 'IO2'.*IO, S1, S2, end"):
        mixed[0].role("IO2")
    assert isinstance(mixed[:8], PromptSet) and len(mixed[:8]) == 8


def test_known_heads():
    heads = known_heads()
    assert heads["name_mover"] == ("9.9", "9.6", "10.0")
    assert sum(len(v) for v in heads.values()) == 26 and len(heads) == 7
    with pytest.raises(DataError, match="no known heads"):
        known_heads("greater-than")


def test_data_does_not_import_torch():
    code = "import sys, circuitlang.data; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def write(tmp_path, *lines):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_file_happy_path(tmp_path, gpt2_tokenizer):
    path = write(
        tmp_path,
        "# a comment",
        '{"text": "When Mary and John went to the store, John gave a drink to", "target": " Mary",'
        ' "distractor": " John", "roles": {"S2": {"word": "John", "occurrence": 2}, "IO": "Mary", "end": 13}}',
        "",
        '{"text": "The cat sat on the mat", "roles": {"end": 5, "IO": "cat"}}',
    )
    ps = load_prompt_file(path, gpt2_tokenizer)
    assert len(ps) == 2 and ps.role_names == ("IO", "end")
    first = ps[0]
    assert (first.role("S2"), first.role("IO"), first.role("end")) == (9, 1, 13)
    assert gpt2_tokenizer.decode([first.target]) == " Mary" and gpt2_tokenizer.decode([first.distractor]) == " John"
    assert first.labels[:3] == ("'When'", "IO", "'and'") and first.labels[9] == "S2"
    assert dict(first.meta)["source"].endswith("prompts.jsonl:2")
    assert ps[1].target is None and ps[1].roles == (("end", 5), ("IO", 1))

    bos = load_prompt_file(path, gpt2_tokenizer, prepend_bos=True)
    assert bos[0].token_ids == (gpt2_tokenizer.bos_token_id, *first.token_ids)
    assert bos[0].roles == tuple((name, pos + 1) for name, pos in first.roles)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "The cat sat",}', r"prompts.jsonl:2:24: bad JSON"),
        ('["The cat sat"]', r"prompts.jsonl:2:1: expected a JSON object"),
        ('{"roles": {"IO": 1}}', r"prompts.jsonl:2:1: missing 'text'"),
        ('{"text": "The cat sat", "taget": " cat"}', r"prompts.jsonl:2:25: unknown key 'taget'.*did you mean 'target'"),
        ('{"text": "The cat sat", "roles": {"IO": "dog"}}', r"prompts.jsonl:2:35: role 'IO': word 'dog' not found"),
        (
            '{"text": "The cat sat", "roles": {"IO": {"word": "cat", "occurrence": 2}}}',
            r"prompts.jsonl:2:35: role 'IO': word 'cat' occurs 1 time\(s\) in the text, not 2",
        ),
        (  # found in the text, but not as a token of its own: known only once tokenized
            '{"text": "The cat sat", "roles": {"IO": "ca"}}', r"prompts.jsonl:2:35: role 'IO': word 'ca' not found among the text's tokens",
        ),
        ('{"text": "The cat sat", "roles": {"end": 3}}', r"prompts.jsonl:2:35: role 'end' position 3 out of range"),
        ('{"text": "The cat sat", "roles": {"end": 2.5}}', r"prompts.jsonl:2:35: role 'end': must be a token position"),
        ('{"text": "The cat sat", "target": " Xzyqwv"}', r"prompts.jsonl:2:25: target ' Xzyqwv' is not a single token"),
    ],
)
def test_prompt_file_errors_name_file_and_line(tmp_path, gpt2_tokenizer, line, message):
    path = write(tmp_path, '{"text": "The cat sat", "roles": {"IO": "cat"}}', line)
    with pytest.raises(DataError, match=message):
        load_prompt_file(path, gpt2_tokenizer)


def test_prompt_file_empty_or_missing(tmp_path, gpt2_tokenizer):
    with pytest.raises(DataError, match="no prompts in file"):
        load_prompt_file(write(tmp_path, "# only a comment", ""), gpt2_tokenizer)
    with pytest.raises(DataError, match="missing.jsonl: no such prompt file"):
        load_prompt_file(tmp_path / "missing.jsonl", gpt2_tokenizer)


# --- Prompt files checked without a tokenizer (circ check) ----------------------------------------------


@pytest.mark.parametrize("line, message", [
    ('{"text": "The cat sat",}', r"p.jsonl:2:24: bad JSON: Expecting property name"),
    ("[" * 100_000, r"p.jsonl:2: bad JSON: nested too deeply"),
    ('{"text": "a", "roles": {"end": ' + "9" * 5000 + "}}", r"p.jsonl:2: bad JSON: .*digits"),
    ("42", r"p.jsonl:2:1: expected a JSON object .*, got an integer 42"),
    ('{"txt": "The cat"}', r"p.jsonl:2:2: unknown key 'txt'.*did you mean 'text'\?"),
    ('{"text": ""}', r"p.jsonl:2:2: 'text' must be a non-empty string, got a string \"\""),
    ('{"text": 7}', r"p.jsonl:2:2: 'text' must be a non-empty string, got an integer 7"),
    ('{"text": "The cat", "roles": ["IO"]}', r"p.jsonl:2:21: 'roles' must be an object .*, got an array"),
    ('{"text": "The cat", "roles": {"my role": 1}}', r"p.jsonl:2:31: role name 'my role' can't be written in a spec"),
    ('{"text": "The cat", "roles": {"IO": -1}}', r"p.jsonl:2:31: role 'IO': position -1 is negative"),
    ('{"text": "The cat", "roles": {"IO": true}}', r"p.jsonl:2:31: role 'IO': must be a token position .*got a boolean"),
    ('{"text": "The cat", "roles": {"IO": {"word": "cat", "occurence": 2}}}', r"role 'IO': unknown key 'occurence'"),
    ('{"text": "The cat", "roles": {"IO": {"word": "cat", "occurrence": 0}}}', r"role 'IO': occurrence must be a positive"),
    ('{"text": "The cat", "roles": {"IO": "dog"}}', r"p.jsonl:2:31: role 'IO': word 'dog' not found in the text"),
    ('{"text": "The cat", "target": 3}', r"p.jsonl:2:21: 'target' must be a non-empty string"),
])
def test_prompt_file_structure_is_checked_without_a_tokenizer(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "The cat sat", "roles": {"IO": "cat"}}\n' + line + "\n")
    with pytest.raises(PromptFileError, match=message):
        read_prompt_file(path)


def test_prompt_file_encoding_directory_and_bom(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(PromptFileError, match=r"p.jsonl:2:14: not UTF-8 text \(byte 0xe9\)"):
        read_prompt_file(path)
    with pytest.raises(PromptFileError, match=r"is a directory, not a prompt file"):
        read_prompt_file(tmp_path)
    path.write_bytes('\ufeff{"text": "a\u2028b", "roles": {"x": "b"}}\r\n'.encode())  # BOM, CRLF, U+2028 inside a string
    (record,) = read_prompt_file(path)
    assert record.text == "a\u2028b" and record.roles == (("x", "b"),) and record.line == 1


def test_prompt_file_role_names_are_the_grammars_words():
    from circuitlang.data.prompts import ROLE_NAME
    from circuitlang.lang.parser import BARE_WORD

    assert ROLE_NAME.pattern == BARE_WORD.pattern


def test_the_worked_example_prompt_file_loads(gpt2_tokenizer):
    """specs/examples/my-task.jsonl, the prompt file docs/language.md walks through, passes the token checks too."""
    ps = load_prompt_file(Path(__file__).resolve().parents[1] / "specs" / "examples" / "my-task.jsonl", gpt2_tokenizer)
    assert len(ps) == 5 and ps.role_names == ("person", "city", "other", "end")
    first = ps[0]
    assert (first.role("city"), first.role("person"), first.role("end")) == (3, 10, len(first.token_ids) - 1)
    assert gpt2_tokenizer.decode([first.target]) == " Paris" and gpt2_tokenizer.decode([first.distractor]) == " Rome"
