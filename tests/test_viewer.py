"""The viewer (trace.html, diff.html) in a real browser: Chromium driven by Playwright, the file opened from
file://. Every number the page shows is checked against one computed here from the Trace, independently of
circuitlang.report.viewer. Skipped (with the reason) only where Playwright or a Chromium is not installed."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from circuitlang.cli import main
from circuitlang.report import edge_filter, read_trace_json
from circuitlang.report.diff import BOTH, ONLY_A, ONLY_B, diff_to_dict, diff_traces
from circuitlang.report.draw import SIDE_COLOURS
from circuitlang.report.export import graph_heads, node_id, writer_shares
from tiny_models import build_gpt2

REPO = Path(__file__).resolve().parents[1]
SHOW = 2  # the specs' `show` filter: the viewer's default threshold
KNOWN = ("0.1", "1.2", "2.2", "2.3")  # `compare heads` of the specs


def _chromium() -> str | None:
    for candidate in (os.environ.get("CIRCUITLANG_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate) or (candidate if os.path.isfile(candidate) else None)):
            return path
    return None


def _missing(reason: str):
    """Skip, except where CI requires the browser tests (.ci/run sets CIRCUITLANG_BROWSER_TESTS=required)."""
    if os.environ.get("CIRCUITLANG_BROWSER_TESTS") == "required":
        pytest.fail(reason + " (CIRCUITLANG_BROWSER_TESTS=required)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright import sync_api
    except ImportError:
        _missing("Playwright for Python is not installed (pip install -e '.[test]'); the viewer's browser tests need it")
    executable = _chromium()
    if executable is None:
        _missing("no Chromium found (apt-get install chromium, or set CIRCUITLANG_CHROMIUM to one); "
                 "the viewer's browser tests need it")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A page opened from file://, recording console errors and uncaught exceptions."""

    def __init__(self, browser, path: Path, fragment: str = ""):
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(path.resolve().as_uri() + fragment)
        self.page.wait_for_selector("body[data-ready]")

    def edges(self) -> set[tuple[str, str]]:
        return {tuple(x) for x in self.page.eval_on_selector_all(
            "svg .edge.communication", "els => els.map(e => [e.dataset.u, e.dataset.v])")}

    def nodes(self) -> set[str]:
        return set(self.page.eval_on_selector_all("svg .node", "els => els.map(e => e.dataset.id)"))

    def slide(self, value: int) -> None:
        self.page.eval_on_selector("#min", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector).strip()

    def close(self) -> None:
        assert self.errors == [], self.errors
        self.page.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gpt2_tokenizer):
    """specs/ioi.circ (which asks for html) on a tiny model, twice (mass 0.7 and 0.95), and their diff."""
    root = tmp_path_factory.mktemp("viewer")
    tiny = build_gpt2(root / "tiny", gpt2_tokenizer, n_layer=3, n_head=4, n_embd=64, seed=4)
    base = (f'extends "{REPO / "specs" / "ioi.circ"}"\nmodel "{tiny}"\nprompts ioi 16 mixed seed 0\n'
            f"show edges in >= {SHOW} prompts\ncompare heads {', '.join(KNOWN)}\n"
            "evaluate faithfulness against abc sizes 2, 5 rank influence random 0\n")  # the tiny model has 12 heads
    (root / "a.circ").write_text(base + 'intervene "into root 2" {\n  edges into root 2\n  ablate, boost  global, local  against random\n}\n')
    (root / "b.circ").write_text(base + "keep mass 0.95\n")
    for name in ("a", "b"):
        assert main(["run", str(root / f"{name}.circ"), "--out", str(root / name), "--no-cache", "--quiet"]) == 0
    assert main(["diff", str(root / "a" / "trace.json"), str(root / "b" / "trace.json"), "--out", str(root / "diff")]) == 0
    return root


@pytest.fixture(scope="module")
def trace(runs):
    return read_trace_json(runs / "a" / "trace.json")


def communication(trace, min_count: int, types: str = "sd") -> set[tuple[str, str]]:
    """The trace's own count for the filter: communication edges seen in >= min_count prompts."""
    return {(node_id(u), node_id(v)) for u, v, d in trace.graph.edges(data=True)
            if d["kind"] == "communication" and d["count"] >= min_count and d["type"] in types}


def test_run_writes_one_self_contained_file(runs, trace):
    html = (runs / "a" / "trace.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.count("<script") == 2
    lowered = html.lower()
    for remote in ("src=", "href=\"http", "@import", "url(http", "fetch(", "xmlhttprequest"):
        assert remote not in lowered, remote  # nothing loaded from anywhere: works from file:// offline
    assert (runs / "diff" / "diff.html").exists()


def test_visible_edges_follow_the_slider_and_the_type_toggles(browser, runs, trace):
    page = Page(browser, runs / "a" / "trace.html")
    assert int(page.page.input_value("#min")) == SHOW
    assert page.edges() == communication(trace, SHOW)
    filtered = edge_filter(trace.graph, SHOW)
    assert page.nodes() == {node_id(n) for n in filtered.nodes}  # heads, token boxes: the drawing's nodes
    assert int(page.page.get_attribute("#status", "data-edges")) == len(communication(trace, SHOW))
    top = max(d["count"] for *_, d in trace.graph.edges(data=True) if d["kind"] == "communication")
    counts = []
    for t in (1, 3, 5, top):
        page.slide(t)
        assert page.edges() == communication(trace, t), t
        counts.append(len(page.edges()))
    assert counts[0] > counts[1] > 0 and counts[-1] >= 1 and len(set(counts)) > 1
    page.slide(1)
    page.page.uncheck("#type-s")
    assert page.edges() == communication(trace, 1, "d")
    page.page.check("#type-s")
    page.page.uncheck("#type-d")
    assert page.edges() == communication(trace, 1, "s")
    page.close()


def test_clicking_a_head_shows_its_firing_statistics(browser, runs, trace):
    page = Page(browser, runs / "a" / "trace.html")
    heads = [n for n in edge_filter(trace.graph, SHOW).nodes if len(n) == 2]
    traced = Counter(zip(trace.events.layer.tolist(), trace.events.head.tolist()))
    for l, h in sorted(heads, key=lambda n: -traced[n])[:3]:
        page.page.click(f'svg .node.head[data-id="{l}.{h}"]')
        assert int(page.text("#head-firing").replace(",", "")) == trace.firing.counts[l, h]
        assert int(page.text("#head-traced").replace(",", "")) == traced[l, h]
        assert (page.text("#head-class") == "compared") == (f"{l}.{h}" in KNOWN)  # `compare heads ...`
        bars = page.page.eval_on_selector_all(".chart.hist .bar", "els => els.map(e => [+e.dataset.k, +e.dataset.n])")
        assert {k: n for k, n in bars if n} == dict(Counter(trace.firing.slice_counts[l][h].tolist()))
        usage = page.page.eval_on_selector_all(".chart.usage .bar", "els => els.map(e => [+e.dataset.k, +e.dataset.n])")
        expected = trace.firing.slice_usage[l, h]
        assert {k: n for k, n in usage if n} == {k: int(n) for k, n in enumerate(expected) if n}
        # in and out edges at the filter, with the graph's counts
        rows = page.page.eval_on_selector_all("aside tr[data-edge]", "els => els.map(e => e.dataset.edge)")
        mine = {f"{u}>{v}" for u, v in communication(trace, SHOW) if u == f"{l}.{h}" or v.split(":")[0] == f"{l}.{h}"}
        assert set(rows) == mine
        assert f"head={l}.{h}" in page.page.evaluate("location.hash")
    page.close()


def _edge_prompts(trace, u: str, v: str) -> dict[int, float]:
    """Per prompt, the summed contribution of the edge rows that make graph edge u -> v (from the rows)."""
    e = trace.edges
    (ul, uh), (vh, role) = map(int, u.split(".")), v.split(":")
    vl, vhh = map(int, vh.split("."))
    out: dict[int, float] = {}
    for row in range(len(e)):
        token = e.dest[row] if e.side[row] == "d" else e.src[row]
        if (e.up_layer[row], e.up_head[row], e.layer[row], e.head[row]) == (ul, uh, vl, vhh) \
                and trace.labels[e.prompt[row]][token] == role:
            out[int(e.prompt[row])] = out.get(int(e.prompt[row]), 0.0) + float(e.contribution[row])
    return out


def test_clicking_an_edge_lists_the_prompts_it_was_traced_in(browser, runs, trace):
    page = Page(browser, runs / "a" / "trace.html")
    edges = sorted(communication(trace, SHOW), key=lambda uv: -trace.graph.edges[tuple(map(_node, uv))]["count"])
    for u, v in edges[:3]:
        page.page.locator(f'svg .edge.communication[data-u="{u}"][data-v="{v}"] .hit').dispatch_event("click")
        expected = _edge_prompts(trace, u, v)
        d = trace.graph.edges[_node(u), _node(v)]
        assert int(page.text("#edge-count")) == d["count"] == len(expected)
        listed = page.page.eval_on_selector_all("#prompts .prompt", "els => els.map(e => +e.dataset.p)")
        assert listed == sorted(expected)[:50]
        shown = page.page.eval_on_selector_all("#prompts .prompt .pc", "els => els.map(e => [+e.dataset.c, +e.textContent])")
        np.testing.assert_allclose([c for c, _ in shown], [expected[p] for p in listed], rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose([c for _, c in shown], [expected[p] for p in listed], rtol=5e-3, atol=1e-6)  # 3 digits
        np.testing.assert_allclose(float(page.text("#edge-total").replace(",", "")), d["total"], rtol=1e-3)
        # the prompt text, with the downstream event's dest and src tokens marked
        first = page.page.locator("#prompts .prompt").first
        text = "".join(trace.token_text[listed[0]])
        assert first.inner_text().endswith(text.strip()[-20:]) or text.strip()[-20:] in first.inner_text()
        assert first.locator("mark.dest").count() + first.locator("mark.src").count() >= 1
    page.close()


def _node(text: str) -> tuple:
    head, _, role = text.partition(":")
    l, h = map(int, head.split("."))
    return (l, h, role) if role else (l, h)


def test_edge_colours_widths_and_known_heads_follow_the_drawing(browser, runs, trace):
    page = Page(browser, runs / "a" / "trace.html")
    colours = page.page.eval_on_selector_all(
        "svg .edge.communication", "els => els.map(e => [e.dataset.u, e.dataset.v, e.querySelector('.comm').getAttribute('stroke')])")
    for u, v, colour in colours:
        assert colour == SIDE_COLOURS[trace.graph.edges[_node(u), _node(v)]["type"]]
    known = set(page.page.eval_on_selector_all("svg .node.head.known", "els => els.map(e => e.dataset.id)"))
    assert known == set(KNOWN) & page.nodes() and known
    roots = set(page.page.eval_on_selector_all("svg .node.head.root", "els => els.map(e => e.dataset.id)"))
    assert roots == {r.split()[0] for r in trace.config.roots} & page.nodes()
    page.close()


def test_diff_view_matches_circ_diff(browser, runs):
    data = json.loads((runs / "diff" / "diff.json").read_text())
    page = Page(browser, runs / "diff" / "diff.html")
    drawn = page.page.eval_on_selector_all(
        "svg .edge.communication", "els => els.map(e => [e.dataset.u, e.dataset.v, e.dataset.where, "
        "e.querySelector('.comm').getAttribute('stroke'), e.querySelector('.comm').getAttribute('stroke-dasharray')])")
    colour = {"a": ONLY_A, "b": ONLY_B, "both": BOTH}
    key = {"a": "only_a", "b": "only_b", "both": "both"}
    for where in ("a", "b", "both"):
        assert {(u, v) for u, v, w, *_ in drawn if w == where} == {(e["source"], e["target"]) for e in data["edges"][key[where]]}
        assert int(page.text(f"#e-only-{where}" if where != "both" else "#e-both")) == len(data["edges"][key[where]])
        assert int(page.text(f"#n-only-{where}" if where != "both" else "#n-both")) == len(data["nodes"][key[where]])
    changes = {(c["source"], c["target"]): c for c in data["changes"]}
    for u, v, where, stroke, dash in drawn:
        assert stroke == colour[where]
        assert (dash is not None) == (changes[u, v]["type"] == "d")  # dashed: into a destination token
    # Each head's colour: where `circ diff` puts it.
    fills = dict(page.page.eval_on_selector_all("svg .node.head", "els => els.map(e => [e.dataset.id, e.dataset.where])"))
    for where in ("a", "b", "both"):
        assert {n for n, w in fills.items() if w == where} == {n for n in data["nodes"][key[where]] if ":" not in n}
    # A higher count re-filters as `circ diff --min-count` would.
    a, b = read_trace_json(runs / "a" / "trace.json"), read_trace_json(runs / "b" / "trace.json")
    for t in (SHOW + 1, SHOW + 3):
        page.slide(t)
        expected = diff_to_dict(diff_traces(a, b, t))
        for where in ("a", "b", "both"):
            got = {(e["u"], e["v"]) for e in page.page.eval_on_selector_all(
                f'svg .edge.communication[data-where="{where}"]', "els => els.map(e => ({u: e.dataset.u, v: e.dataset.v}))")}
            assert got == {(e["source"], e["target"]) for e in expected["edges"][key[where]]}, (t, where)
    # An edge's counts in A and in B.
    (u, v), c = next(iter(changes.items()))
    page.slide(SHOW)
    page.page.locator(f'svg .edge.communication[data-u="{u}"][data-v="{v}"] .hit').dispatch_event("click")
    assert (int(page.text("#edge-count-a")), int(page.text("#edge-count-b"))) == (c["count_a"], c["count_b"])
    page.close()


def test_the_url_fragment_restores_the_view(browser, runs, trace):
    page = Page(browser, runs / "a" / "trace.html")
    page.slide(3)
    page.page.uncheck("#type-s")
    head = sorted(n for n in edge_filter(trace.graph, 3).nodes if len(n) == 2)[0]
    page.page.click(f'svg .node.head[data-id="{node_id(head)}"]')
    url = page.page.url
    assert "t=3" in url and "types=d" in url and f"head={node_id(head)}" in url
    page.close()
    again = Page(browser, Path(url.split("#")[0].removeprefix("file://")), "#" + url.split("#")[1])
    assert int(again.page.input_value("#min")) == 3 and not again.page.is_checked("#type-s")
    assert again.edges() == communication(trace, 3, "d")
    assert int(again.text("#head-firing").replace(",", "")) == trace.firing.counts[head]
    again.close()
    # an edge and the search box too
    u, v = sorted(communication(trace, SHOW))[0]
    page = Page(browser, runs / "a" / "trace.html", f"#t={SHOW}&edge={u}%3E{v.replace(':', '%3A')}&q=1.")
    assert int(page.text("#edge-count")) == trace.graph.edges[_node(u), _node(v)]["count"]
    matched = set(page.page.eval_on_selector_all("svg .node.head.match", "els => els.map(e => e.dataset.id)"))
    assert matched == {n for n in page.nodes() if n.startswith("1.") and ":" not in n}
    page.close()


def test_interventions_beside_the_graph_and_a_sets_edges_highlighted(browser, runs, trace):
    results = json.loads((runs / "a" / "interventions.json").read_text())
    page = Page(browser, runs / "a" / "trace.html")
    assert page.page.locator("#verdicts tr[data-set]").count() == len(results["verdicts"]) > 0
    page.page.click('#sets tr[data-set="into root 2"]')
    root = trace.config.roots[1].split()[0]
    highlighted = {tuple(x) for x in page.page.eval_on_selector_all(
        "svg .edge.communication.hl", "els => els.map(e => [e.dataset.u, e.dataset.v])")}
    assert highlighted == {(u, v) for u, v in communication(trace, SHOW) if v.split(":")[0] == root}
    effects = page.page.locator("#set-effects tr").count() - 1
    assert effects == sum(s["set"] == "into root 2" for s in results["summaries"]) > 0
    assert "set=into+root+2" in page.page.evaluate("location.hash")
    page.close()


def test_circ_view_writes_when_needed_and_opens(runs, monkeypatch, capsys):
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)
    html = runs / "a" / "trace.html"
    html.unlink()
    assert main(["view", str(runs / "a"), "--no-open"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {html}" and html.exists() and not opened
    assert main(["view", str(runs / "a" / "trace.json")]) == 0
    assert capsys.readouterr().out.strip() == f"viewer {html}"  # up to date: not rewritten
    assert opened == [html.resolve().as_uri()]
    assert main(["view", str(runs / "nowhere"), "--no-open"]) == 2
    assert "no trace.json" in capsys.readouterr().err


def test_circ_view_of_a_spec(runs, tmp_path, monkeypatch, capsys):
    """A spec: traced first (json and html) when its output directory holds no run; a directory holding another
    spec's run is refused, never shown as this spec's (its manifest names the spec that wrote it)."""
    monkeypatch.setenv("CIRCUITLANG_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "v.circ"
    spec.write_text((runs / "a.circ").read_text() + f'output "{runs / "a"}" json\n')
    assert main(["view", str(spec), "--no-open"]) == 2
    assert "holds the outputs of" in capsys.readouterr().err
    spec.write_text((runs / "b.circ").read_text() + f'output "{tmp_path / "fresh"}" json\n')
    assert main(["view", str(spec), "--no-open"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "fresh" / "trace.html"))
    assert (tmp_path / "fresh" / "trace.html").exists()
    assert read_trace_json(tmp_path / "fresh" / "trace.json").graph.edges == read_trace_json(runs / "b" / "trace.json").graph.edges


def test_html_is_an_output_format(tmp_path, capsys):
    spec = tmp_path / "s.circ"
    spec.write_text('output "x" json html\n')
    assert main(["check", str(spec)]) == 0
    spec.write_text('output "x" json htm\n')
    assert main(["check", str(spec)]) == 2
    assert '"html"' in capsys.readouterr().err


def test_writer_nodes_and_each_heads_signal_by_writer(browser, runs):
    """`sources heads mlp embed bias`: writer nodes drawn as such (not heads), and a head's panel lists its
    signal by writer class with the shares the report computes."""
    spec = runs / "writers.circ"
    spec.write_text(f'extends "{runs / "b.circ"}"\nsources heads mlp embed bias\nshow edges in >= 1 prompts\n')
    assert main(["run", str(spec), "--out", str(runs / "writers"), "--no-cache", "--quiet"]) == 0
    t = read_trace_json(runs / "writers" / "trace.json")
    writers = {node_id(n) for n in t.graph.nodes if len(n) == 2 and n[1] < 0}
    assert writers, "this model's MLPs and embeddings carry much of its signal"
    page = Page(browser, runs / "writers" / "trace.html")
    drawn = set(page.page.eval_on_selector_all("svg .node.writer", "els => els.map(e => e.dataset.id)"))
    assert drawn == writers
    assert not drawn & set(page.page.eval_on_selector_all("svg .node.head", "els => els.map(e => e.dataset.id)"))
    labels = page.page.eval_on_selector_all("svg text.layer-label", "els => els.map(e => e.textContent)")
    assert "layer -1" not in labels and ("embeddings" in labels) == ("embed" in writers)  # issue 26, item 8
    first = sorted(drawn)[0]
    page.page.click(f'svg .node.writer[data-id="{first}"]')
    assert "not a head" in page.text("#writer-kind")
    shares = writer_shares(t, graph_heads(t.graph))
    head = max(shares, key=lambda n: t.graph.nodes[n]["traced"])
    page.page.click(f'svg .node.head[data-id="{head[0]}.{head[1]}"]')
    cells = page.page.eval_on_selector_all("table.split tr", "rows => rows.map(r => [...r.children].map(c => c.textContent))")
    header, *rows = cells
    for row in rows:
        side = row[0]
        for name, cell in zip(header[1:], row[1:]):
            assert float(cell.rstrip("%")) == pytest.approx(100 * shares[head][side][name], abs=0.5)
    page.close()


# --- issue 26, item 8 -----------------------------------------------------------------------------------------

def test_a_heads_in_edges_name_the_token_they_go_into(browser, runs, trace):
    page = Page(browser, runs / "a" / "trace.html")
    into = Counter(v.split(":")[0] for _, v in communication(trace, SHOW))
    head = max(into, key=lambda h: (len({v for _, v in communication(trace, SHOW) if v.split(":")[0] == h}), into[h]))
    page.page.click(f'svg .node.head[data-id="{head}"]')
    rows = page.page.eval_on_selector_all("aside tr[data-edge]", "els => els.map(e => [e.dataset.edge, e.cells[0].textContent])")
    shown = {edge: text for edge, text in rows if edge.split(">")[1].split(":")[0] == head}
    assert shown and all(text == f"{edge.split('>')[0]} → {edge.split(':')[1]}" for edge, text in shown.items())
    assert len(set(shown.values())) == len(shown)  # no two rows read alike
    page.close()


def test_selecting_a_set_brings_its_edges_into_view(browser, runs, trace):
    page = Page(browser, runs / "a" / "trace.html")
    area = page.page.locator("svg").bounding_box()
    page.page.mouse.move(area["x"] + 5, area["y"] + 5)
    for _ in range(25):  # zoomed far into the top left corner
        page.page.mouse.wheel(0, -200)
    page.page.wait_for_timeout(100)

    def outside() -> list[str]:
        ends = set(page.page.eval_on_selector_all(
            "svg .edge.communication.hl", "els => els.flatMap(e => [e.dataset.u, e.dataset.v])"))
        x0, y0, w, h = map(float, page.page.evaluate("document.querySelector('svg').getAttribute('viewBox')").split())
        places = dict(page.page.eval_on_selector_all("svg .node", "els => els.map(e => [e.dataset.id, e.getAttribute('transform')])"))
        spots = {end: tuple(map(float, places[end][len("translate("):-1].split(","))) for end in ends}
        assert ends
        return [end for end, (x, y) in spots.items() if not (x0 <= x <= x0 + w and y0 <= y <= y0 + h)]

    page.page.click('#sets tr[data-set="into root 2"]')
    assert outside() == []
    page.page.click('#sets tr[data-set="into root 2"]')  # cleared
    for _ in range(25):
        page.page.mouse.wheel(0, -200)
    page.page.evaluate("location.hash = location.hash.replace(/(&|#)set=[^&]*/, '') + '&set=into+root+2'")
    page.page.wait_for_timeout(200)
    assert outside() == []
    page.close()


def test_diff_changes_of_total_carry_their_sign(browser, runs):
    data = json.loads((runs / "diff" / "diff.json").read_text())
    grown = [c for c in data["changes"] if c["total_b"] > c["total_a"] and c["count_a"] >= SHOW and c["count_b"] >= SHOW]
    assert grown
    page = Page(browser, runs / "diff" / "diff.html")
    c = grown[0]
    page.page.locator(f'svg .edge.communication[data-u="{c["source"]}"][data-v="{c["target"]}"] .hit').dispatch_event("click")
    assert page.text("#edge-delta-total").startswith("+")
    page.close()
