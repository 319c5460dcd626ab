// The dinokit search page: plain JavaScript, no build step, nothing from other sites.
"use strict";

const $ = (id) => document.getElementById(id);
const query = { blob: null, name: "query", box: null };

async function api(path, options = {}) {
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(`${r.status}: ${body.error || r.statusText}`);
  return body;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function searchOptions() {
  const k = Math.max(1, Math.min(1000, parseInt($("k").value, 10) || 12));
  const text = $("filter").value.trim();
  let filter = null;
  if (text) filter = JSON.parse(text); // a SyntaxError is shown as the status line
  return { k, filter };
}

function showQuery(blob, name) {
  query.blob = blob;
  query.name = name || "query";
  query.box = null;
  $("box").hidden = true;
  const img = $("query-img");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  $("query-wrap").hidden = false;
}

function render(body) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of body.results) {
    const card = document.createElement("figure");
    card.className = "card";
    card.dataset.id = hit.id;
    card.title = `search by item ${hit.id}`;
    const img = document.createElement("img");
    img.src = `/items/${hit.id}/image`;
    img.alt = hit.path;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const path = document.createElement("span");
    path.className = "path";
    path.textContent = `#${hit.id} ${hit.path}`;
    card.append(img, score, path);
    if (Object.keys(hit.metadata).length) {
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = JSON.stringify(hit.metadata);
      card.append(meta);
    }
    card.addEventListener("click", () => searchById(hit.id));
    grid.append(card);
  }
  status(`${body.results.length} results in ${body.took_ms.toFixed(1)} ms`);
}

async function run(label, task) {
  status(`${label}…`);
  try {
    render(await task());
  } catch (e) {
    status(e.message, true);
  }
}

function searchByImage() {
  if (!query.blob) return;
  return run("searching", () => {
    const { k, filter } = searchOptions();
    const form = new FormData();
    form.append("file", query.blob, query.name);
    form.append("k", String(k));
    if (filter) form.append("filter", JSON.stringify(filter));
    if (query.box) form.append("box", JSON.stringify(query.box));
    return api("/search", { method: "POST", body: form });
  });
}

function searchById(id) {
  // show the item as the new query (so a region of it can be searched next), search by its stored vector
  fetch(`/items/${id}/image`).then((r) => (r.ok ? r.blob() : null)).then((b) => b && showQuery(b, `item-${id}`));
  return run(`searching by item ${id}`, () => {
    const { k, filter } = searchOptions();
    return api("/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id, k, filter }),
    });
  });
}

function pickFile(file) {
  if (!file) return;
  showQuery(file, file.name);
  searchByImage();
}

// ----------------------------------------------------------------------- drag a box on the query image

function imageRect() {
  // where the picture sits inside the element (object-fit: contain letterboxes it)
  const img = $("query-img");
  const w = img.clientWidth, h = img.clientHeight;
  const scale = Math.min(w / img.naturalWidth, h / img.naturalHeight);
  const dw = img.naturalWidth * scale, dh = img.naturalHeight * scale;
  return { x: (w - dw) / 2, y: (h - dh) / 2, w: dw, h: dh, scale };
}

function setupBox() {
  const wrap = $("query-wrap"), box = $("box");
  let start = null;
  const point = (e) => {
    const r = wrap.getBoundingClientRect();
    return { x: e.clientX - r.left, y: e.clientY - r.top };
  };
  const draw = (a, b) => {
    Object.assign(box.style, {
      left: `${Math.min(a.x, b.x)}px`, top: `${Math.min(a.y, b.y)}px`,
      width: `${Math.abs(a.x - b.x)}px`, height: `${Math.abs(a.y - b.y)}px`,
    });
    box.hidden = false;
  };
  wrap.addEventListener("pointerdown", (e) => {
    start = point(e);
    wrap.setPointerCapture(e.pointerId);
  });
  wrap.addEventListener("pointermove", (e) => start && draw(start, point(e)));
  wrap.addEventListener("pointerup", (e) => {
    if (!start) return;
    const end = point(e), a = start;
    start = null;
    if (Math.abs(end.x - a.x) < 4 || Math.abs(end.y - a.y) < 4) {
      box.hidden = true;
      return;
    }
    draw(a, end);
    const r = imageRect();
    const px = (v, off) => (v - off) / r.scale; // element pixels -> image pixels
    query.box = [px(Math.min(a.x, end.x), r.x), px(Math.min(a.y, end.y), r.y),
                 px(Math.max(a.x, end.x), r.x), px(Math.max(a.y, end.y), r.y)].map((v) => Math.round(v * 10) / 10);
    searchByImage();
  });
}

// ----------------------------------------------------------------------- adding images

async function addImages() {
  const files = $("add-files").files;
  if (!files.length) return ($("add-out").textContent = "pick one or more images first");
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const meta = $("add-meta").value.trim();
  if (meta) form.append("metadata", meta);
  const token = $("token").value.trim();
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  try {
    const body = await api("/items", { method: "POST", body: form, headers });
    $("add-out").textContent = `added ids ${body.ids.join(", ") || "none"}` +
      (body.skipped.length ? `\nskipped: ${body.skipped.map((s) => `${s.name} (${s.reason})`).join("; ")}` : "");
    loadInfo();
  } catch (e) {
    $("add-out").textContent = e.message;
  }
}

async function loadInfo() {
  try {
    const info = await api("/info");
    const model = info.model && (info.model.name || info.model.arch);
    $("info").textContent = `${info.count} items · ${info.kind} · ${info.dim}-d ${info.feature} · ${model || "model"}`;
  } catch (e) {
    $("info").textContent = e.message;
  }
}

function setup() {
  const drop = $("drop");
  $("pick").addEventListener("change", (e) => pickFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pickFile(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => (e.key === "Enter" || e.key === " ") && $("pick").click());
  $("clear-box").addEventListener("click", () => { query.box = null; $("box").hidden = true; searchByImage(); });
  $("k").addEventListener("change", () => query.blob && searchByImage());
  $("add-btn").addEventListener("click", addImages);
  setupBox();
  loadInfo();
}

document.addEventListener("DOMContentLoaded", setup);
