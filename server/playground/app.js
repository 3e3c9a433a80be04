// steerd playground: plain vs steered continuations, feature search, feature cards and a
// per-token heatmap. Talks only to steerd's HTTP API (docs/api.md, "OpenAI-compatible HTTP"); no build step.

const TOP_K = 5; // features per token shown on hover
const $ = (id) => document.getElementById(id);

const state = {
  model: null,
  saes: [],
  edits: [], // {sae, index, label, mode, value, base, where, start, end}
  heat: null, // the heatmap's feature {sae, index, label}
  read: null, // the read the last run asked for {sae, watch}
  runs: { plain: null, steered: null },
  pieces: new Map(), // token id -> its text
  features: new Map(), // "sae/index" -> feature JSON
};

// ------------------------------------------------------------------------------ HTTP

async function api(path, body) {
  const headers = {};
  const token = $("auth-token").value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) {
    let msg = `${res.status} ${res.statusText}`;
    try { msg = (await res.json()).error.message; } catch { /* not our JSON error */ }
    if (res.status === 401) msg += " (paste the server's bearer token in the token box)";
    throw new Error(msg);
  }
  return res;
}

const getJSON = async (path, body) => (await api(path, body)).json();

async function feature(sae, index) {
  const key = `${sae}/${index}`;
  if (!state.features.has(key)) {
    state.features.set(key, await getJSON(`/v1/features/${encodeURIComponent(sae)}/${index}`));
  }
  return state.features.get(key);
}

// One streamed completion into `out`: text as it arrives, then token ids and reads.
async function stream(body, out) {
  const run = { promptIds: [], ids: [], features: [], text: "" };
  out.textContent = "";
  out.dataset.state = "running";
  const res = await api("/v1/completions", body);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
      const msg = JSON.parse(event.slice(6));
      if (msg.error) throw new Error(msg.error.message);
      const c = msg.choices[0];
      if (!c) continue;
      if (c.prompt_token_ids) run.promptIds = c.prompt_token_ids;
      run.ids.push(...(c.token_ids ?? []));
      run.features.push(...(c.features ?? []));
      run.text += c.text;
      out.textContent = run.text;
    }
  }
  out.dataset.state = "done";
  return run;
}

// ------------------------------------------------------------------------------ helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "on") Object.entries(v).forEach(([ev, fn]) => node.addEventListener(ev, fn));
    else if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  node.append(...children);
  return node;
}

function showError(err) {
  $("error").hidden = !err;
  $("error").textContent = err ? String(err.message ?? err) : "";
}

const fmt = (x, d = 3) => (typeof x === "number" ? Number(x.toFixed(d)).toString() : "");
const tokenText = (s) => s.replaceAll("\n", "↵");

// ------------------------------------------------------------------------------ search

async function search(ev) {
  ev?.preventDefault();
  const q = $("search").value.trim();
  const sae = $("search-sae").value;
  const list = $("search-results");
  showError(null);
  try {
    const params = new URLSearchParams({ q, limit: "20" });
    if (sae) params.set("sae", sae);
    const { data } = await getJSON(`/v1/features/search?${params}`);
    list.replaceChildren(...data.map(resultItem));
    if (!data.length) list.append(el("li", { class: "empty" }, `no feature matches “${q}”`));
  } catch (err) {
    showError(err);
  }
}

function resultItem(f) {
  state.features.set(`${f.sae}/${f.index}`, f);
  return el("li", { "data-testid": "search-result", "data-sae": f.sae, "data-index": f.index },
    el("a", { href: "#", class: "label", "data-testid": "show-card",
              on: { click: (e) => { e.preventDefault(); showCard(f.sae, f.index); } } },
      el("b", {}, `#${f.index} `), f.label),
    el("small", {}, `density ${fmt(f.density, 4)}` + (f.steer_value ? ` · steer ${fmt(f.steer_value, 1)}` : "")),
    el("span", { class: "buttons" },
      el("button", { "data-testid": "add-edit", on: { click: () => addEdit(f) } }, "+ edit"),
      el("button", { "data-testid": "heatmap-feature", on: { click: () => setHeat(f) } }, "heatmap")));
}

// ------------------------------------------------------------------------------ feature card

async function showCard(sae, index) {
  const card = $("feature-card");
  showError(null);
  let f;
  try {
    state.features.delete(`${sae}/${index}`); // the card shows the full, fresh record
    f = await feature(sae, index);
  } catch (err) {
    showError(err);
    return;
  }
  const stats = [["SAE", f.sae], ["index", f.index], ["topic", f.topic], ["density", fmt(f.density, 5)],
    ["max activation", fmt(f.max_activation)], ["mean activation", fmt(f.mean_activation)],
    ["steer value", f.steer_value ? fmt(f.steer_value) : "not measured"],
    ["steer success", f.steer_value ? fmt(f.steer_success) : ""]];
  const logits = (name, key) => (f[key]?.length
    ? [el("h4", {}, name), el("ol", { class: "logits", "data-testid": key },
        ...f[key].map((t) => el("li", {}, el("code", {}, tokenText(t.token)), ` ${fmt(t.logit)}`)))]
    : []);
  card.replaceChildren(
    el("h3", { "data-testid": "card-label" }, f.label),
    el("dl", {}, ...stats.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-testid": `card-${k.replace(" ", "-")}` }, String(v))])),
    ...(f.top_tokens?.length ? [el("h4", {}, "top tokens"), el("p", {}, f.top_tokens.join(", "))] : []),
    ...logits("promotes", "promoted"),
    ...logits("suppresses", "suppressed"),
    ...(f.examples?.length ? [el("h4", {}, "top examples"), el("ol", { class: "examples", "data-testid": "card-examples" },
      ...f.examples.map((x) => el("li", {}, x.context, el("mark", {}, tokenText(x.token)), el("small", {}, ` ${fmt(x.activation, 2)}`))))] : []),
    el("div", { class: "buttons" },
      el("button", { on: { click: () => addEdit(f) } }, "+ edit"),
      el("button", { on: { click: () => setHeat(f) } }, "heatmap")));
  card.hidden = false;
}

// ------------------------------------------------------------------------------ edits

// A new edit starts where the text stays fluent: 0.75 x the stream's norm at the site
// (site_norm, from the labels), else the measured steer value or the largest activation.
// The slider reaches 2x that, past the labeller's (strong) steer value.
const FLUENT = 0.75;

function addEdit(f) {
  const base = (f.site_norm ? FLUENT * f.site_norm : 0) || f.steer_value || f.max_activation || 1;
  state.edits.push({ sae: f.sae, index: f.index, label: f.label, mode: "clamp", value: base, base,
                     where: "all", start: "", end: "" });
  renderEdits();
}

function sliderRange(e) {
  if (e.mode === "scale") return { min: -5, max: 10, step: 0.1 };
  return { min: -2 * e.base, max: 2 * e.base, step: e.base / 100 };
}

function renderEdits() {
  const list = $("edits");
  if (!state.edits.length) {
    list.replaceChildren(el("li", { class: "empty" }, "none: add one from a search result"));
    return;
  }
  list.replaceChildren(...state.edits.map((e, i) => {
    const r = sliderRange(e);
    const number = el("input", { type: "number", step: "any", value: e.value, disabled: e.mode === "ablate",
                                 "data-testid": "edit-value" });
    const slider = el("input", { type: "range", ...r, value: e.value, disabled: e.mode === "ablate",
                                 "data-testid": "edit-slider" });
    const sync = (src, dst) => src.addEventListener("input", () => { e.value = Number(src.value); dst.value = src.value; });
    sync(number, slider);
    sync(slider, number);
    const mode = el("select", { "data-testid": "edit-mode", on: { change: () => {
      e.mode = mode.value;
      if (e.mode === "scale") e.value = 2;
      else if (e.mode !== "ablate" && Math.abs(e.value) < 1e-9) e.value = e.base;
      renderEdits();
    } } }, ...["clamp", "ablate", "scale", "add"].map((m) => el("option", { value: m, selected: m === e.mode }, m)));
    const where = el("select", { "data-testid": "edit-positions", on: { change: () => { e.where = where.value; renderEdits(); } } },
      ...[["all", "all positions"], ["generation", "generation only"], ["prompt", "prompt range"],
          ["generation-range", "generation range"]].map(([v, t]) => el("option", { value: v, selected: v === e.where }, t)));
    const bound = (key, hint) => el("input", { type: "number", class: "bound", placeholder: hint, value: e[key],
                                               "data-testid": `edit-${key}`, on: { input: (ev) => { e[key] = ev.target.value; } } });
    const ranged = e.where === "prompt" || e.where === "generation-range";
    return el("li", { "data-testid": "edit", "data-index": e.index },
      el("span", { class: "label" }, el("b", {}, `#${e.index} `), e.label), mode, slider, number, where,
      ...(ranged ? [bound("start", "start"), bound("end", "end")] : []),
      el("button", { class: "remove", title: "remove", on: { click: () => { state.edits.splice(i, 1); renderEdits(); } } }, "×"));
  }));
}

// The proto's Intervention as the HTTP body spells it (docs/api.md).
function intervention(e) {
  const iv = { sae: e.sae, feature: e.index, mode: e.mode, value: e.mode === "ablate" ? 0 : Number(e.value) };
  if (e.where === "generation") iv.scope = "generation_only";
  if (e.where === "prompt" || e.where === "generation-range") {
    const range = { frame: e.where === "prompt" ? "prompt" : "generation" };
    if (e.start !== "") range.start = Number(e.start);
    if (e.end !== "") range.end = Number(e.end);
    iv.positions = { ranges: [range] };
  }
  return iv;
}

// ------------------------------------------------------------------------------ run

function readFor(sae) {
  const watched = [state.heat?.sae === sae ? state.heat.index : null,
    ...state.edits.filter((e) => e.sae === sae).map((e) => e.index)];
  return { sae, watch: [...new Set(watched.filter((i) => i !== null))] };
}

async function run() {
  showError(null);
  const sae = state.heat?.sae ?? state.saes[0]?.id;
  const read = sae ? readFor(sae) : null;
  const body = {
    model: state.model, prompt: $("prompt").value, stream: true, return_token_ids: true,
    max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
    reads: read ? [{ sae: read.sae, top_k: TOP_K, watch: read.watch }] : [],
  };
  $("run").disabled = true;
  $("run-state").textContent = "running…";
  $("run-state").dataset.state = "running";
  try {
    const [plain, steered] = await Promise.all([
      stream(body, $("plain-output")),
      stream({ ...body, interventions: state.edits.map(intervention) }, $("steered-output")),
    ]);
    const ids = [...new Set([...plain.promptIds, ...plain.ids, ...steered.ids])].filter((t) => !state.pieces.has(t));
    if (ids.length) {
      const { pieces } = await getJSON("/v1/token_pieces", { token_ids: ids });
      ids.forEach((t, i) => state.pieces.set(t, pieces[i]));
    }
    Object.assign(state, { read, runs: { plain, steered } });
    $("run-state").textContent = `done: ${plain.ids.length} + ${steered.ids.length} tokens`;
    $("run-state").dataset.state = "done";
    renderHeatmap();
  } catch (err) {
    $("run-state").textContent = "failed";
    $("run-state").dataset.state = "error";
    showError(err);
  } finally {
    $("run").disabled = false;
  }
}

// ------------------------------------------------------------------------------ heatmap

function setHeat(f) {
  state.heat = { sae: f.sae, index: f.index, label: f.label };
  $("heatmap-title").textContent = `#${f.index} ${f.label}`;
  const read = state.read;
  const watched = read && read.sae === f.sae && read.watch.includes(f.index);
  if (state.runs.plain && !watched) run(); // its values were not read: read them
  else renderHeatmap();
}

function renderHeatmap() {
  const run = state.runs[$("heatmap-source").value];
  const box = $("heatmap");
  box.replaceChildren();
  $("token-top").replaceChildren();
  if (!run || !state.read) return;
  const { sae, watch } = state.read;
  const at = new Map(run.features.filter((f) => f.sae === sae).map((f) => [f.position, f]));
  const k = state.heat?.sae === sae ? watch.indexOf(state.heat.index) : -1;
  const tokens = [...run.promptIds, ...run.ids];
  const values = tokens.map((_, p) => (k >= 0 && at.has(p) ? at.get(p).watch_values[k] : null));
  const peak = Math.max(1e-9, ...values.filter((v) => v !== null).map(Math.abs));
  tokens.forEach((id, p) => {
    const cell = el("span", { class: p < run.promptIds.length ? "cell" : "cell generated",
                              "data-testid": "heat-cell", "data-position": p, "data-token-id": id },
      tokenText(state.pieces.get(id) ?? `[${id}]`));
    const v = values[p];
    if (v !== null) {
      cell.dataset.value = String(v);
      cell.title = `${fmt(v)}`;
      const a = Math.min(Math.abs(v) / peak, 1);
      cell.style.background = v >= 0 ? `rgba(234, 88, 12, ${a})` : `rgba(37, 99, 235, ${a})`;
      if (a > 0.55) cell.classList.add("strong");
    }
    cell.addEventListener("mouseenter", () => showTop(sae, at.get(p), p, id));
    box.append(cell);
  });
}

async function showTop(sae, read, p, id) {
  const box = $("token-top");
  const head = el("div", {}, el("b", {}, `position ${p} `), el("code", {}, tokenText(state.pieces.get(id) ?? "")));
  if (!read) {
    box.replaceChildren(head, el("small", {}, " no read here (the last token is never fed to the model)"));
    return;
  }
  const labels = await Promise.all(read.indices.map((i) => feature(sae, i).then((f) => f.label, () => "")));
  box.replaceChildren(head, el("ol", {}, ...read.indices.map((i, j) =>
    el("li", { "data-testid": "top-feature", "data-index": i },
      el("b", {}, `#${i} `), `${labels[j]} `, el("small", {}, fmt(read.values[j]))))));
}

// ------------------------------------------------------------------------------ start

async function connect() {
  showError(null);
  try {
    const [models, saes] = await Promise.all([getJSON("/v1/models"), getJSON("/v1/saes")]);
    state.model = models.data[0].id;
    state.saes = saes.data;
    const desc = saes.data.map((s) => `${s.id} (${s.architecture}${s.k ? ` k=${s.k}` : ""}, ${s.d_sae} features, ` +
      `${s.layers?.length ? `cross-layer, layers ${s.layers[0]}–${s.layers.at(-1)}` : `layer ${s.layer}`}` +
      `${s.labelled ? ", labelled" : ""})`).join("; ");
    $("model-info").textContent = `${state.model} · ${desc || "no SAE"}`;
    $("search-sae").replaceChildren(el("option", { value: "" }, "all SAEs"),
      ...saes.data.filter((s) => s.labelled).map((s) => el("option", { value: s.id }, s.id)));
  } catch (err) {
    $("model-info").textContent = "not connected";
    showError(err);
  }
}

$("auth-token").value = localStorage.getItem("steerd.token") ?? "";
$("auth-token").addEventListener("change", () => {
  localStorage.setItem("steerd.token", $("auth-token").value.trim());
  connect();
});
$("search-form").addEventListener("submit", search);
$("run").addEventListener("click", run);
$("heatmap-source").addEventListener("change", renderHeatmap);
connect();
