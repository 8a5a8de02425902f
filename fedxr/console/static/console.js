// fedxr console: the run page's live chart, /try uploads, local times. Plain JavaScript, no build step.
"use strict";

const POLL_MS = 2000;
const MAX_POLLS = 3600;  // a run page stops polling after two hours

function el(tag, attrs = {}, text = "") {
  const ns = ["svg", "line", "polyline", "circle", "text", "g"].includes(tag) ? "http://www.w3.org/2000/svg" : null;
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function drawRounds(svg, rounds) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const numbered = rounds.filter(r => Number.isInteger(r.round));
  const W = 640, H = 280, L = 48, R = 120, T = 12, B = 36;
  const n = Math.max(1, numbered.length);
  const x = i => L + (W - L - R) * (n === 1 ? 0.5 : i / (n - 1));
  const values = numbered.flatMap(r => [r.aggregate_val_auroc, ...Object.values(r.sites).map(s => s.val_auroc)])
    .filter(v => v !== null && v !== undefined);
  const lo = Math.min(0.5, Math.floor(10 * Math.min(...values, 1)) / 10);  // AUROC axis from 0.5 (or lower) to 1
  const y = v => T + (H - T - B) * (1 - (v - lo) / (1 - lo));
  for (let v = lo; v <= 1.0001; v += 0.1) {
    svg.appendChild(el("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid"}));
    svg.appendChild(el("text", {x: L - 6, y: y(v) + 4, class: "axis", "text-anchor": "end"}, v.toFixed(1)));
  }
  numbered.forEach((r, i) => svg.appendChild(el("text", {x: x(i), y: H - 12, class: "axis", "text-anchor": "middle"}, String(r.round))));
  svg.appendChild(el("text", {x: (L + W - R) / 2, y: H - 1, class: "axis", "text-anchor": "middle"}, "round"));
  const sites = [...new Set(numbered.flatMap(r => Object.keys(r.sites)))].sort();
  const series = sites.map(s => [s, numbered.map((r, i) => [i, r.sites[s] && r.sites[s].val_auroc])]);
  series.push(["aggregate", numbered.map((r, i) => [i, r.aggregate_val_auroc])]);
  series.forEach(([name, pts], k) => {
    const ok = pts.filter(([, v]) => v !== null && v !== undefined);
    const cls = name === "aggregate" ? "series aggregate" : `series s${k % 6}`;
    svg.appendChild(el("polyline", {points: ok.map(([i, v]) => `${x(i)},${y(v)}`).join(" "), class: cls}));
    ok.forEach(([i, v]) => svg.appendChild(el("circle", {cx: x(i), cy: y(v), r: 3, class: cls, "data-round": i})));
    svg.appendChild(el("text", {x: W - R + 8, y: T + 14 + 16 * k, class: cls + " legend"}, name));
  });
  svg.setAttribute("data-rounds", String(numbered.length));
}

async function followRun(section) {
  const run = section.dataset.run;
  const svg = document.getElementById("rounds-chart");
  for (let polls = 0; polls < MAX_POLLS; polls++) {
    let state;
    try {
      const res = await fetch(`/api/runs/${encodeURIComponent(run)}/progress`, {credentials: "same-origin"});
      if (res.status === 401) { window.location = "/login"; return; }
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      state = await res.json();
    } catch (e) { await new Promise(r => setTimeout(r, POLL_MS)); continue; }
    drawRounds(svg, state.rounds || []);
    const list = document.getElementById("stages");
    list.replaceChildren(...Object.entries(state.stages).map(([name, st]) =>
      el("li", {class: st.done ? "done" : (st.running ? "running" : (st.failed ? "failed" :
        (st.interrupted ? "interrupted" : (st.disabled ? "disabled" : ""))))}, name)));
    const launched = state.launched;
    const label = document.getElementById("run-state");
    const run_ = state.run_state;
    if (launched) label.textContent = launched.running ? "running…" : (launched.returncode === 0 ? "finished" : "failed");
    else if (run_ && (run_.state === "interrupted" || run_.state === "failed"))
      label.textContent = `${run_.state} during ${run_.stage}: a coordinator can start it again (New run, the same recipe); the stages already done are kept`;
    if (state.failed) {
      const box = document.getElementById("failure");
      box.hidden = false;
      box.textContent = `stage ${state.failed.stage} failed; its log ends:\n${state.failed.log_tail}`;
    }
    const busy = (launched && launched.running) || Object.values(state.stages).some(st => st.running);
    if (!busy && polls > 0) return;
    await new Promise(r => setTimeout(r, POLL_MS));
  }
}

function fmt(p) { return (100 * p).toFixed(1) + " %"; }

function setupTry(form) {
  const error = document.getElementById("try-error");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.hidden = true;
    const file = document.getElementById("try-file").files[0];
    if (!file) return;
    if (file.size > Number(form.dataset.maxBytes)) {
      error.textContent = `the file is larger than ${Math.round(form.dataset.maxBytes / 1048576)} MB`;
      error.hidden = false;
      return;
    }
    const model = document.getElementById("try-model").value;
    const busy = document.getElementById("try-busy"), submit = document.getElementById("try-submit");
    busy.hidden = false; submit.disabled = true;
    let res, body;
    try {
      res = await fetch(`/api/predict?model=${encodeURIComponent(model)}`, {
        method: "POST", body: file, credentials: "same-origin",
        headers: {"X-CSRF-Token": form.dataset.csrf, "X-Filename": file.name, "Content-Type": "application/octet-stream"},
      });
      body = await res.json();
    } finally { busy.hidden = true; submit.disabled = false; }
    if (!res.ok) { error.textContent = body.detail || `error ${res.status}`; error.hidden = false; return; }
    document.getElementById("try-image").src = body.image;
    const heat = document.getElementById("try-heatmap");
    heat.hidden = !body.heatmap;
    if (body.heatmap) heat.src = body.heatmap;
    document.getElementById("try-heatmap-note").textContent =
      body.heatmap ? `Grad-CAM for ${body.heatmap_label}` : (body.heatmap_note || "");
    // A model trained on synthetic data says so above its findings; every model says what it was trained on.
    const warning = document.getElementById("try-warning");
    warning.hidden = !body.synthetic;
    warning.textContent = body.synthetic ? "This model was trained on synthetic data — not for diagnosis." : "";
    document.getElementById("try-provenance").textContent = body.trained_on || "";
    // An image the model is not for: the warning replaces the list of findings.
    const ood = document.getElementById("try-ood");
    ood.hidden = body.in_distribution !== false;
    ood.textContent = body.in_distribution === false ? `Findings withheld — ${body.ood_reason}.` : "";
    const findings = document.getElementById("try-findings");
    findings.replaceChildren(...(body.in_distribution === false ? [el("li", {}, "none shown: see the warning above")] :
      body.findings.length ? body.findings.map(f => el("li", {class: "finding"},
        `${f.label} ${fmt(f.probability)}` + (f.operating_point ? ` — ${f.operating_point}` : ""))) :
      [el("li", {}, "no finding above its threshold")]));
    const tbody = document.querySelector("#try-probabilities tbody");
    tbody.replaceChildren(...body.probabilities.map(p => {
      const tr = el("tr", {class: p.finding ? "finding" : (p.reliable ? "" : "unreliable")});
      tr.append(el("td", {}, p.label), el("td", {}, p.reliable ? fmt(p.probability) : "not reliable in this model"),
                el("td", {}, p.reliable ? fmt(p.threshold) : "–"),
                el("td", {}, p.reliable ? (p.operating_point || "").replace(/^above /, "") : p.why || ""));
      return tr;
    }));
    document.getElementById("try-result").hidden = false;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".time[data-epoch]").forEach(td => {
    if (td.dataset.epoch) td.textContent = new Date(Number(td.dataset.epoch) * 1000).toLocaleString();
  });
  const progress = document.getElementById("progress");
  if (progress) followRun(progress);
  const form = document.getElementById("try-form");
  if (form) setupTry(form);
});
