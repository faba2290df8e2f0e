"""Tasks declared in a spec (`task` blocks, docs/language.md "Tasks"): what `circ check` rejects, the prompts they
draw (the IOI task draws the IOI generator's), the words dropped for the tokenizer, and F over answer sets."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from circuitlang.data.ioi import ioi_counterfactuals, ioi_prompts
from circuitlang.data.prompts import DataError
from circuitlang.data.tasks import task_prompts
from circuitlang.engine.forward import set_metric
from circuitlang.engine.roots import direct_effects
from circuitlang.lang import SpecError, format_plan, parse_spec, parse_text
from circuitlang.lang.plan import TaskPrompts

TASK = '''\
model gpt2
task "names" {
  words names "Mary", "John", "Tom", "Anna", "Bob", "Kate"
  words places (place, kind) "store" "shop", "park" "garden"
  slot IO, S from names
  slot where from places
  template "Then, {IO} and {S} went to the {where}. {S} gave a drink to"
  template "When {S} and {IO} got to the {where.kind}, {S} handed it to"
  target " {IO}"
  distractor " {S}"
  counterfactual IO, S1, S2 -> names
}
'''


def spec(*changes: tuple[str, str], tail: str = "") -> str:
    text = TASK
    for old, new in changes:
        assert old in text
        text = text.replace(old, new)
    return text + tail


def test_a_task_compiles_to_its_prompts_roles_and_round_trips():
    plan = parse_text(spec(tail="trace from 9.9 end->S2, 9.6 end->IO\n"), "t.circ")
    assert isinstance(plan.prompts, TaskPrompts) and (plan.prompts.n, plan.prompts.seed) == (256, 0)
    task = plan.prompts.task
    assert [v.name for v in task.vocabularies] == ["names", "places"] and task.vocabularies[1].columns == ("place", "kind")
    assert task.counterfactual.roles == ("IO", "S1", "S2") and task.metric == "logit"
    assert parse_text(format_plan(plan), "again.circ") == plan
    assert parse_text(spec(tail="prompts task 12 seed 3\n")).prompts == TaskPrompts(task, 12, 3)


BAD = [
    # unknown slot
    (spec(('{IO} and {S} went', '{IO} and {SS} went')), 't.circ:7:29: unknown slot "SS"; slots are IO, S or where; did you mean "S"?'),
    # empty word list: inline, and a file of comments only
    (spec(('words places (place, kind) "store" "shop", "park" "garden"', 'words places')),
     't.circ:4:9: words places is empty; list its words on the line: words places "a", "b", ... (or words NAME file "PATH")'),
    (spec(('words names "Mary", "John", "Tom", "Anna", "Bob", "Kate"', 'words names file "empty.txt"')),
     't.circ:3:20: the word file empty.txt is empty (blank lines and # comments only)'),
    # a template without the role the counterfactual names
    (spec(('IO, S1, S2 -> names', 'IO, S3 -> names')),
     't.circ:7:12: template 1 has no role "S3", which the counterfactual on line 11 names; its roles are IO, S1, where, S2'),
    (spec(('IO, S1, S2 -> names', 'where -> names')),
     't.circ:8:12: template 2 writes column "kind" at role where, which words names of the counterfactual has not'),
    (spec(('slot where from places', 'slot where from place')), 't.circ:6:19: unknown word list "place"; write `words place '
     '...` above this line; did you mean "places"?'),
    (spec(('{where.kind}', '{where.kinds}')), 't.circ:8:49: words places has no column "kinds"; its columns are place or kind; '
     'did you mean "kind"?'),
    (spec(('target " {IO}"', 'target " {IO..9}"')), 't.circ:9:13: a range reads IO as a whole number, and words names has "Mary"'),
    (spec(('went to the {where}.', 'went to the {1..where}.')), 't.circ:7:44: a range {A..B} makes several answers; write it '
     'in a target or distractor'),
    (spec(('  target " {IO}"\n', '')), 't.circ:7:12: template 1 has no target; add `target " {IO}"` to the task or to the template'),
    (spec(('"Mary", "John"', '"Mary" "Ann", "John"')), 't.circ:3:15: a row of 2 words in words names, which has 1 column; '
     'name the columns: words NAME (a, b) ...'),
    (spec(('went to the', 'went {to the')), 't.circ:7:37: unmatched "{"; placeholders are written {slot}'),
    (spec(('slot IO, S from names', 'slot IO, S, S from names')), 't.circ:5:15: slot S is given twice'),
    (spec(tail="prompts ioi 20\n"), "t.circ:13:1: prompts ioi and the task block both make the prompts; drop one, or write "
     "`prompts task [N] [seed S]` for the task's"),
    ("prompts task 20\n", 't.circ:1:1: prompts task draws from the spec\'s task block, and there is none; add one: task "NAME" '
     '{ ... } (docs/language.md, "Tasks")'),
    (spec(tail="trace from 9.9 end->IO2\n"), 't.circ:13:21: unknown role "IO2"; roles of every prompt of task "names" are IO, '
     'S1, where, S2, end; did you mean "IO"?'),
    (spec(tail="evaluate faithfulness against abc\n"), 't.circ:13:31: the prompts of task "names" carry the task\'s own '
     "counterfactual: write `against counterfactual`"),
    (spec(('  counterfactual IO, S1, S2 -> names\n', ''), tail="evaluate faithfulness against counterfactual\n"),
     't.circ:12:31: task "names" has no counterfactual; add a line like "counterfactual IO -> names" to it'),
    (spec(('  target " {IO}"\n', '  target " {IO}"\n  metric logit\n')), 't.circ:10:15: expected "difference", found end of line'),
    ('task "x" {\n  words a "b"\n', 't.circ:3:1: unclosed task block; end it with a line holding "}"'),
    ("slot IO from names\n", 't.circ:1:1: "slot" is only allowed inside a task block'),
    (spec(('  template "When', '  template " "\n  template "When')), 't.circ:8:12: an empty template; write the prompt with its '
     '{slot} placeholders'),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m.split(": ", 1)[1][:50] for _, m in BAD])
def test_a_bad_task_is_one_located_line(text, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(SpecError) as e:
        parse_text(text, "t.circ")
    assert str(e.value) == message


@pytest.mark.parametrize("seed", [0, 7])
def test_the_ioi_task_draws_the_ioi_generators_prompts(gpt2_tokenizer, seed):
    """specs/tasks/ioi.circ: the tokens, answers, ABC counterfactuals and the IO, S1, S2, end roles of `prompts ioi 256
    mixed seed S` (docs/tasks.md says what differs: the labels of the other tokens)."""
    task = parse_spec("specs/tasks/ioi.circ").prompts.task
    ours = task_prompts(task, gpt2_tokenizer, 256, seed)
    theirs = ioi_counterfactuals(ioi_prompts(gpt2_tokenizer, 256, "mixed", seed), gpt2_tokenizer, "abc", seed)
    for a, b in zip(ours, theirs, strict=True):
        assert (a.token_ids, a.target, a.distractor, a.counterfactual) == (b.token_ids, b.target, b.distractor, b.counterfactual)
        assert all(a.role(r) == b.role(r) for r in ("IO", "S1", "S2", "end"))
    assert ours.role_names == ("S1", "IO", "S2", "end") and ours.description == f'task "ioi" 256 seed {seed}'


def test_words_of_several_tokens_are_dropped_and_counted(gpt2_tokenizer):
    text = spec(('"Mary", "John"', '"Mary", "Maryjanewski", "John"'), ('"store" "shop"', '"store" "shop", "xqzvlot" "yard"'))
    prompts = task_prompts(parse_text(text, "t.circ").prompts.task, gpt2_tokenizer, 40, 1)
    assert "dropped 1 of 7 words names, 1 of 3 words places (not one token)" in prompts.description
    assert not any("Maryjanewski" in p.text or "xqzvlot" in p.text for p in prompts)
    one = spec(('"Mary", "John", "Tom", "Anna", "Bob", "Kate"', '"Mary", "Maryjanewski"'))
    with pytest.raises(DataError, match=r"^t.circ:3:9: only 1 of the 2 words of names are one token for this tokenizer; "
                       r"slot IO, S and the counterfactual need 5$"):
        task_prompts(parse_text(one, "t.circ").prompts.task, gpt2_tokenizer, 4, 0)


def test_an_answer_the_spec_pins_must_be_one_token(gpt2_tokenizer):
    task = parse_text(spec(('distractor " {S}"', 'distractor " {S}", " Maryjanewski"')), "t.circ").prompts.task
    with pytest.raises(DataError, match=r"^t.circ:10:3: distractor ' Maryjanewski' is \d tokens for this tokenizer; an "
                       "answer must be one token$"):
        task_prompts(task, gpt2_tokenizer, 4, 0)


def test_a_counterfactual_must_keep_the_token_count(gpt2_tokenizer):
    text = spec(('{S} handed it to"', '{S} handed it to" counterfactual "When {S} and {IO} got to the big {where.kind}, {S} '
                                      'handed it to"'))
    task = parse_text(text, "t.circ").prompts.task
    with pytest.raises(DataError, match=r"^t.circ:8:12: the counterfactual 'When .* got to the big .*' has (\d+) tokens and "
                       r"its prompt 'When .*' \d+; they must align token by token$"):
        task_prompts(task, gpt2_tokenizer, 16, 0)


def test_answer_sets_expand_ranges_of_slots(gpt2_tokenizer):
    text = '''task "years" {
      words years "03", "50", "97"
      slot year from years
      template "The war lasted from the year 17{year} to the year 17"
      target "{year+1..99}"
      distractor "{00..year-1}"
      metric probability difference
    }
    '''
    task = parse_text(textwrap.dedent(text), "y.circ").prompts.task
    decode = gpt2_tokenizer.decode
    for p in task_prompts(task, gpt2_tokenizer, 12, 0):
        year = int(decode([p.token_ids[p.role("year")]]))
        assert [int(decode([t])) for t in p.targets] == list(range(year + 1, 100))
        assert [decode([t]) for t in p.distractors] == [f"{k:02d}" for k in range(year)]
        assert p.target == p.targets[0] and p.distractor == p.distractors[0]


def test_f_over_answer_sets():
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    answers = torch.tensor([[[1, 2, -1], [3, -1, -1]], [[4, -1, -1], [5, 6, 7]], [[8, -1, -1], [9, -1, -1]]])
    probs = logits.softmax(-1)
    expected_logit = torch.stack([logits[0, [1, 2]].mean() - logits[0, 3], logits[1, 4] - logits[1, [5, 6, 7]].mean(),
                                  logits[2, 8] - logits[2, 9]])
    expected_prob = torch.stack([probs[0, [1, 2]].sum() - probs[0, 3], probs[1, 4] - probs[1, [5, 6, 7]].sum(),
                                 probs[2, 8] - probs[2, 9]])
    torch.testing.assert_close(set_metric(logits, answers), expected_logit)
    torch.testing.assert_close(set_metric(logits, answers, "probability"), expected_prob)
    torch.testing.assert_close(set_metric(logits, answers[:, :, 0]), logits[:, [1, 4, 8]].diagonal() - logits[:, [3, 5, 9]].diagonal())
    # a head's direct effect reads the mean target column minus the mean distractor column
    writes, W_U, scale = torch.randn(3, 2, 2, 6), torch.randn(6, 20), torch.rand(3) + 0.5
    got = direct_effects(writes, W_U, answers, scale)
    direction = torch.stack([W_U[:, [1, 2]].mean(1) - W_U[:, 3], W_U[:, 4] - W_U[:, [5, 6, 7]].mean(1), W_U[:, 8] - W_U[:, 9]])
    torch.testing.assert_close(got, torch.einsum("plhd,pd->plh", writes, direction) / scale[:, None, None])


def test_a_task_run_records_its_metric_as_the_full_model_computes_it(gpt2_tokenizer, tmp_path, monkeypatch):
    """F with the probability difference of answer sets, from the run's own two-stage read (final norm, then every
    logit at the last token), against the model's full logits; and trace.json's "metric" record."""
    from circuitlang.models.model import load_model
    from circuitlang.report.export import trace_to_dict
    from circuitlang.runner.execute import build_prompts, run_plan
    from tiny_models import build_gpt2

    monkeypatch.setenv("CIRCUITLANG_CACHE", str(tmp_path / "cache"))
    directory = build_gpt2(tmp_path / "tiny", gpt2_tokenizer, n_layer=2, n_head=2, n_embd=32, seed=3)
    text = spec(("model gpt2", f'model "{directory}"'), ('target " {IO}"', 'target " {IO}", " {S}"'),
                ('distractor " {S}"', 'distractor " Tom", " the", " a"'), ('"Mary", "John", "Tom"', '"Mary", "John"'),
                tail="prompts task 6 seed 2\ntrace from auto 1\n")
    text = text.replace('  counterfactual', '  metric probability difference\n  counterfactual')
    plan = parse_text(text, str(tmp_path / "t.circ"))
    model = load_model(str(directory))
    result = run_plan(plan, model=model)
    prompts = build_prompts(plan, model)
    with torch.inference_mode():
        tokens = torch.tensor([p.token_ids for p in prompts if len(p.token_ids) == len(prompts[0].token_ids)])
        probs = model.bridge(tokens)[:, -1].softmax(-1)
    same = [i for i, p in enumerate(prompts) if len(p.token_ids) == len(prompts[0].token_ids)]
    expected = [float(probs[k, list(prompts[i].targets)].sum() - probs[k, list(prompts[i].distractors)].sum()) for k, i in enumerate(same)]
    np.testing.assert_allclose(np.array(result.logit_diff)[same], expected, rtol=1e-4, atol=1e-7)
    record = trace_to_dict(result.trace, metric=result.metric)["metric"]
    f = np.array(result.logit_diff)
    assert record == {"kind": "probability difference", "mean": pytest.approx(f.mean()), "positive_fraction": float((f > 0).mean()),
                      "prompts": 6}
