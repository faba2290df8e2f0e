// circuitlang viewer: hand-written, no library, no network. Reads the JSON embedded in the page (#data), lays the
// circuit out as the paper's Fig. 5 (layers top to bottom, a row of token boxes above a row of head ovals
// per layer) and keeps the view state (threshold, edge types, search, selection) in the URL fragment.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("data").textContent);
  const S = D.style;
  const DIFF = D.mode === "diff";
  const SVGNS = "http://www.w3.org/2000/svg";
  const PROMPT_LIMIT = 50;

  // --- helpers ------------------------------------------------------------------------------------------
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const fmt = (x, d = 3) => (x === null || x === undefined || !isFinite(x) ? "—"
    : Math.abs(x) >= 1000 ? Math.round(x).toLocaleString("en-US") : Number(Number(x).toPrecision(d)).toString());
  const fmtInt = (x) => Number(x).toLocaleString("en-US");
  const signed = (x) => (x > 0 ? "+" : "") + fmt(x);  // a change (B - A), its sign always shown
  const headOf = (id) => id.split(":")[0];
  const roleOf = (id) => { const k = id.indexOf(":"); return k < 0 ? null : id.slice(k + 1); };
  // Writer nodes of `sources` ("mlp 5", "bias 3", "embed") take a negative head number, as in trace.json's layout.
  const WRITERS = { mlp: -1, bias: -2, embed: -3 };
  const writerKind = (id) => { const w = headOf(id).split(" ")[0]; return w in WRITERS ? w : null; };
  const parseHead = (id) => {
    const kind = writerKind(id);
    if (kind) { const l = headOf(id).split(" ")[1]; return [l === undefined ? -1 : Number(l), WRITERS[kind]]; }
    return headOf(id).split(".").map(Number);
  };
  const label = (id) => { const r = roleOf(id); return r === null ? id : `${headOf(id)} ${r}`; };  // the paper's 9.6, 9.6 end
  const edgeKey = (e) => `${e.u}>${e.v}`;
  const el = (tag, attrs = {}, parent = null) => {
    const n = document.createElementNS(SVGNS, tag);
    for (const k in attrs) n.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(n);
    return n;
  };

  const edges = D.edges;
  const byKey = new Map(edges.map((e, k) => [edgeKey(e), k]));
  const heads = new Map((D.heads || []).map((h) => [h.id, h]));
  const roleRank = new Map((D.role_order || []).map((r, k) => [r, k]));
  const roots = new Set(D.roots || []);
  const known = D.known || {};
  const maxCount = Math.max(1, ...edges.map((e) => (DIFF ? Math.max(e.ca, e.cb) : e.count)));
  const lowest = DIFF ? D.min_count : 1;
  const sets = (D.interventions && D.interventions.sets) || [];

  // --- state and the URL fragment -------------------------------------------------------------------------
  const state = { t: Math.min(Math.max(D.min_count || 1, lowest), maxCount), s: true, d: true, a: true, b: true, both: true,
                  q: "", head: null, edge: null, set: null };

  function readHash() {
    const h = new URLSearchParams(location.hash.replace(/^#/, ""));
    if (h.has("t")) { const t = parseInt(h.get("t"), 10); if (isFinite(t)) state.t = Math.min(Math.max(t, lowest), maxCount); }
    if (h.has("types")) { const v = h.get("types"); state.s = v.includes("s"); state.d = v.includes("d"); }
    if (DIFF && h.has("where")) { const v = h.get("where").split(","); state.a = v.includes("a"); state.b = v.includes("b"); state.both = v.includes("both"); }
    state.q = h.get("q") || "";
    state.head = h.get("head");
    state.edge = h.has("edge") && byKey.has(h.get("edge")) ? h.get("edge") : null;
    state.set = h.has("set") && sets.some((s) => s.name === h.get("set")) ? h.get("set") : null;
    if (state.head && state.edge) state.edge = null;
  }

  function writeHash() {
    const h = new URLSearchParams();
    h.set("t", state.t);
    h.set("types", (state.s ? "s" : "") + (state.d ? "d" : ""));
    if (DIFF) h.set("where", ["a", "b", "both"].filter((w) => state[w]).join(","));
    if (state.q) h.set("q", state.q);
    if (state.head) h.set("head", state.head);
    if (state.edge) h.set("edge", state.edge);
    if (state.set) h.set("set", state.set);
    const hash = "#" + h.toString();
    if (location.hash !== hash) {
      try { history.replaceState(null, "", hash); } catch (err) { location.hash = hash; }
    }
  }

  // --- which edges are shown ------------------------------------------------------------------------------
  function where(e) {
    const inA = e.ca >= state.t, inB = e.cb >= state.t;
    return inA && inB ? "both" : inA ? "a" : inB ? "b" : null;
  }

  function visibleEdges() {
    const out = [];
    edges.forEach((e, k) => {
      if (!state[e.type]) return;
      if (DIFF) { const w = where(e); if (w && state[w]) out.push(k); }
      else if (e.count >= state.t) out.push(k);
    });
    return out;
  }

  // --- layout: Fig. 5, computed here ----------------------------------------------------------------------
  const measure = document.createElement("canvas").getContext("2d");
  measure.font = "11px -apple-system, Segoe UI, Helvetica, Arial, sans-serif";
  const HEAD_RX = 30, HEAD_RY = 14, TOKEN_H = 22, GAP = 10, GROUP_GAP = 26, ROW_GAP = 42, LAYER_GAP = 64;

  function layout(vis) {
    const nodes = new Map();
    const add = (id) => {
      if (nodes.has(id)) return;
      const [l, h] = parseHead(id);
      const role = roleOf(id);
      const w = role === null ? 2 * HEAD_RX : Math.ceil(measure.measureText(label(id)).width) + 16;
      nodes.set(id, { id, l, h, role, w, x: 0, y: 0 });
    };
    for (const k of vis) { add(edges[k].u); add(edges[k].v); add(headOf(edges[k].v)); }
    const layers = [...new Set([...nodes.values()].map((n) => n.l))].sort((a, b) => a - b);
    const groups = new Map(); // layer -> [{head, tokens, w}]
    for (const l of layers) {
      const hs = [...nodes.values()].filter((n) => n.l === l && n.role === null).sort((a, b) => a.h - b.h);
      groups.set(l, hs.map((hn) => {
        const tokens = [...nodes.values()].filter((n) => n.l === l && n.h === hn.h && n.role !== null)
          .sort((a, b) => (roleRank.get(a.role) ?? 1e9) - (roleRank.get(b.role) ?? 1e9) || (a.role < b.role ? -1 : 1));
        const tw = tokens.reduce((s, t) => s + t.w, 0) + GAP * Math.max(0, tokens.length - 1);
        return { head: hn, tokens, w: Math.max(hn.w, tw), tw };
      }));
    }
    let y = 0;
    const rows = [];
    for (const l of layers) {
      const gs = groups.get(l);
      const hasTokens = gs.some((g) => g.tokens.length);
      const tokenY = y, headY = hasTokens ? y + ROW_GAP : y;
      rows.push({ l, tokenY, headY, hasTokens });
      y = headY + LAYER_GAP;
    }
    const place = () => {
      for (const r of rows) {
        const gs = groups.get(r.l);
        const width = gs.reduce((s, g) => s + g.w, 0) + GROUP_GAP * Math.max(0, gs.length - 1);
        let x = -width / 2;
        for (const g of gs) {
          const cx = x + g.w / 2;
          g.head.x = cx; g.head.y = r.headY;
          let tx = cx - g.tw / 2;
          for (const t of g.tokens) { t.x = tx + t.w / 2; t.y = r.tokenY; tx += t.w + GAP; }
          x += g.w + GROUP_GAP;
        }
      }
    };
    place();
    // A few barycentre sweeps: order each layer's groups by the mean x of the nodes they connect to.
    const nbrs = new Map();
    const link = (a, b) => { if (!nbrs.has(a)) nbrs.set(a, []); nbrs.get(a).push(b); };
    for (const k of vis) { const e = edges[k]; link(headOf(e.v), e.u); link(e.u, e.v); }
    for (let it = 0; it < 4; it++) {
      for (const r of (it % 2 ? [...rows].reverse() : rows)) {
        const gs = groups.get(r.l);
        const bary = (g) => {
          const xs = [g.head.id, ...g.tokens.map((t) => t.id)].flatMap((id) => (nbrs.get(id) || [])).map((id) => nodes.get(id).x);
          return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : g.head.x;
        };
        const keyed = gs.map((g) => [bary(g), g.head.h, g]);
        keyed.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
        groups.set(r.l, keyed.map((x) => x[2]));
        place();
      }
    }
    return { nodes, rows };
  }

  // --- drawing --------------------------------------------------------------------------------------------
  const app = document.createElement("div");
  app.id = "app";
  document.body.appendChild(app);
  const header = document.createElement("header");
  const graphBox = document.createElement("div");
  graphBox.id = "graph";
  const aside = document.createElement("aside");
  app.append(header, graphBox, aside);

  const svg = el("svg", { id: "svg", preserveAspectRatio: "xMidYMid meet" }, graphBox);
  const defs = el("defs", {}, svg);
  const world = el("g", { id: "world" }, svg);
  const markerColours = { s: S.s, d: S.d, att: S.attention, a: S.only_a, b: S.only_b, both: S.both, sel: "#111" };
  for (const [name, colour] of Object.entries(markerColours)) {
    const m = el("marker", { id: "m-" + name, viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "9", markerHeight: "9",
                             markerUnits: "userSpaceOnUse", orient: "auto" }, defs);
    el("path", { d: "M0,1 L10,5 L0,9 z", fill: colour }, m);
  }

  function shade(f) {
    const rgb = S.light.map((a, k) => Math.round(a + (S.dark[k] - a) * f));
    return ["#" + rgb.map((c) => c.toString(16).padStart(2, "0")).join(""), f > 0.5 ? "white" : "black"];
  }

  let current = { vis: [], nodes: new Map(), rows: [] };
  let view = null;

  function draw() {
    const vis = visibleEdges();
    const { nodes, rows } = layout(vis);
    current = { vis, nodes, rows };
    world.textContent = "";
    const gEdges = el("g", { id: "edges" }, world), gNodes = el("g", { id: "nodes" }, world), gLabels = el("g", {}, world);
    if (!vis.length) {
      const t = el("text", { x: 0, y: 0, "text-anchor": "middle", class: "empty" }, world);
      t.textContent = DIFF ? "no edge at this count" : `no edge seen in ≥ ${state.t} prompts of the types shown`;
    }
    let minX = Infinity;
    for (const n of nodes.values()) minX = Math.min(minX, n.x - n.w / 2);
    for (const r of rows) {
      const t = el("text", { x: minX - 18, y: r.headY + 4, "text-anchor": "end", class: "layer-label" }, gLabels);
      t.textContent = r.l < 0 ? "embeddings" : `layer ${r.l}`;  // the embeddings write before layer 0
    }
    // attention edges: each token box into its head
    const tokens = [...nodes.values()].filter((n) => n.role !== null);
    for (const t of tokens) {
      const h = nodes.get(headOf(t.id));
      const g = el("g", { class: "edge attention", "data-u": t.id, "data-v": h.id }, gEdges);
      const colour = DIFF ? S[nodeWhere.get(t.id) === "both" ? "both" : nodeWhere.get(t.id) === "a" ? "only_a" : "only_b"] : S.attention;
      el("path", { class: "att", d: `M${t.x},${t.y + TOKEN_H / 2} L${h.x},${h.y - HEAD_RY - 1}`, stroke: colour, "stroke-width": 0.8,
                   "marker-end": "url(#m-att)" }, g);
      const count = DIFF ? null : D.attention[t.id];
      const title = el("title", {}, g);
      title.textContent = DIFF ? "attention" : `attention, ${count} prompts`;
    }
    // communication edges
    const [lo, hi] = S.penwidth;
    const weight = (e) => (DIFF ? Math.abs(e.tb - e.ta) : Math.max(e.total, 0));
    const heaviest = Math.max(0, ...vis.map((k) => weight(edges[k]))) || 1;
    for (const k of vis) {
      const e = edges[k], a = nodes.get(e.u), b = nodes.get(e.v);
      const x1 = a.x, y1 = a.y + HEAD_RY, x2 = b.x, y2 = b.y - TOKEN_H / 2 - 1;
      const dy = Math.max(30, (y2 - y1) * 0.45);
      const d = `M${x1},${y1} C${x1},${y1 + dy} ${x2},${y2 - dy} ${x2},${y2}`;
      const w = DIFF ? where(e) : null;
      const colour = DIFF ? S[{ a: "only_a", b: "only_b", both: "both" }[w]] : S[e.type];
      const g = el("g", { class: "edge communication", "data-k": k, "data-u": e.u, "data-v": e.v, "data-type": e.type }, gEdges);
      if (DIFF) g.setAttribute("data-where", w);
      const path = el("path", { class: "comm", d, stroke: colour, "stroke-width": (lo + (hi - lo) * weight(e) / heaviest).toFixed(2),
                                "marker-end": `url(#m-${DIFF ? w : e.type})` }, g);
      if (DIFF && e.type === "d") path.setAttribute("stroke-dasharray", "6 4");
      el("path", { class: "hit", d }, g);
      const title = el("title", {}, g);
      title.textContent = DIFF
        ? `${e.u} → ${label(e.v)} (${e.type}): A ${e.ca} prompts, total ${fmt(e.ta)}; B ${e.cb} prompts, total ${fmt(e.tb)}`
        : `${e.u} → ${label(e.v)} (${e.type}): ${e.count} prompts, total ${fmt(e.total)}, mean ${fmt(e.mean)}`;
    }
    // nodes
    const traced = [...nodes.values()].filter((n) => n.role === null).map((n) => (heads.get(n.id) || {}).traced || 0);
    const most = Math.log1p(Math.max(1, ...traced));
    for (const n of nodes.values()) {
      const kind = n.role === null ? writerKind(n.id) : null;
      const g = el("g", { class: "node " + (kind ? "writer" : n.role === null ? "head" : "token"), "data-id": n.id,
                          transform: `translate(${n.x},${n.y})` }, gNodes);
      const title = el("title", {}, g);
      if (kind) {
        el("rect", { x: -HEAD_RX, y: -HEAD_RY, width: 2 * HEAD_RX, height: 2 * HEAD_RY }, g);
        const t = el("text", { "text-anchor": "middle", dy: "0.35em" }, g);
        t.textContent = n.id;
        title.textContent = writerText(n.id);
      } else if (n.role === null) {
        let fill, font = "black", stroke = null;
        if (DIFF) {
          const w = nodeWhere.get(n.id);
          fill = S[{ a: "fill_a", b: "fill_b", both: "fill_both" }[w]];
          stroke = S[{ a: "only_a", b: "only_b", both: "both" }[w]];
          g.setAttribute("data-where", w);
          title.textContent = `head ${n.id}: ${{ a: "only in A", b: "only in B", both: "in both" }[w]}`;
        } else {
          const info = heads.get(n.id) || { traced: 0, firing: 0 };
          [fill, font] = shade(most ? Math.log1p(info.traced) / most : 0);
          if (known[n.id]) g.classList.add("known");
          title.textContent = `head ${n.id}: ${info.traced} events traced, ${info.firing} firings` + (known[n.id] ? ` · ${known[n.id]}` : "");
        }
        if (roots.has(n.id)) { g.classList.add("root"); el("ellipse", { class: "ring", rx: HEAD_RX + 5, ry: HEAD_RY + 5 }, g); }
        const ell = el("ellipse", { rx: HEAD_RX, ry: HEAD_RY, fill }, g);
        if (stroke) { ell.style.stroke = stroke; ell.style.strokeWidth = 2; }
        const t = el("text", { "text-anchor": "middle", dy: "0.35em", fill: font }, g);
        t.textContent = label(n.id);
      } else {
        const r = el("rect", { x: -n.w / 2, y: -TOKEN_H / 2, width: n.w, height: TOKEN_H, rx: 5 }, g);
        if (DIFF) { r.style.stroke = S[{ a: "only_a", b: "only_b", both: "both" }[nodeWhere.get(n.id)]]; r.style.strokeWidth = 1.5; }
        const t = el("text", { "text-anchor": "middle", dy: "0.35em" }, g);
        t.textContent = label(n.id);
        title.textContent = `token ${n.role} of head ${headOf(n.id)}`;
      }
    }
    fit();
    decorate();
  }

  // where each node is in a diff: endpoints of the edges in A, in B, at the current count
  let nodeWhere = new Map();
  function computeNodeWhere() {
    const inA = new Set(), inB = new Set();
    for (const e of edges) {
      if (!DIFF) break;
      for (const [set, c] of [[inA, e.ca], [inB, e.cb]]) {
        if (c >= state.t) { set.add(e.u); set.add(e.v); set.add(headOf(e.v)); }
      }
    }
    nodeWhere = new Map();
    for (const id of new Set([...inA, ...inB])) nodeWhere.set(id, inA.has(id) && inB.has(id) ? "both" : inA.has(id) ? "a" : "b");
    return { inA, inB };
  }

  // highlight: search matches, the selection's neighbourhood, an intervention set's edges
  function decorate() {
    const q = state.q.trim().toLowerCase();
    const matches = new Set();
    if (q) {
      for (const n of current.nodes.values()) {
        if (n.role !== null) continue;
        if (n.id === q || n.id.startsWith(q.endsWith(".") ? q : q + ".") || n.id.startsWith(q) && q.includes(".") || (known[n.id] || "").toLowerCase().includes(q)) matches.add(n.id);
      }
    }
    const hl = new Set(), hlEdges = new Set();
    const focusEdge = (k) => { const e = edges[k]; hlEdges.add(k); hl.add(e.u); hl.add(e.v); hl.add(headOf(e.v)); };
    let focus = false;
    const shown = new Set(current.vis);
    if (state.head) {
      focus = true; hl.add(state.head);
      for (const k of current.vis) { const e = edges[k]; if (e.u === state.head || headOf(e.v) === state.head) focusEdge(k); }
    } else if (state.edge) {
      focus = true; focusEdge(byKey.get(state.edge));
    } else if (state.set) {
      focus = true;
      const s = sets.find((x) => x.name === state.set);
      for (const k of s.edges) if (shown.has(k)) focusEdge(k);
    }
    svg.classList.toggle("focus", focus);
    for (const g of world.querySelectorAll(".node")) {
      const id = g.getAttribute("data-id");
      g.classList.toggle("match", matches.has(id));
      g.classList.toggle("hl", hl.has(id));
      g.classList.toggle("selected", id === state.head);
    }
    for (const g of world.querySelectorAll(".edge")) {
      if (g.classList.contains("attention")) { g.classList.toggle("hl", hl.has(g.getAttribute("data-u"))); continue; }
      const k = +g.getAttribute("data-k");
      g.classList.toggle("hl", hlEdges.has(k));
      g.classList.toggle("selected", state.edge === edgeKey(edges[k]));
      g.classList.toggle("inset", !!state.set && hlEdges.has(k));
    }
    const status = document.getElementById("status");
    const nHeads = [...current.nodes.values()].filter((n) => n.role === null && !writerKind(n.id)).length;
    status.textContent = `${fmtInt(current.vis.length)} edges · ${nHeads} heads` + (q ? ` · ${matches.size} match` : "");
    status.setAttribute("data-edges", current.vis.length);
    status.setAttribute("data-heads", nHeads);
  }

  // --- pan and zoom (the viewBox) --------------------------------------------------------------------------
  // fit(true): the whole circuit; fit(): readable, as wide as the pane allows (up to 1.25x) and from the
  // top, so a tall circuit (18 layers of Gemma) starts legible and is panned down, not shrunk to dots.
  function fit(all) {
    const bb = world.getBBox(), m = 30, r = svg.getBoundingClientRect();
    const W = r.width || 800, H = r.height || 600;
    const bw = Math.max(bb.width + 2 * m, 200), bh = Math.max(bb.height + 2 * m + 50, 150);  // + room for the legend
    let scale = Math.min(W / bw, H / bh, 1.6);
    if (!all) scale = Math.max(scale, Math.min(W / bw, 1.25));
    const w = W / scale, h = H / scale;
    view = { x: bb.x - m - (w - bw) / 2, y: bh <= h ? bb.y - m - (h - bh) / 2 : bb.y - m, w, h };
    applyView();
  }
  // bring node `id` into the middle of the view if it is outside it (a selection from the URL or a table)
  function reveal(id) {
    const n = current.nodes.get(id);
    if (!n || (n.x > view.x + 40 && n.x < view.x + view.w - 40 && n.y > view.y + 40 && n.y < view.y + view.h - 40)) return;
    view = { ...view, x: n.x - view.w / 2, y: n.y - view.h / 2 };
    applyView();
  }
  function applyView() { svg.setAttribute("viewBox", `${view.x} ${view.y} ${view.w} ${view.h}`); }
  function toWorld(cx, cy) {
    const p = svg.createSVGPoint(); p.x = cx; p.y = cy;
    return p.matrixTransform(svg.getScreenCTM().inverse());
  }
  function zoom(factor, cx, cy) {
    const r = svg.getBoundingClientRect();
    const p = toWorld(cx ?? r.left + r.width / 2, cy ?? r.top + r.height / 2);
    view = { x: p.x - (p.x - view.x) * factor, y: p.y - (p.y - view.y) * factor, w: view.w * factor, h: view.h * factor };
    applyView();
  }
  svg.addEventListener("wheel", (ev) => { ev.preventDefault(); zoom(ev.deltaY > 0 ? 1.15 : 1 / 1.15, ev.clientX, ev.clientY); }, { passive: false });
  let drag = null;
  svg.addEventListener("pointerdown", (ev) => { drag = { x: ev.clientX, y: ev.clientY, view: { ...view }, moved: false }; });
  window.addEventListener("pointermove", (ev) => {
    if (!drag) return;
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (!drag.moved && Math.hypot(dx, dy) < 4) return;
    drag.moved = true; graphBox.classList.add("dragging");
    const r = svg.getBoundingClientRect();
    const scale = Math.max(drag.view.w / r.width, drag.view.h / r.height);
    view = { ...drag.view, x: drag.view.x - dx * scale, y: drag.view.y - dy * scale };
    applyView();
  });
  window.addEventListener("pointerup", () => { setTimeout(() => { drag = null; }, 0); graphBox.classList.remove("dragging"); });
  svg.addEventListener("click", (ev) => {
    if (drag && drag.moved) return;
    const node = ev.target.closest(".node"), edge = ev.target.closest(".edge.communication");
    if (node) select({ head: headOf(node.getAttribute("data-id")) });
    else if (edge) select({ edge: edgeKey(edges[+edge.getAttribute("data-k")]) });
    else select({});
  });

  // --- header: title and controls ----------------------------------------------------------------------------
  function buildHeader() {
    const sub = DIFF ? `edges seen in ≥ ${D.min_count} prompts in either trace`
                     : `${fmtInt(D.n_prompts)} prompts · roots ${D.config.roots.join(", ")} · firing > ${D.config.threshold} · mass ${D.config.mass} · slices ${D.config.slices}`;
    const typeSwatch = (t) => DIFF ? `<span class="swatch${t === "d" ? " dash" : ""}" style="color:#555;background:#555"></span>`
                                   : `<span class="swatch" style="background:${S[t]}"></span>`;
    header.innerHTML = `
      <div><h1 title="${esc(D.title)}">${esc(D.title)}</h1><div class="sub">${esc(sub)}</div></div>
      <div class="controls">
        <label title="show edges seen in at least this many prompts">min prompts
          <input id="min" type="range" min="${lowest}" max="${maxCount}" step="1" value="${state.t}">
          <span id="min-value">${state.t}</span></label>
        <label title="edges into a source token (s)"><input id="type-s" type="checkbox"> ${typeSwatch("s")} s</label>
        <label title="edges into a destination token (d)"><input id="type-d" type="checkbox"> ${typeSwatch("d")} d</label>
        ${DIFF ? ["a", "b", "both"].map((w) => `<label><input id="where-${w}" type="checkbox"> <span class="swatch" style="background:${S[{ a: "only_a", b: "only_b", both: "both" }[w]]}"></span> ${{ a: "only A", b: "only B", both: "both" }[w]}</label>`).join("") : ""}
        <label><input id="search" type="search" placeholder="find head, e.g. 9.6" autocomplete="off"></label>
        <span id="status"></span>
      </div>`;
    const min = header.querySelector("#min");
    min.addEventListener("input", () => { state.t = +min.value; header.querySelector("#min-value").textContent = state.t; refresh(); });
    for (const t of ["s", "d"]) header.querySelector("#type-" + t).addEventListener("change", (ev) => { state[t] = ev.target.checked; refresh(); });
    if (DIFF) for (const w of ["a", "b", "both"]) header.querySelector("#where-" + w).addEventListener("change", (ev) => { state[w] = ev.target.checked; refresh(); });
    const search = header.querySelector("#search");
    search.addEventListener("input", () => { state.q = search.value; decorate(); writeHash(); });
    search.addEventListener("keydown", (ev) => {
      if (ev.key !== "Enter") return;
      const hit = world.querySelector(".node.head.match");
      if (hit) select({ head: hit.getAttribute("data-id") });
    });
  }
  function syncControls() {
    header.querySelector("#min").value = state.t;
    header.querySelector("#min-value").textContent = state.t;
    header.querySelector("#type-s").checked = state.s;
    header.querySelector("#type-d").checked = state.d;
    if (DIFF) for (const w of ["a", "b", "both"]) header.querySelector("#where-" + w).checked = state[w];
    header.querySelector("#search").value = state.q;
  }

  function legend() {
    const box = document.createElement("div");
    box.id = "legend";
    box.innerHTML = DIFF
      ? `<div><span class="swatch" style="background:${S.only_a}"></span> only in A &nbsp; <span class="swatch" style="background:${S.only_b}"></span> only in B &nbsp; <span class="swatch" style="background:${S.both}"></span> in both</div>
         <div>solid: into a source token (s) · dashed: into a destination token (d) · width: |change of total contribution|</div>`
      : `<div><span class="swatch" style="background:${S.s}"></span> into a source token (s) &nbsp; <span class="swatch" style="background:${S.d}"></span> into a destination token (d) &nbsp; <span class="swatch" style="background:${S.attention}"></span> attention</div>
         <div>width: accumulated contribution · darker: more events traced${D.compare ? ` · <span style="color:green">green border: known head (${esc(D.compare)})</span>` : ""} · <span style="color:#a07800">dashed gold ring: root</span></div>`;
    graphBox.appendChild(box);
    const z = document.createElement("div");
    z.id = "zoom";
    z.innerHTML = `<button id="zoom-in" title="zoom in">+</button><button id="zoom-out" title="zoom out">−</button><button id="fit" title="fit the circuit">fit</button>`;
    graphBox.appendChild(z);
    z.querySelector("#zoom-in").onclick = () => zoom(1 / 1.3);
    z.querySelector("#zoom-out").onclick = () => zoom(1.3);
    z.querySelector("#fit").onclick = () => fit(true);
  }

  // --- the side panel -------------------------------------------------------------------------------------
  function chart(values, cls, xLabel, first) {
    // bars for values[k], k from `first`; the x axis labelled at a few ticks
    const W = 380, H = 120, L = 38, B = 22, T = 6;
    const xs = values.map((v, k) => [k, v]).filter(([k]) => k >= first);
    if (!xs.length) return `<p class="note">none</p>`;
    const n = xs.length, max = Math.max(1, ...xs.map(([, v]) => v));
    const bw = (W - L - 4) / n;
    let bars = "";
    for (const [idx, [k, v]] of xs.entries()) {
      const h = (H - B - T) * v / max;
      bars += `<rect class="bar ${cls}" data-k="${k}" data-n="${v}" x="${(L + idx * bw + (bw > 3 ? 0.5 : 0)).toFixed(2)}" y="${(H - B - h).toFixed(2)}" width="${Math.max(0.6, bw - (bw > 3 ? 1 : 0)).toFixed(2)}" height="${h.toFixed(2)}"><title>${esc(xLabel)} ${k}: ${v}</title></rect>`;
    }
    const step = Math.max(1, Math.ceil(n / 8));
    let ticks = "";
    for (let idx = 0; idx < n; idx += step) ticks += `<text x="${(L + (idx + 0.5) * bw).toFixed(1)}" y="${H - 8}" text-anchor="middle">${xs[idx][0]}</text>`;
    return `<svg class="chart ${cls}" viewBox="0 0 ${W} ${H}" width="100%">
      <line x1="${L}" y1="${H - B}" x2="${W - 2}" y2="${H - B}" stroke="#aab1bd"/>
      <text x="${L - 4}" y="${T + 8}" text-anchor="end">${fmtInt(max)}</text><text x="${L - 4}" y="${H - B}" text-anchor="end">0</text>
      ${bars}${ticks}<text x="${W - 2}" y="${T + 8}" text-anchor="end">${esc(xLabel)}</text></svg>`;
  }

  function edgeRows(ks, cols) {
    return ks.map((k) => {
      const e = edges[k];
      return `<tr class="link" data-edge="${esc(edgeKey(e))}">` + cols.map((c) => c(e)).join("") + "</tr>";
    }).join("");
  }

  const LIST = 30;
  function edgeTable(ks, title, other) {
    // trace mode: count, total, mean; diff: A, B and the change
    if (!ks.length) return `<h3>${title}</h3><p class="note">none at this filter</p>`;
    const shown = ks.slice(0, LIST);
    const more = ks.length > LIST ? `<p class="note">${ks.length - LIST} more, not listed</p>` : "";
    if (DIFF) {
      return `<h3>${title} (${ks.length})</h3><table><tr><th>${other === "u" ? "from" : "to"}</th><th>type</th><th class="num">A</th><th class="num">B</th><th class="num">Δ count</th></tr>` +
        edgeRows(shown, [(e) => `<td>${esc(other === "u" ? `${e.u} → ${roleOf(e.v)}` : label(e.v))}</td>`, (e) => `<td>${e.type}</td>`,
                         (e) => `<td class="num">${e.ca}</td>`, (e) => `<td class="num">${e.cb}</td>`, (e) => `<td class="num">${signed(e.cb - e.ca)}</td>`]) + `</table>${more}`;
    }
    // an in-edge names the token it writes into: a head's tokens each have their own edges from one writer
    return `<h3>${title} (${ks.length})</h3><table><tr><th>${other === "u" ? "from" : "to"}</th><th>type</th><th class="num">count</th><th class="num">total</th><th class="num">mean</th></tr>` +
      edgeRows(shown, [(e) => `<td>${esc(other === "u" ? `${e.u} → ${roleOf(e.v)}` : label(e.v))}</td>`, (e) => `<td><span style="color:${S[e.type]}">${e.type}</span></td>`,
                       (e) => `<td class="num">${e.count}</td>`, (e) => `<td class="num">${fmt(e.total)}</td>`, (e) => `<td class="num">${fmt(e.mean)}</td>`]) + `</table>${more}`;
  }

  const byCount = (a, b) => (DIFF ? Math.max(edges[b].ca, edges[b].cb) - Math.max(edges[a].ca, edges[a].cb) : edges[b].count - edges[a].count) || a - b;

  function writerText(id) {
    const [l] = parseHead(id);
    return { mlp: `the MLP of layer ${l}`, bias: `the attention output bias b_O of layer ${l}`, embed: "the embeddings" }[writerKind(id)]
      + " (a source, not a head: the trace does not recurse into it)";
  }

  function splitTable(split) {
    const classes = D.writer_classes || [];
    const sides = ["d", "s"].filter((s) => split && split[s]);
    if (!sides.length) return "";
    return `<h3>its signal by writer (share of its traced events' signal)</h3><table class="split"><tr><th>side</th>${classes.map((c) => `<th>${esc(c)}</th>`).join("")}</tr>` +
      sides.map((s) => `<tr><td>${s}</td>${classes.map((c) => `<td>${fmt(100 * split[s][c], 2)}%</td>`).join("")}</tr>`).join("") + "</table>";
  }

  function headPanel(id) {
    const vis = new Set(current.vis);
    const into = [], out = [];
    edges.forEach((e, k) => { if (!vis.has(k)) return; if (headOf(e.v) === id) into.push(k); if (e.u === id) out.push(k); });
    into.sort(byCount); out.sort(byCount);
    if (writerKind(id)) return `<h2>${esc(id)}</h2><p class="note" id="writer-kind">${esc(writerText(id))}</p>` + edgeTable(out, "edges out of it", "v");
    const badges = (roots.has(id) ? `<span class="badge root">root</span>` : "") + (known[id] ? `<span class="badge known">${esc(known[id])}</span>` : "");
    if (DIFF) {
      const w = nodeWhere.get(id);
      return `<h2>head ${esc(id)}${badges}</h2><dl class="kv"><dt>where</dt><dd id="head-where">${w ? { a: "only in A", b: "only in B", both: "in both" }[w] : "in neither at this count"}</dd></dl>` +
        edgeTable(into, "edges into its tokens", "u") + edgeTable(out, "edges out of it", "v");
    }
    const h = heads.get(id);
    if (!h) return `<h2>head ${esc(id)}</h2><p class="note">not in the trace</p>`;
    const events = h.hist.reduce((a, b) => a + b, 0);
    const meanS = events ? h.hist.reduce((a, v, k) => a + k * v, 0) / events : NaN;
    return `<h2>head ${esc(id)}${badges}</h2>
      <dl class="kv">
        <dt>firing events</dt><dd id="head-firing">${fmtInt(h.firing)}</dd>
        <dt>traced events</dt><dd id="head-traced">${fmtInt(h.traced)}</dd>
        <dt>mean |S<sub>ij</sub>|</dt><dd id="head-mean-s">${fmt(meanS)}</dd>
        ${D.compare ? `<dt>known class</dt><dd id="head-class">${esc(known[id] || "— (not in the " + D.compare + " list)")}</dd>` : ""}
      </dl>
      ${splitTable(h.split)}
      <h3>|S<sub>ij</sub>| over its ${fmtInt(events)} firing events (Fig. 3)</h3>${chart(h.hist, "hist", "|S_ij|", 1)}
      <h3>slice usage: firings using slice k (Fig. 2)</h3>${chart(h.usage, "usage", "slice k", 0)}
      ${edgeTable(into, "edges into its tokens", "u")}${edgeTable(out, "edges out of it", "v")}
      <p class="note">edges at the current filter (≥ ${state.t} prompts, types ${(state.s ? "s" : "") + (state.d ? "d" : "")})</p>`;
  }

  function promptHtml(p, i, j, side) {
    const words = D.text[p] || [];
    const into = side === "d" ? i : j;
    return words.map((w, k) => {
      if (k !== i && k !== j) return esc(w);
      const lead = w.match(/^\s*/)[0], text = esc(w.slice(lead.length));
      const cls = [k === i ? "dest" : "src", k === into ? "into" : ""].join(" ").trim();
      const what = k === i && k === j ? "dest and src" : k === i ? "dest" : "src";
      return `${esc(lead)}<mark class="${cls}" title="${what}: ${esc(D.labels[p][k])}">${text}</mark>`;
    }).join(D.text_is_labels ? " " : "");
  }

  function edgePanel(key) {
    const k = byKey.get(key), e = edges[k];
    const head = `<h2>${esc(e.u)} → ${esc(label(e.v))}</h2>`;
    if (DIFF) {
      return head + `<dl class="kv"><dt>type</dt><dd>${e.type}</dd>
        <dt>where</dt><dd id="edge-where">${{ a: "only in A", b: "only in B", both: "in both" }[where(e)] || "—"}</dd>
        <dt>count A</dt><dd id="edge-count-a">${e.ca}</dd><dt>count B</dt><dd id="edge-count-b">${e.cb}</dd>
        <dt>Δ count</dt><dd id="edge-delta">${signed(e.cb - e.ca)}</dd>
        <dt>total A</dt><dd>${fmt(e.ta)}</dd><dt>total B</dt><dd>${fmt(e.tb)}</dd><dt>Δ total</dt><dd id="edge-delta-total">${signed(e.tb - e.ta)}</dd></dl>`;
    }
    const order = e.p.map((p, n) => n);
    const shown = order.slice(0, PROMPT_LIMIT);
    const list = shown.map((n) => `<div class="prompt" data-p="${e.p[n]}"><span class="pc" data-c="${e.c[n]}" title="contribution in this prompt">${fmt(e.c[n])}</span><span class="pn">#${e.p[n]}</span>${promptHtml(e.p[n], e.i[n], e.j[n], e.s[n])}</div>`).join("");
    return head + `<dl class="kv">
        <dt>type</dt><dd id="edge-type"><span style="color:${S[e.type]}">${e.type}</span> (${e.type === "s" ? "into the source token" : "into the destination token"})</dd>
        <dt>prompts</dt><dd id="edge-count">${fmtInt(e.count)}</dd>
        <dt>through s / d</dt><dd>${e.ns} / ${e.nd} prompts</dd>
        <dt>total contribution</dt><dd id="edge-total">${fmt(e.total, 4)}</dd>
        <dt>mean contribution</dt><dd id="edge-mean">${fmt(e.mean, 4)}</dd>
      </dl>
      <h3>traced in ${fmtInt(e.p.length)} prompts${e.p.length > PROMPT_LIMIT ? `, the first ${PROMPT_LIMIT} listed` : ""}</h3>
      <p class="note">the downstream event's <mark class="dest" style="background:none">dest</mark> and <mark class="src" style="background:none">src</mark> tokens; highlighted: the token ${esc(e.u)} writes into; right: the edge's contribution in that prompt${D.text_is_labels ? "; tokens shown by their labels (the trace has no token text)" : ""}</p>
      <div id="prompts">${list}</div>`;
  }

  function overview() {
    const vis = [...current.vis].sort(byCount);
    if (DIFF) {
      const { inA, inB } = computeNodeWhere();
      const all = edges.map((e, k) => k).filter((k) => where(edges[k]));
      const n = (w) => all.filter((k) => where(edges[k]) === w).length;
      const nodesIn = (f) => [...nodeWhere.values()].filter(f).length;
      const jn = nodeWhere.size ? nodesIn((w) => w === "both") / nodeWhere.size : 1;
      const je = all.length ? n("both") / all.length : 1;
      const settings = D.settings.map(([name, a, b]) => `<tr${a !== b ? ' style="background:#fff7d6"' : ""}><td>${esc(name)}</td><td>${esc(a)}</td><td>${esc(b)}</td></tr>`).join("");
      const changes = all.slice().sort((x, y) => Math.abs(edges[y].tb - edges[y].ta) - Math.abs(edges[x].tb - edges[x].ta) || x - y).slice(0, 15);
      return `<h2>Diff</h2><table><tr><th></th><th>A</th><th>B</th></tr><tr><td>input</td><td>${esc(D.names[0])}</td><td>${esc(D.names[1])}</td></tr>${settings}</table>
        <h3>edges seen in ≥ ${state.t} prompts</h3>
        <table id="diff-counts"><tr><th></th><th class="num">in both</th><th class="num">only in A</th><th class="num">only in B</th><th class="num">Jaccard</th></tr>
        <tr><td>nodes</td><td class="num" id="n-both">${nodesIn((w) => w === "both")}</td><td class="num" id="n-only-a">${nodesIn((w) => w === "a")}</td><td class="num" id="n-only-b">${nodesIn((w) => w === "b")}</td><td class="num">${jn.toFixed(2)}</td></tr>
        <tr><td>edges</td><td class="num" id="e-both">${n("both")}</td><td class="num" id="e-only-a">${n("a")}</td><td class="num" id="e-only-b">${n("b")}</td><td class="num">${je.toFixed(2)}</td></tr></table>
        <h3>largest changes of total contribution</h3><table><tr><th>edge</th><th>type</th><th class="num">A</th><th class="num">B</th><th class="num">Δ total</th></tr>` +
        edgeRows(changes, [(e) => `<td>${esc(e.u)} → ${esc(label(e.v))}</td>`, (e) => `<td>${e.type}</td>`, (e) => `<td class="num">${e.ca}</td>`,
                           (e) => `<td class="num">${e.cb}</td>`, (e) => `<td class="num">${signed(e.tb - e.ta)}</td>`]) + "</table>" +
        `<p class="note">click a head or an edge for its numbers; drag to pan, wheel to zoom</p>`;
    }
    const rootsHtml = D.config.roots.map((r) => `<tr class="link" data-head="${esc(r.split(" ")[0])}"><td>${esc(r)}</td><td class="num">${fmtInt((heads.get(r.split(" ")[0]) || {}).firing || 0)}</td></tr>`).join("");
    return `<h2>Trace</h2><dl class="kv">
        <dt>model</dt><dd>${esc(D.model)}</dd><dt>prompts</dt><dd>${esc(D.prompts)} (${fmtInt(D.n_prompts)})</dd>
        <dt>edges in the trace</dt><dd>${fmtInt(edges.length)}</dd>
        <dt>shown</dt><dd id="shown">${fmtInt(current.vis.length)} seen in ≥ ${state.t} prompts</dd></dl>
      <h3>roots</h3><table><tr><th>root</th><th class="num">head firings</th></tr>${rootsHtml}</table>
      <h3>edges shown, by count</h3><table><tr><th>edge</th><th>type</th><th class="num">count</th><th class="num">total</th></tr>` +
      edgeRows(vis.slice(0, 15), [(e) => `<td>${esc(e.u)} → ${esc(label(e.v))}</td>`, (e) => `<td><span style="color:${S[e.type]}">${e.type}</span></td>`,
                                  (e) => `<td class="num">${e.count}</td>`, (e) => `<td class="num">${fmt(e.total)}</td>`]) + "</table>" +
      (vis.length > 15 ? `<p class="note">${vis.length - 15} more in the graph</p>` : "") +
      `<p class="note">click a head or an edge for its numbers; drag to pan, wheel to zoom</p>`;
  }

  function interventionsPanel() {
    const I = D.interventions;
    if (!I) return "";
    const verdicts = I.verdicts.map((v) => `<tr class="link${state.set === v.set ? " active" : ""}" data-set="${esc(v.set)}"><td>${esc(v.set)}</td><td>${esc(v.place)}</td>
      <td class="num">${fmt(v.ablate)}</td><td class="num">${fmt(v.ablate_random)}</td><td class="num">${fmt(v.boost)}</td><td class="num">${fmt(v.boost_random)}</td>
      <td class="verdict-${esc(v.verdict.replace(/[^a-z]+/g, "-"))}">${esc(v.verdict)}</td></tr>`).join("");
    const setRows = I.sets.map((s) => `<tr class="link${state.set === s.name ? " active" : ""}" data-set="${esc(s.name)}"><td>${esc(s.name)}</td><td>${esc(s.selectors.join("; "))}</td>
      <td class="num">${s.edges.length}</td><td class="num">${s.n_prompts}</td></tr>`).join("");
    let detail = "";
    if (state.set) {
      const order = { "ablate signal": 0, "boost signal": 1, "ablate random": 2, "boost random": 3 };
      const rows = I.summaries.filter((s) => s.set === state.set)
        .sort((a, b) => (a.place !== "global") - (b.place !== "global") || order[`${a.kind} ${a.control}`] - order[`${b.kind} ${b.control}`]);
      const s = I.sets.find((x) => x.name === state.set);
      const vis = new Set(current.vis);
      const shown = s.edges.filter((k) => vis.has(k)).length;
      detail = `<h3 id="set-title">“${esc(state.set)}”: ${s.edges.length} edges, ${shown} at this filter highlighted</h3>
        <table id="set-effects"><tr><th>place</th><th>kind</th><th class="num">n</th><th class="num">dF mean</th><th class="num">dF median [IQR]</th><th class="num">dA′ mean</th><th class="num">cos</th><th class="num">norm</th></tr>` +
        rows.map((r) => `<tr><td>${esc(r.place)}</td><td>${esc(r.control === "signal" ? r.kind : "random " + r.kind)}</td><td class="num">${r.n_prompts}</td>
          <td class="num">${fmt(r.delta_f_mean)}</td><td class="num">${fmt(r.delta_f_median)} [${fmt(r.delta_f_q25, 2)}, ${fmt(r.delta_f_q75, 2)}]</td>
          <td class="num">${fmt(r.delta_score_mean)}</td><td class="num">${fmt(r.cosine_mean, 4)}</td><td class="num">${fmt(r.norm_ratio_mean)}</td></tr>`).join("") +
        `</table><p class="note">dF = F(X, e, h) − F(X); dA′: change of the downstream score; click the set again to clear</p>`;
    }
    return `<h2 id="interventions">Interventions (section 5.4)</h2>
      <h3>verdict: does ablation lower F and boosting raise it, more than the random control?</h3>
      <table id="verdicts"><tr><th>set</th><th>place</th><th class="num">ablate</th><th class="num">random</th><th class="num">boost</th><th class="num">random</th><th>verdict</th></tr>${verdicts}</table>
      <h3>sets (click one to highlight its edges)</h3>
      <table id="sets"><tr><th>set</th><th>edges</th><th class="num">graph edges</th><th class="num">prompts</th></tr>${setRows}</table>${detail}`;
  }

  function renderPanel() {
    let html = state.head ? headPanel(state.head) : state.edge ? edgePanel(state.edge) : overview();
    if (state.head || state.edge) html = `<p><button id="back">← overview</button></p>` + html;
    aside.innerHTML = html + interventionsPanel();
    const back = aside.querySelector("#back");
    if (back) back.onclick = () => select({});
    for (const tr of aside.querySelectorAll("tr[data-edge]")) tr.onclick = () => select({ edge: tr.getAttribute("data-edge") });
    for (const tr of aside.querySelectorAll("tr[data-head]")) tr.onclick = () => select({ head: tr.getAttribute("data-head") });
    for (const tr of aside.querySelectorAll("tr[data-set]")) tr.onclick = () => {
      const name = tr.getAttribute("data-set");
      state.set = state.set === name ? null : name;
      state.head = null; state.edge = null;
      decorate(); renderPanel(); writeHash();
      revealSelection();
    };
  }

  function select(what) {
    state.head = what.head || null;
    state.edge = what.edge || null;
    if (state.head || state.edge) state.set = null;
    decorate(); renderPanel(); writeHash();
    revealSelection();
  }
  function revealSelection() {
    if (state.head) reveal(state.head);
    else if (state.edge) reveal(edges[byKey.get(state.edge)].v);
    else if (state.set) revealEdges(D.interventions.sets.find((x) => x.name === state.set).edges);
  }
  // bring the drawn ends of edges `ks` into the view (widening it if they span more than it holds)
  function revealEdges(ks) {
    const ends = ks.flatMap((k) => [edges[k].u, edges[k].v]).map((id) => current.nodes.get(id)).filter(Boolean);
    if (!ends.length) return;
    const m = 60, xs = ends.map((n) => n.x), ys = ends.map((n) => n.y);
    const box = { x0: Math.min(...xs) - m, x1: Math.max(...xs) + m, y0: Math.min(...ys) - m, y1: Math.max(...ys) + m };
    if (box.x0 >= view.x && box.x1 <= view.x + view.w && box.y0 >= view.y && box.y1 <= view.y + view.h) return;
    const grow = Math.max(1, (box.x1 - box.x0) / view.w, (box.y1 - box.y0) / view.h);
    const w = view.w * grow, h = view.h * grow;
    view = { x: (box.x0 + box.x1) / 2 - w / 2, y: (box.y0 + box.y1) / 2 - h / 2, w, h };
    applyView();
  }

  function refresh() {
    computeNodeWhere();
    draw(); renderPanel(); writeHash();
  }

  // --- start ------------------------------------------------------------------------------------------------
  readHash();
  buildHeader();
  legend();
  syncControls();
  refresh();
  revealSelection();
  window.addEventListener("hashchange", () => { readHash(); syncControls(); refresh(); revealSelection(); });
  window.__viewer = { ready: performance.now(), state, visibleEdges: () => current.vis.map((k) => edgeKey(edges[k])) };
  document.body.setAttribute("data-ready", "1");
})();
