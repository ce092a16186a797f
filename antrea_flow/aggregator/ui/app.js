// The antrea-flow web UI: a live flow table and charts over the flow API of the page's own
// origin. Every view takes the same filters as `antrea-flow observe`.
"use strict";

const MAX_ROWS = 500;
const REFRESH_MS = 10000;
const ALLOWED_COLOR = "#2e9d57";
const DENIED_COLOR = "#d62d20";
const FLOW_TYPES = {1: "intra-node", 2: "inter-node", 3: "to-external", 4: "from-external"};
const PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"};
const token = new URLSearchParams(location.search).get("access_token");

const form = document.getElementById("filters");
const tbody = document.querySelector("#flows tbody");
const statusText = document.getElementById("status");
const chart = echarts.init(document.getElementById("chart"));
// Without animations: a view refreshed every few seconds must not move under the pointer.
const draw = (option) => chart.setOption({animation: false, ...option}, true);
let view = "map";
let stream = null;
let paused = false;

// The form's filters as query parameters; `more` holds extra "name=value" pairs.
function filterParams(withWindow) {
  const params = new URLSearchParams();
  for (const [name, value] of new FormData(form)) {
    if (!value.trim() || name === "more" || (name === "since" && !withWindow)) continue;
    params.append(name, value.trim());
  }
  for (const pair of (form.elements.more.value || "").split(/\s+/)) {
    const at = pair.indexOf("=");
    if (at > 0) params.append(pair.slice(0, at), pair.slice(at + 1));
  }
  if (token) params.set("access_token", token);
  return params;
}

// The body of a GET of the API: parsed JSON, or the text of an NDJSON answer; an Error
// with the API's message when it refuses the request.
async function get(path, params, json = true) {
  const response = await fetch(`${path}?${params}`);
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error || response.statusText);
  }
  return json ? response.json() : response.text();
}

// ---- the flow table ----

function verdictOf(flow) {
  const actions = [flow.ingressNetworkPolicyRuleAction, flow.egressNetworkPolicyRuleAction];
  if (actions.includes(2)) return "DROPPED";
  if (actions.includes(3)) return "REJECTED";
  return "ALLOWED";
}

function endpoint(flow, side) {
  const pod = flow[`${side}PodName`];
  const ip = flow[`${side}IPv4Address`] || flow[`${side}IPv6Address`] || "";
  const host = pod ? `${flow[`${side}PodNamespace`]}/${pod}` : ip.includes(":") ? `[${ip}]` : ip;
  const port = flow[`${side}TransportPort`];
  return [1, 58].includes(flow.protocolIdentifier) || port === undefined ? host : `${host}:${port}`;
}

function policyOf(flow, verdict) {
  const parts = [];
  for (const direction of ["egress", "ingress"]) {
    const name = flow[`${direction}NetworkPolicyName`];
    const action = flow[`${direction}NetworkPolicyRuleAction`];
    if (verdict !== "ALLOWED" && action !== 2 && action !== 3) continue;
    if (!name) {
      if (action === 2 || action === 3) parts.push(`${direction} K8s NetworkPolicy default deny`);
      continue;
    }
    const namespace = flow[`${direction}NetworkPolicyNamespace`];
    const rule = flow[`${direction}NetworkPolicyRuleName`];
    parts.push(`${direction} ${namespace ? namespace + "/" : ""}${name}${rule ? " rule " + rule : ""}`);
  }
  return parts.join(", ") || "-";
}

function humanBytes(count) {
  let value = count || 0;
  for (const unit of ["B", "kB", "MB", "GB"]) {
    if (value < 1000) return unit === "B" ? `${value} B` : `${value.toFixed(1)} ${unit}`;
    value /= 1000;
  }
  return `${value.toFixed(1)} TB`;
}

function flowRow(flow) {
  const verdict = verdictOf(flow);
  const end = flow.flowEndMilliseconds || (flow.flowEndSeconds || 0) * 1000;
  const cells = [
    new Date(end).toLocaleTimeString(),
    endpoint(flow, "source"),
    endpoint(flow, "destination"),
    flow.destinationServicePortName || "-",
    PROTOCOLS[flow.protocolIdentifier] || String(flow.protocolIdentifier),
    FLOW_TYPES[flow.flowType] || "-",
    verdict,
    policyOf(flow, verdict),
    `${humanBytes(flow.octetTotalCount)} / ${humanBytes(flow.reverseOctetTotalCount)}`,
  ];
  const row = document.createElement("tr");
  row.className = `flow ${verdict}`;
  cells.forEach((text, index) => {
    const cell = row.insertCell();
    cell.textContent = text;
    if (index === 6) cell.className = `verdict ${verdict}`;
  });
  return row;
}

function addFlow(flow) {
  tbody.insertBefore(flowRow(flow), tbody.firstChild);
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
  document.getElementById("flow-count").textContent = `(${tbody.rows.length} shown)`;
}

function closeStream() {
  if (stream) stream.close();
  stream = null;
}

function openStream() {
  closeStream();
  tbody.replaceChildren();
  const params = filterParams(false);
  params.set("follow", "true");
  params.set("format", "sse");
  params.set("last", "200");
  stream = new EventSource(`/api/v1/flows?${params}`);
  stream.onopen = () => { statusText.textContent = "live"; };
  stream.onmessage = (event) => addFlow(JSON.parse(event.data).flow);
  stream.addEventListener("error", (event) => {
    // A message of type "error" is the server cutting a slow stream off; EventSource
    // reconnects from the last record it has.
    statusText.textContent = event.data ? JSON.parse(event.data).error : "reconnecting…";
  });
}

// ---- the charts ----

function trimmed(id) {
  return id.length > 40 ? `${id.slice(0, 37)}...` : id;
}

function edgeColor(edge) {
  return edge.dropped + edge.rejected > 0 ? DENIED_COLOR : ALLOWED_COLOR;
}

function edgeTooltip(edge) {
  return `${edge.source} → ${edge.target}<br>${humanBytes(edge.bytes)}, ` +
    `${edge.connections} connection(s): ${edge.allowed} allowed, ` +
    `${edge.dropped} dropped, ${edge.rejected} rejected`;
}

function width(bytes, most) {
  return 1 + 5 * Math.log1p(bytes) / Math.log1p(most || 1);
}

// Each namespace a column of its workloads (addresses outside the cluster the last one),
// as Hubble UI boxes them: the same graph is always drawn the same way.
function mapLayout(nodes) {
  const columns = new Map();
  for (const node of nodes) {
    const column = node.kind === "external" ? "external" : node.namespace;
    if (!columns.has(column)) columns.set(column, []);
    columns.get(column).push(node);
  }
  const order = [...columns.keys()].filter((c) => c !== "external").sort();
  if (columns.has("external")) order.push("external");
  const places = new Map();
  order.forEach((column, x) => {
    columns.get(column).forEach((node, y) => places.set(node.id, [x * 300, y * 90 + (x % 2) * 30]));
  });
  return {order, places};
}

function drawMap(graph) {
  const {order: namespaces, places} = mapLayout(graph.nodes);
  const most = Math.max(1, ...graph.edges.map((e) => e.bytes));
  const kinds = Object.fromEntries(graph.nodes.map((n) => [n.id, n.kind]));
  draw({
    tooltip: {formatter: (p) => p.dataType === "edge" ? edgeTooltip(p.data.edge) : `${p.data.name}<br>${humanBytes(p.data.bytes)}`},
    legend: [{data: namespaces, top: 4}],
    series: [{
      type: "graph",
      layout: "none",
      roam: true,
      draggable: true,
      edgeSymbol: ["none", "arrow"],
      label: {show: true, position: "right", formatter: (p) => trimmed(p.data.name)},
      categories: namespaces.map((name) => ({name})),
      data: graph.nodes.map((node) => ({
        id: node.id, name: node.id, kind: node.kind, bytes: node.bytes,
        category: namespaces.indexOf(node.kind === "external" ? "external" : node.namespace),
        x: places.get(node.id)[0], y: places.get(node.id)[1],
        symbolSize: 12 + 18 * Math.log1p(node.bytes) / Math.log1p(most),
      })),
      edges: graph.edges.map((edge) => ({
        source: edge.source, target: edge.target, edge, kinds,
        lineStyle: {color: edgeColor(edge), width: width(edge.bytes, most), curveness: 0.15},
      })),
    }],
  });
}

function drawSankey(graph, valueOf) {
  // Sources and targets are separate columns (a pair talking both ways is no cycle).
  const names = new Set();
  const links = graph.edges.map((edge) => {
    names.add(`from ${edge.source}`);
    names.add(`to ${edge.target}`);
    return {
      source: `from ${edge.source}`, target: `to ${edge.target}`, value: Math.max(1, valueOf(edge)),
      edge, lineStyle: {color: edgeColor(edge), opacity: 0.45},
    };
  });
  draw({
    tooltip: {formatter: (p) => p.dataType === "edge" ? edgeTooltip(p.data.edge) : p.name.replace(/^\S+ /, "")},
    series: [{
      type: "sankey", emphasis: {focus: "adjacency"}, nodeGap: 10,
      label: {formatter: (p) => trimmed(p.name.replace(/^\S+ /, ""))},
      data: [...names].map((name) => ({name})),
      links,
    }],
  });
}

function drawThroughput(data) {
  const series = [];
  for (const node of data.nodes) {
    for (const direction of ["tx", "rx"]) {
      series.push({
        name: `${node.node} ${direction}`, type: "line", showSymbol: false,
        data: data.times.map((t, i) => [t * 1000, node[direction][i]]),
      });
    }
  }
  draw({
    tooltip: {trigger: "axis"},
    legend: [{top: 4}],
    xAxis: {type: "time"},
    yAxis: {type: "value", name: "bits/s", axisLabel: {formatter: (v) => humanBytes(v).replace("B", "b")}},
    series,
  });
}

// Pod-to-Pod leaves out addresses outside the cluster (ids without a namespace).
function betweenPods(graph) {
  return {...graph, edges: graph.edges.filter((e) => e.source.includes("/") && e.target.includes("/"))};
}

const mapBy = document.querySelector("select[name=map-by]");

const VIEWS = {
  map: ["/api/v1/graph", () => mapBy.value, drawMap],
  "sankey-pod": ["/api/v1/graph", "pod", (g) => drawSankey(betweenPods(g), (e) => e.bytes)],
  "sankey-service": ["/api/v1/graph", "service", (g) => drawSankey(g, (e) => e.bytes)],
  "sankey-policy": ["/api/v1/graph", "policy", (g) => drawSankey(g, (e) => e.connections)],
  throughput: ["/api/v1/throughput", null, drawThroughput],
};

async function refreshChart() {
  const [path, by, render] = VIEWS[view];
  const params = filterParams(true);
  if (by) params.set("by", typeof by === "function" ? by() : by);
  document.getElementById("map-by").hidden = view !== "map";
  try {
    const data = await get(path, params);
    render(data);
    document.body.dataset.chart = view;
    document.body.dataset.chartEdges = data.edges ? data.edges.length : data.nodes.length;
  } catch (error) {
    document.getElementById("filter-error").textContent = error.message;
  }
}

// ---- filters and controls ----

function setFilter(name, value) {
  const field = form.elements[name];
  if (field) {
    field.value = value;
  } else {
    form.elements.more.value = `${form.elements.more.value} ${name}=${value}`.trim();
  }
}

async function apply() {
  const error = document.getElementById("filter-error");
  error.textContent = "";
  try {
    const params = filterParams(false);
    params.set("last", "0");
    await get("/api/v1/flows", params, false);  // a 400 names the bad filter
  } catch (failure) {
    error.textContent = failure.message;
    return;
  }
  if (!paused) openStream();
  refreshChart();
}

// What clicking a map node filters on, by its kind.
const NODE_FILTERS = {external: "ip", namespace: "namespace", node: "node", pod: "pod", workload: "pod"};

chart.on("click", (p) => {
  if (p.dataType === "node" && NODE_FILTERS[p.data.kind]) {
    setFilter(NODE_FILTERS[p.data.kind], p.data.id);
  } else if (p.dataType === "edge" && p.data.edge && view === "map") {
    // Each end by its own side's filter (Nodes have none: either end's Node, the source's).
    const {edge, kinds} = p.data;
    const end = (id, side) => {
      const filter = NODE_FILTERS[kinds[id]];
      return filter === "node" ? (side === "from" ? `node=${id}` : "") : `${side}-${filter}=${id}`;
    };
    form.elements.more.value = `${end(edge.source, "from")} ${end(edge.target, "to")}`.trim();
  } else {
    return;
  }
  apply();
});

form.addEventListener("submit", (event) => { event.preventDefault(); apply(); });
document.getElementById("clear").addEventListener("click", () => { form.reset(); apply(); });
document.getElementById("pause").addEventListener("click", (event) => {
  paused = !paused;
  event.target.textContent = paused ? "Resume" : "Pause";
  statusText.textContent = paused ? "paused" : "live";
  if (paused) closeStream(); else openStream();
});
for (const button of document.querySelectorAll("#tabs button")) {
  button.addEventListener("click", () => {
    document.querySelector("#tabs .active").classList.remove("active");
    button.classList.add("active");
    view = button.dataset.view;
    refreshChart();
  });
}
mapBy.addEventListener("change", refreshChart);
window.addEventListener("resize", () => chart.resize());
setInterval(refreshChart, REFRESH_MS);
apply();
