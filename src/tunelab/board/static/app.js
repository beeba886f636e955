/* tunelab board: a page per hash route (#/runs, #/run/ID, #/launch, #/compare?run=A&run=B, #/sweeps, #/methods).
   Data from the JSON API; live updates from server-sent events (/api/events). No build step, no dependencies. */
"use strict";

const main = document.getElementById("main");
let source = null;      // the open EventSource
let selected = new Set(JSON.parse(sessionStorage.getItem("tunelab-selected") || "[]"));

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c.nodeType ? c : String(c));
  return el;
}
const exact = v => Number.isInteger(v) ? String(v) : String(+v.toPrecision(4));  // 0.975, 1619.46 -> 1619
const fmt = (v, pct) => v === null || v === undefined ? "-" : pct ? (100 * v).toFixed(1) + "%" : fmtNum(v);
const api = (path, opts) => fetch(path, opts).then(async r => {
  const body = (r.headers.get("content-type") || "").includes("json") ? await r.json() : await r.text();
  if (!r.ok && r.status !== 422) throw new Error(body.detail || body || r.statusText);
  return body;
});
const post = (path, body) => api(path, {method: "POST", headers: {"Content-Type": "application/json",
                                                                    "X-Tunelab-Board": "1"},
                                         body: JSON.stringify(body || {})});
const statusBadge = s => h("span", {class: "status " + s, text: s});
const runLink = id => h("a", {href: "#/run/" + encodeURIComponent(id), text: id});

function listen(url, handlers) {
  if (source) source.close();
  source = new EventSource(url);
  const conn = document.getElementById("conn");
  source.onopen = () => { conn.textContent = "live"; };
  source.onerror = () => { conn.textContent = "reconnecting…"; };
  for (const [name, fn] of Object.entries(handlers)) source.addEventListener(name, e => fn(JSON.parse(e.data)));
}

// -- Runs -------------------------------------------------------------------------------------------------------
function pageRuns() {
  const table = h("table", {id: "runs-table"});
  const compareBtn = h("button", {id: "compare-btn", class: "primary", onclick: () => {
    location.hash = "#/compare?" + [...selected].map(r => "run=" + encodeURIComponent(r)).join("&"); }}, "Compare");
  main.replaceChildren(h("h1", {text: "Runs"}),
    h("div", {class: "toolbar"}, compareBtn, h("span", {class: "muted", id: "runs-count"})), table,
    h("p", {class: "muted", text: "Every run directory under the board's runs directory, also those started from " +
                                  "the command line. Tick runs to compare them."}));
  const draw = snap => {
    const head = ["", "run", "status", "method", "objective", "step", "loss", "score (before → after)",
                  "tokens/s", "peak MB", "wall s"];
    table.replaceChildren(h("thead", {}, h("tr", {}, head.map(t => h("th", {text: t})))),
      h("tbody", {}, snap.runs.map(r => h("tr", {"data-run": r.id},
        h("td", {}, h("input", {type: "checkbox", class: "pick", checked: selected.has(r.id), onchange: e => {
          e.target.checked ? selected.add(r.id) : selected.delete(r.id);
          sessionStorage.setItem("tunelab-selected", JSON.stringify([...selected])); updateBtn(); }})),
        h("td", {}, runLink(r.id)), h("td", {class: "status-cell"}, statusBadge(r.status)),
        h("td", {text: r.method || "-"}), h("td", {text: r.objective || "-"}),
        h("td", {class: "num", text: r.step ? r.step + (r.max_steps ? " / " + r.max_steps : "") : "-"}),
        h("td", {class: "num", text: fmt(r.loss)}),
        h("td", {text: r.score_metric ? `${r.score_metric}: ${fmt(r.score_before, true)} → ${fmt(r.score_after, true)}`
                                      : "-"}),
        h("td", {class: "num", text: fmt(r.tokens_per_s)}), h("td", {class: "num", text: fmt(r.peak_memory_mb)}),
        h("td", {class: "num", text: fmt(r.wall_time_s)})))));
    document.getElementById("runs-count").textContent = `${snap.runs.length} run(s)`;
    updateBtn();
  };
  const updateBtn = () => { compareBtn.disabled = selected.size < 1; compareBtn.textContent =
    `Compare ${selected.size} selected`; };
  api("/api/runs").then(draw);
  listen("/api/events", {runs: draw});
}

// -- Run page ---------------------------------------------------------------------------------------------------
const CHARTS = [["chart-loss", "loss", r => [["train", r.loss], ["held-out", r.eval_loss]]],
                ["chart-lr", "learning rate", r => [["lr", r.lr]]],
                ["chart-tps", "tokens/s", r => [["tokens/s", r.tokens_per_s]]],
                ["chart-mem", "memory (MB)", r => [["memory", r.memory_mb]]],
                ["chart-reward", "reward", r => Object.keys(r).filter(k => k.includes("reward")).map(k => [k, r[k]])]];

function pageRun(id) {
  let metrics = [];
  const title = h("h1", {id: "run-title", text: id});
  const status = h("span", {id: "run-status"});
  const stopBtn = h("button", {id: "stop-btn", onclick: () => post("/api/stop/" + id).then(refresh, alertErr)}, "Stop");
  const resumeBtn = h("button", {id: "resume-btn", onclick: () => post("/api/resume/" + id).then(refresh, alertErr)},
                      "Resume");
  const charts = h("div", {class: "charts"}, CHARTS.map(([cid]) => h("canvas", {id: cid})));
  const evals = h("div", {id: "evals"}), samples = h("div", {id: "samples"}), recipe = h("pre", {id: "recipe-yaml"});
  const info = h("p", {class: "muted", id: "run-info"});
  main.replaceChildren(title, h("div", {class: "toolbar"}, status, stopBtn, resumeBtn,
    h("a", {href: "/api/log/" + id, target: "_blank", text: "log"})), info, charts,
    h("h2", {text: "Evaluation before / after"}), evals, h("h2", {text: "Samples"}), samples,
    h("h2", {text: "Resolved recipe"}), recipe);
  const drawCharts = () => CHARTS.forEach(([cid, name, pick]) => {
    const canvas = document.getElementById(cid);
    const series = {};
    metrics.forEach(r => pick(r).forEach(([k, v]) => {
      if (typeof v === "number") (series[k] = series[k] || []).push([r.step, v]); }));
    const list = Object.entries(series).map(([k, pts]) => ({name: k, points: pts, dashed: k === "held-out"}));
    canvas.style.display = cid === "chart-reward" && !list.length ? "none" : "";
    drawChart(canvas, list, {title: name});
  });
  const setStatus = s => {
    status.replaceChildren(statusBadge(s));
    stopBtn.disabled = !["queued", "running"].includes(s);
    resumeBtn.disabled = ["queued", "running", "stopping", "finished"].includes(s);
  };
  const refresh = () => api("/api/run/" + id).then(d => {
    metrics = d.metrics || [];
    setStatus(d.status);
    info.textContent = [d.method && `method ${d.method}`, d.objective && `objective ${d.objective}`,
      d.model && `model ${d.model}`, d.tokens_per_s && `${fmtNum(d.tokens_per_s)} tokens/s`,
      d.peak_memory_mb && `peak ${fmtNum(d.peak_memory_mb)} MB`].filter(Boolean).join(" · ");
    drawCharts(); drawEvals(d); recipe.textContent = d.recipe_yaml || "(not started yet)";
    listen(`/api/events?run=${encodeURIComponent(id)}&after=${metrics.length}`, {
      metrics: recs => {
        metrics = metrics.concat(recs); drawCharts();
        if (recipe.textContent.startsWith("(not")) api("/api/run/" + id).then(d => {  // it started since
          if (d.recipe_yaml) recipe.textContent = d.recipe_yaml; });
      },
      status: s => { const was = status.textContent; setStatus(s); if (was && was !== s) refresh(); },
    });
  }, alertErr);
  const drawEvals = d => {
    const before = (d.evals || {}).eval_before || (d.summary || {}).before || {};
    const after = (d.evals || {}).eval_after || (d.summary || {}).after || {};
    const keys = [...new Set([...Object.keys(before), ...Object.keys(after)])].filter(k =>
      typeof (after[k] ?? before[k]) === "number" && !["n", "eval_time_s"].includes(k));
    evals.replaceChildren(keys.length ? h("table", {id: "evals-table"}, h("tr", {}, ["metric", "before", "after"].map(
      t => h("th", {text: t}))), keys.map(k => h("tr", {}, h("td", {text: k}),
      h("td", {class: "num", text: fmt(before[k], k === "exact_match")}),
      h("td", {class: "num", text: fmt(after[k], k === "exact_match")})))) : h("p", {class: "muted", text: "none yet"}));
    const s = (after.samples || before.samples || []).slice(0, 8);
    samples.replaceChildren(s.length ? h("table", {}, h("tr", {}, ["prompt", "reference", "prediction", ""].map(
      t => h("th", {text: t}))), s.map(x => h("tr", {}, h("td", {text: x.prompt}), h("td", {text: x.answer}),
      h("td", {text: x.prediction}), h("td", {text: x.correct ? "✓" : "✗"})))) : h("p", {class: "muted",
      text: "no samples (exact match on a built-in task writes some)"}));
  };
  refresh();
}

// -- Launch -----------------------------------------------------------------------------------------------------
let schema = null;
const asText = v => v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : String(v);
const getPath = (obj, path) => path.split(".").reduce((o, k) => (o && typeof o === "object" ? o[k] : undefined), obj);

function input(path, spec, value) {
  const attrs = {"data-path": path, id: "f-" + path.replace(/\./g, "-")};
  let el;
  if (spec.widget === "checkbox") el = h("input", {...attrs, type: "checkbox", checked: value === true});
  else if (spec.widget === "select") el = h("select", attrs, (spec.nullable ? [""] : []).concat(spec.choices).map(
    c => h("option", {value: c, selected: asText(value) === c, text: c || "null"})));
  else if (spec.widget === "yaml") el = h("textarea", {...attrs, rows: 1}, asText(value));
  else el = h("input", {...attrs, type: spec.widget === "number" ? "number" : "text", step: spec.step || null,
                        value: asText(value), placeholder: spec.nullable ? "null" : null});
  return el;
}
const readInput = el => el.type === "checkbox" ? String(el.checked) : el.value;

function row(path, spec, value, help) {
  return h("div", {class: "row", "data-row": path}, h("label", {for: "f-" + path.replace(/\./g, "-"), text: path}),
    h("div", {}, input(path, spec, value), h("div", {class: "field-error", "data-for": path})),
    h("div", {class: "help", text: help || ""}));
}

function pageLaunch() {
  const start = h("select", {id: "recipe-source"}, h("option", {value: "", text: "defaults"}));
  const form = h("div", {id: "recipe-form"});
  const preview = h("textarea", {id: "yaml-preview", spellcheck: "false",
                                 placeholder: "Preview shows the resolved recipe here; edit it and Launch runs it."});
  const msg = h("div", {id: "launch-msg", class: "muted"});
  main.replaceChildren(h("h1", {text: "Launch a run"}),
    h("div", {class: "toolbar"}, h("label", {text: "start from "}), start,
      h("button", {id: "preview-btn", onclick: () => check(false)}, "Validate & preview YAML"),
      h("button", {id: "launch-btn", class: "primary", onclick: () => check(true)}, "Launch"), msg),
    h("div", {class: "launch"}, form, h("div", {}, h("h2", {text: "YAML"}), preview)));
  let defaults = {}, base = {};
  const build = values => {
    base = values;
    const sections = {};
    schema.fields.filter(f => !f.section).forEach(f => {
      const top = f.path.includes(".") ? f.path.split(".")[0] : "run";
      (sections[top] = sections[top] || []).push(f);
    });
    const parts = [];
    for (const [name, fields] of Object.entries(sections)) {
      const rows = fields.map(f => row(f.path, f, getPath(values, f.path), f.description));
      if (name === "method" || name === "objective") continue;
      parts.push(h("fieldset", {"data-section": name}, h("legend", {text: name}), rows));
      if (name === "model") parts.push(classFieldset("method"), classFieldset("objective"));
    }
    form.replaceChildren(...parts);
    const od = form.querySelector('[data-path="output_dir"]');
    if (od) { od.value = schema.runs_dir; od.disabled = true; }
  };
  const classFieldset = kind => {
    const table = schema[kind + "s"], chosen = (base[kind] || {}).name || schema.defaults[kind];
    const pick = h("select", {id: kind + "-select", "data-path": kind + ".name"}, Object.keys(table).map(
      n => h("option", {value: n, selected: n === chosen, text: n})));
    const opts = h("div", {id: kind + "-options"});
    const fill = () => {
      const name = pick.value, given = (base[kind] || {}).name === name ? base[kind] : {};
      const info = table[name];
      opts.replaceChildren(h("p", {class: "muted"}, info.doc + " ", info.paper ? h("a", {href: info.paper,
        target: "_blank", text: info.paper}) : ""), ...info.options.map(o => row(`${kind}.${o.path}`, o,
        o.path in given ? given[o.path] : o.value, `${o.type} = ${o.default}. ${o.description}`)));
    };
    pick.addEventListener("change", fill); fill();
    return h("fieldset", {"data-section": kind}, h("legend", {text: kind}),
      h("div", {class: "row"}, h("label", {text: kind + ".name"}), pick, h("div", {class: "help",
        text: `registered ${kind}s; its options follow`})), opts);
  };
  const overrides = () => {  // the fields that differ from the default recipe, as the CLI's a.b=value
    const out = [];
    form.querySelectorAll("[data-path]").forEach(el => {
      const path = el.dataset.path, [kind, opt] = path.split(".");
      if (path === "output_dir") return;  // the board's runs directory, always
      let def = getPath(defaults, path);
      if ((kind === "method" || kind === "objective") && opt !== "name") {
        def = schema[kind + "s"][form.querySelector(`#${kind}-select`).value].options.find(o => o.path === opt).value;
      }
      def = el.type === "checkbox" ? String(def === true) : asText(def);
      const v = readInput(el);
      if (v === def) return;
      const quoted = el.tagName === "INPUT" && el.type === "text" && v !== "";  // a name stays a string
      out.push(`${path}=${v === "" ? "null" : quoted ? JSON.stringify(v) : v}`);
    });
    return out;
  };
  const showErrors = errors => {
    form.querySelectorAll(".field-error").forEach(e => { e.textContent = ""; });
    form.querySelectorAll(".row.invalid").forEach(e => e.classList.remove("invalid"));
    const loose = [];
    (errors || []).forEach(e => {
      const slot = e.field && form.querySelector(`.field-error[data-for="${CSS.escape(e.field)}"]`);
      if (slot) { slot.textContent = e.message; slot.closest(".row").classList.add("invalid"); }
      else loose.push((e.field ? e.field + ": " : "") + e.message);
    });
    msg.className = errors && errors.length ? "err" : "muted";
    msg.textContent = loose.join("; ") || (errors && errors.length ? "fix the fields marked in red" : "");
  };
  let edited = false;
  preview.addEventListener("input", () => { edited = true; });
  const check = launch => {
    const body = edited && preview.value.trim() ? {yaml: preview.value} : {overrides: overrides()};
    post(launch ? "/api/launch" : "/api/validate", body).then(r => {
      showErrors(r.errors);
      if (!r.ok) return;
      if (r.yaml) { preview.value = r.yaml; edited = false; }
      if (launch) { msg.className = "muted"; msg.textContent = `queued ${r.run}`;
                    location.hash = "#/run/" + encodeURIComponent(r.run); }
    }, alertErr);
  };
  start.addEventListener("change", () => {
    if (!start.value) { build(defaults); preview.value = ""; edited = false; return; }
    post("/api/validate", {yaml: schema.recipes[start.value]}).then(r => {
      build(r.values || defaults); preview.value = schema.recipes[start.value]; edited = true; });
  });
  api("/api/schema").then(s => {
    schema = s;
    Object.keys(s.recipes).forEach(n => start.append(h("option", {value: n, text: n})));
    return post("/api/validate", {overrides: []});
  }).then(r => { defaults = r.values; build(defaults); }, alertErr);
  if (source) source.close();
}

// -- Compare, Sweeps, Methods -------------------------------------------------------------------------------------
function pageCompare(query) {
  const runs = new URLSearchParams(query).getAll("run");
  if (!runs.length) {
    main.replaceChildren(h("h1", {text: "Compare"}), h("p", {class: "muted",
      text: "Tick runs on the Runs page and press Compare: their tables and plots as `tunelab report` draws them."}));
    return;
  }
  main.replaceChildren(h("h1", {text: `Compare ${runs.length} run(s)`}), h("p", {class: "muted"}, runs.join(", ")),
    h("iframe", {id: "compare-frame", src: "/api/compare?" + runs.map(r => "run=" + encodeURIComponent(r)).join("&")}));
  if (source) source.close();
}

function pageSweeps() {
  const list = h("div", {id: "sweeps-list"});
  main.replaceChildren(h("h1", {text: "Sweeps"}), list);
  const draw = snap => list.replaceChildren(...(snap.sweeps.length ? snap.sweeps.map(s => h("section",
    {"data-sweep": s.id}, h("h2", {text: s.name}),
    h("p", {class: "muted"}, `${s.trials.total} trials` + (s.trials.complete !== undefined ? `: ${s.trials.complete} ` +
      `complete, ${s.trials.pruned} pruned, ${s.trials.failed} failed, ${s.trials.running} running` : "") +
      (s.objectives ? " · objectives " + s.objectives.join(", ") : "") + " ",
      s.report ? h("a", {href: "/api/files/" + s.report, target: "_blank", text: "report"}) : ""),
    s.best.length ? h("table", {class: "front"}, h("tr", {}, ["trial", ...s.objectives, "parameters"].map(
      t => h("th", {text: t}))), s.best.map(t => h("tr", {}, h("td", {}, t.run_dir ? runLink(s.id + "/trials/" +
      t.run_dir.split("/").pop()) : "#" + t.number), s.objectives.map(o => h("td", {class: "num",
      text: exact(t.values[o])})), h("td", {text: Object.entries(t.params).map(([k, v]) =>
      `${k}=${typeof v === "number" ? exact(v) : v}`).join(", ")})))) : h("p", {class: "muted",
      text: "no finished trial yet"}))) : [h("p", {class: "muted", text: "No sweep directories (tunelab sweep) here."})]));
  api("/api/runs").then(draw);
  listen("/api/events", {runs: draw});
}

function pageMethods() {
  if (source) source.close();
  api("/api/catalogue").then(c => {
    const table = (kind, entries) => h("table", {id: kind + "-table"}, h("tr", {}, ["name", "paper", "what it is",
      "options (default)"].map(t => h("th", {text: t}))), Object.entries(entries).map(([n, m]) => h("tr", {},
      h("td", {}, h("code", {text: n})), h("td", {}, m.paper ? h("a", {href: m.paper, target: "_blank",
      text: m.paper.replace("https://", "")}) : "-"), h("td", {text: (m.trains ? m.trains + ". " : "") + m.doc}),
      h("td", {class: "muted", text: m.options.map(o => `${o.path}=${o.default}`).join(", ") || "none"}))));
    main.replaceChildren(h("h1", {text: "Methods"}), table("methods", c.methods), h("h1", {text: "Objectives"}),
      table("objectives", c.objectives));
  }, alertErr);
}

function alertErr(e) {
  const m = document.getElementById("launch-msg") || main;
  m.prepend(h("div", {class: "err", text: String(e.message || e)}));
}

function route() {
  const hash = location.hash || "#/runs";
  const [path, query] = hash.slice(1).split("?");
  document.querySelectorAll("header nav a").forEach(a => a.classList.toggle("active",
    path.startsWith(a.getAttribute("href").slice(1)) || (path.startsWith("/run/") && a.id === "nav-runs")));
  if (path.startsWith("/run/")) return pageRun(decodeURIComponent(path.slice(5)));
  ({"/launch": pageLaunch, "/compare": () => pageCompare(query || ""), "/sweeps": pageSweeps,
    "/methods": pageMethods}[path] || pageRuns)();
}
window.addEventListener("hashchange", route);
route();
