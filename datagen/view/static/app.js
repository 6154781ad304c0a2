// datagen view: the page. Plain JS, no build step, nothing fetched from elsewhere.
//
// Teacher text is untrusted: every piece of data reaches the DOM as a text node or
// textContent, never through innerHTML, so "<script>" or "<img onerror=...>" in an
// instruction shows those characters and runs nothing. The server's Content-Security-Policy
// (no inline script) is a second wall, not the first.
//
// Routes (the part of the URL after #): /tasks?q=&sort=&desc=&offset=&f.FACET=value,
// /task/ROW (or /task?id=ID), /run.
"use strict";

const PAGE_SIZE = 50;
const FACET_LABELS = {
  status: "kept / rejected", method: "method", operation: "operation", round: "round",
  teacher: "teacher", stage: "reject stage", reason: "reject reason", classification: "classification",
  language: "language", mark: "curation mark", file: "file",
};
const COLUMNS = [
  ["status", "status"], ["id", "id"], ["instruction", "instruction"], ["operation", "operation"], ["round", "round"], ["instances", "inst."], ["reason", "reject reason"],
  ["mark", "mark"],
];

// -- building DOM from data, as text only ------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = String(value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

function textBlock(text, id) {
  return el("pre", { class: "text", id }, text === null || text === undefined || text === "" ? "(empty)" : String(text));
}

function taskLink(link) {
  if (link.row === null || link.row === undefined) return el("span", { class: "muted" }, link.id, " (not in this run)");
  return el("a", { href: `#/task/${Number(link.row)}`, class: "task-link" }, link.id);
}

function badge(value, kind) {
  return el("span", { class: `badge ${kind || ""} v-${String(value).replace(/[^a-z0-9]/gi, "")}` }, value);
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function showError(error) {
  clear(main()).append(el("p", { class: "error" }, "Error: ", error.message || String(error)));
}

const main = () => document.getElementById("main");

// -- routing -------------------------------------------------------------------------------

function route() {
  const hash = location.hash.replace(/^#/, "") || "/tasks";
  const [path, search] = hash.split("?");
  const params = new URLSearchParams(search || "");
  for (const id of ["nav-tasks", "nav-run"]) document.getElementById(id).classList.remove("active");
  if (path.startsWith("/task/")) return showTask(`row=${encodeURIComponent(path.slice(6))}`);
  if (path === "/task") return showTask(`id=${encodeURIComponent(params.get("id") || "")}`);
  if (path === "/run") return showRun();
  return showTasks(params);
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);

// -- Tasks ---------------------------------------------------------------------------------

let lastTasksHash = "#/tasks";
let tasksTicket = 0; // only the latest request of the table may draw it (typing sends several)
let searchTimer = null;

function tasksHash(params) {
  const text = params.toString();
  return "#/tasks" + (text ? "?" + text : "");
}

function withParam(params, name, value) {
  const next = new URLSearchParams(params);
  if (value === null || value === "") next.delete(name); else next.set(name, value);
  if (name !== "offset") next.delete("offset");
  return next;
}

function tasksSkeleton() {
  let view = document.getElementById("tasks-view");
  if (view) return view;
  const search = el("input", {
    id: "search", type: "search", placeholder: "Search id, instruction, reject reason…", autocomplete: "off",
    oninput: () => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(() => {
        const params = new URLSearchParams((location.hash.split("?")[1]) || "");
        location.hash = tasksHash(withParam(params, "q", search.value.trim()));
      }, 250);
    },
  });
  view = el("div", { id: "tasks-view", class: "tasks" },
    el("aside", { id: "facets" }),
    el("section", { class: "table-side" },
      el("div", { class: "toolbar" }, search, el("span", { id: "count", class: "muted" }),
        el("span", { id: "notice", class: "muted" })),
      el("table", { id: "tasks" }, el("thead"), el("tbody")),
      el("div", { class: "pager" },
        el("button", { id: "prev", type: "button" }, "← previous"),
        el("span", { id: "page", class: "muted" }),
        el("button", { id: "next", type: "button" }, "next →"))));
  clear(main()).append(view);
  return view;
}

async function showTasks(params) {
  document.getElementById("nav-tasks").classList.add("active");
  lastTasksHash = tasksHash(params);
  const view = tasksSkeleton();
  const search = document.getElementById("search");
  if (document.activeElement !== search) search.value = params.get("q") || "";
  const query = new URLSearchParams(params);
  query.set("limit", PAGE_SIZE);
  const ticket = ++tasksTicket;
  let page;
  try {
    page = await getJSON(`/api/tasks?${query}`);
  } catch (error) {
    return showError(error);
  }
  if (ticket !== tasksTicket || !document.body.contains(view)) return; // superseded, or navigated away
  document.getElementById("root").textContent = page.root;
  renderFacets(page, params);
  renderTable(page, params);
  const offset = page.offset;
  document.getElementById("count").textContent = `${page.total.toLocaleString()} of ${page.all.toLocaleString()} tasks` +
    (page.indexing ? ` so far (indexing… ${page.all.toLocaleString()} tasks read)` : "");
  const notes = [];
  if (page.unfinished_lines.length) notes.push(`an unfinished last line (still being written?) not shown yet: ${page.unfinished_lines.join(", ")}`);
  if (page.changed_files.length) notes.push(`changed on disk since read (restart datagen view to see them): ${page.changed_files.join(", ")}`);
  document.getElementById("notice").textContent = notes.join("; ");
  if (page.indexing || !page.languages_ready) {
    // counts and facets fill in as the index is read (and languages detected): ask again soon
    const hash = location.hash;
    setTimeout(() => {
      if (ticket === tasksTicket && location.hash === hash && document.body.contains(view)) showTasks(params);
    }, page.indexing ? 500 : 2000);
  }
  document.getElementById("page").textContent = page.total
    ? `${offset + 1}–${Math.min(offset + PAGE_SIZE, page.total)}` : "no tasks match";
  const prev = document.getElementById("prev");
  const next = document.getElementById("next");
  prev.disabled = offset <= 0;
  next.disabled = offset + PAGE_SIZE >= page.total;
  prev.onclick = () => { location.hash = tasksHash(withParam(params, "offset", String(Math.max(0, offset - PAGE_SIZE)))); };
  next.onclick = () => { location.hash = tasksHash(withParam(params, "offset", String(offset + PAGE_SIZE))); };
}

function renderFacets(page, params) {
  const aside = clear(document.getElementById("facets"));
  for (const [name, counts] of Object.entries(page.facets)) {
    const selected = params.getAll(`f.${name}`);
    if (counts.length <= 1 && !selected.length && name !== "status") continue; // nothing to choose between
    const list = el("ul");
    for (const [value, count] of counts.slice(0, 30)) {
      const on = selected.includes(value);
      const next = new URLSearchParams(params);
      next.delete(`f.${name}`);
      next.delete("offset");
      for (const kept of (on ? selected.filter((v) => v !== value) : [...selected, value])) next.append(`f.${name}`, kept);
      list.append(el("li", {},
        el("a", { href: tasksHash(next), class: on ? "facet on" : "facet", "data-facet": name, "data-value": value },
          el("span", { class: "facet-value" }, value), el("span", { class: "facet-count" }, count.toLocaleString()))));
    }
    const title = name === "language" && !page.languages_ready ? `${FACET_LABELS[name]} (detecting…)` : FACET_LABELS[name];
    aside.append(el("div", { class: "facet-group", id: `facet-${name}` }, el("h3", {}, title), list));
  }
}

function renderTable(page, params) {
  const table = document.getElementById("tasks");
  const sort = params.get("sort");
  const desc = params.get("desc") === "1";
  const head = el("tr");
  for (const [key, label] of COLUMNS) {
    const next = withParam(withParam(params, "sort", key), "desc", sort === key && !desc ? "1" : null);
    const arrow = sort === key ? (desc ? " ↓" : " ↑") : "";
    head.append(el("th", { class: `col-${key}` }, el("a", { href: tasksHash(next), "data-sort": key }, label + arrow)));
  }
  clear(table.tHead).append(head);
  const body = clear(table.tBodies[0]);
  for (const row of page.rows) {
    const open = () => { location.hash = `#/task/${Number(row.row)}`; };
    body.append(el("tr", { class: `status-${row.status}`, "data-row": row.row, onclick: open },
      el("td", {}, badge(row.status)),
      el("td", { class: "col-id" }, el("a", { href: `#/task/${Number(row.row)}` }, row.id)),
      el("td", { class: "col-instruction", title: row.instruction }, row.instruction),
      el("td", { title: row.method }, row.operation), el("td", {}, row.round),
      el("td", { class: "num" }, row.instances),
      el("td", { class: "col-reason", title: row.reason }, row.reason === "-" ? "" : `${row.stage}: ${row.reason}`),
      el("td", {}, row.mark === "-" ? "" : badge(row.mark, "mark"))));
  }
}

// -- a task ------------------------------------------------------------------------------------

function section(title, ...children) {
  return el("section", { class: "card" }, el("h3", {}, title), ...children);
}

function keyValues(pairs) {
  return el("table", { class: "kv" }, pairs.map(([key, value]) => el("tr", {}, el("th", {}, key), el("td", {}, value))));
}

function show(value) {
  if (value === null || value === undefined) return "";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

async function showTask(query) {
  let page;
  try {
    page = await getJSON(`/api/task?${query}`);
  } catch (error) {
    return showError(error);
  }
  const task = page.task || {};
  const record = page.record || {};
  const lineage = task.lineage || {};
  const view = el("div", { class: "task-main" }); // the task itself
  const side = el("div", { class: "task-side" }); // curation and where the task comes from
  side.append(curatePanel(page));

  if (page.status === "rejected") {
    view.append(section("Rejected",
      keyValues([["stage", record.stage || ""], ["reason", record.reason || ""], ["detail", record.detail || ""],
        ["duplicate of", page.duplicate_of ? taskLink(page.duplicate_of) : ""]]),
      record.raw ? [el("h4", {}, "raw teacher text"), textBlock(record.raw, "raw")] : []));
  }
  if (task.instruction !== undefined) view.append(section("Instruction", textBlock(task.instruction, "instruction")));
  if (task.system) view.append(section("System message", textBlock(task.system, "system")));
  const instances = task.instances || [];
  if (instances.length) {
    view.append(section(`Instances (${instances.length})${task.is_classification ? " · classification" : ""}`,
      instances.map((instance, number) => el("div", { class: "instance" },
        el("h4", {}, `#${number + 1}`),
        instance.input ? [el("div", { class: "label" }, "input"), textBlock(instance.input)] : [],
        el("div", { class: "label" }, "output"), textBlock(instance.output),
        instance.explanation ? [el("div", { class: "label" }, "explanation"), textBlock(instance.explanation)] : [],
        // a multi-turn conversation (Magpie): the exchanges after the first
        (instance.followups || []).map((turn, k) => el("div", { class: "followup" },
          el("div", { class: "label" }, `user, turn ${k + 2}`), textBlock(turn.user),
          el("div", { class: "label" }, `assistant, turn ${k + 2}`), textBlock(turn.assistant)))))));
  }
  if (task.tags && typeof task.tags === "object") {  // the judge's tags (Magpie): datagen filter keeps by them
    view.append(section("Tags", keyValues(Object.entries(task.tags).map(([key, value]) => [key, show(value)]))));
  }
  let lineageSection = null; // shown last on the side, after the chain and the neighbours
  if (Object.keys(lineage).length) {
    const pairs = Object.entries(lineage)
      .filter(([key]) => key !== "most_similar")
      .map(([key, value]) => [key, key === "parent_ids" ? el("span", { id: "parents" },
        page.parents.map((link, i) => [i ? ", " : "", taskLink(link)])) : show(value)]);
    lineageSection = section("Lineage", keyValues(pairs));
  }
  if (page.chain.length || page.children.length) {
    const chain = el("ol", { id: "chain", class: "chain" },
      page.chain.map((link) => el("li", {}, taskLink(link), " ", el("span", { class: "muted" }, link.operation || ""),
        link.instruction ? el("div", { class: "snippet" }, link.instruction) : [])),
      el("li", { class: "this" }, el("strong", {}, page.id), " ", el("span", { class: "muted" }, lineage.operation || ""),
        el("div", { class: "snippet" }, task.instruction || "")));
    const children = page.children.length
      ? el("ul", { id: "children" }, page.children.map((link) => el("li", {}, taskLink(link), " ",
        el("span", { class: "muted" }, link.operation || ""), el("div", { class: "snippet" }, link.instruction || ""))))
      : el("p", { class: "muted" }, "no children in this run");
    side.append(section("Evolution", el("h4", {}, "from the seed"), chain, el("h4", {}, "children"), children));
  }
  if (page.similar.length || page.stored_similar.length) {
    const rows = page.similar.map((item) => el("tr", {}, el("td", { class: "num" }, item.rouge_l.toFixed(3)),
      el("td", {}, taskLink(item)), el("td", {}, item.instruction)));
    side.append(section("Most similar instructions (ROUGE-L F1)",
      el("table", { id: "similar", class: "grid" }, el("tr", {}, el("th", {}, "ROUGE-L"), el("th", {}, "task"),
        el("th", {}, "instruction")), rows),
      page.stored_similar.length ? [el("h4", {}, "stored by Self-Instruct when the task was made"),
        el("table", { class: "grid" }, page.stored_similar.map((item) => el("tr", {},
          el("td", { class: "num" }, Number(item.rouge_l).toFixed(3)), el("td", {}, item.instruction))))] : []));
  }
  if (lineageSection) side.append(lineageSection);
  view.append(el("details", { class: "card" }, el("summary", {}, "the record as stored"),
    el("pre", { class: "text" }, JSON.stringify(record, null, 2))));
  clear(main()).append(el("div", { id: "task-view", class: "task" },
    el("div", { class: "task-head" }, el("a", { href: lastTasksHash, id: "back" }, "← Tasks"),
      el("h2", {}, badge(page.status), " ", el("span", { id: "task-id" }, page.id),
        el("span", { class: "muted where" }, ` ${page.file}:${page.line}`))),
    view, side));
  window.scrollTo(0, 0);
}

function curatePanel(page) {
  const current = el("span", { id: "mark-state" });
  const saved = el("span", { id: "mark-saved", class: "muted" });
  const note = el("input", { id: "note", type: "text", placeholder: "note (why)", value: page.mark ? page.mark.note : "" });
  const describe = (mark) => {
    clear(current).append(...(mark ? [badge(mark.decision, "mark"), mark.note ? ` ${mark.note}` : ""] : ["not marked"]));
  };
  describe(page.mark);
  const send = async (decision) => {
    try {
      const result = await getJSON("/api/mark", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ id: page.id, decision, note: note.value }),
      });
      describe(result.mark);
      saved.textContent = `saved to ${result.overrides}`;
    } catch (error) {
      saved.textContent = `not saved: ${error.message}`;
    }
  };
  return el("section", { class: "card curate" }, el("h3", {}, "Curate"),
    el("div", { class: "curate-row" }, current, note,
      el("button", { id: "mark-keep", type: "button", onclick: () => send("keep") }, "Keep"),
      el("button", { id: "mark-drop", type: "button", class: "danger", onclick: () => send("drop") }, "Drop"),
      el("button", { id: "mark-clear", type: "button", onclick: () => send("clear") }, "Clear")),
    saved);
}

// -- Run -----------------------------------------------------------------------------------

const SUMMARY_FIGURES = [
  ["method", "method"], ["tasks_total", "tasks"], ["tasks_produced", "new tasks"], ["requests_sent", "requests"],
  ["cache_hits", "cache hits"], ["retries", "retries"], ["failures", "failures"], ["parse_failures", "parse failures"],
  ["prompt_tokens", "prompt tokens"], ["completion_tokens", "completion tokens"], ["cost", "cost"],
  ["wall_seconds", "wall time (s)"],
];

async function showRun() {
  document.getElementById("nav-run").classList.add("active");
  let run;
  try {
    run = await getJSON("/api/run");
  } catch (error) {
    return showError(error);
  }
  const view = el("div", { id: "run-view", class: "run" });
  const unreadable = (item) => el("p", { class: "error" }, `${item.file}: ${item.error}`);

  view.append(section("Generation", run.summaries.length ? run.summaries.map((item) => item.error ? unreadable(item) :
    el("div", { class: "summary" }, el("h4", {}, item.file),
      keyValues(SUMMARY_FIGURES.filter(([key]) => key in item.data).map(([key, label]) => [label, show(item.data[key])])
        .concat(item.data.teacher ? [["teacher", `${item.data.teacher.backend}:${item.data.teacher.model}`]] : [])),
      reasonTable(item.data.rejects_by_reason || {}))) : el("p", { class: "muted" }, "no *.summary.json here")));

  view.append(section("Filter", run.stats.length ? run.stats.map((item) => item.error ? unreadable(item) :
    el("div", { class: "stats" }, el("h4", {}, item.file),
      el("p", {}, `kept ${item.data.kept} of ${item.data.in}, rejected ${item.data.rejected}` +
        (item.data.wall_seconds !== undefined ? ` (${item.data.wall_seconds} s)` : "")),
      el("table", { class: "grid" }, el("tr", {}, ["pass", "in", "out", "reasons"].map((h) => el("th", {}, h))),
        (item.data.passes || []).map((entry) => el("tr", {}, el("td", {}, entry.pass), el("td", { class: "num" }, entry.in),
          el("td", { class: "num" }, entry.out),
          el("td", {}, Object.entries(entry.reasons || {}).map(([reason, count]) => `${reason}: ${count}`).join("; ") || "-"))))))
    : el("p", { class: "muted" }, "no *.stats.json here")));

  view.append(section("Card plots", run.plots.length ? el("div", { class: "plots" }, run.plots.map((name) =>
    el("figure", {}, el("img", { src: `/files/${name.split("/").map(encodeURIComponent).join("/")}`, alt: name }),
      el("figcaption", {}, name)))) : el("p", { class: "muted" }, "no card/*.png here (datagen export writes them)")));

  view.append(section("Evaluation", run.reports.length ? run.reports.map((item) => item.error ? unreadable(item) :
    evalReport(item, run.sample_columns)) : el("p", { class: "muted" }, "no eval report.json here")));
  clear(main()).append(view);
}

function reasonTable(reasons) {
  const entries = Object.entries(reasons);
  if (!entries.length) return [];
  return el("table", { class: "grid" }, el("tr", {}, el("th", {}, "rejects"), el("th", {}, "reason")),
    entries.map(([reason, count]) => el("tr", {}, el("td", { class: "num" }, count), el("td", {}, reason))));
}

function evalReport(item, sampleColumns) {
  const report = item.data;
  const metrics = ["loss", "perplexity", "rouge_l"];
  const models = ["base", "tuned", "dpo"].filter((name) => report[name] && typeof report[name] === "object");
  // "teacher replies" only when the held-out tasks' lineage says so; reports older than that field keep "teacher"
  const reference = report.reference && report.reference.label ? report.reference.label : null;
  const heldOut = report.data !== null && report.data !== undefined;
  return el("div", { class: "report" }, el("h4", {}, item.file),
    heldOut ? el("table", { class: "grid" }, el("tr", {}, el("th", {}, "metric"), models.map((name) => el("th", {}, name))),
      metrics.map((metric) => el("tr", {}, el("td", {}, metric),
        models.map((name) => el("td", { class: "num" }, show(report[name][metric])))))) : [],
    report.judge ? el("p", {}, `judged win rate of tuned over base: ${show(report.judge.win_rate)}`) : [],
    (report.benchmarks || []).length ? benchmarkTable(report.benchmarks) : [],
    sampleTable(report.samples || [], sampleColumns.map(([key, label]) =>
      [key, key === "reference" && reference ? reference : label]), "samples"),
    (report.benchmarks || []).filter((entry) => (entry.samples || []).length).map((entry) => [
      el("h5", {}, `${entry.name}: samples`),
      sampleTable(entry.samples, sampleColumns.map(([key, label]) => [key, key === "reference" ? "reference" : label]))]));
}

function sampleTable(samples, sampleColumns, id) {
  if (!samples.length) return [];
  const known = new Set(sampleColumns.map(([key]) => key));
  const extra = [...new Set(samples.flatMap((sample) => Object.keys(sample)))]
    .filter((key) => !known.has(key) && samples.some((sample) => typeof sample[key] === "string"));
  const columns = sampleColumns.concat(extra.map((key) => [key, key]));
  return el("table", id ? { class: "grid samples", id } : { class: "grid samples" },
    el("tr", {}, columns.map(([, label]) => el("th", {}, label))),
    samples.map((sample) => el("tr", {}, columns.map(([key]) => el("td", {}, textBlock(sample[key]))))));
}

function benchmarkTable(entries) {
  return [
    el("table", { class: "grid benchmarks" },
      el("tr", {}, ["benchmark", "metric", "base", "tuned"].map((name) => el("th", {}, name))),
      entries.flatMap((entry) => (entry.metrics || []).map((row) => el("tr", {},
        el("td", { title: `${entry.title}; ${entry.source || ""}` }, entry.name), el("td", {}, row.label || row.metric),
        el("td", { class: "num" }, show(row.base)), el("td", { class: "num" }, show(row.tuned)))))),
    entries.flatMap((entry) => (entry.warnings || []).map((warning) =>
      el("p", { class: "warning" }, `${entry.name}: ${warning}`))),
  ];
}
