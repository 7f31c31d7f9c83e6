"""The one page `anomalab serve` shows at GET /: self-contained (inline style and script, no external
scripts, fonts, styles or images), allowed by its Content-Security-Policy through their sha256 hashes.

Drop or pick images; each is sent to POST /v1/score as its own request (the server batches concurrent
requests) and shown with its overlay, score and verdict. A slider shows what another threshold would
decide, on the page only: the saved threshold stays. File names are shown as text, never as HTML.
"""

from __future__ import annotations

import base64
import hashlib

STYLE = """
:root{--bad:#c62828;--ok:#2e7d32;--ink:#222;--muted:#666;--line:#ddd}
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:var(--ink);background:#fafafa}
header{background:#263238;color:#fff;padding:.8em 1.5em;display:flex;gap:1.5em;align-items:baseline;flex-wrap:wrap}
header h1{font-size:1.25em;margin:0}
#model{font-size:.9em;color:#cfd8dc}
main{padding:1em 1.5em}
#auth{background:#fff3e0;border:1px solid #ffb74d;padding:.6em 1em;border-radius:4px;margin-bottom:1em}
#drop{border:2px dashed #90a4ae;border-radius:6px;padding:1.4em;text-align:center;background:#fff;color:var(--muted)}
#drop.over{background:#e3f2fd;border-color:#1e88e5}
#drop label{color:#1565c0;text-decoration:underline;cursor:pointer}
#files{position:absolute;left:-10000px}
#controls{margin:1em 0;padding:.8em 1em;background:#fff;border:1px solid var(--line);border-radius:6px}
#controls .row{display:flex;gap:1em;align-items:center;flex-wrap:wrap}
#slider{width:min(320px,60vw);vertical-align:middle}
.note{color:var(--muted);font-size:.85em;margin:.4em 0 0}
#legend img{width:400px;height:14px;display:block;border:1px solid #999;margin-top:.4em}
.ticks{position:relative;width:400px;height:1.4em;font-size:.8em;color:var(--muted)}
.ticks span{position:absolute;transform:translateX(-50%);white-space:nowrap}
#counts{margin:.5em 0 0}
#counts b{font-weight:600}
#grid{display:flex;flex-wrap:wrap;gap:.8em}
.card{width:236px;margin:0;background:#fff;border:1px solid var(--line);border-radius:6px;padding:.4em;font-size:.85em}
.card img{width:100%;aspect-ratio:1/1;object-fit:contain;background:#eceff1;image-rendering:pixelated;display:block}
.card.anomalous{border-color:var(--bad);background:#fdecea}
.card.error{border-color:#ef6c00;background:#fff3e0}
.verdict{font-weight:700;text-transform:uppercase;letter-spacing:.03em}
.anomalous .verdict{color:var(--bad)}.normal .verdict{color:var(--ok)}.error .verdict{color:#ef6c00}
.score{font-variant-numeric:tabular-nums;float:right}
.whatif{color:var(--muted);margin-top:.2em}.whatif.flip{color:#6a1b9a;font-weight:600}
.name{overflow-wrap:anywhere;color:var(--muted);margin-top:.2em}
.detail{overflow-wrap:anywhere;margin-top:.3em}
button{font:inherit;padding:.2em .7em}
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const state = {model: null, cards: [], token: ""};
const fromHash = /(?:^#|&)token=([^&]+)/.exec(location.hash);
state.token = fromHash ? decodeURIComponent(fromHash[1]) : (sessionStorage.getItem("anomalab-token") || "");
const fmt = (v) => (v === null || v === undefined) ? "-" : Number(v).toPrecision(5);
function headers() { return state.token ? {"Authorization": "Bearer " + state.token} : {}; }

async function loadModel() {
  let r;
  try { r = await fetch("/v1/model", {headers: headers()}); }
  catch (e) { $("model").textContent = "server unreachable"; return; }
  if (r.status === 401) { $("auth").hidden = false; $("model").textContent = "token needed"; return; }
  $("auth").hidden = true;
  const m = await r.json();
  state.model = m;
  const thr = m.threshold ? fmt(m.threshold.value) : "none";
  $("model").textContent = m.detector + " \u00b7 input " + m.input_shape.join("\u00d7") + " \u00b7 " + m.engine +
    " \u00b7 threshold " + thr + " \u00b7 anomalab " + m.versions.anomalab;
  $("saved").textContent = thr;
  if (m.colour_bar) {
    const img = document.createElement("img");
    img.alt = "colour scale of the overlays"; img.src = "data:image/png;base64," + m.colour_bar;
    $("legend").textContent = "Overlay colours, the same scale for every image: clear at the normal level, " +
      "blue up to the pixel threshold, yellow to red above it.";
    $("legend").appendChild(img);
    const cs = m.colour_scale;
    const lo = cs.low - 0.1 * (cs.threshold - cs.low), hi = cs.high + 0.1 * (cs.high - cs.threshold);
    const ticks = document.createElement("div"); ticks.className = "ticks";
    for (const [v, label] of [[cs.low, "normal"], [cs.threshold, "pixel threshold"]]) {
      const s = document.createElement("span");
      const at = 100 * (v - lo) / (hi - lo);
      s.style.left = at.toFixed(1) + "%"; s.textContent = label + " " + Number(v).toPrecision(3);
      s.style.transform = at < 15 ? "none" : (at > 85 ? "translateX(-100%)" : "translateX(-50%)");
      ticks.appendChild(s);
    }
    $("legend").appendChild(ticks);
  } else if (m.notes && m.notes.length) { $("legend").textContent = m.notes.join("; "); }
  updateSlider();
}

function card(file) {
  const fig = document.createElement("figure");
  fig.className = "card pending";
  const img = document.createElement("img");
  img.alt = "image " + file.name;
  img.src = URL.createObjectURL(file);
  const cap = document.createElement("figcaption");
  const verdict = document.createElement("span"); verdict.className = "verdict"; verdict.textContent = "scoring\u2026";
  const score = document.createElement("span"); score.className = "score";
  const whatif = document.createElement("div"); whatif.className = "whatif";
  const name = document.createElement("div"); name.className = "name"; name.textContent = file.name;
  const detail = document.createElement("div"); detail.className = "detail";
  cap.append(verdict, score, whatif, name, detail);
  fig.append(img, cap);
  $("grid").prepend(fig);
  const c = {fig, img, verdict, score, whatif, detail, result: null};
  state.cards.push(c);
  return c;
}

async function scoreFile(file) {
  const c = card(file);
  const body = new FormData();
  body.append("images", file, file.name);
  const maps = state.model && state.model.overlays ? "true" : "false";
  let r, data;
  try {
    r = await fetch("/v1/score?maps=" + maps, {method: "POST", body, headers: headers()});
    data = await r.json();
  } catch (e) { data = {detail: String(e)}; r = {ok: false, status: 0}; }
  if (!r.ok) {
    c.fig.className = "card error"; c.verdict.textContent = "error " + (r.status || "");
    c.detail.textContent = data.detail || "request failed";
    if (r.status === 401) { $("auth").hidden = false; }
    return;
  }
  const res = data.results[0];
  c.result = res;
  c.score.textContent = fmt(res.score);
  c.score.title = "score " + res.score;
  if (res.overlay) { c.img.src = "data:image/png;base64," + res.overlay; c.img.alt = "overlay of " + res.name; }
  c.verdict.textContent = res.verdict || "no threshold";
  c.fig.className = "card done " + (res.verdict || "none");
  c.fig.dataset.score = res.score;
  updateSlider();
}

function scored() { return state.cards.filter((c) => c.result); }

function updateSlider() {
  const s = $("slider");
  const saved = state.model && state.model.threshold ? state.model.threshold.value : null;
  const values = scored().map((c) => c.result.score);
  if (saved !== null) values.push(saved);
  if (!values.length) { s.disabled = true; show(); return; }
  const lo = Math.min(0, ...values), hi = Math.max(...values);
  const span = (hi - lo) || Math.abs(hi) || 1;
  const keep = s.dataset.moved === "1" ? Number(s.value) : (saved !== null ? saved : hi);
  s.min = lo; s.max = hi + 0.25 * span; s.step = "any";
  s.value = keep; s.disabled = false;
  show();
}

function show() {
  const s = $("slider");
  const t = Number(s.value);
  const saved = state.model && state.model.threshold ? state.model.threshold.value : null;
  $("whatif").textContent = s.disabled ? "-" : fmt(t);
  const moved = saved === null || s.dataset.moved === "1";
  const done = scored();
  let flagged = 0, flaggedSaved = 0;
  for (const c of done) {
    const bad = c.result.score > t;
    flagged += bad; flaggedSaved += c.result.verdict === "anomalous";
    const would = bad ? "anomalous" : "normal";
    c.whatif.textContent = "at " + fmt(t) + ": " + would;
    c.whatif.hidden = !moved;
    c.whatif.classList.toggle("flip", c.result.verdict ? would !== c.result.verdict : false);
  }
  const atSaved = saved !== null && moved ? " (" + flaggedSaved + " at the saved threshold)" : "";
  $("counts").textContent = done.length ? (flagged + " of " + done.length + " anomalous at " + fmt(t) + atSaved)
    : "no images scored yet";
}

function addFiles(list) { for (const f of Array.from(list)) scoreFile(f); }

$("files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over"); addFiles(e.dataTransfer.files);
});
$("slider").addEventListener("input", () => { $("slider").dataset.moved = "1"; show(); });
$("reset").addEventListener("click", () => {
  const s = $("slider"); s.dataset.moved = "0"; updateSlider();
});
$("clear").addEventListener("click", () => { state.cards = []; $("grid").textContent = ""; updateSlider(); });
$("auth").addEventListener("submit", (e) => {
  e.preventDefault(); state.token = $("token").value.trim();
  sessionStorage.setItem("anomalab-token", state.token); loadModel();
});
loadModel();
"""

BODY = """
<header><h1>anomalab</h1><div id="model">loading the model\u2026</div></header>
<main>
<form id="auth" hidden><label>This server needs its token: <input id="token" type="password" autocomplete="off"
 size="32"></label> <button type="submit">use token</button>
 <span class="note">kept in this tab only (sessionStorage)</span></form>
<div id="drop">Drop images here, or <label for="files">choose files</label>
 <input id="files" type="file" multiple accept="image/*"></div>
<section id="controls">
 <div class="row"><span>Saved threshold: <b id="saved">-</b></span>
 <label>What if the threshold were <input id="slider" type="range" disabled> <output id="whatif">-</output></label>
 <button id="reset" type="button">back to saved</button></div>
 <p class="note">The slider only changes what this page shows; the saved threshold stays as it is
 (change it with <code>anomalab threshold RUN --value X</code>).</p>
 <div class="row"><b id="counts">no images scored yet</b> <button id="clear" type="button">clear images</button></div>
 <div id="legend" class="note"></div>
</section>
<div id="grid"></div>
</main>
"""


def _csp_hash(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


PAGE = (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
        f"content='width=device-width,initial-scale=1'><title>anomalab serve</title><style>{STYLE}</style></head>"
        f"<body>{BODY}<script>{SCRIPT}</script></body></html>")
SCRIPT_HASH = _csp_hash(SCRIPT)
STYLE_HASH = _csp_hash(STYLE)
