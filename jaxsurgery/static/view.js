// jaxsurgery's interactive graph view (see jaxsurgery/_interactive.py). Needs dagre.
// jaxsurgeryView(root, packed): root is the view's container, packed what View.packed()
// gives: View.data() with the vars as columns of string-table indices (see unpackView).
function unpackView(p) {
  const s = p.strings, c = p.columns, n = c.name.length, vars = new Array(n);
  for (let k = 0; k < n; k++) {
    vars[k] = {
      index: k, name: s[c.name[k]], aliases: (c.aliases[k] || []).map((i) => s[i]),
      type: s[c.type[k]], primitive: s[c.primitive[k]], scope: s[c.scope[k]],
      source: s[c.source[k]], group: s[c.group[k]], role: s[c.role[k]],
    };
  }
  const edges = [];
  for (let k = 0; k < p.edges.length; k += 2) edges.push([p.edges[k], p.edges[k + 1]]);
  const g = p.groups, groups = new Array(g.key.length);
  for (let k = 0; k < groups.length; k++) {
    groups[k] = {
      key: s[g.key[k]], label: s[g.label[k]], path: s[g.path[k]], kind: s[g.kind[k]],
      glob: Array.isArray(g.glob[k]) ? g.glob[k].map((i) => s[i]) : s[g.glob[k]], parent: g.parent[k] < 0 ? null : s[g.parent[k]],
      size: g.size[k], depth: g.depth[k], also: (g.also[k] || []).map((i) => s[i]),
    };
  }
  return { groups, vars, edges, expanded: p.expanded };
}

function jaxsurgeryView(root, packed) {
  "use strict";
  const data = unpackView(packed);
  const SVGNS = "http://www.w3.org/2000/svg";
  const groups = {};
  data.groups.forEach((g) => { groups[g.key] = g; });
  const expanded = new Set(data.expanded);
  const q = (sel) => root.querySelector(sel);
  const svg = q("svg.jsv-canvas");
  const scene = q("g.jsv-scene");
  const card = q(".jsv-card");
  const count = q(".jsv-count");
  let marked = new Set();  // var indices matching the search
  let view = { x: 0, y: 0, k: 1 };

  // which node a var shows as: its outermost collapsed group, else itself
  function nodeOf(v) {
    const chain = [];
    for (let g = v.group; g && groups[g].depth > 0; g = groups[g].parent) chain.push(g);
    for (let k = chain.length - 1; k >= 0; k--) if (!expanded.has(chain[k])) return chain[k];
    return "v" + v.index;
  }
  function clipLeft(text, width) {
    return text.length <= width ? text : "\u2026" + text.slice(text.length - width + 1);
  }
  // the least width from `width` up at which different labels stay apart once clipped
  // (…['Dense_0']['bias'] of two modules), as min_width_apart in _hierarchy.py
  function widthApart(labels, width) {
    const longest = Math.max(width, ...labels.map((t) => t.length));
    for (; width < longest; width = Math.min(width + 4, longest)) {
      const seen = new Map();
      if (labels.every((t) => (seen.has(clipLeft(t, width)) ? seen.get(clipLeft(t, width)) === t
        : (seen.set(clipLeft(t, width), t), true)))) break;
    }
    return width;
  }
  function el(tag, attrs, parent) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, val] of Object.entries(attrs)) e.setAttribute(k, val);
    if (parent) parent.appendChild(e);
    return e;
  }
  const ORDER = ["input", "output", "window", "context", "selected", "plain", "faded"];

  function render() {
    const g = new dagre.graphlib.Graph({ compound: true, multigraph: false });
    g.setGraph({ rankdir: "TB", nodesep: 18, ranksep: 30, marginx: 12, marginy: 12 });
    g.setDefaultEdgeLabel(() => ({}));
    const nodes = {};
    const nodeOfVar = new Array(data.vars.length);
    data.vars.forEach((v, k) => {
      const key = nodeOf(v);
      nodeOfVar[k] = key;
      let n = nodes[key];
      if (!n) {
        if (key[0] === "g") {
          const grp = groups[key];
          n = nodes[key] = { key, group: grp, label: grp.label, detail: grp.size + " vars", role: v.role, hit: false };
        } else {
          n = nodes[key] = { key, v, label: v.name, detail: v.type + " " + v.primitive, role: v.role, hit: false };
        }
      } else if (ORDER.indexOf(v.role) < ORDER.indexOf(n.role)) {
        n.role = v.role;
      }
      if (marked.has(v.index)) n.hit = true;
    });
    // (at most 40 characters: names alike up to their last few stay alike, the card has them)
    const chars = Math.min(widthApart(Object.values(nodes).map((n) => n.label), 22), 40);
    const boxWidth = Math.max(160, Math.round(chars * 7.2));
    // clusters: the open groups around what they hold
    const clusters = new Set();
    Object.values(nodes).forEach((n) => {
      g.setNode(n.key, { width: boxWidth, height: 40 });
      let parent = n.group ? n.group.parent : n.v.group;
      if (parent && groups[parent].depth > 0 && expanded.has(parent)) {
        g.setParent(n.key, "c" + parent);
        for (let p = parent; p && groups[p].depth > 0; p = groups[p].parent) {
          if (!clusters.has(p)) {
            clusters.add(p);
            g.setNode("c" + p, { label: groups[p].label });
            const up = groups[p].parent;
            if (up && groups[up].depth > 0) g.setParent("c" + p, "c" + up);
          }
        }
      }
    });
    const seen = new Set();
    data.edges.forEach(([a, b]) => {
      const s = nodeOfVar[a], t = nodeOfVar[b];
      if (s === t || seen.has(s + ">" + t)) return;
      seen.add(s + ">" + t);
      g.setEdge(s, t);
    });
    dagre.layout(g);
    while (scene.firstChild) scene.removeChild(scene.firstChild);
    // outer clusters first: an inner one's header drawn over its parent's frame takes
    // its own clicks (drawn before, the parent's frame closed the parent)
    [...clusters].sort((a, b) => groups[a].depth - groups[b].depth).forEach((p) => {
      const c = g.node("c" + p);
      const box = el("g", { class: "jsv-cluster", "data-key": p }, scene);
      el("rect", { x: c.x - c.width / 2, y: c.y - c.height / 2, width: c.width, height: c.height, rx: 8 }, box);
      const t = el("text", { x: c.x - c.width / 2 + 8, y: c.y - c.height / 2 + 13 }, box);
      t.textContent = "\u25be " + clipLeft(groups[p].label, 40);
      box.addEventListener("click", (e) => {
        e.stopPropagation();
        expanded.delete(p);
        render.clicked = true;
        render();
      });
      box.addEventListener("mouseenter", () => showGroup(groups[p]));
    });
    g.edges().forEach((e) => {
      const pts = g.edge(e).points;
      const d = "M" + pts.map((p) => p.x.toFixed(1) + "," + p.y.toFixed(1)).join(" L");
      el("path", { d, class: "jsv-edge", "marker-end": "url(#" + root.id + "-arrow)" }, scene);
    });
    Object.values(nodes).forEach((n) => {
      const p = g.node(n.key);
      const box = el("g", { class: "jsv-node jsv-" + n.role + (n.group ? " jsv-group" : "") + (n.hit ? " jsv-hit" : ""), "data-key": n.key }, scene);
      el("rect", { x: p.x - boxWidth / 2, y: p.y - 20, width: boxWidth, height: 40, rx: 6 }, box);
      const t1 = el("text", { x: p.x, y: p.y - 3, class: "jsv-label" }, box);
      t1.textContent = (n.group ? "\u25b8 " : "") + clipLeft(n.label, chars);
      const t2 = el("text", { x: p.x, y: p.y + 12, class: "jsv-detail" }, box);
      t2.textContent = clipLeft(n.detail, 26);
      if (n.group) {
        box.addEventListener("click", () => { expanded.add(n.key); render.clicked = true; render(); });
        box.addEventListener("mouseenter", () => showGroup(n.group));
      } else {
        box.addEventListener("click", () => showVar(n.v, true));
        box.addEventListener("mouseenter", () => showVar(n.v, false));
      }
    });
    const info = g.graph();
    root.dataset.nodes = Object.keys(nodes).length;
    root.dataset.width = info.width;
    // first drawn, asked to, or a group opened or closed so that boxes fall outside
    if (!render.done || (render.clicked && outside(info.width, info.height))) {
      fit(info.width, info.height);
      render.done = true;
    }
    render.clicked = false;
  }
  function outside(w, h) {
    const box = svg.getBoundingClientRect();
    return view.x < 0 || view.y < 0 || view.x + w * view.k > (box.width || 800) ||
      view.y + h * view.k > (box.height || 500);
  }

  function fit(w, h) {
    const box = svg.getBoundingClientRect();
    // a margin of 10 above and below at any scale (h + 20 scaled lost the bottom
    // margin's share, and the last box, on tall pictures)
    const k = Math.min(1, (box.width || 800) / (w + 20), ((box.height || 500) - 20) / h);
    view = { x: ((box.width || 800) - w * k) / 2, y: 10, k };
    place();
  }
  function place() {
    scene.setAttribute("transform", `translate(${view.x},${view.y}) scale(${view.k})`);
  }

  function row(label, value) {
    if (value === undefined || value === null || value === "") return "";
    const esc = String(value).replace(/&/g, "&amp;").replace(/</g, "&lt;");
    return `<div class="jsv-row"><b>${label}</b> <span>${esc}</span></div>`;
  }
  function showVar(v, pin) {
    card.innerHTML = row("name", v.name) + row("aliases", v.aliases.join(", ")) +
      row("type", v.type) + row("primitive", v.primitive) + row("scope", v.scope) +
      row("source", v.source) + row("role", v.role === "plain" ? "" : v.role) +
      `<div class="jsv-row"><b>selector</b> <code class="jsv-selector"></code> ` +
      `<button class="jsv-copy">copy</button></div>`;
    const code = card.querySelector(".jsv-selector");
    code.textContent = `g[${JSON.stringify(v.name)}]`;
    card.querySelector(".jsv-copy").addEventListener("click", () => {
      const text = code.textContent;
      if (navigator.clipboard) navigator.clipboard.writeText(text).catch(() => {});
      const range = document.createRange();
      range.selectNodeContents(code);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
    });
    if (pin) card.dataset.pinned = v.name;
  }
  function showGroup(grp) {
    card.innerHTML = row("group", grp.path || grp.label) + row("kind", grp.kind) +
      row("also", grp.also.join(", ")) + row("vars", grp.size) +
      `<div class="jsv-row"><b>selector</b> <code class="jsv-selector"></code></div>` +
      `<div class="jsv-hint">click to ${expanded.has(grp.key) ? "close" : "open"}</div>`;
    card.querySelector(".jsv-selector").textContent =
      grp.glob ? `g.select(${JSON.stringify(grp.glob).replace(/","/g, '", "')})` +
        (grp.kind === "call" ? "  # its result, the values named inside it, its arguments" : "") : "";
  }

  function search(text) {
    const words = text.toLowerCase().split(/\s+/).filter((w) => w);
    marked = new Set();
    if (words.length) {
      data.vars.forEach((v) => {
        const hay = (v.name + " " + v.aliases.join(" ") + " " + v.scope + " " + v.primitive).toLowerCase();
        if (words.every((w) => hay.includes(w))) marked.add(v.index);
      });
    }
    count.textContent = words.length ? `${marked.size} match${marked.size === 1 ? "" : "es"}` : "";
    // open the groups of the first matches so they show as themselves
    let opened = 0;
    data.vars.forEach((v) => {
      if (!marked.has(v.index) || opened >= 12) return;
      opened++;
      for (let g = v.group; g && groups[g].depth > 0; g = groups[g].parent) expanded.add(g);
    });
    render();
  }

  q(".jsv-search").addEventListener("input", (e) => search(e.target.value));
  q(".jsv-fit").addEventListener("click", () => { render.done = false; render(); });
  q(".jsv-collapse").addEventListener("click", () => {
    expanded.clear();
    data.expanded.forEach((k) => expanded.add(k));
    render.done = false;
    render();
  });
  // pan (drag) and zoom (wheel)
  let drag = null;
  svg.addEventListener("mousedown", (e) => { drag = { x: e.clientX - view.x, y: e.clientY - view.y }; });
  window.addEventListener("mouseup", () => { drag = null; });
  svg.addEventListener("mousemove", (e) => {
    if (!drag) return;
    view.x = e.clientX - drag.x;
    view.y = e.clientY - drag.y;
    place();
  });
  svg.addEventListener("wheel", (e) => {
    e.preventDefault();
    const box = svg.getBoundingClientRect();
    const mx = e.clientX - box.left, my = e.clientY - box.top;
    const f = Math.exp(-e.deltaY * 0.0015);
    view.x = mx - (mx - view.x) * f;
    view.y = my - (my - view.y) * f;
    view.k *= f;
    place();
  }, { passive: false });
  render();
  return { render, search, expanded };
}
