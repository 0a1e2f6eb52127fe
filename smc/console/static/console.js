// SMC console: the mesh map (Cytoscape.js), the timeline of changes (virtual list), time
// travel, "why", proxy configs and live updates from the server's event stream.
// Every string from the server is put in the page as text (never as HTML).
"use strict";

const ROW_H = 24;
const PAGE = 200;
const state = {
  token: null,
  travelSeq: null, // timeline entry the map shows; null: live
  total: 0, // rows of the filtered timeline
  pages: new Map(), // page index -> rows (ascending filtered order)
  loading: new Set(),
  selected: null, // display index selected in the timeline
  filters: { actor: "", kind: "", namespace: "", since: "", until: "" },
  cy: null,
  graphTimer: null,
  nodeSignature: "",
  ready: false,
  readyAt: 0, // ms after navigation start: map drawn
  timelineAt: 0, // ms after navigation start: first timeline rows shown
};
window.smcConsole = state; // for tests and the curious

// ---------------------------------------------------------------------------------- helpers
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}
const $ = (id) => document.getElementById(id);
function fmt(v) { return v === null || v === undefined ? "—" : typeof v === "object" ? JSON.stringify(v) : String(v); }
function kv(rows) {
  return el("table", { class: "kv" }, rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v instanceof Node ? v : fmt(v)))));
}

function headers() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}
async function api(path) {
  const resp = await fetch(path, { headers: headers() });
  if (resp.status === 401) {
    $("auth").hidden = false;
    throw new Error("the server asks for a credential (401): paste a bearer token above");
  }
  const body = await resp.json();
  if (!resp.ok) {
    const e = (body.errors || [])[0] || {};
    throw new Error(`${resp.status}: ${e.field ? e.field + ": " : ""}${e.reason || resp.statusText}`);
  }
  return body;
}
function fill(where, ...children) {
  where.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}
function showError(where, err) {
  where.replaceChildren(el("p", { class: "error", role: "alert" }, String(err.message || err)));
}

// ---------------------------------------------------------------------------------- tabs
function selectTab(name) {
  for (const t of ["details", "why", "proxy"]) {
    $(`tab-${t}`).setAttribute("aria-selected", String(t === name));
    $(`panel-${t}`).hidden = t !== name;
  }
}

// ---------------------------------------------------------------------------------- map
const STYLE = [
  { selector: "node", style: { label: "data(label)", "font-size": 10, "text-valign": "bottom",
      "text-margin-y": 3, "background-color": "#4c6ef5", width: 22, height: 22,
      "min-zoomed-font-size": 6 } },
  { selector: 'node[kind = "identity"]', style: { shape: "round-rectangle", "background-color": "#868e96" } },
  { selector: 'node[kind = "external"]', style: { "background-color": "#ced4da" } },
  { selector: "node[?vm]", style: { "border-width": 3, "border-color": "#f08c00" } },
  { selector: "node[?nacked]", style: { "background-color": "#c92a2a" } },
  { selector: "edge", style: { width: 1.5, "curve-style": "bezier", "target-arrow-shape": "triangle",
      "line-color": "#2b8a3e", "target-arrow-color": "#2b8a3e", "arrow-scale": 0.8 } },
  { selector: 'edge[kind = "split"]', style: { "line-style": "dashed", "line-color": "#7048e8",
      "target-arrow-color": "#7048e8", label: "data(label)", "font-size": 10, "text-background-color": "#fff",
      "text-background-opacity": 1 } },
  { selector: 'edge[kind = "traffic"]', style: { "line-color": "#adb5bd", "target-arrow-color": "#adb5bd" } },
  { selector: "edge[?busy]", style: { width: "data(width)", label: "data(label)", "font-size": 9,
      "text-background-color": "#fff", "text-background-opacity": 1 } },
  { selector: "edge[?failing]", style: { "line-color": "#c92a2a", "target-arrow-color": "#c92a2a" } },
  { selector: ":selected", style: { "overlay-color": "#1c7ed6", "overlay-opacity": 0.25 } },
];

function elementsOf(graph) {
  const nodes = graph.nodes.map((n) => ({ group: "nodes", data: {
    id: n.id, label: n.namespace ? `${n.label}.${n.namespace}` : n.label, kind: n.kind,
    vm: n.vms > 0, nacked: n.proxies.nacked > 0, raw: n } }));
  const edges = graph.edges.map((e) => {
    const t = e.traffic;
    const label = [e.kind === "split" ? `${e.percent}%` : "",
      t ? `${t.rps} rps${t.denyRatio ? ` ${Math.round(t.denyRatio * 100)}% denied` : ""}${t.errorRatio ? ` ${Math.round(t.errorRatio * 100)}% 5xx` : ""}` : ""]
      .filter(Boolean).join(" ");
    return { group: "edges", data: {
      id: e.id, source: e.source, target: e.target, kind: e.kind, label, raw: e,
      busy: Boolean(t), width: t ? Math.min(8, 1.5 + Math.log2(1 + t.rps)) : 1.5,
      failing: Boolean(t && (t.denyRatio + t.errorRatio) > 0.5) } };
  });
  return { nodes, edges };
}

function renderGraph(graph) {
  const { nodes, edges } = elementsOf(graph);
  const signature = nodes.map((n) => n.data.id).join("|");
  const cy = state.cy;
  cy.batch(() => {
    if (cy.elements().empty()) {
      cy.add([...nodes, ...edges]); // first draw: one call
      return;
    }
    const keep = new Set([...nodes, ...edges].map((x) => x.data.id));
    cy.elements().filter((x) => !keep.has(x.id())).remove();
    const fresh = [];
    for (const x of [...nodes, ...edges]) {
      const have = cy.getElementById(x.data.id);
      if (have.nonempty()) have.data(x.data);
      else fresh.push(x);
    }
    cy.add(fresh);
  });
  if (signature !== state.nodeSignature) {
    state.nodeSignature = signature;
    const big = nodes.length > 80;
    cy.layout(big ? { name: "grid", avoidOverlap: true, animate: false }
      : { name: "breadthfirst", directed: true, spacingFactor: 1.4, avoidOverlap: true, animate: false }).run();
    cy.fit(undefined, 30);
    if (cy.zoom() > 1.2) { cy.zoom(1.2); cy.center(); } // a small mesh: keep labels readable
  }
  $("permissive").hidden = !graph.permissive;
  const services = graph.nodes.filter((n) => n.kind === "service").length;
  $("summary").textContent = `${services} services, ${graph.edges.length} edges`;
  const names = $("node-names");
  names.replaceChildren(...graph.nodes.slice(0, 2000).map((n) => el("option", { value: n.id.slice(n.id.indexOf(":") + 1) })));
  const ns = new Set(graph.nodes.map((n) => n.namespace).filter(Boolean));
  const sel = $("map-ns");
  const cur = sel.value;
  sel.replaceChildren(el("option", { value: "" }, "all"), ...[...ns].sort().map((x) => el("option", { value: x }, x)));
  sel.value = cur;
}

async function loadGraph() {
  const q = new URLSearchParams();
  if (state.travelSeq !== null) q.set("at", String(state.travelSeq));
  if ($("map-ns").value) q.set("namespace", $("map-ns").value);
  try {
    const graph = await api(`/v1/console/graph?${q}`);
    renderGraph(graph);
    return graph;
  } catch (err) {
    showError($("panel-details"), err);
    return null;
  }
}
function scheduleGraph() {
  if (state.travelSeq !== null) return; // a past map does not change
  clearTimeout(state.graphTimer);
  state.graphTimer = setTimeout(loadGraph, 150);
}

function showNode(raw) {
  selectTab("details");
  const rows = [["kind", raw.kind], ["namespace", raw.namespace], ["name", raw.name]];
  if (raw.backing) rows.push(["backed by", raw.backing]);
  if (raw.ports) rows.push(["ports", raw.ports.map((p) => `${p.name || "-"} ${p.port}/${p.protocol}`).join(", ")]);
  rows.push(["pods / VMs", `${raw.pods} / ${raw.vms}`]);
  rows.push(["identities", raw.identities.join(", ") || "—"]);
  rows.push(["proxies", `${raw.proxies.connected} connected, ${raw.proxies.acked} ACKed, ${raw.proxies.nacked} NACKed`]);
  fill($("panel-details"), el("h2", {}, raw.id), kv(rows));
}

function showEdge(raw) {
  selectTab("details");
  const panel = $("panel-details");
  if (raw.kind === "split") {
    fill(panel, el("h2", {}, "TrafficSplit"), kv([
      ["split", raw.split], ["from", raw.source], ["to", raw.target],
      ["weight", `${raw.weight} (${raw.percent}%)`]]));
    return;
  }
  const t = raw.traffic;
  const traffic = t ? kv([["requests/s", t.rps], ["requests (window)", t.requests],
    ["denied (403)", `${Math.round(t.denyRatio * 1000) / 10}%`], ["errors (5xx)", `${Math.round(t.errorRatio * 1000) / 10}%`]]) : null;
  if (raw.kind === "traffic") {
    fill(panel, el("h2", {}, "Traffic (no SMI grant)"), kv([["from", raw.source], ["to", raw.target]]), traffic);
    return;
  }
  const rules = raw.rules.map((r) => el("li", {},
    el("strong", {}, `TrafficTarget ${r.trafficTarget}`), ` lets ${r.source} reach ${r.destination}`,
    r.http.length ? el("ul", {}, r.http.map((m) => el("li", {},
      `${m.methods.join(",")} ${m.pathRegex || "any path"}${m.headers.length ? " headers " + m.headers.map((h) => h.join("=")).join(" ") : ""} (${m.name})`))) : null,
    r.tcpPorts !== null ? el("div", {}, `TCP ports: ${r.tcpPorts.length ? r.tcpPorts.join(", ") : "any"}`) : null,
    r.port !== null ? el("div", {}, `port ${r.port}`) : null,
    el("button", { type: "button", onclick: () => {
      $("why-from").value = r.source; $("why-to").value = r.destination; selectTab("why"); runWhy();
    } }, "Why?")));
  fill(panel, el("h2", {}, "Allowed"), kv([["from", raw.source], ["to", raw.target]]),
    traffic ? el("h3", {}, "Traffic") : null, traffic, el("h3", {}, "Rules"), el("ul", {}, rules));
}

function initMap() {
  state.cy = cytoscape({
    container: $("map"), style: STYLE, minZoom: 0.05, maxZoom: 4,
    textureOnViewport: true, hideEdgesOnViewport: true,
  });
  state.cy.on("tap", "node", (ev) => showNode(ev.target.data("raw")));
  state.cy.on("tap", "edge", (ev) => showEdge(ev.target.data("raw")));
  $("find").addEventListener("change", () => {
    const v = $("find").value.trim();
    const hit = state.cy.nodes().filter((n) => n.id() === `svc:${v}` || n.id() === `id:${v}`);
    if (hit.nonempty()) {
      state.cy.elements().unselect(); hit.select();
      state.cy.animate({ center: { eles: hit }, zoom: 1.5 }, { duration: 200 });
      showNode(hit.data("raw"));
    }
  });
  $("map-ns").addEventListener("change", () => { state.nodeSignature = ""; loadGraph(); });
  // keyboard: arrows cycle through nodes, Enter shows the selected one
  $("map").addEventListener("keydown", (ev) => {
    const nodes = state.cy.nodes().sort((a, b) => a.id().localeCompare(b.id()));
    if (!nodes.length) return;
    const cur = nodes.filter(":selected");
    let i = cur.nonempty() ? nodes.indexOf(cur[0]) : -1;
    if (ev.key === "ArrowRight" || ev.key === "ArrowDown") i = (i + 1) % nodes.length;
    else if (ev.key === "ArrowLeft" || ev.key === "ArrowUp") i = (i - 1 + nodes.length) % nodes.length;
    else if (ev.key === "Enter" && cur.nonempty()) { showNode(cur.data("raw")); return; }
    else return;
    ev.preventDefault();
    state.cy.elements().unselect(); nodes[i].select(); showNode(nodes[i].data("raw"));
  });
}

// ---------------------------------------------------------------------------------- timeline
function filterQuery() {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(state.filters)) if (v) q.set(k, v);
  return q;
}
function rowAt(display) {
  // newest first: display 0 is the last row of the ascending, filtered timeline
  const idx = state.total - 1 - display;
  const page = state.pages.get(Math.floor(idx / PAGE));
  return page ? page[idx % PAGE] : undefined;
}
async function loadPage(p) {
  if (state.pages.has(p) || state.loading.has(p)) return;
  state.loading.add(p);
  try {
    const q = filterQuery(); q.set("offset", String(p * PAGE)); q.set("limit", String(PAGE));
    const body = await api(`/v1/console/timeline?${q}`);
    state.pages.set(p, body.items);
    if (body.total !== state.total) setTotal(body.total);
  } catch (err) {
    showError($("panel-details"), err);
  } finally {
    state.loading.delete(p);
  }
  renderTimeline();
}
function setTotal(n) {
  state.total = n;
  $("tl-spacer").style.height = `${n * ROW_H}px`;
  $("tl-count").textContent = `${n} changes`;
}
function renderTimeline() {
  const box = $("timeline");
  const first = Math.max(0, Math.floor(box.scrollTop / ROW_H) - 5);
  const last = Math.min(state.total, Math.ceil((box.scrollTop + box.clientHeight) / ROW_H) + 5);
  const want = new Set();
  const rows = [];
  for (let d = first; d < last; d++) {
    const idx = state.total - 1 - d;
    want.add(Math.floor(idx / PAGE));
    const r = rowAt(d);
    const attrs = { class: "tl-row" + (r && r.seq === state.travelSeq ? " travel" : ""), role: "option",
      "aria-selected": String(d === state.selected), "data-display": String(d), style: `top:${d * ROW_H}px` };
    rows.push(r ? el("div", { ...attrs, "data-seq": String(r.seq), onclick: () => selectRow(d, true) },
      el("span", { class: "pos" }, `#${r.seq} `), `${r.at.replace("+00:00", "Z")} `,
      el("span", { class: "type" }, r.type), ` ${r.aggregate} `, el("span", { class: "actor" }, r.actor),
      `@${r.source}`) : el("div", attrs, "…"));
  }
  $("timeline").replaceChildren($("tl-spacer"), ...rows);
  if (!state.timelineAt && rows.some((r) => r.dataset.seq)) state.timelineAt = performance.now();
  for (const p of want) if (p >= 0) loadPage(p);
}
function resetTimeline() {
  state.pages.clear();
  state.selected = null;
  loadPage(0).then(() => {
    // the newest rows are the last page: load it once the total is known
    if (state.total > 0) loadPage(Math.floor((state.total - 1) / PAGE));
  });
}
async function selectRow(d, open) {
  state.selected = d;
  renderTimeline();
  const box = $("timeline");
  if (d * ROW_H < box.scrollTop) box.scrollTop = d * ROW_H;
  else if ((d + 1) * ROW_H > box.scrollTop + box.clientHeight) box.scrollTop = (d + 1) * ROW_H - box.clientHeight;
  if (open) {
    const r = rowAt(d);
    if (r) await showChange(r.seq);
  }
}
async function showChange(seq) {
  selectTab("details");
  const panel = $("panel-details");
  try {
    const ev = await api(`/v1/console/events/${seq}`);
    const diff = el("table", { class: "kv diff" }, ev.diff.map((d) => el("tr", {},
      el("td", {}, d.path), el("td", {}, d.before === null ? null : el("div", { class: "before" }, fmt(d.before)),
        d.after === null ? null : el("div", { class: "after" }, fmt(d.after))))));
    fill(panel, 
      el("h2", {}, `#${ev.seq} ${ev.type}`),
      kv([["aggregate", ev.aggregate], ["actor", ev.actor], ["source", ev.source], ["appended", ev.at],
        ["occurred", ev.occurredAt], ["position", ev.position], ["event id", ev.eventId],
        ["previous", ev.previousSeq === null ? "first event of this aggregate" : `#${ev.previousSeq}`]]),
      el("button", { type: "button", id: "travel-here", onclick: () => travelTo(ev.seq) }, "Show the mesh as it was after this change (T)"),
      el("h3", {}, ev.previousSeq === null ? "Content" : "Changed"), diff);
  } catch (err) {
    showError(panel, err);
  }
}
function initTimeline() {
  const box = $("timeline");
  box.addEventListener("scroll", () => requestAnimationFrame(renderTimeline));
  box.addEventListener("keydown", (ev) => {
    const cur = state.selected === null ? -1 : state.selected;
    if (ev.key === "ArrowDown") { ev.preventDefault(); selectRow(Math.min(state.total - 1, cur + 1), false); }
    else if (ev.key === "ArrowUp") { ev.preventDefault(); selectRow(Math.max(0, cur - 1), false); }
    else if (ev.key === "PageDown") { ev.preventDefault(); selectRow(Math.min(state.total - 1, cur + 10), false); }
    else if (ev.key === "PageUp") { ev.preventDefault(); selectRow(Math.max(0, cur - 10), false); }
    else if (ev.key === "Enter" && cur >= 0) { ev.preventDefault(); selectRow(cur, true); }
    else if ((ev.key === "t" || ev.key === "T") && cur >= 0) { const r = rowAt(cur); if (r) travelTo(r.seq); }
  });
  for (const [id, key] of [["f-actor", "actor"], ["f-kind", "kind"], ["f-ns", "namespace"], ["f-since", "since"], ["f-until", "until"]]) {
    $(id).addEventListener("change", () => { state.filters[key] = $(id).value.trim(); resetTimeline(); });
  }
}
async function loadFacets() {
  try {
    const f = await api("/v1/console/timeline/facets");
    for (const [id, values] of [["f-actor", f.actors], ["f-kind", f.kinds], ["f-ns", f.namespaces]]) {
      const sel = $(id); const cur = sel.value;
      sel.replaceChildren(el("option", { value: "" }, "any"), ...values.map((v) => el("option", { value: v }, v)));
      sel.value = cur;
    }
  } catch (err) { /* shown by the other loads */ }
}

// ---------------------------------------------------------------------------------- travel
async function travelTo(seq) {
  state.travelSeq = seq;
  state.nodeSignature = "";
  $("mode").textContent = "past"; $("mode").className = "badge past";
  $("travel").hidden = false;
  const graph = await loadGraph();
  $("travel-at").textContent = graph && graph.timeTravel ? `#${seq} (${graph.timeTravel.at})` : `#${seq}`;
  renderTimeline();
}
function backToLive() {
  if (state.travelSeq === null) return;
  state.travelSeq = null;
  state.nodeSignature = "";
  $("mode").textContent = "live"; $("mode").className = "badge live";
  $("travel").hidden = true;
  loadGraph();
  renderTimeline();
}

// ---------------------------------------------------------------------------------- why, proxy
async function runWhy() {
  const out = $("why-result");
  const q = new URLSearchParams({ from: $("why-from").value.trim(), to: $("why-to").value.trim() });
  if ($("why-path").value.trim()) q.set("path", $("why-path").value.trim());
  if ($("why-method").value.trim()) q.set("method", $("why-method").value.trim());
  if (state.travelSeq !== null) q.set("at", String(state.travelSeq));
  try {
    const r = await api(`/v1/console/why?${q}`);
    fill(out, 
      el("p", {}, el("span", { class: r.allowed ? "allow" : "deny", id: "why-decision" }, r.decision.toUpperCase()), " ", r.reason),
      el("h3", {}, "Decided by"),
      r.decidedBy.length ? el("ol", { id: "why-events" }, r.decidedBy.map((e) => el("li", {},
        e.seq === null ? e.position : el("a", { href: "#", onclick: (ev) => { ev.preventDefault(); showChange(e.seq); } }, `#${e.seq}`),
        ` ${e.occurred_at.replace("+00:00", "Z")}: ${e.type} ${e.aggregate} by ${e.actor}`,
        e.verified ? ` (signed by ${e.writer})` : "", ` ${e.effect} access`)))
        : el("p", { class: "hint" }, "no change on the log moved access for this pair (deny by default)"));
  } catch (err) { showError(out, err); }
}
async function runProxy() {
  const out = $("proxy-result");
  const node = $("proxy-node").value.trim();
  try {
    const q = new URLSearchParams({ node });
    if (state.travelSeq !== null) q.set("at", String(state.travelSeq));
    const r = await api(`/v1/console/proxy?${q}`);
    if (r.past) { // the config the log says it was served at that point
      const p = r.past;
      fill(out, el("p", {}, `as of #${r.timeTravel.seq} (${r.timeTravel.at})`),
        kv([["node", p.node], ["identity", p.identity], ["no config because", p.reason || null], ["versions", p.versions]]),
        ["listeners", "routes", "clusters", "endpoints", "secrets"].map((t) => el("details", {},
          el("summary", {}, `${t} (${p[t].length})`), el("pre", {}, JSON.stringify(p[t], null, 1)))));
      return;
    }
    const c = r.config;
    fill(out, 
      kv([["node", r.node_id], ["connected", r.connected], ["ACKed", r.acked], ["NACKed", r.nacked],
        ["versions", c ? c.versions : null]]),
      c ? el("div", {}, Object.entries(c.resources).map(([type, items]) => el("details", {},
        el("summary", {}, `${type} (${items.length})`),
        el("ul", {}, items.map((i) => el("li", {}, el("details", {}, el("summary", {}, i.name), el("pre", {}, JSON.stringify(i.resource, null, 1))))))))) : null);
  } catch (err) { showError(out, err); }
}

// ---------------------------------------------------------------------------------- live
async function follow() {
  for (;;) {
    try {
      const resp = await fetch("/v1/console/stream", { headers: headers() });
      if (!resp.ok) throw new Error(`stream: HTTP ${resp.status}`);
      $("conn").textContent = "connected"; $("conn").className = "badge live";
      const reader = resp.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const chunk = buf.slice(0, cut); buf = buf.slice(cut + 2);
          let kind = "message"; let data = "";
          for (const line of chunk.split("\n")) {
            if (line.startsWith("event: ")) kind = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
          }
          if (data) onLive(kind, JSON.parse(data));
        }
      }
    } catch (err) {
      /* reconnect below */
    }
    $("conn").textContent = "reconnecting"; $("conn").className = "badge down";
    await new Promise((r) => setTimeout(r, 1000));
  }
}
function onLive(kind, data) {
  if (kind === "rows") {
    const filtered = Object.values(state.filters).some(Boolean);
    if (data.resorted || filtered || data.items.length < data.total - state.total) {
      setTotal(data.total); resetTimeline(); loadFacets(); return;
    }
    // the new rows are the newest: keep what is on screen where it is
    const before = state.total;
    for (const r of data.items) {
      const p = Math.floor(r.seq / PAGE);
      const page = state.pages.get(p);
      if (page) page[r.seq % PAGE] = r;
      else if (r.seq % PAGE === 0) state.pages.set(p, [r]);
    }
    setTotal(data.total);
    if (state.selected !== null) state.selected += data.total - before;
    $("timeline").scrollTop += (data.total - before) * ROW_H * (state.selected !== null || $("timeline").scrollTop > 0 ? 1 : 0);
    renderTimeline();
    loadFacets();
  } else if (kind === "graph") {
    scheduleGraph();
  } else if (kind === "resync") {
    resetTimeline(); scheduleGraph();
  }
}

// ---------------------------------------------------------------------------------- start
async function start() {
  const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (m) { sessionStorage.setItem("smc-token", decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname); }
  state.token = sessionStorage.getItem("smc-token");
  $("auth").addEventListener("submit", (ev) => {
    ev.preventDefault(); state.token = $("token").value.trim(); sessionStorage.setItem("smc-token", state.token);
    $("auth").hidden = true; boot();
  });
  for (const t of ["details", "why", "proxy"]) $(`tab-${t}`).addEventListener("click", () => selectTab(t));
  $("why-form").addEventListener("submit", (ev) => { ev.preventDefault(); runWhy(); });
  $("proxy-form").addEventListener("submit", (ev) => { ev.preventDefault(); runProxy(); });
  $("back-live").addEventListener("click", backToLive);
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") backToLive(); });
  initMap();
  initTimeline();
  boot();
}
async function boot() {
  const graphLoad = loadGraph();
  resetTimeline(); // the first timeline page loads while the map is drawn
  const graph = await graphLoad;
  if (graph === null) return;
  state.readyAt = performance.now(); // the map is drawn and answers clicks
  loadFacets();
  follow();
  setInterval(scheduleGraph, 5000); // traffic rates change without log events
  state.ready = true;
  document.body.dataset.ready = "true";
}
document.addEventListener("DOMContentLoaded", start);
