// The search page: plain DOM, no framework, no CDN. Talks to the same JSON API as any client.
"use strict";

const $ = (id) => document.getElementById(id);
let collections = [];
let imageFile = null;
// Words too common to be worth highlighting.
const STOP = new Set(("a an and are as at be by do does for from has have how in into is it its of on or "
  + "that the their this to was what when where which who why will with").split(" "));

async function api(path, options = {}) {
  const res = await fetch(path, { credentials: "same-origin", ...options });
  const isJson = (res.headers.get("content-type") || "").includes("json");
  const body = isJson ? await res.json() : null;
  if (!res.ok) throw new Error((body && body.error) || `${res.status} ${res.statusText}`);
  return body;
}

function current() {
  return collections.find((c) => c.name === $("collection").value);
}

function settings() {
  return { collection: $("collection").value, k: Number($("k").value) || 10,
           mode: $("mode").value, engine: $("engine").value, group_by_doc: $("group").checked };
}

function onCollection() {
  const c = current();
  if (!c) return;
  const text = c.modality === "text";
  // A joint text-image model (CLIP) takes words and pictures whichever kind it stores.
  const words = c.queries.includes("text");
  $("mode").disabled = !text;
  if (!text) $("mode").value = "vector";
  $("q").placeholder = text ? "Search by text"
    : words ? "Describe a picture, or drop an image below"
    : "Drop an image below, or click a result for more like it";
  $("q").disabled = !words;
  $("drop").hidden = !c.queries.includes("image");
  // Passages of documents (ingested with --chunk-tokens) can be grouped by their document.
  $("group-label").hidden = !c.fields.includes("doc_id");
  if ($("group-label").hidden) $("group").checked = false;
}

async function loadCollections() {
  try {
    collections = (await api("/collections")).collections;
  } catch (e) {
    showError(e.message);
    return;
  }
  const sel = $("collection");
  sel.replaceChildren(...collections.map((c) => {
    const o = document.createElement("option");
    o.value = c.name;
    o.textContent = `${c.name} (${c.modality}, ${c.rows} items)`;
    return o;
  }));
  onCollection();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

async function search(body, label) {
  $("error").hidden = true;
  $("status").textContent = "Searching…";
  const options = body instanceof FormData
    ? { method: "POST", body }
    : { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) };
  try {
    render(await api("/search", options), label);
  } catch (e) {
    $("results").replaceChildren();
    showError(e.message);
  }
}

function searchImage(file) {
  const form = new FormData();
  form.append("image", file);
  for (const [key, value] of Object.entries(settings())) form.append(key, String(value));
  search(form, `image ${file.name}`);
}

function moreLike(id) {
  search({ ...settings(), mode: "vector", group_by_doc: false, id }, `more like ${id}`);
}

function setImage(file) {
  if (!file) return;
  imageFile = file;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").textContent = `${file.name}: drop another image to search again`;
  searchImage(file);
}

// Query terms in a text, as DOM nodes (no innerHTML: stored text is never parsed as markup).
function highlighted(text, query) {
  const terms = ((query || "").toLowerCase().match(/[\p{L}\p{N}]{2,}/gu) || []).filter((t) => !STOP.has(t));
  let start = 0;
  const lower = text.toLowerCase();
  const first = Math.min(...terms.map((t) => lower.indexOf(t)).filter((i) => i >= 0));
  if (Number.isFinite(first) && first > 120) start = text.lastIndexOf(" ", first - 80) + 1;
  const end = Math.min(text.length, start + 320);
  const shown = (start > 0 ? "…" : "") + text.slice(start, end) + (end < text.length ? "…" : "");
  const p = document.createElement("p");
  p.className = "snippet";
  if (!terms.length) {
    p.textContent = shown;
    return p;
  }
  // A crude stem (telescopes -> telescope*) so plural and singular both light up.
  const stems = terms.map((t) => (t.length > 4 ? t.replace(/(es|s)$/, "") : t)
    .replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  const re = new RegExp(`(${stems.map((t) => `${t}[\\p{L}\\p{N}]*`).join("|")})`, "giu");
  for (const [i, part] of shown.split(re).entries()) {
    if (!part) continue;
    if (i % 2) {
      const m = document.createElement("mark");
      m.textContent = part;
      p.append(m);
    } else {
      p.append(part);
    }
  }
  return p;
}

function render(data, label) {
  const hits = data.results;
  const box = $("results");
  const images = hits.some((h) => h.image_url);
  box.className = images ? "images" : "texts";
  const query = label.startsWith("more like") || label.startsWith("image") ? "" : label;
  box.replaceChildren(...hits.map((hit) => {
    const card = document.createElement("div");
    card.className = "hit";
    card.dataset.id = hit.id;
    card.title = "Click for more like this";
    if (hit.image_url) {
      const img = document.createElement("img");
      img.src = `${hit.image_url}?size=256`;
      img.alt = hit.id;
      img.loading = "lazy";
      card.append(img);
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = hit.id;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = Number(hit.score).toFixed(3);
    meta.append(id);
    if (hit.label) {
      const tag = document.createElement("span");
      tag.className = "label";
      tag.textContent = hit.label;
      meta.append(tag);
    }
    meta.append(score);
    card.append(meta);
    if (!hit.image_url && hit.text) card.append(highlighted(String(hit.text), query));
    if (hit.doc_id != null) {
      const where = document.createElement("div");
      where.className = "where";
      where.textContent = [hit.doc_id, hit.page != null ? `page ${hit.page}` : null, hit.heading,
                           hit.chunk != null ? `passage ${hit.chunk}` : null].filter(Boolean).join(" · ");
      card.append(where);
    }
    card.addEventListener("click", () => moreLike(hit.id));
    return card;
  }));
  $("status").textContent = `${hits.length} results for ${label} in ${data.collection} (${data.took_ms} ms)`;
}

$("search").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("q").value.trim();
  if (q) search({ ...settings(), query: q }, q);
  else if (imageFile) searchImage(imageFile);
  else showError("Type a query or drop an image.");
});
$("collection").addEventListener("change", () => {
  onCollection();
  $("results").replaceChildren();
  $("status").textContent = "";
});
$("pick").addEventListener("click", (e) => {
  e.preventDefault();
  $("file").click();
});
$("file").addEventListener("change", () => setImage($("file").files[0]));
for (const type of ["dragenter", "dragover"]) {
  document.addEventListener(type, (e) => {
    e.preventDefault();
    $("drop").classList.add("over");
  });
}
document.addEventListener("dragleave", (e) => {
  if (!e.relatedTarget) $("drop").classList.remove("over");
});
document.addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  const file = [...(e.dataTransfer ? e.dataTransfer.files : [])].find((f) => f.type.startsWith("image/"));
  if (file) setImage(file);
  else showError("Drop an image file (JPEG, PNG, WebP, …).");
});

loadCollections();
