// The LIMA human-study page: one item at a time (LIMA §4: which answer is better, or neither;
// LIMA §6: each response of a conversation graded fail / pass / excellent), labels posted to
// annotate.py as they are made.
//
// Nothing an answer says ever runs or becomes markup: every piece of text from the server enters
// the page through textContent or a text node, never innerHTML. The Markdown subset below builds
// elements for what it recognises (paragraphs, line breaks, headings, lists, code blocks, inline
// code, bold, italic) and leaves everything else (HTML tags, links, images) as the characters
// they are. The server's Content-Security-Policy backs this up: only this file may run.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");  // a study open to other machines
const NAME_KEY = "lima-study-annotator";
const $ = (id) => document.getElementById(id);
let study = null;     // GET /api/study: kind, total, intro, ask, options [{key, shortcut, text}], skip
let name = null;      // the annotator, remembered in this browser
let current = null;   // GET /api/item: n (position, 0-based; null when all are labelled), item, label...
let busy = false;     // a request in flight: keys and buttons wait for it

// ---- talking to the server ----------------------------------------------------------------------

async function api(path, body) {
  const headers = {"Accept": "application/json"};
  if (TOKEN) headers["X-Lima-Token"] = TOKEN;
  const init = body === undefined ? {headers} :
    {method: "POST", headers: {...headers, "Content-Type": "application/json"}, body: JSON.stringify(body)};
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new Error("the study server cannot be reached: is it still running? (reload to retry)");
  }
  const data = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

async function run(action) {  // one request at a time; its error shown above the item
  if (busy) return;
  busy = true;
  showError(null);
  try {
    await action();
  } catch (e) {
    showError(e.message);
  } finally {
    busy = false;
  }
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

// ---- Markdown, as elements built from text ------------------------------------------------------

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

const FENCE = /^\s*(```+|~~~+)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || LIST_ITEM.test(line);
}

function markdown(text) {
  const root = el("div", "md");
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {  // a code block: shown exactly as written, up to the closing fence (or the end)
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
      i++;
      const pre = el("pre");
      pre.appendChild(el("code", null, body.join("\n")));
      root.appendChild(pre);
    } else if (!line.trim()) {
      i++;
    } else if (HEADING.test(line)) {
      const m = line.match(HEADING);
      const h = el("h" + Math.min(m[1].length + 2, 6));
      inline(h, m[2]);
      root.appendChild(h);
      i++;
    } else if (LIST_ITEM.test(line)) {
      i = list(root, lines, i);
    } else {  // a paragraph: its lines, each break kept, up to a blank line or another block
      const p = el("p");
      for (let first = true; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i++, first = false) {
        if (!first) p.appendChild(el("br"));
        inline(p, lines[i]);
      }
      root.appendChild(p);
    }
  }
  return root;
}

function list(parent, lines, i) {
  // consecutive list items; a deeper indent opens a list inside the item before it, and an
  // indented line that is not an item continues that item
  const stack = [];  // [{indent, list, li}], outermost first
  while (i < lines.length) {
    const m = lines[i].match(LIST_ITEM);
    if (!m) {
      if (stack.length && /^\s+\S/.test(lines[i]) && !startsBlock(lines[i])) {
        const li = stack[stack.length - 1].li;
        li.appendChild(el("br"));
        inline(li, lines[i].trim());
        i++;
        continue;
      }
      break;
    }
    const indent = m[1].replace(/\t/g, "    ").length;
    while (stack.length && indent < stack[stack.length - 1].indent) stack.pop();
    let top = stack[stack.length - 1];
    if (!top || indent > top.indent) {
      const ordered = /\d/.test(m[2]);
      const list = el(ordered ? "ol" : "ul");
      if (ordered) list.start = parseInt(m[2], 10);
      (top ? top.li : parent).appendChild(list);
      top = {indent, list, li: null};
      stack.push(top);
    }
    top.li = el("li");
    inline(top.li, m[3]);
    top.list.appendChild(top.li);
    i++;
  }
  return i;
}

// `code` (nothing inside it is markup), **bold** / __bold__, *italic* / _italic_ (underscores
// only around words, never inside one: snake_case and window.__name stay as written)
const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|(?<![\p{L}\p{N}_])__(?=\S)([\s\S]*?\S)__(?![\p{L}\p{N}_])|\*(?=\S)([\s\S]*?\S)\*|(?<![\p{L}\p{N}_])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\p{L}\p{N}_])/gu;

function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    if (m[1]) {
      parent.appendChild(el("code", null, m[2]));
    } else {
      const bold = m[3] !== undefined || m[4] !== undefined;
      const e = el(bold ? "strong" : "em");
      inline(e, bold ? (m[3] ?? m[4]) : (m[5] ?? m[6]));
      parent.appendChild(e);
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

// ---- the item -----------------------------------------------------------------------------------

function block(title, text, className) {
  const box = el("article", className);
  box.appendChild(el("h2", null, title));
  box.appendChild(markdown(text));
  return box;
}

function where(view) {
  const parts = [];
  if (view.dialogue !== undefined) parts.push(`dialogue ${view.dialogue}, turn ${view.turn}`);
  if (view.id !== undefined && view.id !== null) parts.push(`id ${view.id}`);
  if (view.source) parts.push(`source ${view.source}`);
  return parts.join(" · ");
}

function renderItem() {
  const box = $("item");
  box.replaceChildren();
  const view = current.item;
  box.appendChild(el("p", "where", where(view)));
  if (study.kind === "pairwise") {
    box.appendChild(el("p", "intro", study.intro));  // the paper's question (LIMA Appendix C)
    box.appendChild(block("Question", view.prompt, "prompt"));
    const answers = el("div", "answers");
    answers.appendChild(block("Answer A", view.answers[0], "answer"));
    answers.appendChild(block("Answer B", view.answers[1], "answer"));
    box.appendChild(answers);
  } else {
    const context = el("section", "context");
    context.appendChild(el("h2", null, "The conversation so far"));
    if (!view.context.length) context.appendChild(el("p", "none", view.no_context));
    view.context.forEach((turn, k) => {
      context.appendChild(block(k % 2 === 0 ? "User" : "Assistant", turn, k % 2 === 0 ? "turn user" : "turn assistant"));
    });
    box.appendChild(context);
    box.appendChild(block("User", view.prompt, "turn user"));
    box.appendChild(block("Response", view.response, "answer response"));
  }
  box.appendChild(el("p", "ask", study.ask));
  const options = el("div", "options");
  for (const o of study.options) options.appendChild(optionButton(o.key, o.shortcut, o.text));
  options.appendChild(optionButton(study.skip, study.skip, "skip"));
  box.appendChild(options);
  box.hidden = false;
  $("finished").hidden = true;
}

function optionButton(key, shortcut, text) {
  const b = el("button", "option" + (current.label === key ? " chosen" : ""));
  b.type = "button";
  b.dataset.key = key;
  b.appendChild(el("kbd", null, shortcut === key ? key : `${shortcut} / ${key}`));
  b.appendChild(document.createTextNode(" " + text));
  if (current.label === key) b.appendChild(el("span", "yours", " (your label)"));
  b.addEventListener("click", () => choose(key));
  return b;
}

function show(view) {
  current = view;
  $("progress").textContent = view.n === null ? `all ${view.total} labelled` :
    `${view.n + 1} of ${view.total} · ${view.done} labelled`;
  $("nav").hidden = false;
  if (view.n === null) {
    $("item").hidden = true;
    $("finished").hidden = false;
    $("finished-total").textContent = view.total;
    $("finished-file").textContent = view.file;
  } else {
    renderItem();
  }
  $("back").disabled = view.n === 0;
  $("forward").disabled = view.n === null || !view.labelled;
  window.scrollTo(0, 0);
}

// ---- actions ------------------------------------------------------------------------------------

const load = (n) => run(async () => {
  const query = `name=${encodeURIComponent(name)}` + (n === undefined ? "" : `&n=${n}`);
  show(await api(`/api/item?${query}`));
});

function choose(key) {
  if (!current || current.n === null) return;
  const {n, ref} = current;
  run(async () => show(await api("/api/label", {name, n, ref, key})));  // -> the next item without a label
}

function back() {
  if (current && current.n !== 0) load(current.n === null ? current.total - 1 : current.n - 1);
}

function forward() {
  if (current && current.n !== null && current.labelled) load(current.n + 1 < current.total ? current.n + 1 : undefined);
}

function start(who) {
  name = who;
  localStorage.setItem(NAME_KEY, who);
  $("signin").hidden = true;
  $("who").hidden = false;
  $("who-name").textContent = who;
  load();
}

function signIn() {
  name = current = null;
  for (const id of ["item", "finished", "nav", "who"]) $(id).hidden = true;
  $("progress").textContent = "";
  $("signin").hidden = false;
  $("name").focus();
}

document.addEventListener("keydown", (e) => {
  if (e.target.closest("input, textarea") || e.ctrlKey || e.metaKey || e.altKey || !study || !name) return;
  const k = e.key.toLowerCase();
  const option = study.options.find((o) => o.key === k || o.shortcut === k);
  if (option || k === study.skip) {
    e.preventDefault();
    choose(option ? option.key : study.skip);
  } else if (e.key === "ArrowLeft") {
    back();
  } else if (e.key === "ArrowRight") {
    forward();
  }
});

document.addEventListener("DOMContentLoaded", async () => {
  $("name-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const who = $("name").value.trim().toLowerCase();
    if (who) start(who);
  });
  $("name").addEventListener("input", () => { $("name").value = $("name").value.toLowerCase(); });
  $("rename").addEventListener("click", signIn);
  $("back").addEventListener("click", back);
  $("forward").addEventListener("click", forward);
  await run(async () => {
    study = await api("/api/study");
    $("title").textContent = study.kind === "pairwise" ? "LIMA human study: which answer is better?" :
      "LIMA human study: grade each response";
    $("key-help").textContent = study.options.map((o) => `${o.shortcut} / ${o.key}`).join(", ");
  });
  if (!study) return;  // the error says why
  const remembered = localStorage.getItem(NAME_KEY);
  if (remembered) start(remembered); else signIn();
});
