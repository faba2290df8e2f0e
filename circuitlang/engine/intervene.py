"""Edge interventions (paper section 5.4; appendix "Intervention Details", "Magnitudes of Interventions").

An edge row of the trace, (l, b) -> (layer, a) of type s or d on the token pair (i, j) of a prompt,
carries a signal: the part of the upstream head's write o at token m (m = j for s, m = i for d) that
lies in the downstream head's subspace for that firing, span{v_k : k in S_ij} (s) or span{u_k} (d).
In homogeneous coordinates (appendix, "Handling Homogeneous Coordinates"), with P that projector:

    h = (P [o; 0])[:d], then centred (h - mean h) for LayerNorm models, not for RMSNorm ones.

o is a displacement added to the residual, so its homogeneous coordinate is 0, exactly as in the
contributions of eq. (8): h is then the signal whose size the edge's weight reports. The authors' code
appends a 1 (the homogeneous coordinate of a point), which adds P's image of the homogeneous axis, a
vector the upstream head never wrote; `homogeneous=True` reproduces that.

`ablate` subtracts h, `boost` adds it. `global` does so in the upstream head's residual write at token
m (`blocks.{l}.hook_attn_out`, which is the write after any post-attention norm), so every later
reader sees the change. `local` does so only in the downstream head's input: its normalised input at
m becomes x_m -/+ h / scale_m (scale: the downstream norm's clean scale at m); the head's q, k and v
are recomputed from that input, which by linearity is adding (h / scale_m) W to the head's own slice
of `attn.hook_q`, `hook_k`, `hook_v` in the current pass. With grouped KV heads the key and value
heads are shared: a local change of k/v reaches every query head of the group.

`random` controls do the same with a subspace of the same size drawn from the downstream head's
slices not in S_ij, from a torch.Generator seeded by the plan's seed and the set's name.

A set is applied all at once: every selected edge row in every prompt where it was traced, the
deltas summed. Nothing below the first layer a variant changes can differ from the clean run, so each
pass starts there, from the clean residual captured at that layer (the upstream head's layer for
global, the downstream head's for local), and stops at the final norm, where F reads two logits. Under
causal attention nothing before the first token a set changes differs either: the pass runs only the
positions from there on, attending to the clean keys and values of the positions before (captured
with the activations, `Activations.kv`); for `edges into root 1 at end` that is the last token alone.
The variants of a set (kind x place x control) that start at the same layer run stacked in one batch,
and only over the prompts the set touches. `partial=False` runs every pass from the tokens instead:
the same numbers, as the tests check.

This module's top level imports no torch, so that the report layer can read its result types.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from circuitlang.data.prompts import PromptSet
from circuitlang.engine.results import Trace
from circuitlang.lang.plan import EdgeSelector, InterventionSet, Root, RootSet

if TYPE_CHECKING:
    from torch import Tensor

    from circuitlang.engine.forward import Activations
    from circuitlang.models.geometry import AttentionGeometry
    from circuitlang.models.model import LoadedModel

Progress = Callable[[str, int, int], None]

KINDS = ("ablate", "boost")
PLACES = ("global", "local")
CONTROLS = ("signal", "random")


class InterventionError(ValueError):
    """An intervention set that cannot run (a root number the trace lacks, a role the prompts lack)."""


# --- results: numpy and plain Python only ------------------------------------------------------------


@dataclass(frozen=True)
class InterventionRows:
    """One row per (set, kind, place, control, prompt the set intervenes in), as columns.

    f_before / f_after: F = logit(target) - logit(distractor) at the last token without / with the
    intervention, delta_f their difference (NaN when the prompts carry no answers). score_*: the
    downstream heads' raw attention scores A'_ij of the set's traced events in the prompt (their mean
    when there are several). cosine, norm_ratio: x against x' at each intervened token of each
    downstream head, averaged (Figs. 10-13); x is the head's normalised input, x' the same with the
    intervention (local: x -/+ h / scale; global: the intervened pass's residual, normalised with the
    clean scale). n_edges: the set's edge rows traced in the prompt.
    """

    set: np.ndarray
    kind: np.ndarray
    place: np.ndarray
    control: np.ndarray
    prompt: np.ndarray
    n_edges: np.ndarray
    f_before: np.ndarray
    f_after: np.ndarray
    delta_f: np.ndarray
    score_before: np.ndarray
    score_after: np.ndarray
    delta_score: np.ndarray
    cosine: np.ndarray
    norm_ratio: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)

    def where(self, **match) -> np.ndarray:
        """Bool mask of the rows whose columns equal `match`, e.g. where(set="x", kind="ablate")."""
        mask = np.ones(len(self), dtype=bool)
        for column, value in match.items():
            mask &= getattr(self, column) == value
        return mask


ROW_TEXT = ("set", "kind", "place", "control")
ROW_INT = ("prompt", "n_edges")


@dataclass(frozen=True)
class InterventionSummary:
    """Statistics over the intervened prompts of one (set, kind, place, control)."""

    set: str
    kind: str
    place: str
    control: str
    n_prompts: int
    delta_f_mean: float
    delta_f_median: float
    delta_f_q25: float
    delta_f_q75: float
    delta_score_mean: float
    delta_score_median: float
    delta_score_q25: float
    delta_score_q75: float
    cosine_mean: float
    cosine_min: float
    norm_ratio_mean: float


@dataclass(frozen=True)
class Verdict:
    """Per (set, place): does ablation lower F and boosting raise it, more than the random control?

    verdict: "yes" (both, or the one kind run), "ablate only", "boost only", "reversed" (ablation
    raises F and boosting lowers it, beyond the control), "no", or "n/a" (no F, no prompts).
    """

    set: str
    place: str
    ablate: float | None
    ablate_random: float | None
    boost: float | None
    boost_random: float | None
    verdict: str


@dataclass(frozen=True)
class SetInfo:
    """What a set resolved to in the trace: per selector, how many edge rows it matched."""

    name: str
    line: int
    selectors: tuple[str, ...]
    matched: tuple[int, ...]
    n_edge_rows: int
    n_prompts: int
    upstream: tuple[tuple[int, int], ...]
    downstream: tuple[tuple[int, int], ...]
    actions: tuple[str, ...]
    places: tuple[str, ...]
    random_control: bool


@dataclass(frozen=True)
class InterventionResults:
    """Every intervention of a plan: per-prompt rows, summaries, verdicts, and what each set matched.

    passes: forward passes run (one per set, kind, place and control, times the chunks of
    `batch_size` prompts); centred: whether h was centred (LayerNorm models); homogeneous: whether h
    projects [o; 1] (the paper) or [o; 0].
    """

    model: str
    seed: int
    centred: bool
    homogeneous: bool
    sets: tuple[SetInfo, ...]
    rows: InterventionRows
    summaries: tuple[InterventionSummary, ...]
    verdicts: tuple[Verdict, ...]
    passes: int
    timings: dict = field(default_factory=dict, compare=False)

    def summary(self, set: str, kind: str, place: str, control: str = "signal") -> InterventionSummary | None:
        for s in self.summaries:
            if (s.set, s.kind, s.place, s.control) == (set, kind, place, control):
                return s
        return None


def describe(selector: EdgeSelector) -> str:
    """A selector as the spec line that makes it."""
    head = "{}.{}".format
    if selector.kind == "edge":
        text = f"edge {head(*selector.up)} -> {head(*selector.down)}"
    elif selector.kind == "into":
        text = f"edges into root {selector.root}" if selector.root else f"edges into {head(*selector.down)}"
    elif selector.kind == "from":
        text = f"edges from {head(*selector.up)}"
    else:
        text = f"top {selector.k} edges"
    return text + (f" at {selector.role}" if selector.role else "") + (f" {selector.side}" if selector.side else "")


# --- selecting edge rows of the trace (numpy only) ---------------------------------------------------


def _role_match(trace: Trace, prompts: PromptSet, token: np.ndarray, role: str) -> np.ndarray:
    """Bool per edge row: the row's token is at `role` in its prompt (a role position, or a label)."""
    prompt = trace.edges.prompt
    if role in prompts.role_names:
        positions = np.array([p.role(role) for p in prompts], dtype=np.int64)
        return token == positions[prompt]
    if not any(role in labels for labels in trace.labels):
        raise InterventionError(f"role {role!r} is neither a role of the prompts ({', '.join(prompts.role_names)}) "
                                "nor a token label of the trace")
    return np.array([trace.labels[p][t] == role for p, t in zip(prompt.tolist(), token.tolist())], dtype=bool)


def select_edges(trace: Trace, prompts: PromptSet, selector: EdgeSelector, roots: Sequence[Root] = ()) -> np.ndarray:
    """Bool mask over the trace's edge rows that `selector` picks (see EdgeSelector). Only edges from heads:
    section 5.4 moves a head's output; the writers of `sources` (MLPs, biases, embeddings) are left alone."""
    e = trace.edges
    token = e.token
    up = lambda head: (e.up_layer == head[0]) & (e.up_head == head[1])  # noqa: E731
    down = lambda head: (e.layer == head[0]) & (e.head == head[1])  # noqa: E731
    if selector.kind == "edge":
        mask = up(selector.up) & down(selector.down)
    elif selector.kind == "into":
        head = selector.down
        if selector.root is not None:
            if not 1 <= selector.root <= len(roots):
                raise InterventionError(f"edges into root {selector.root}: the trace has {len(roots)} "
                                        f"root{'s' * (len(roots) != 1)}, numbered from 1")
            root = roots[selector.root - 1]
            if isinstance(root, RootSet):
                raise InterventionError(f"edges into root {selector.root}: that root is a set of firings ({root}) of "
                                        "several heads; name one head: edges into L.H")
            head = (root.layer, root.head)
        mask = down(head)
    elif selector.kind == "from":
        mask = up(selector.up)
    elif selector.kind == "top":
        comm = [(u, v, d) for u, v, d in trace.graph.edges(data=True) if d.get("kind") == "communication"]
        comm.sort(key=lambda x: (-x[2]["total"], x[0], x[1]))
        labels = np.array([trace.labels[p][t] for p, t in zip(e.prompt.tolist(), token.tolist())], dtype=object)
        mask = np.zeros(len(e), dtype=bool)
        for u, v, _ in comm[: selector.k]:
            mask |= up(u) & down(v[:2]) & (labels == v[2])
    else:
        raise InterventionError(f"unknown edge selector kind {selector.kind!r}")
    if selector.side is not None:
        mask &= e.side == selector.side
    if selector.role is not None:
        mask &= _role_match(trace, prompts, token, selector.role)
    return mask & (e.up_head >= 0)


# --- the interventions (torch from here on, imported inside the functions) ---------------------------


@dataclass(frozen=True)
class GroupPlan:
    """A set's selected edge rows merged per intervened signal; what needs no activations.

    One group per (prompt, upstream head, downstream head, side, token m, offset): the rows of several
    traced events that read the same upstream write at the same token through the same subspace basis
    are merged, their S_ij united, so a signal is never subtracted twice. slices, random_slices [G, r]:
    the slices projected on (the random set has the same size, or all the slices outside S_ij if fewer),
    drawn here, once for the whole prompt set, so that chunking the prompts cannot change a draw.
    """

    prompt: Tensor
    up_layer: Tensor
    up_head: Tensor
    layer: Tensor
    head: Tensor
    side: np.ndarray
    token: Tensor
    offset: Tensor
    slices: Tensor
    random_slices: Tensor

    def __len__(self) -> int:
        return len(self.prompt)

    def take(self, idx: Tensor) -> GroupPlan:
        return type(self)(**{f.name: getattr(self, f.name)[idx.numpy() if f.name == "side" else idx] for f in fields(self)})


@dataclass(frozen=True)
class EdgeGroups(GroupPlan):
    """A GroupPlan with its deltas. h, h_random [G, d]: the signal and the random control in residual
    units (centred where the model's norm centres); scale [G]: the downstream norm's clean scale at m."""

    h: Tensor
    h_random: Tensor
    scale: Tensor


def set_seed(seed: int, name: str) -> int:
    """The random control's seed for one set: the plan's seed and the set's name."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63)


def plan_groups(trace: Trace, rows: np.ndarray, r: int, seed: int, rotary: bool) -> GroupPlan:
    """Merge the edge rows `rows` (indices into trace.edges) into groups, first-seen order, and draw the controls."""
    import torch

    e = trace.edges
    rows = np.asarray(rows, dtype=np.int64)
    side = e.side[rows]
    token = np.where(side == "d", e.dest[rows], e.src[rows])
    offset = (e.dest[rows] - e.src[rows]) if rotary else np.zeros(len(rows), dtype=np.int64)
    columns = (e.prompt[rows], e.up_layer[rows], e.up_head[rows], e.layer[rows], e.head[rows], side, token, offset)
    group_of: dict[tuple, int] = {}
    masks: list[np.ndarray] = []
    for key, event in zip(zip(*(c.tolist() for c in columns)), e.event[rows].tolist()):
        g = group_of.setdefault(key, len(group_of))
        if g == len(masks):
            masks.append(np.zeros(r, dtype=bool))
        masks[g][trace.events.slices[event]] = True
    order = sorted(group_of, key=group_of.get)
    G = len(order)
    p, ul, uh, l, a, sd, m, off = (list(c) for c in zip(*order)) if G else ([],) * 8
    mask = torch.from_numpy(np.stack(masks)) if G else torch.zeros(0, r, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    random_mask = torch.zeros_like(mask)
    for g in range(G):
        outside = (~mask[g]).nonzero().flatten()
        k = min(int(mask[g].sum()), len(outside))
        random_mask[g, outside[torch.randperm(len(outside), generator=generator)[:k]]] = True
    P_, UL, UH, L_, A, M, OFF = (torch.tensor(x, dtype=torch.long) for x in (p, ul, uh, l, a, m, off))
    return GroupPlan(P_, UL, UH, L_, A, np.array(sd, dtype=np.str_), M, OFF, mask, random_mask)


def group_signals(acts: Activations, geometry: AttentionGeometry, plan: GroupPlan, centre: bool, homogeneous: bool = False,
                  rows: Tensor | None = None) -> EdgeGroups:
    """h and h_random of every group, read from `acts` at row `rows[g]` (default: the group's prompt).

    h = (P [o; 0])[:d] with P the projector on the group's slices and o the upstream head's write at m;
    homogeneous=True projects [o; 1] as the authors' code does, adding the projection of the homogeneous
    axis onto the subspace, which is not the upstream head's and dominates h where the residual is small.
    """
    import torch

    R = plan.prompt if rows is None else rows
    h, h_random = project_writes(acts, geometry, plan, upstream_writes(acts, geometry, plan, R), (plan.slices, plan.random_slices),
                                 centre, homogeneous)
    scale = acts.scale[plan.layer, R, plan.token] if len(plan) else torch.zeros(0)
    return EdgeGroups(**{f.name: getattr(plan, f.name) for f in fields(plan)}, h=h.float(), h_random=h_random.float(),
                      scale=scale.float())


def upstream_writes(acts: Activations, geometry: AttentionGeometry, plan: GroupPlan, rows: Tensor) -> Tensor:
    """[G, d] float64: o, each group's upstream head's residual write at its token m, from `acts` row rows[g]
    (W_O carries any post-attention norm gain; the clean post-norm scale divides)."""
    import torch

    from circuitlang.engine import decompose as dc

    o = torch.zeros(len(plan), geometry.W_O.shape[-1], dtype=torch.float64)
    M = plan.token
    for lb in sorted(set(zip(plan.up_layer.tolist(), plan.up_head.tolist()))):
        idx = ((plan.up_layer == lb[0]) & (plan.up_head == lb[1])).nonzero().flatten()
        write = dc.row_matmul(acts.z[rows[idx], M[idx], lb[0], lb[1]].double(), geometry.W_O[lb[0], lb[1]].double())
        if acts.post_scale is not None:
            write = write / acts.post_scale[lb[0], rows[idx], M[idx]].double()[:, None]
        o[idx] = write
    return o


def project_writes(acts: Activations, geometry: AttentionGeometry, plan: GroupPlan, writes: Tensor, chosen: Sequence[Tensor],
                   centre: bool, homogeneous: bool = False) -> list[Tensor]:
    """Per mask of `chosen` ([G, r] bool over the downstream head's slices): (P [w; 0])[:d] [G, d] float64 for each
    group's write w (`writes` [G, d]), P the projector on the chosen slices of the group's downstream head and
    offset (u_k for side d, v_k for side s), then centred where the model's norm centres."""
    import torch

    from circuitlang.engine import decompose as dc
    from circuitlang.engine.trace import slices_for

    G, d = writes.shape
    OFF = plan.offset
    homog = torch.cat([writes.double(), torch.full((G, 1), float(homogeneous), dtype=torch.float64)], dim=1)
    outs = [torch.zeros(G, d, dtype=torch.float64) for _ in chosen]
    layer_np, head_np = plan.layer.numpy(), plan.head.numpy()
    for layer in sorted(set(layer_np.tolist())):
        at = torch.from_numpy(np.nonzero(layer_np == layer)[0])
        slices = slices_for(geometry, acts, layer, plan.head[at], OFF[at])
        for s in ("s", "d"):
            basis, cores = (slices.Q_b, slices.V) if s == "s" else (slices.Q_a, slices.U)
            for head in sorted(set(head_np.tolist())):
                idx = torch.from_numpy(np.nonzero((layer_np == layer) & (head_np == head) & (plan.side == s))[0])
                if len(idx) == 0:
                    continue
                Q = basis[head]  # [d+1, r]
                hk = slices.index(torch.full((len(idx),), head, dtype=torch.long), OFF[idx])
                coords = dc.through_cores(dc.row_matmul(homog[idx], Q), cores, *hk)  # [w; 1] . u_k (or v_k)
                for out, mask in zip(outs, chosen):
                    lifted = dc.through_cores(coords * mask[idx].double(), cores, *hk, transpose=True)
                    out[idx] = dc.row_matmul(lifted, Q.T)[:, :d]  # P [w; 1], the homogeneous coordinate dropped
    return [out - out.mean(-1, keepdim=True) for out in outs] if centre else outs


def edge_groups(acts: Activations, geometry: AttentionGeometry, trace: Trace, rows: np.ndarray, seed: int, centre: bool,
                homogeneous: bool = False) -> EdgeGroups:
    """plan_groups and group_signals in one step, for activations of every prompt of the trace."""
    plan = plan_groups(trace, rows, geometry.W_Q.shape[-1], seed, geometry.rotary)
    return group_signals(acts, geometry, plan, centre, homogeneous)


def intervention_deltas(model: LoadedModel, geometry: AttentionGeometry, groups: EdgeGroups, kind: str, place: str,
                        control: str, batch: Sequence[int], n: int, first: int = 0, qk_only: bool = False) -> dict[str, Tensor]:
    """{hook name: what to add there} applying `groups` to a batch of prompts (global prompt ids `batch`),
    over positions first..n-1 (a pass resumed after a clean prefix; no group of the batch writes before it).

    global: per upstream layer, the summed -/+h at `blocks.{l}.hook_attn_out`; local: per downstream
    layer and q/k/v, (-/+h / scale) W in each intervened head's slice (the key/value head of its group).
    qk_only (local): each group reaches only the input its side reads, the query (d) or the key (s), not v.
    """
    import torch

    from circuitlang.engine import decompose as dc

    sign = -1.0 if kind == "ablate" else 1.0
    where = {p: row for row, p in enumerate(batch)}
    keep = torch.tensor([int(p) in where for p in groups.prompt.tolist()], dtype=torch.bool)
    idx = keep.nonzero().flatten()
    if len(idx) == 0:
        return {}
    rows = torch.tensor([where[int(p)] for p in groups.prompt[idx].tolist()], dtype=torch.long)
    tok = groups.token[idx] - first
    h = (groups.h if control == "signal" else groups.h_random)[idx] * sign
    d = h.shape[-1]
    n -= first

    def summed(values: Tensor, sel: Tensor) -> Tensor:
        """[B, n, d]: the rows `sel` of `values` [G', d] added at their prompt's row and token."""
        dx = torch.zeros(len(batch), n, d)
        dx.index_put_((rows[sel], tok[sel]), values[sel], accumulate=True)
        return dx

    deltas: dict[str, Tensor] = {}
    if place == "global":
        for layer in sorted(set(groups.up_layer[idx].tolist())):
            deltas[f"blocks.{layer}.hook_attn_out"] = summed(h, (groups.up_layer[idx] == layer).nonzero().flatten())
        return deltas
    b = model.bridge
    h = h / groups.scale[idx][:, None]
    query_side = torch.from_numpy(groups.side[idx.numpy()] == "d")
    for layer in sorted(set(groups.layer[idx].tolist())):
        W_K, W_V = b.W_K[layer].detach().float().cpu(), b.W_V[layer].detach().float().cpu()  # [H_kv, d, r]
        H, H_kv, r = geometry.W_Q.shape[1], W_K.shape[0], W_K.shape[-1]
        group = H // H_kv
        dq = torch.zeros(len(batch), n, H, r)
        dk = torch.zeros(len(batch), n, H_kv, r)
        dv = torch.zeros(len(batch), n, H_kv, r)
        for head in sorted(set(groups.head[idx][groups.layer[idx] == layer].tolist())):
            sel = ((groups.layer[idx] == layer) & (groups.head[idx] == head)).nonzero().flatten()
            if qk_only:
                dq[:, :, head] += dc.row_matmul(summed(h, sel[query_side[sel]]), geometry.W_Q[layer, head])
                dk[:, :, head // group] += dc.row_matmul(summed(h, sel[~query_side[sel]]), W_K[head // group])
                continue
            dx = summed(h, sel)
            dq[:, :, head] += dc.row_matmul(dx, geometry.W_Q[layer, head])
            dk[:, :, head // group] += dc.row_matmul(dx, W_K[head // group])
            dv[:, :, head // group] += dc.row_matmul(dx, W_V[head // group])
        reads = (("q", dq), ("k", dk)) if qk_only else (("q", dq), ("k", dk), ("v", dv))
        deltas.update({f"blocks.{layer}.attn.hook_{name}": delta for name, delta in reads})
    return deltas


def _adder(delta: Tensor) -> Callable:
    def hook(tensor, hook=None):
        # Some bridges run the q/k/v hooks on [B, n, heads * r], before the split into heads.
        step = delta.flatten(-2) if tensor.dim() == delta.dim() - 1 else delta
        return tensor + step.to(device=tensor.device, dtype=tensor.dtype)
    return hook


def intervention_hooks(model: LoadedModel, geometry: AttentionGeometry, groups: EdgeGroups, kind: str, place: str, control: str,
                       batch: Sequence[int], n: int, first: int = 0) -> list[tuple[str, Callable]]:
    """Forward hooks adding `intervention_deltas` (see there) to a batch of prompts."""
    deltas = intervention_deltas(model, geometry, groups, kind, place, control, batch, n, first)
    return [(name, _adder(delta)) for name, delta in deltas.items()]


def _norm_centres(model: LoadedModel) -> bool:
    return str(getattr(model.bridge.cfg, "normalization_type", "LN")).upper().startswith("LN")


@dataclass(frozen=True)
class SetPlan:
    """One intervene block resolved against the trace: its edge rows, their groups, its variants."""

    set: InterventionSet
    info: SetInfo
    rows: np.ndarray
    groups: GroupPlan
    prompts: np.ndarray  # the prompts it touches, ascending
    events: tuple[tuple[int, int, int, int, int], ...]  # its downstream events (prompt, layer, head, dest, src)
    variants: tuple[tuple[str, str, str], ...]  # (kind, place, control)
    n_edges: np.ndarray  # [P]: the set's edge rows traced in each prompt

    def start(self, place: str) -> int:
        """The first layer a variant changes: the lowest upstream write (global) or downstream head (local)."""
        layers = self.groups.up_layer if place == "global" else self.groups.layer
        return int(layers.min())


def plan_sets(trace: Trace, prompts: PromptSet, sets: Sequence[InterventionSet], roots: Sequence[Root], seed: int,
              r: int, rotary: bool) -> list[SetPlan]:
    """Resolve every set against the trace: selections, groups and random draws (no model, no activations)."""
    plans = []
    e = trace.edges
    for s in sets:
        masks = [select_edges(trace, prompts, sel, roots) for sel in s.edges]
        rows = np.nonzero(np.logical_or.reduce(masks) if masks else np.zeros(len(e), bool))[0]
        used = np.unique(e.prompt[rows])
        info = SetInfo(
            name=s.name, line=s.line, selectors=tuple(describe(x) for x in s.edges), matched=tuple(int(m.sum()) for m in masks),
            n_edge_rows=len(rows), n_prompts=len(used),
            upstream=tuple(sorted(set(zip(e.up_layer[rows].tolist(), e.up_head[rows].tolist())))),
            downstream=tuple(sorted(set(zip(e.layer[rows].tolist(), e.head[rows].tolist())))),
            actions=tuple(s.actions), places=tuple(s.places), random_control=s.random_control,
        )
        events = tuple(sorted(set(zip(*(x.tolist() for x in (e.prompt[rows], e.layer[rows], e.head[rows], e.dest[rows], e.src[rows]))))))
        controls = ("signal", "random") if s.random_control else ("signal",)
        variants = tuple((kind, place, control) for kind in s.actions for place in s.places for control in controls)
        plans.append(SetPlan(s, info, rows, plan_groups(trace, rows, r, set_seed(seed, s.name), rotary), used, events, variants,
                             np.bincount(e.prompt[rows], minlength=len(prompts))))
    return plans


def passes_needed(plans: Sequence[SetPlan], prompt_ids: np.ndarray | None = None, batch_rows: int = 256) -> int:
    """The stacked forward passes `intervene_chunk` runs for the prompts `prompt_ids` (all when None)."""
    total = 0
    for sp in plans:
        used = sp.prompts if prompt_ids is None else np.intersect1d(sp.prompts, prompt_ids)
        if len(used) == 0:
            continue
        firsts = first_changes(sp.groups, used)
        for variants in _by_start(sp).values():
            total += len(pass_batches(firsts, max(1, batch_rows // len(variants))))
    return total


def _by_start(sp: SetPlan) -> dict[int, list[tuple[str, str, str]]]:
    """The set's variants grouped by the layer their pass starts at: those stack into one pass."""
    out: dict[int, list] = {}
    for variant in sp.variants:
        out.setdefault(sp.start(variant[1]), []).append(variant)
    return out


def intervene_chunk(model: LoadedModel, geometry: AttentionGeometry, acts: Activations, prompt_ids: np.ndarray, plans: Sequence[SetPlan],
                    f_base: np.ndarray, answers: Tensor | None, *, centre: bool, homogeneous: bool = False, batch_rows: int = 256,
                    partial: bool = True, tick: Callable[[int], None] | None = None, metric: str = "logit") -> dict[str, list]:
    """Every variant of every set on the prompts `prompt_ids` (acts row k holds prompt prompt_ids[k]): row columns.

    The variants of a set that start at the same layer run stacked in one batch of up to `batch_rows`
    rows; partial=True starts that pass at the layer (from the residual captured there), False runs the
    whole model from the tokens (the reference the tests compare with). tick(passes) after each pass.
    answers [P, 2] or [P, 2, K] and metric: F's answers and how it compares them (forward.set_metric).
    """
    import torch

    columns: dict[str, list] = {f.name: [] for f in fields(InterventionRows)}
    local_of = {int(p): k for k, p in enumerate(prompt_ids.tolist())}
    partial = partial and model.family.resumable
    for sp in plans:
        used = np.intersect1d(sp.prompts, prompt_ids)
        if len(used) == 0:
            continue
        idx = torch.from_numpy(np.isin(sp.groups.prompt.numpy(), used).nonzero()[0])
        plan = sp.groups.take(idx)
        groups = group_signals(acts, geometry, plan, centre, homogeneous,
                               rows=torch.tensor([local_of[int(p)] for p in plan.prompt.tolist()], dtype=torch.long))
        results: dict[tuple[str, str, str], dict] = {}
        order_of: dict[tuple[str, str, str], np.ndarray] = {}  # each variant's rows in the order its passes ran them
        firsts = first_changes(plan, used)
        resume = partial and acts.kv is not None
        for start, variants in _by_start(sp).items():
            batches = pass_batches(firsts, max(1, batch_rows // len(variants)))
            order_of.update(dict.fromkeys(variants, np.concatenate(batches)))
            for rows in batches:
                out = _stacked_pass(model, geometry, acts, groups, sp.events, variants, used[rows], local_of,
                                    start if partial else 0, int(firsts[rows[0]]) if resume else 0, answers,
                                    float(model.attn_scale), centre, metric)
                for variant, values in out.items():
                    acc = results.setdefault(variant, {k: [] for k in values})
                    for k, v in values.items():
                        acc[k].append(v)
                if tick is not None:
                    tick(1)
        for kind, place, control in sp.variants:
            values = {k: np.concatenate(v)[np.argsort(order_of[kind, place, control])] for k, v in results[kind, place, control].items()}
            columns["set"] += [sp.set.name] * len(used)
            columns["kind"] += [kind] * len(used)
            columns["place"] += [place] * len(used)
            columns["control"] += [control] * len(used)
            columns["prompt"] += used.tolist()
            columns["n_edges"] += sp.n_edges[used].tolist()
            columns["f_before"] += f_base[used].tolist()
            columns["f_after"] += values["f_after"].tolist()
            columns["delta_f"] += (values["f_after"] - f_base[used]).tolist()
            for key in ("score_before", "score_after", "cosine", "norm_ratio"):
                columns[key] += values[key].tolist()
            columns["delta_score"] += (values["score_after"] - values["score_before"]).tolist()
    return columns


def first_changes(plan: GroupPlan, prompts: np.ndarray) -> np.ndarray:
    """[len(prompts)]: the first position the groups `plan` change in each of `prompts` (ascending, each with a group)."""
    keep = np.isin(plan.prompt.numpy(), prompts)
    firsts = np.full(len(prompts), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(firsts, np.searchsorted(prompts, plan.prompt.numpy()[keep]), plan.token.numpy()[keep])
    return firsts


def pass_batches(firsts: np.ndarray, step: int) -> list[np.ndarray]:
    """The prompts of a set (indices) in batches of at most `step` that share their first changed position, in
    prompt order: a pass runs from that position (see stacked_pass)."""
    out = []
    for first in np.unique(firsts):
        same = np.nonzero(firsts == first)[0]
        out += [same[b : b + step] for b in range(0, len(same), step)]
    return out


def _stacked_pass(model, geometry, acts, groups: EdgeGroups, events, variants, batch: np.ndarray, local_of: dict[int, int],
                  start: int, first: int, answers, raw_scale: float, centre: bool, metric: str = "logit") -> dict[tuple, dict[str, np.ndarray]]:
    """One pass of len(variants) x len(batch) rows (variant-major) from layer `start` and position `first`:
    F after, scores, magnitudes."""
    import torch

    from circuitlang.engine.forward import pass_scores, score_hooks

    B = len(batch)
    local = torch.tensor([local_of[int(p)] for p in batch.tolist()], dtype=torch.long)
    n = acts.tokens.shape[1]  # the pass's length (see stacked_pass)
    per_variant = [intervention_deltas(model, geometry, groups, kind, place, control, batch.tolist(), n, first)
                   for kind, place, control in variants]
    down_layers = sorted({ev[1] for ev in events})
    watch = [name for l in down_layers for name in score_hooks(model, l)]
    if any(place == "global" for _, place, _ in variants):
        watch += [f"blocks.{l}.hook_resid_pre" for l in down_layers]
    f_after, captured = stacked_pass(model, acts, per_variant, batch, local, start, first, answers, metric, watch)
    scores_after = {l: pass_scores(model, captured, l) for l in down_layers}
    out = {}
    where = {int(p): k for k, p in enumerate(batch.tolist())}
    sign_of = {"ablate": -1.0, "boost": 1.0}
    for v, (kind, place, control) in enumerate(variants):
        score_before = [[] for _ in batch]
        score_after = [[] for _ in batch]
        cosine = [[] for _ in batch]
        ratio = [[] for _ in batch]
        # Raw scores A'_ij of the set's downstream events, before and after.
        for p, layer, head, i, j in events:
            if p not in where:
                continue
            k = where[p]
            score_before[k].append(acts.event_score(layer, local_of[p], head, i, j) * raw_scale)
            # i >= first: each event's edges write at its dest or its src, both <= i.
            score_after[k].append(float(scores_after[layer][v * B + k, head, i - first, j]) * raw_scale)
        # Magnitudes at each intervened token of each downstream head (global: per downstream layer).
        sel = [g for g, p in enumerate(groups.prompt.tolist()) if p in where]
        h_all = (groups.h if control == "signal" else groups.h_random) * sign_of[kind]
        if place == "local":
            sites: dict[tuple, Tensor] = {}
            for g in sel:
                key = (int(groups.prompt[g]), int(groups.layer[g]), int(groups.head[g]), int(groups.token[g]))
                step = h_all[g] / groups.scale[g]
                sites[key] = sites[key] + step if key in sites else step
            for (p, layer, _head, m), step in sites.items():
                x = acts.x[layer, local_of[p], m]
                _magnitude(x, x + step, cosine[where[p]], ratio[where[p]])
        else:
            for p, layer, m in sorted({(int(groups.prompt[g]), int(groups.layer[g]), int(groups.token[g])) for g in sel}):
                resid_new = captured[f"blocks.{layer}.hook_resid_pre"][0][v * B + where[p], m - first].double()
                if centre:
                    resid_new = resid_new - resid_new.mean()
                x = acts.x[layer, local_of[p], m]
                _magnitude(x, (resid_new / float(acts.scale[layer, local_of[p], m])).float(), cosine[where[p]], ratio[where[p]])
        mean = lambda values: np.array([np.mean(x) if x else np.nan for x in values])  # noqa: E731
        out[kind, place, control] = {"f_after": f_after[v * B : (v + 1) * B], "score_before": mean(score_before),
                                     "score_after": mean(score_after), "cosine": mean(cosine), "norm_ratio": mean(ratio)}
    return out


def stacked_pass(model: LoadedModel, acts: Activations, per_variant: Sequence[dict[str, Tensor]], batch: np.ndarray, local: Tensor,
                 start: int, first: int, answers: Tensor | None, metric: str = "logit",
                 watch: Sequence[str] = ()) -> tuple[np.ndarray, dict[str, list[Tensor]]]:
    """One pass of len(per_variant) x len(batch) rows (variant-major), each variant's deltas ({hook: [B, n - first, ...]},
    `intervention_deltas`) added to its rows, from layer `start` and position `first` (acts rows `local` hold the
    prompts `batch`): F at each row's last token (NaN without answers) and the `watch` hooks' activations."""
    import torch

    from circuitlang.engine.forward import keepers, logit_diff, prefix_cache, run_to_final_norm

    B, V = len(batch), len(per_variant)
    # Causal attention: the padding after a prompt changes nothing before it, and nothing before the batch's
    # first changed position changes at any layer, so the pass runs positions first..n-1 and attends to the
    # clean keys and values of the positions before it. n: the capture's length, not the batch's longest
    # prompt: a prompt's pass then has the same shape (and bits) whichever prompts share its batch.
    n = acts.tokens.shape[1]
    names = sorted({name for deltas in per_variant for name in deltas})
    stacked = {}
    for name in names:
        like = next(deltas[name] for deltas in per_variant if name in deltas)
        stacked[name] = torch.cat([deltas.get(name, torch.zeros_like(like)) for deltas in per_variant])
    captured: dict[str, list[Tensor]] = {}
    hooks = [(name, _adder(delta)) for name, delta in stacked.items()] + keepers(watch, captured)
    tokens = acts.tokens[local, first:n].repeat(V, 1)
    resid = acts.resid[start][local, first:n].repeat(V, 1, 1) if start > 0 else None
    cache = prefix_cache(model, acts.kv, local, first, V) if first > 0 else None
    final = run_to_final_norm(model, tokens, hooks, start=start, resid=resid, cache=cache)
    last = (acts.lengths[local] - 1 - first).repeat(V)
    rows = torch.arange(B * V)
    picked = answers[torch.from_numpy(batch)] if answers is not None else None
    f_after = (logit_diff(model, final[rows.to(final.device), last.to(final.device)],
                          picked.repeat(V, *[1] * (picked.dim() - 1)), metric).double().numpy()
               if answers is not None else np.full(B * V, np.nan))
    return f_after, captured


def run_interventions(
    model: LoadedModel,
    prompts: PromptSet,
    trace: Trace,
    sets: Sequence[InterventionSet],
    roots: Sequence[Root],
    seed: int,
    acts: Activations | None = None,
    progress: Progress | None = None,
    *,
    geometry: AttentionGeometry | None = None,
    batch_rows: int = 256,
    homogeneous: bool = False,
    partial: bool = True,
) -> InterventionResults:
    """Run every set of `sets` on the edges of `trace` (see the module docstring); never prints.

    roots: the trace's roots in order (for `edges into root K`); acts: activations of every prompt with
    the residual at each set's start layers (captured here when None); progress(stage, done, total) ticks
    once per pass; homogeneous: see group_signals; partial: see intervene_chunk. The orchestration
    (circuitlang.runner) runs `intervene_chunk` itself, chunk by chunk, and `finish_interventions`.
    """
    from circuitlang.engine.forward import capture
    from circuitlang.models.geometry import attention_geometry

    t0 = time.perf_counter()
    if geometry is None:
        geometry = attention_geometry(model)
    plans = plan_sets(trace, prompts, sets, roots, seed, geometry.W_Q.shape[-1], geometry.rotary)
    if acts is None or (partial and not start_layers(plans) <= set(acts.resid or ())):
        acts = capture(model, prompts, resid_layers=sorted(start_layers(plans)), kv=True)
    f_base, answers = baseline(prompts, acts.logit_diff)
    total = passes_needed(plans, batch_rows=batch_rows)
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        if progress is not None:
            progress("interventions", done[0], total)

    columns = intervene_chunk(model, geometry, acts, np.arange(len(prompts)), plans, f_base, answers, centre=_norm_centres(model),
                              homogeneous=homogeneous, batch_rows=batch_rows, partial=partial, tick=tick, metric=prompts.metric)
    return finish_interventions(model.name, seed, _norm_centres(model), homogeneous, plans, [columns], done[0], time.perf_counter() - t0)


def start_layers(plans: Sequence[SetPlan]) -> set[int]:
    """The layers where the sets' partial passes start (the residual there must be captured)."""
    return {start for sp in plans if len(sp.rows) for start in _by_start(sp) if start > 0}


def baseline(prompts: PromptSet, logit_diff: Tensor | None) -> tuple[np.ndarray, Tensor | None]:
    """F before, as float64 numpy (NaN without answers), and the answer ids [P, 2, K] (None without answers)."""
    from circuitlang.engine.forward import answer_ids

    if logit_diff is None:
        return np.full(len(prompts), np.nan), None
    return logit_diff.double().numpy(), answer_ids(prompts)


def finish_interventions(model_name: str, seed: int, centre: bool, homogeneous: bool, plans: Sequence[SetPlan],
                         chunks: Sequence[dict[str, list]], passes: int, seconds: float) -> InterventionResults:
    """Row columns of every chunk -> InterventionResults, rows ordered by (set, variant, prompt) whatever the chunking."""
    columns = {f.name: [v for c in chunks for v in c[f.name]] for f in fields(InterventionRows)}
    rows = InterventionRows(**{
        k: np.array(v, dtype=np.str_ if k in ROW_TEXT else np.int64 if k in ROW_INT else np.float64) for k, v in columns.items()
    })
    rank = {(sp.set.name, *variant): (s, v) for s, sp in enumerate(plans) for v, variant in enumerate(sp.variants)}
    order = sorted(range(len(rows)), key=lambda k: (*rank[rows.set[k], rows.kind[k], rows.place[k], rows.control[k]], rows.prompt[k]))
    rows = InterventionRows(**{f.name: getattr(rows, f.name)[np.array(order, dtype=np.int64)] for f in fields(rows)})
    summaries = summarise(rows)
    return InterventionResults(
        model=model_name, seed=int(seed), centred=centre, homogeneous=bool(homogeneous), sets=tuple(sp.info for sp in plans),
        rows=rows, summaries=summaries, verdicts=verdicts(summaries), passes=passes, timings={"interventions": seconds},
    )


def _magnitude(x, x_new, cosines: list, ratios: list) -> None:
    import torch

    x, x_new = x.double(), x_new.double()
    cosines.append(float(torch.nn.functional.cosine_similarity(x, x_new, dim=0)))
    ratios.append(float(x_new.norm() / x.norm()))


# --- summaries (numpy) --------------------------------------------------------------------------------


def _stats(values: np.ndarray) -> tuple[float, float, float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (float("nan"),) * 4
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return float(values.mean()), float(median), float(q25), float(q75)


def summarise(rows: InterventionRows) -> tuple[InterventionSummary, ...]:
    """One summary per (set, kind, place, control), in the order the rows were run."""
    keys = list(dict.fromkeys(zip(rows.set.tolist(), rows.kind.tolist(), rows.place.tolist(), rows.control.tolist())))
    out = []
    for s, kind, place, control in keys:
        mask = rows.where(set=s, kind=kind, place=place, control=control)
        cos = rows.cosine[mask][np.isfinite(rows.cosine[mask])]
        ratio = rows.norm_ratio[mask][np.isfinite(rows.norm_ratio[mask])]
        out.append(InterventionSummary(
            s, kind, place, control, int(mask.sum()), *_stats(rows.delta_f[mask]), *_stats(rows.delta_score[mask]),
            cosine_mean=float(cos.mean()) if len(cos) else float("nan"),
            cosine_min=float(cos.min()) if len(cos) else float("nan"),
            norm_ratio_mean=float(ratio.mean()) if len(ratio) else float("nan"),
        ))
    return tuple(out)


def verdicts(summaries: Sequence[InterventionSummary]) -> tuple[Verdict, ...]:
    """Per (set, place): ablation lowers F and boosting raises it, each more than its random control."""
    means: dict[tuple, float] = {(s.set, s.place, s.kind, s.control): s.delta_f_mean for s in summaries}
    out = []
    for set_name, place in dict.fromkeys((s.set, s.place) for s in summaries):
        get = lambda kind, control: means.get((set_name, place, kind, control))  # noqa: E731
        ab, ab_r, bo, bo_r = get("ablate", "signal"), get("ablate", "random"), get("boost", "signal"), get("boost", "random")
        out.append(Verdict(set_name, place, ab, ab_r, bo, bo_r, _verdict(ab, ab_r, bo, bo_r)))
    return tuple(out)


def _verdict(ab, ab_r, bo, bo_r) -> str:
    present = [v for v in (ab, bo) if v is not None]
    if not present or any(not np.isfinite(v) for v in present):
        return "n/a"
    lowers = ab is not None and ab < min(0.0, ab_r if ab_r is not None and np.isfinite(ab_r) else 0.0)
    raises = bo is not None and bo > max(0.0, bo_r if bo_r is not None and np.isfinite(bo_r) else 0.0)
    raises_ab = ab is not None and ab > max(0.0, ab_r if ab_r is not None and np.isfinite(ab_r) else 0.0)
    lowers_bo = bo is not None and bo < min(0.0, bo_r if bo_r is not None and np.isfinite(bo_r) else 0.0)
    if (lowers or ab is None) and (raises or bo is None):
        return "yes"
    if (raises_ab or ab is None) and (lowers_bo or bo is None):
        return "reversed"
    if lowers:
        return "ablate only"
    if raises:
        return "boost only"
    return "no"
