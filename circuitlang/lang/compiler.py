"""Meaning of the `.circ` language: statement trees -> one checked, typed `Plan`.

A spec is read with its `extends` chain: the base's statements come first, then the child's
replace those of the same kind and its intervene blocks those of the same name. The merged spec is
checked as a whole, so an error names the file and line where the offending statement was written.
"""

from __future__ import annotations

import difflib
import os
import re
import unicodedata
from decimal import Decimal

from lark import Token, Tree

from circuitlang.data.ioi import IOI_ROLES, known_heads
from circuitlang.data.prompts import MAX_PROMPTS, PromptFileError, common_roles, read_prompt_file
from circuitlang.data.tasks import Reference, Span, TaskTextError, placeholders, template_roles
from circuitlang.lang.errors import SpecError, did_you_mean, listing
from circuitlang.lang.parser import BARE_WORD, KEYWORDS, STATEMENTS, parse_statements
from circuitlang.lang.plan import (
    CHECKS,
    OUTPUT_FORMATS,
    RANKINGS,
    AutoRoots,
    EdgeSelector,
    Evaluation,
    FilePrompts,
    InterventionSet,
    IOIPrompts,
    ModelSpec,
    Output,
    Plan,
    READING_KEYS,
    READING_SETS,
    Readings,
    Root,
    RootSet,
    SliceRule,
    Slot,
    Swap,
    Task,
    TaskPrompts,
    Template,
    Vocabulary,
    WRITERS,
    Where,
)

# (layers, heads) of the built-in model aliases, so that specs for them are checked before loading.
# Every embedded model (circuitlang.models.embedded.EMBEDDED, which imports torch) is here: a test checks.
MODEL_SHAPES = {"gpt2": (12, 12), "openai-community/gpt2": (12, 12), "gemma-3-270m": (18, 4)}
# Limits on the numbers of a spec (docs/language.md, "Limits"), so a slip of the finger fails `circ check`.
MAX_AUTO_ROOTS = 10_000  # and at most the model's heads, once its shape is known
MAX_SLICES = 100_000
MAX_TOP_EDGES = 1_000_000
MAX_SEED = 2**63 - 1
MAX_INDEX = 99_999  # a layer or head number
MAX_RANDOM_DRAWS = 1_000  # `evaluate ... random K`
# Letters that look like ASCII ones (Cyrillic, Greek), for "did you mean" on a model name typed with one.
_HOMOGLYPHS = str.maketrans("аеорсухіјѕԁԛԝАВЕКМНОРСТХІЈЅαοντΑΒΕΗΙΚΜΝΟΡΤΧΥΖ",
                            "aeopcyxijsdqwABEKMHOPCTXIJSaovtABEHIKMNOPTXYZ")
KNOWN_LISTS = ("ioi",)  # `compare known NAME`: the lists circuitlang.data.ioi.known_heads has
DTYPES = ("float32", "float16", "bfloat16")
_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")
_SLOT_NAME = re.compile(r"[A-Za-z_]\w*")  # a slot is written {slot} and {slot.column} in a task's texts
_ESCAPE = re.compile(r"\\(.?)")
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
_KIND = {"prompts_ioi": "prompts", "prompts_file": "prompts", "prompts_task": "prompts", "trace_roots": "trace",
         "trace_auto": "trace", "compare_known": "compare", "compare_heads": "compare"}

Statements = dict[str, tuple[str, Tree]]  # statement kind or block name -> (file, tree)


def parse_spec(path: str | os.PathLike) -> Plan:
    """Compile the spec file at `path` (with its `extends` chain) into a Plan."""
    path = os.path.normpath(path)
    return _compile(*_load(path, _read(path, Where(path)), ()))


def parse_text(text: str, filename: str = "<spec>") -> Plan:
    """Compile spec text; `filename` names it in errors and anchors its relative paths."""
    return _compile(*_load(filename, text, ()))


def check_against_model(plan: Plan, n_layers: int, n_heads: int) -> None:
    """Raise SpecError if a head the plan names (roots, edges, compared heads) isn't in the model."""
    def inside(layer, head):
        return 0 <= layer < n_layers and 0 <= head < n_heads

    where = dict(plan.where)
    fallback = Where(plan.sources[0] if plan.sources else "<plan>")
    shape = f"{plan.model.name} ({n_layers} layers x {n_heads} heads: 0.0 to {n_layers - 1}.{n_heads - 1})"
    roots = () if isinstance(plan.roots, AutoRoots) else plan.roots
    for r in roots:
        if isinstance(r, RootSet) and r.last >= n_layers:
            raise SpecError.at(where.get(str(r), fallback), f"{r}: layer {r.last} is out of range for {shape}")
    named = [(r.layer, r.head) for r in roots if isinstance(r, Root)]
    named += [h for s in plan.interventions for e in s.edges for h in (e.up, e.down) if h]
    if isinstance(plan.compare, tuple):
        named += [_head(h) for h in plan.compare]
    if plan.evaluate is not None and isinstance(plan.evaluate.sizes, tuple) and max(plan.evaluate.sizes) > n_layers * n_heads:
        raise SpecError.at(where.get("evaluate sizes", fallback), f"evaluate: circuit size {max(plan.evaluate.sizes)} is more "
                           f"than the {n_layers * n_heads} heads of {plan.model.name} ({n_layers} layers x {n_heads} heads)")
    for layer, head in named:
        if not inside(layer, head):
            at = where.get(f"{layer}.{head}", fallback)
            raise SpecError.at(at, f"head {layer}.{head} is out of range for {shape}")
    if isinstance(plan.roots, AutoRoots) and plan.roots.k > n_layers * n_heads:
        raise SpecError.at(where.get("trace", fallback), f"trace from auto {plan.roots.k}: "
                           f"{plan.model.name} has only {n_layers * n_heads} heads ({n_layers} layers x {n_heads} heads)")
    if isinstance(plan.compare, str):
        for layer, head in (_head(h) for heads in known_heads(plan.compare).values() for h in heads):
            if not inside(layer, head):
                raise SpecError.at(where.get("compare", fallback), f'the known "{plan.compare}" list '
                                   f"names head {layer}.{head}, out of range for {shape}")


def format_plan(plan: Plan) -> str:
    """The plan as one flat spec, defaults spelled out and `extends` resolved; `parse_text` of it
    gives the same plan back."""
    m, p, o = plan.model, plan.prompts, plan.output
    lines = [f"# compiled from {', extending '.join(plan.sources)}"] if plan.sources else []
    lines += [
        f"model   {_word(m.name)} device {m.device} dtype {m.dtype}",
        f"prompts ioi {p.n} {p.kind} seed {p.seed}" if isinstance(p, IOIPrompts)
        else f"prompts task {p.n} seed {p.seed}" if isinstance(p, TaskPrompts)
        else f'prompts file "{p.path}"',
        "trace   from " + (f"auto {plan.roots.k}" if isinstance(plan.roots, AutoRoots)
                           else ", ".join(map(str, plan.roots))),
        f"firing  attention > {_decimal(plan.threshold)}",
        f"slices  {plan.slices}",
        f"keep    mass {_decimal(plan.mass)}",
        f"show    edges in >= {plan.show_min_count} prompts",
        f"sources {' '.join(plan.writers)}",
        f"readings {plan.readings}",
    ]
    if plan.compare is not None:
        lines.append("compare " + (f"known {plan.compare}" if isinstance(plan.compare, str)
                                   else f"heads {', '.join(plan.compare)}"))
    lines += [f'output  "{o.directory}" {" ".join(o.formats)}', f"seed    {plan.seed}"]
    if plan.evaluate is not None:
        lines.append(f"evaluate {plan.evaluate}")
    if isinstance(p, TaskPrompts):
        lines += ["", *_task_lines(p.task)]
    for s in plan.interventions:
        actions = f"{', '.join(s.actions)}  {', '.join(s.places)}"
        lines += ["", f'intervene "{s.name}" {{', *(f"  {_selector(e)}" for e in s.edges),
                  f"  {actions}" + ("  against random" if s.random_control else ""), "}"]
    return "\n".join(lines) + "\n"


def _read(path: str, where: Where) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, ValueError) as e:  # ValueError: not UTF-8 text
        reason = getattr(e, "strerror", None) or "not UTF-8 text"
        raise SpecError.at(where, f"can't read {path}: {reason.lower()}") from None


def _load(filename: str, text: str, chain: tuple[str, ...]) -> tuple[Statements, Statements, list[str]]:
    """The statements and intervene blocks of `filename` over those of its `extends` chain, and
    the files read (child first)."""
    statements: Statements = {}
    blocks: Statements = {}
    for tree in parse_statements(text, filename):
        if tree.data == "intervene":
            table, key, what = blocks, _text(tree.children[0]), f"intervene {tree.children[0]} block"
        else:
            key = _KIND.get(tree.data, tree.data)
            table, what = statements, f'"{key}" statement'
        if key in table:
            raise SpecError(filename, tree.meta.line, tree.meta.column,
                            f"duplicate {what}; the first is on line {table[key][1].meta.line}")
        table[key] = (filename, tree)
    if "extends" not in statements:
        return statements, blocks, [filename]
    token = statements.pop("extends")[1].children[0]
    where = Where(filename, token.line, token.column)
    base = os.path.normpath(os.path.join(os.path.dirname(filename), _text(token)))
    seen = (*chain, filename)
    if os.path.abspath(base) in map(os.path.abspath, seen):
        raise SpecError.at(where, f"extends cycle: {' -> '.join((*seen, base))}")
    base_statements, base_blocks, sources = _load(base, _read(base, where), seen)
    return base_statements | statements, base_blocks | blocks, [filename, *sources]


def _compile(statements: Statements, blocks: Statements, sources: list[str]) -> Plan:
    c = _Compiler()
    fields = {}
    for kind in STATEMENTS:  # model, prompts and trace first: the rest may name their heads, roles, roots
        if kind in statements:
            c.file, tree = statements[kind]
            c.where[kind] = Where(c.file, tree.meta.line, tree.meta.column)
            fields.update(getattr(c, f"_{tree.data}")(*tree.children))
    if c.task is not None and "prompts" not in statements:
        fields["prompts"] = TaskPrompts(c.task)
    interventions = []
    for file, tree in blocks.values():
        c.file = file
        interventions.append(c.intervene(*tree.children))
    plan = Plan(**fields, interventions=tuple(interventions), sources=tuple(sources),
                where=tuple(c.where.items()))
    if plan.model.name in MODEL_SHAPES:
        check_against_model(plan, *MODEL_SHAPES[plan.model.name])
    return plan


class _Compiler:
    """Turns each statement's tree into Plan fields, checking what one statement can't alone:
    roles against the prompts, root numbers against the trace."""

    def __init__(self):
        self.file = ""
        self.where: dict[str, Where] = {}
        self.roles: tuple[str, ...] = IOI_ROLES  # the roles every prompt defines
        self.prompt_file: str | None = None  # the prompts file's name, once `prompts file` is read
        self.any_roles: set[str] = set()  # with a prompts file: the roles some prompt defines
        self.records = ()  # with a prompts file: its checked lines
        self.model_name = Plan.model.name  # the default model
        self.roots: tuple[Root, ...] | AutoRoots = AutoRoots()
        self.task: Task | None = None  # the task block, once read

    def error(self, token: Token, message: str) -> SpecError:
        return SpecError(self.file, token.line, token.column, message)

    # statements, one method per tree kind of circuit.lark

    def _model(self, name, *options):
        given = {}
        for key, value in (o.children for o in options):
            if key in given:
                raise self.error(key, f'"{key}" is given twice')
            if key == "device" and not _DEVICE.fullmatch(value):
                raise self.error(value, f'unknown device "{value}"; devices are cpu, cuda, cuda:N and mps'
                                 + did_you_mean(value, ("cpu", "cuda", "mps")))
            if key == "dtype" and value not in DTYPES:
                raise self.error(value, f'unknown dtype "{value}"; dtypes are {listing(DTYPES, "and")}'
                                 + did_you_mean(value, DTYPES))
            given[str(key)] = str(value)
        self.model_name = _text(name)
        _check_model_name(name, self.file)
        return {"model": ModelSpec(self.model_name, **given)}

    def _prompts_ioi(self, n, kind, seed):
        self.no_task("prompts ioi", n or seed or kind)
        self.roles = IOI_ROLES
        return {"prompts": IOIPrompts(
            self.count(n, "the number of prompts", MAX_PROMPTS) if n else IOIPrompts.n,
            str(kind.children[0]) if kind else IOIPrompts.kind,
            self.count(seed, "the seed", MAX_SEED, least=0) if seed else IOIPrompts.seed,
        )}

    def _prompts_file(self, path):
        self.no_task("prompts file", path)
        shown = os.path.normpath(os.path.join(os.path.dirname(self.file), _text(path)))
        absolute = os.path.abspath(shown)
        if os.path.isdir(absolute):
            raise self.error(path, f"{absolute} is a directory, not a prompts file")
        if not os.path.isfile(absolute):
            raise self.error(path, f"no such prompts file: {absolute}")
        try:  # everything but the tokens, checked now rather than after the model has loaded
            records = read_prompt_file(shown)
        except PromptFileError as e:
            raise SpecError(e.file, e.line, e.column, e.message) from None
        self.roles = common_roles(records)
        self.prompt_file = os.path.basename(shown)
        self.any_roles = {name for r in records for name, _ in r.roles}
        self.records = records
        self.prompt_path = shown
        return {"prompts": FilePrompts(absolute)}

    def _prompts_task(self, n, seed):
        if self.task is None:
            raise SpecError.at(self.where["prompts"], "prompts task draws from the spec's task block, and there is none; "
                               'add one: task "NAME" { ... } (docs/language.md, "Tasks")')
        return {"prompts": TaskPrompts(
            self.task,
            self.count(n, "the number of prompts", MAX_PROMPTS) if n else TaskPrompts.n,
            self.count(seed, "the seed", MAX_SEED, least=0) if seed else TaskPrompts.seed,
        )}

    def no_task(self, statement: str, token) -> None:
        if self.task is not None:
            raise SpecError.at(self.where["prompts"], f"{statement} and the task block both make the prompts; "
                               "drop one, or write `prompts task [N] [seed S]` for the task's")

    def _task(self, name, *lines):
        self.task = _TaskCompiler(self).task(name, lines)
        roles = template_roles([t.text for t in self.task.templates])
        self.roles = tuple(r for r in roles[0] if all(r in rs for rs in roles))
        self.any_roles = {r for rs in roles for r in rs}
        return {}

    def _trace_roots(self, *trees):
        roots = []
        for tree in trees:
            root = getattr(self, f"_{tree.data}")(*tree.children)
            if root in roots:
                raise SpecError(self.file, tree.meta.line, tree.meta.column, f"root {root} is given twice")
            roots.append(root)
        self.roots = tuple(roots)
        return {"roots": self.roots}

    def _root(self, head, dest, src):
        return Root(*self.head(head), self.role(dest), self.role(src))

    def _root_heads(self, heads, dest, src):
        """`9.* end->S2`: the head's firing on those roles, for every head of the layer."""
        layer = heads.update("INT", heads.split(".")[0])
        return self.root_set(heads, (heads, layer, layer), dest, src, None)

    def _root_set(self, layers, dest, src, except_source):
        token = layers.children[0]
        ends = [token.update("INT", n) for n in token.split("-")] if token.type == "LAYER_RANGE" else [token, token]
        return self.root_set(token, (token, *ends), dest, src, except_source)

    def root_set(self, at, layers, dest, src, except_source) -> RootSet:
        token, first, last = layers
        first, last = (self.count(n, "a layer", MAX_INDEX, least=0) for n in (first, last))
        if first > last:
            raise self.error(token, f"layers {first}-{last}: the first layer is above the last; write layers {last}-{first}")
        skip = except_source and self.count(except_source.children[0], "the source position", MAX_INDEX, least=0)
        root = RootSet(first, last, dest and self.role(dest), src and self.role(src), skip)
        self.where.setdefault(str(root), Where(self.file, at.line, at.column))
        return root

    def _trace_auto(self, k):
        self.roots = AutoRoots(self.count(k, "the number of roots", MAX_AUTO_ROOTS)) if k else AutoRoots()
        if self.model_name in MODEL_SHAPES:  # any other model: once loaded (check_against_model)
            layers, heads = MODEL_SHAPES[self.model_name]
            if self.roots.k > layers * heads:
                raise self.error(k, f"trace from auto {k}: {self.model_name} has only {layers * heads} heads "
                                 f"({layers} layers x {heads} heads)")
        return {"roots": self.roots}

    def _firing(self, number):
        return {"threshold": self.fraction(number.children[0], "the firing threshold")}

    def _slices(self, rule):
        if isinstance(rule, Tree):
            return {"slices": SliceRule(str(rule.children[0]))}
        return {"slices": SliceRule("top", self.count(rule, "the number of slices", MAX_SLICES))}

    def _keep(self, number):
        return {"mass": self.fraction(number.children[0], "the kept mass")}

    def _show(self, n):
        return {"show_min_count": self.count(n, "the prompt count of show", MAX_PROMPTS)}

    def _compare_known(self, tree):
        name = tree.children[0]
        if name not in KNOWN_LISTS:
            raise self.error(name, f'unknown list "{name}"; known lists are {listing(KNOWN_LISTS)}'
                             + did_you_mean(name, KNOWN_LISTS))
        return {"compare": str(name)}

    def _compare_heads(self, *heads):
        return {"compare": tuple("{}.{}".format(*self.head(h)) for h in heads)}

    def _output(self, directory, *formats):
        for f in formats:
            if f not in OUTPUT_FORMATS:
                raise self.error(f, f'unknown output format "{f}"; formats are '
                                 f'{listing(OUTPUT_FORMATS, "and")}' + did_you_mean(f, OUTPUT_FORMATS))
        formats = tuple(dict.fromkeys(map(str, formats))) or Output.formats
        return {"output": Output(_text(directory), formats)}

    def _seed(self, seed):
        return {"seed": self.count(seed, "the seed", MAX_SEED, least=0)}

    def _evaluate(self, against, mean, sizes, ranks, random, check, edge_sizes):
        kind = str(against.children[0])
        if self.task is not None:
            if kind != "counterfactual":
                raise self.error(against.children[0], f'the prompts of task "{self.task.name}" carry the task\'s own '
                                 "counterfactual: write `against counterfactual`")
            if self.task.counterfactual is None and any(t.counterfactual is None for t in self.task.templates):
                raise self.error(against.children[0], f'task "{self.task.name}" has no counterfactual; add a line like '
                                 '"counterfactual IO -> names" to it')
            kind = "counterfactual"
        elif kind == "counterfactual":
            if self.prompt_file is None:
                raise self.error(against.children[0], "against counterfactual takes each prompt's own counterfactual, from "
                                 "a task or a prompts file; the ioi prompts have abc and flipped")
            kind = "file"
        if self.task is not None:
            pass
        elif kind == "file" and self.prompt_file is None:
            raise self.error(against.children[0], "evaluate ... against file takes each prompt's counterfactual from a prompts "
                             "file; the ioi prompts have abc and flipped counterfactuals")
        if kind != "file" and self.prompt_file is not None:
            raise self.error(against.children[0], f"the {kind} counterfactual is made for the ioi prompts; with "
                             f"{self.prompt_file} write `against file` (each prompt's \"counterfactual\" text)")
        if kind == "file":
            for r in self.records:
                missing = [k for k in ("counterfactual", "target", "distractor") if getattr(r, k) is None]
                if missing:
                    raise SpecError(self.prompt_path, r.line, 0, f"evaluate ... against file needs "
                                    f"{listing(tuple(repr(m) for m in missing), 'and')} in every prompt (line "
                                    f"{self.where['evaluate'].line} of {self.file})")
        chosen = None
        if sizes is not None:
            if len(sizes.children) == 0:
                chosen = "all"
            else:
                chosen = tuple(sorted({self.count(n, "a circuit size", MAX_INDEX) for n in sizes.children}))
                largest = max(sizes.children, key=int)  # checked against the model's heads once it is loaded
                self.where["evaluate sizes"] = Where(self.file, largest.line, largest.column)
        draws = self.count(random, "the number of random rankings", MAX_RANDOM_DRAWS, least=0) if random else Evaluation.random
        rankings = Evaluation.rankings
        if ranks is not None:
            for word in ranks.children:
                if str(word) not in RANKINGS:
                    raise self.error(word, f'unknown ranking "{word}"; rankings are {listing(RANKINGS, "and")}'
                                     + did_you_mean(str(word), RANKINGS))
            rankings = tuple(dict.fromkeys(map(str, ranks.children)))
        if check is not None and str(check.children[0]) not in CHECKS:
            raise self.error(check.children[0], f'unknown check "{check.children[0]}"; the check is "tl" (TransformerLens 4)'
                             + did_you_mean(str(check.children[0]), CHECKS))
        edges = None if edge_sizes is None else tuple(sorted({self.count(n, "an edge circuit size", MAX_INDEX) for n in edge_sizes.children}))
        return {"evaluate": Evaluation(kind, mean is not None, chosen, draws, rankings, check is not None, edges)}

    def _sources(self, keyword, *words):
        chosen = []
        for w in words:
            if w not in WRITERS:
                raise self.error(w, f'unknown source "{w}"; sources are {listing(WRITERS, "and")}' + did_you_mean(w, WRITERS))
            if w in chosen:
                raise self.error(w, f'source "{w}" is given twice')
            chosen.append(str(w))
        if "heads" not in chosen:
            raise self.error(keyword, "sources must include heads: the trace recurses only through heads "
                             f"(e.g. sources heads {' '.join(chosen)})")
        return {"writers": tuple(w for w in WRITERS if w in chosen)}

    def _readings(self, keyword, name, *overrides):
        if name not in READING_SETS:
            raise self.error(name, f'unknown set of readings "{name}"; sets are {listing(tuple(READING_SETS))}'
                             + did_you_mean(name, tuple(READING_SETS)))
        values = dict(vars(READING_SETS[str(name)]))
        given: set[str] = set()
        for key, value in zip(overrides[::2], overrides[1::2]):
            if key not in READING_KEYS:
                raise self.error(key, f'unknown reading "{key}"; readings are {listing(READING_KEYS, "and")}'
                                 + did_you_mean(key, READING_KEYS))
            if key in given:
                raise self.error(key, f'reading "{key}" is given twice')
            allowed = tuple(sorted({getattr(r, key) for r in READING_SETS.values()}))
            if value not in allowed:
                raise self.error(value, f'reading {key} is {listing(allowed)}, got "{value}"' + did_you_mean(value, allowed))
            given.add(str(key))
            values[str(key)] = str(value)
        if len(overrides) % 2:
            key = overrides[-1]
            raise self.error(key, f'reading "{key}" needs a value, e.g. readings {name} {key} '
                             f"{getattr(READING_SETS['circuitlang'], str(key), 'VALUE')}")
        return {"readings": Readings(**values)}

    # intervene blocks

    def intervene(self, name, *lines):
        edges = tuple(getattr(self, f"_{t.data}")(*t.children) for t in lines if t.data != "actions")
        actions = [t for t in lines if t.data == "actions"]
        if not edges:
            raise self.error(name, f'intervene {name} selects no edges; add a line like "edges into 9.9"')
        if not actions:
            raise self.error(name, f"intervene {name} has no actions line; add one like "
                             '"ablate, boost  global, local  against random"')
        if len(actions) > 1:
            raise SpecError(self.file, actions[1].meta.line, actions[1].meta.column,
                            "a second actions line; put all actions of a block on one line")
        *words, against = actions[0].children
        words = [w.children[0] for w in words]
        return InterventionSet(
            _text(name), edges,
            tuple(w for w in ("ablate", "boost") if w in words) or InterventionSet.actions,
            tuple(w for w in ("global", "local") if w in words) or InterventionSet.places,
            random_control=against is not None,
            line=name.line,
        )

    def _edge(self, up, down, via):
        heads = self.head(up), self.head(down)
        if heads[0][0] >= heads[1][0]:
            raise self.error(up, f"edge {up} -> {down} doesn't go downstream: "
                             f"the layer of {up} must be below that of {down}")
        return EdgeSelector("edge", *heads, **self.via(via))

    def _into(self, head, via):
        return EdgeSelector("into", down=self.head(head), **self.via(via))

    def _into_root(self, k, via):
        n = self.roots.k if isinstance(self.roots, AutoRoots) else len(self.roots)
        if len(k) > 6 or not 1 <= int(k) <= n:
            raise self.error(k, f"there is no root {k}; "
                             f"the trace has {n} root{'s' * (n != 1)}, numbered from 1")
        root = None if isinstance(self.roots, AutoRoots) else self.roots[int(k) - 1]
        if isinstance(root, RootSet):
            raise self.error(k, f"root {k} is a set of firings ({root}) of several heads; name one: edges into "
                             f"{root.first}.0")
        down = root and (root.layer, root.head)
        return EdgeSelector("into", down=down, root=int(k), **self.via(via))

    def _from(self, head, via):
        return EdgeSelector("from", up=self.head(head), **self.via(via))

    def _top(self, k):
        return EdgeSelector("top", k=self.count(k, "the number of edges", MAX_TOP_EDGES))

    # pieces

    def via(self, tree):
        role, side = tree.children
        return {"role": role and self.role(role, anywhere=True), "side": side and str(side.children[0])}

    def head(self, token) -> tuple[int, int]:
        if any(len(part) > len(str(MAX_INDEX)) for part in token.split(".")):
            raise self.error(token, f"head {token}: layer and head numbers go up to {MAX_INDEX}")
        layer, head = _head(token)
        self.where.setdefault(f"{layer}.{head}", Where(self.file, token.line, token.column))
        return layer, head

    def role(self, token, anywhere: bool = False) -> str:
        """A role the prompts define: for a root, every prompt; for `at` (anywhere), some prompt."""
        if self.task is not None:
            whose = f'{"the" if anywhere else "every"} prompt{"s" * anywhere} of task "{self.task.name}"'
            known = tuple(sorted(self.any_roles)) if anywhere else self.roles
        elif self.prompt_file is None:
            known, whose = self.roles, "the ioi prompts"
        elif anywhere:
            known, whose = tuple(sorted(self.any_roles)), f"the prompts of {self.prompt_file}"
        else:
            known, whose = self.roles, f"every prompt of {self.prompt_file}"
        if token not in known:
            listed = ", ".join(known) if known else "none"
            raise self.error(token, f'unknown role "{token}"; roles of {whose} are {listed}' + did_you_mean(token, known))
        return str(token)

    def count(self, token, what, most: int, least: int = 1) -> int:
        """A whole number in [least, most]; its digits are counted first (int() refuses 4300 of them)."""
        if len(token) > len(str(most)) or int(token) > most:
            raise self.error(token, f"{what} must be at most {most}, got {_short(token)}")
        if int(token) < least:
            raise self.error(token, f"{what} must be at least {least}, got {token}")
        return int(token)

    def fraction(self, token, what) -> float:
        if not 0 < float(token) <= 1:
            raise self.error(token, f"{what} must be in (0, 1], got {token}")
        return float(token)


def _check_model_name(token: Token, file: str) -> None:
    """A model name that can only be a typo of a built-in one is an error with "did you mean": one that
    differs in case, one with a non-ASCII letter (hub names are ASCII; a Cyrillic "а" looks like an "a"), or
    an org-less name within a letter or two of a built-in. Paths and other hub names are left to the loader."""
    name = _text(token)
    if name in MODEL_SHAPES or name.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name)):
        return
    builtins = list(MODEL_SHAPES)
    skeleton = unicodedata.normalize("NFKC", name).translate(_HOMOGLYPHS)
    close = [b for b in builtins if b.lower() == skeleton.lower()] or difflib.get_close_matches(
        skeleton.lower(), builtins, n=1, cutoff=0.8)
    hint = f'; did you mean "{close[0]}"?' if close else ""
    offset = 1 if token.type == "STRING" else 0
    for i, char in enumerate(name):
        if not char.isascii():
            what = unicodedata.name(char, f"U+{ord(char):04X}").lower()
            raise SpecError(file, token.line, token.column + offset + i,
                            f'model name "{name}" has the non-ASCII character "{char}" (U+{ord(char):04X}, {what}); '
                            f"hub names are ASCII{hint}")
    if close and "/" not in name:  # an org-less name: a built-in, or one of the hub's few legacy names
        raise SpecError(file, token.line, token.column,
                        f'unknown model "{name}"{hint} (a hub model is named org/name, e.g. openai-community/gpt2)')


def _short(digits: str) -> str:
    return digits if len(digits) <= 24 else f"{digits[:12]}... ({len(digits)} digits)"


def _text(token: Token) -> str:
    """A WORD as written, or a STRING without its quotes."""
    return token[1:-1] if token.type == "STRING" else str(token)


def _head(text: str) -> tuple[int, int]:
    layer, head = text.split(".")
    return int(layer), int(head)


def _word(name: str) -> str:
    return name if BARE_WORD.fullmatch(name) and name not in KEYWORDS else f'"{name}"'


def _decimal(x: float) -> str:
    return format(Decimal(repr(x)), "f")


def _selector(e: EdgeSelector) -> str:
    match e.kind:
        case "edge":
            text = "edge {}.{} -> {}.{}".format(*e.up, *e.down)
        case "into":
            text = f"edges into root {e.root}" if e.root else "edges into {}.{}".format(*e.down)
        case "from":
            text = "edges from {}.{}".format(*e.up)
        case "top":
            text = f"top {e.k} edges"
    return text + (f" at {e.role}" if e.role else "") + (f" {e.side}" if e.side else "")


class _TaskCompiler:
    """A `task` block -> Task, checking all that needs no tokenizer: word lists, slots, placeholders, answers and
    the counterfactual against the templates' roles."""

    def __init__(self, outer: _Compiler):
        self.outer, self.file = outer, outer.file
        self.where: dict[str, Where] = {}
        self.vocabularies: dict[str, Vocabulary] = {}
        self.slots: dict[str, str] = {}  # slot -> its word list

    def error(self, token: Token, message: str, offset: int = 0) -> SpecError:
        return SpecError(self.file, token.line, token.column + offset, message)

    def at(self, key: str, token: Token) -> None:
        self.where[key] = Where(self.file, token.line, token.column)

    def task(self, name: Token, lines) -> Task:
        self.at("task", name)
        parts = {"slot": [], "template": [], "target": (), "distractor": (), "swap": None, "metric": "logit"}
        for tree in lines:
            getattr(self, f"_{tree.data}")(tree, parts)
        if not parts["template"]:
            raise self.error(name, f'task {name} has no template; add a line like template "Then, {{IO}} and {{S}} ..."')
        templates = parts["template"]
        for key in ("target", "distractor"):
            for k, (t, token) in enumerate(templates, 1):
                if not (t.targets if key == "target" else t.distractors) and not parts[key]:
                    raise self.error(token, f'template {k} has no {key}; add `{key} " {{IO}}"` to the task or to the template')
        swap = parts["swap"]
        if swap is not None:
            self.check_swap(swap, templates)
        return Task(_text(name), tuple(self.vocabularies.values()), tuple(parts["slot"]), tuple(t for t, _ in templates),
                    parts["target"], parts["distractor"], swap and swap[0], parts["metric"], file=self.file,
                    where=tuple(self.where.items()))

    # lines of the block

    def _words(self, tree, parts):
        name, columns, *rest = tree.children
        if name in self.vocabularies:
            raise self.error(name, f"words {name} is given twice")
        names = tuple(map(str, columns.children)) if columns else ()
        for column in columns.children if columns else ():
            if not _SLOT_NAME.fullmatch(column) or names.count(column) > 1:
                raise self.error(column, f'column "{column}": columns are distinct names of letters, digits and _')
        width = len(names) or 1
        if not rest:
            raise self.error(name, f'words {name} is empty; list its words on the line: words {name} "a", "b", ... '
                             '(or words NAME file "PATH")')
        if len(rest) == 1 and isinstance(rest[0], Token):
            rows = self.word_file(rest[0], width)
        else:
            rows = []
            for row in rest:
                words = tuple(self.text(w) for w in row.children)
                if len(words) != width:
                    raise self.error(row.children[0], f"a row of {len(words)} words in words {name}, which has {width} "
                                     f"column{'s' * (width > 1)}" + ("" if names else "; name the columns: words NAME (a, b) ..."))
                rows.append(words)
        self.at(f"words {name}", name)
        self.vocabularies[str(name)] = Vocabulary(str(name), names, tuple(rows))

    def word_file(self, path: Token, width: int) -> list[tuple[str, ...]]:
        shown = os.path.normpath(os.path.join(os.path.dirname(self.file), _text(path)))
        try:
            with open(shown, encoding="utf-8") as f:
                lines = f.read().removeprefix("\ufeff").split("\n")
        except (OSError, ValueError) as e:
            raise self.error(path, f"can't read the word file {shown}: {(getattr(e, 'strerror', None) or 'not UTF-8 text').lower()}") from None
        rows = []
        for number, line in enumerate(lines, 1):
            line = line.removesuffix("\r")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            words = tuple(line.split("\t")) if width > 1 else (line.strip(),)
            if len(words) != width:
                raise SpecError(shown, number, 0, f"{len(words)} tab-separated words; the word list has {width} columns")
            rows.append(words)
        if not rows:
            raise self.error(path, f"the word file {shown} is empty (blank lines and # comments only)")
        return rows

    def _slot(self, tree, parts):
        *names, vocabulary = tree.children
        if vocabulary not in self.vocabularies:
            raise self.error(vocabulary, f'unknown word list "{vocabulary}"; write `words {vocabulary} ...` above this line'
                             + did_you_mean(vocabulary, self.vocabularies))
        for name in names:
            if not _SLOT_NAME.fullmatch(name) or name == "end":
                raise self.error(name, f'slot "{name}": a slot is a name of letters, digits and _, and not "end"')
            if name in self.slots:
                raise self.error(name, f"slot {name} is given twice")
            self.slots[str(name)] = str(vocabulary)
        rows = self.vocabularies[vocabulary].rows
        if len(names) > len(rows):
            raise self.error(names[0], f"{len(names)} distinct words from {vocabulary}, which has {len(rows)}")
        parts["slot"].append(Slot(tuple(map(str, names)), str(vocabulary)))

    def _template(self, tree, parts):
        text, *options = tree.children
        k = len(parts["template"]) + 1
        self.at(f"template {k}", text)
        if not _text(text).strip():
            raise self.error(text, "an empty template; write the prompt with its {slot} placeholders")
        given = {"target": (), "distractor": (), "counterfactual": None}
        for option in options:
            child = option.children[0]
            if isinstance(child, Tree):  # target / distractor
                key, values = str(child.children[0]), self.answers(child)
            else:
                key, values = "counterfactual", self.checked(child, ranges=False)
            if given[key]:
                raise self.error(child if isinstance(child, Token) else child.children[0], f"template {k} gives its {key} twice")
            given[key] = values
        parts["template"].append((Template(self.checked(text, ranges=False), given["target"], given["distractor"],
                                           given["counterfactual"], line=text.line), text))

    def _answers(self, tree, parts):
        key = str(tree.children[0])
        if parts[key]:
            raise self.error(tree.children[0], f"the task's {key} is given twice")
        self.at(key, tree.children[0])
        parts[key] = self.answers(tree)

    def answers(self, tree) -> tuple[str, ...]:
        return tuple(self.checked(s, ranges=True) for s in tree.children[1:] if s.type == "STRING")

    def _swap(self, tree, parts):
        *roles, to = tree.children
        if parts["swap"] is not None:
            raise self.error(tree.children[0], "the task's counterfactual is given twice")
        self.at("counterfactual", roles[0])
        if to.type == "STRING":
            swap = Swap(tuple(map(str, roles)), text=self.checked(to, ranges=False))
        elif to not in self.vocabularies:
            raise self.error(to, f'unknown word list "{to}"; a counterfactual takes fresh words from a word list '
                             f'or writes a "text"' + did_you_mean(to, self.vocabularies))
        else:
            swap = Swap(tuple(map(str, roles)), vocabulary=str(to))
        parts["swap"] = (swap, roles)

    def _metric(self, tree, parts):
        parts["metric"] = str(tree.children[1])

    def check_swap(self, swap, templates) -> None:
        rule, tokens = swap
        for role, token in zip(rule.roles, tokens):
            if list(rule.roles).count(role) > 1:
                raise self.error(token, f"role {role} is named twice")
        roles = template_roles([t.text for t, _ in templates])
        for k, ((t, token), names) in enumerate(zip(templates, roles), 1):
            if t.counterfactual is not None:
                continue
            for role, role_token in zip(rule.roles, tokens):
                if role == "end":
                    raise self.error(role_token, "the counterfactual changes words at slots' roles, not at end")
                if role not in names:
                    raise self.error(token, f'template {k} has no role "{role}", which the counterfactual on line '
                                     f"{role_token.line} names; its roles are {', '.join(names[:-1])}")
            if rule.vocabulary is not None:
                columns = self.vocabularies[rule.vocabulary].columns
                refs = [p for p in placeholders(t.text) if isinstance(p, Reference)]
                for role, p in zip(names, refs):
                    if role in rule.roles and p.column is not None and p.column not in columns:
                        raise self.error(token, f'template {k} writes column "{p.column}" at role {role}, which words '
                                         f"{rule.vocabulary} of the counterfactual has not")

    # pieces

    def text(self, token: Token) -> str:
        """A task string with its escapes (\\n, \\t, \\\\) read."""
        def escape(m: re.Match) -> str:
            if m.group(1) not in _ESCAPES:
                raise self.error(token, f'unknown escape "\\{m.group(1)}"; escapes are \\n, \\t and \\\\', 1 + m.start())
            return _ESCAPES[m.group(1)]
        return _ESCAPE.sub(escape, _text(token))

    def checked(self, token: Token, ranges: bool) -> str:
        """A template's or answer's text, its placeholders checked against the slots and word lists."""
        raw = _text(token)
        try:
            pieces = placeholders(raw)
        except TaskTextError as e:
            raise self.error(token, e.message, 1 + e.offset) from None
        for p in pieces:
            if isinstance(p, Span):
                if not ranges:
                    raise self.error(token, "a range {A..B} makes several answers; write it in a target or distractor",
                                     1 + p.offset)
                for o in (p.lo, p.hi):
                    if o.slot is not None:
                        self.reference(token, o.slot, o.column, p.offset, numbers=True)
            elif isinstance(p, Reference):
                self.reference(token, p.slot, p.column, p.offset)
        return self.text(token)

    def reference(self, token: Token, slot: str, column: str | None, offset: int, numbers: bool = False) -> None:
        if slot not in self.slots:
            raise self.error(token, f'unknown slot "{slot}"; slots are {listing(tuple(self.slots)) if self.slots else "none yet"}'
                             + did_you_mean(slot, self.slots), 2 + offset)
        vocabulary = self.vocabularies[self.slots[slot]]
        if column is not None and column not in vocabulary.columns:
            known = listing(vocabulary.columns) if vocabulary.columns else "none (it has one unnamed column: write {" + slot + "})"
            raise self.error(token, f'words {vocabulary.name} has no column "{column}"; its columns are {known}'
                             + did_you_mean(column, vocabulary.columns), 2 + offset + len(slot) + 1)
        if numbers:
            index = 0 if column is None else vocabulary.columns.index(column)
            bad = next((r[index] for r in vocabulary.rows if not r[index].isdigit()), None)
            if bad is not None:
                raise self.error(token, f'a range reads {slot} as a whole number, and words {vocabulary.name} has "{bad}"',
                                 2 + offset)


def _task_lines(task: Task) -> list[str]:
    """The task block as written by `format_plan`: word lists inline, so the plan says every word it draws."""
    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") + '"'

    lines = [f"task {quoted(task.name)} {{"]
    for v in task.vocabularies:
        columns = f" ({', '.join(v.columns)})" if v.columns else ""
        line = f"  words {v.name}{columns} "
        for k, row in enumerate(" ".join(map(quoted, r)) for r in v.rows):  # rows continue after a comma
            if k and len(line) + len(row) > 110:
                lines.append(line + ",")
                line = "    "
            line += (", " if k and line != "    " else "") + row
        lines.append(line)
    lines += [f"  slot {', '.join(s.names)} from {s.vocabulary}" for s in task.slots]
    for t in task.templates:
        options = [f"{key} {', '.join(map(quoted, values))}" for key, values in (("target", t.targets), ("distractor", t.distractors))
                   if values]
        options += [f"counterfactual {quoted(t.counterfactual)}"] if t.counterfactual is not None else []
        lines.append(f"  template {quoted(t.text)}" + "".join(f" {o}" for o in options))
    lines += [f"  {key} {', '.join(map(quoted, values))}" for key, values in (("target", task.targets), ("distractor", task.distractors))
              if values]
    if task.counterfactual is not None:
        c = task.counterfactual
        lines.append(f"  counterfactual {', '.join(c.roles)} -> {c.vocabulary or quoted(c.text)}")
    lines += [f"  metric {task.metric} difference", "}"]
    return lines
