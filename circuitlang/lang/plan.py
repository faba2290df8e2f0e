"""The compiled, typed form of a `.circ` spec. Pure data: no torch, no model.

A `Plan` is what the engine and the CLI consume. Every field has the paper's default, so the
paper's set-up (section 5.3) is `Plan(model=ModelSpec("gpt2"), roots=PAPER_ROOTS)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

PromptKind = Literal["ABBA", "BABA", "mixed"]
Side = Literal["s", "d"]


class Where(NamedTuple):
    """Where something was written in a spec, for error messages (line 0: the file as a whole)."""

    file: str
    line: int = 0
    column: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """A hub name, a built-in alias or a local directory in Hugging Face format."""

    name: str
    device: str = "cpu"
    dtype: str = "float32"


@dataclass(frozen=True)
class IOIPrompts:
    """The IOI generator (Wang et al.), section 4.3: N prompts from a seed."""

    n: int = 256
    kind: PromptKind = "mixed"
    seed: int = 0


@dataclass(frozen=True)
class FilePrompts:
    """A JSONL prompt file: one object per line with `text` and named role positions or words."""

    path: str


@dataclass(frozen=True)
class Vocabulary:
    """`words NAME [(COLUMN, ...)] ROWS`: a task's word list; each row holds one word per column."""

    name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Slot:
    """`slot NAME, NAME from VOCABULARY`: per prompt, distinct rows of the vocabulary, one per name."""

    names: tuple[str, ...]
    vocabulary: str


@dataclass(frozen=True)
class Template:
    """`template "TEXT" [target ...] [distractor ...] [counterfactual "TEXT"]`: a prompt's text with `{slot}`
    placeholders, and this template's own answers and counterfactual text (else the task's)."""

    text: str
    targets: tuple[str, ...] = ()
    distractors: tuple[str, ...] = ()
    counterfactual: str | None = None
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Swap:
    """`counterfactual ROLE, ... -> VOCABULARY | "TEXT"`: the counterfactual prompt changes the words at these
    roles, to fresh distinct rows of a vocabulary (none the prompt already drew from it) or to a text."""

    roles: tuple[str, ...]
    vocabulary: str | None = None
    text: str | None = None


METRICS = ("logit", "probability")


@dataclass(frozen=True)
class Task:
    """A `task` block: prompts from templates whose slots are filled from word lists (docs/language.md, "Tasks").

    targets / distractors: the answer sets (text with placeholders) of templates that give none; metric: F is
    the difference of the sets' mean logits (`logit`) or of their summed probabilities (`probability`)."""

    name: str
    vocabularies: tuple[Vocabulary, ...]
    slots: tuple[Slot, ...]
    templates: tuple[Template, ...]
    targets: tuple[str, ...] = ()
    distractors: tuple[str, ...] = ()
    counterfactual: Swap | None = None
    metric: Literal["logit", "probability"] = "logit"
    file: str = field(default="", compare=False)  # the spec file, for errors found once the tokenizer loads
    # where each part was written: "target", "distractor", "counterfactual", "template N", "words NAME"
    where: tuple[tuple[str, Where], ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class TaskPrompts:
    """`prompts task [N] [seed S]`: N prompts of the spec's task, drawn from seed S."""

    task: Task
    n: int = 256
    seed: int = 0


@dataclass(frozen=True)
class Root:
    """A trace root: head (layer, head) on the token pair (dest role -> src role)."""

    layer: int
    head: int
    dest: str
    src: str

    def __str__(self) -> str:
        return f"{self.layer}.{self.head} {self.dest}->{self.src}"


@dataclass(frozen=True)
class RootSet:
    """`trace from every firing of layers FIRST-LAST [from DEST] [to SRC] [except source N]`, and `L.* DEST->SRC`
    (one layer, both roles): every firing of every head of those layers is a root, optionally only those from
    token role `dest`, to token role `src`, and none whose source is position `except_source`.

    A set gives the roots its explicit list would (for `9.* end->S2`: `9.0 end->S2, 9.1 end->S2, ...`); in each
    prompt its root events go by layer, head, destination, then source (the order `readings ... count events`
    walks them in)."""

    first: int
    last: int
    dest: str | None = None
    src: str | None = None
    except_source: int | None = None

    def __str__(self) -> str:
        if self.first == self.last and self.dest and self.src and self.except_source is None:
            return f"{self.first}.* {self.dest}->{self.src}"
        layers = f"layer {self.first}" if self.first == self.last else f"layers {self.first}-{self.last}"
        return (f"every firing of {layers}" + (f" from {self.dest}" if self.dest else "") + (f" to {self.src}" if self.src else "")
                + (f" except source {self.except_source}" if self.except_source is not None else ""))

    def chooses(self, layer, prompt, dest, src, dest_at, src_at):
        """Which of the firings (layer, prompt, dest, src) [N] the set starts from; dest_at, src_at [P]: each
        prompt's position of the set's roles (None without one). Tensors or arrays alike."""
        chosen = (layer >= self.first) & (layer <= self.last)
        if dest_at is not None:
            chosen &= dest == dest_at[prompt]
        if src_at is not None:
            chosen &= src == src_at[prompt]
        if self.except_source is not None:
            chosen &= src != self.except_source
        return chosen


def root_heads(root: Root | RootSet, n_heads: int) -> list[tuple[int, int]]:
    """The heads (layer, head) whose firings a root starts from."""
    if isinstance(root, Root):
        return [(root.layer, root.head)]
    return [(layer, head) for layer in range(root.first, root.last + 1) for head in range(n_heads)]


_ROOT = re.compile(r"^\s*(\d+)\.(\d+|\*)\s+([\w+-]+)\s*->\s*([\w+-]+)\s*$")
_ROOT_SET = re.compile(r"^\s*every firing of (?:layer (\d+)|layers (\d+)-(\d+))(?: from ([\w+-]+))?(?: to ([\w+-]+))?"
                       r"(?: except source (\d+))?\s*$")


def parse_root(text: str) -> Root | RootSet:
    """A root from the text `str` gives it (as trace.json keeps it): `"9.6 end->IO"` -> Root(9, 6, "end", "IO");
    `"9.* end->IO"`, `"every firing of layers 9-11 ..."` -> a RootSet. For the Python API; specs go through the
    language."""
    if match := _ROOT.match(text):
        layer, head, dest, src = match.groups()
        return RootSet(int(layer), int(layer), dest, src) if head == "*" else Root(int(layer), int(head), dest, src)
    if match := _ROOT_SET.match(text):
        one, first, last, dest, src, skip = match.groups()
        return RootSet(int(one or first), int(one or last), dest, src, None if skip is None else int(skip))
    raise ValueError(f"root {text!r} is not of the form 'layer.head dest->src' (e.g. '9.6 end->IO', '9.* end->IO') "
                     "or 'every firing of layers A-B [from ROLE] [to ROLE] [except source N]'")


# The paper's roots (section 5.3): the three name mover heads of GPT-2 small, firing end -> IO.
PAPER_ROOTS = (Root(9, 9, "end", "IO"), Root(9, 6, "end", "IO"), Root(10, 0, "end", "IO"))


@dataclass(frozen=True)
class AutoRoots:
    """`trace from auto k`: the k heads with the largest direct effect on the task metric."""

    k: int = 3


@dataclass(frozen=True)
class SliceRule:
    """Which orthogonal slices form S_ij (section 4.1): `paper`, `all` (Fig. 16) or `top k`."""

    kind: Literal["paper", "all", "top"] = "paper"
    k: int | None = None

    def __str__(self) -> str:
        return f"top {self.k}" if self.kind == "top" else self.kind


@dataclass(frozen=True)
class Output:
    directory: str = "runs/trace"
    formats: tuple[str, ...] = ("json", "graphml", "svg", "png")


OUTPUT_FORMATS = ("json", "graphml", "dot", "svg", "png", "html", "neuronpedia")


@dataclass(frozen=True)
class EdgeSelector:
    """Which traced edges an intervention set acts on (section 5.4, Figs. 6, 7, 25-27).

    kind:
      - "edge": one edge `up -> down` (up/down are (layer, head)); `side` and `role` optional
      - "into": all edges into head `down` (optionally only through token `role` / side);
        `root` is set for `edges into root K` (1-based); with `trace from auto` the compiler
        can't know the head, so `down` is None and the engine resolves the K-th root
      - "from": all edges out of head `up`
      - "top": the `k` heaviest edges of the trace
    """

    kind: Literal["edge", "into", "from", "top"]
    up: tuple[int, int] | None = None
    down: tuple[int, int] | None = None
    role: str | None = None
    side: Side | None = None
    k: int | None = None
    root: int | None = None


@dataclass(frozen=True)
class InterventionSet:
    """A named set of edges intervened on together, with the kinds and places to run."""

    name: str
    edges: tuple[EdgeSelector, ...]
    actions: tuple[Literal["ablate", "boost"], ...] = ("ablate", "boost")
    places: tuple[Literal["global", "local"], ...] = ("global", "local")
    random_control: bool = True
    line: int = 0


WRITERS = ("heads", "mlp", "embed", "bias")  # `sources ...`: the residual writers an edge may come from


@dataclass(frozen=True)
class Readings:
    """Where the paper's text and the authors' released code differ, which one the trace follows
    (docs/method.md, "Readings of the paper"; `readings` in a spec).

    homogeneous: (a) the upstream write in eq. (8), `zero` for [o; 0] (the appendix), `one` for [o; 1]
    (the authors' code); value: (b) the value bias `folded` into the shared b_O (the authors' loading) or
    part of each `head`'s output (eq. 4); negative: (c) a side whose writers sum to <= 0 keeps its `top`
    writer (the code) or `none` (the text's smallest set reaching the mass of the sum); count: (d) an
    edge counts the `prompts` it is seen in (the text) or, as the authors' graph code does, every event
    that reaches it after its first prompt (`events`); labels: (e) where two roles of an IOI prompt fall on one
    token, which names it: the first in circuitlang.data.ioi.IOI_ROLES (`circuitlang`) or, as the authors'
    `idx_to_gram` does, the last in their `word_idx` (`authors`, circuitlang.data.ioi.AUTHORS_ROLES).
    """

    homogeneous: Literal["zero", "one"] = "zero"
    value: Literal["folded", "head"] = "folded"
    negative: Literal["top", "none"] = "top"
    count: Literal["prompts", "events"] = "prompts"
    labels: Literal["circuitlang", "authors"] = "circuitlang"

    @classmethod
    def parse(cls, text: str) -> Readings:
        """The readings `str` wrote: a named set, then `READING VALUE` overrides (text the compiler checked)."""
        name, *overrides = text.split()
        return cls(**{**vars(READING_SETS[name]), **dict(zip(overrides[::2], overrides[1::2]))})

    def __str__(self) -> str:
        """The named set with the fewest overrides, then the overrides: `authors`, `paper count events`."""
        def overrides(base: Readings) -> list[str]:
            return [f"{k} {getattr(self, k)}" for k in READING_KEYS if getattr(self, k) != getattr(base, k)]

        name = min(READING_SETS, key=lambda n: len(overrides(READING_SETS[n])))
        return " ".join([name, *overrides(READING_SETS[name])])


READING_KEYS = ("homogeneous", "value", "negative", "count", "labels")
READING_SETS = {  # the order breaks ties in Readings.__str__
    "circuitlang": Readings(),
    "paper": Readings("zero", "head", "none", "prompts", "circuitlang"),
    "authors": Readings("one", "folded", "top", "events", "authors"),
}


COUNTERFACTUALS = ("abc", "flipped", "file", "counterfactual")
DEFAULT_RANDOM_DRAWS = 10
# `evaluate ... rank`: the trace's influence and count rankings, attribution patching with the gradient at the
# clean run (MIB's EAP) and at the counterfactual run (TransformerLens 4's), direct logit attribution
RANKINGS = ("influence", "count", "attribution_clean", "attribution_cf", "dla")
CHECKS = ("tl",)


@dataclass(frozen=True)
class Evaluation:
    """`evaluate faithfulness against ...`: how much of the task metric circuits of growing size keep.

    against: the counterfactual whose run the heads outside a circuit take their output from: `abc`
    (three other names) or `flipped` (S2 becomes IO) for the ioi prompts, `file` (each prompt's
    `counterfactual` text) for a prompts file; mean: patch with the mean over the counterfactual prompts
    instead of each prompt's own; sizes: the circuit sizes (heads) evaluated, None for the default grid,
    "all" for every size; rankings: the methods whose rankings are evaluated (RANKINGS), random: seeded
    random rankings averaged as the chance baseline; check_tl: check our attribution scores against
    TransformerLens 4's `attribution_patch` and score the trace's edges with its `faithfulness` (`check tl`); edges:
    the edge counts of the trace's edge circuits scored by its own interventions (`edges K, ...`), None for none.
    """

    against: Literal["abc", "flipped", "file"] = "abc"
    mean: bool = False
    sizes: tuple[int, ...] | Literal["all"] | None = None
    random: int = DEFAULT_RANDOM_DRAWS
    rankings: tuple[str, ...] = RANKINGS
    check_tl: bool = False
    edges: tuple[int, ...] | None = None

    def __str__(self) -> str:
        sizes = "" if self.sizes is None else " sizes " + (self.sizes if self.sizes == "all" else ", ".join(map(str, self.sizes)))
        rank = "" if self.rankings == RANKINGS else " rank " + ", ".join(self.rankings)
        edges = "" if self.edges is None else " edges " + ", ".join(map(str, self.edges))
        return f"faithfulness against {self.against}{' mean' * self.mean}{sizes}{rank} random {self.random}{' check tl' * self.check_tl}{edges}"


@dataclass(frozen=True)
class Plan:
    model: ModelSpec = ModelSpec("gemma-3-270m")
    prompts: IOIPrompts | FilePrompts | TaskPrompts = IOIPrompts()
    roots: tuple[Root | RootSet, ...] | AutoRoots = AutoRoots()
    threshold: float = 0.5
    slices: SliceRule = SliceRule()
    mass: float = 0.7
    show_min_count: int = 1
    compare: str | tuple[str, ...] | None = None
    output: Output = Output()
    interventions: tuple[InterventionSet, ...] = ()
    seed: int = 0
    evaluate: Evaluation | None = None
    writers: tuple[str, ...] = ("heads",)  # `sources`: the writers an edge may come from (WRITERS)
    readings: Readings = Readings()
    sources: tuple[str, ...] = field(default=(), compare=False)  # the spec files read, child first
    # where statements ("model", "compare", ...) and heads ("9.9", first mention) were written
    where: tuple[tuple[str, Where], ...] = field(default=(), compare=False, repr=False)
