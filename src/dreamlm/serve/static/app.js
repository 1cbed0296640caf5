// dreamlm playground: plain JavaScript, no build step, talks only to the server that serves it.
"use strict";

const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.authorization = "Bearer " + key;
  return h;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function errorText(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  if (resp.status === 503) return `The server is busy (${message}). Try again in a moment.`;
  if (resp.status === 401) return "The server needs an API key: enter it at the bottom of the page.";
  return message;
}

// Server-sent events from a fetch response: yields {event, data}.
async function* events(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = null;
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      yield { event, data: data.join("\n") };
    }
  }
}

// ---- tabs ----------------------------------------------------------------------------------------------------
const TABS = ["text", "infill", "puzzle"];

function selectTab(name, focus) {
  for (const t of TABS) {
    const tab = $("tab-" + t);
    tab.setAttribute("aria-selected", String(t === name));
    tab.tabIndex = t === name ? 0 : -1;
    $("panel-" + t).hidden = t !== name;
  }
  if (focus) $("tab-" + name).focus();
}

for (const t of TABS) {
  $("tab-" + t).addEventListener("click", () => selectTab(t, false));
  $("tab-" + t).addEventListener("keydown", (e) => {
    const i = TABS.indexOf(t);
    if (e.key === "ArrowRight") selectTab(TABS[(i + 1) % TABS.length], true);
    if (e.key === "ArrowLeft") selectTab(TABS[(i + TABS.length - 1) % TABS.length], true);
  });
}

// ---- models --------------------------------------------------------------------------------------------------
async function loadModels() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { showError(await errorText(resp)); return; }
    const names = (await resp.json()).data.map((m) => m.id);
    // the bundled text model first (the default of the CLI), then the random-weight fixture, then the rest
    const rank = (n) => (n === "stdlib-code" ? 0 : n === "tiny-dream" ? 1 : 2);
    names.sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
    for (const select of document.querySelectorAll(".model-select")) {
      select.textContent = "";
      for (const name of names) select.add(new Option(name, name));
    }
  } catch (e) {
    showError("Could not reach the server: " + e.message);
  }
}

// ---- the canvas ----------------------------------------------------------------------------------------------
const isSpecial = (t) => /^<\|.*\|>$/.test(t);

function drawCanvas(el, frame) {
  const row = frame.rows[0];
  const committed = new Set(row.committed);
  const inAnswer = (i) => frame.spans
    ? frame.spans.some(([a, b]) => i >= a && i < b)
    : i >= frame.answer[0] && i < frame.answer[1];
  el.textContent = "";
  row.tokens.forEach((t, i) => {
    const span = document.createElement("span");
    span.className = "tok";
    if (t === null) {
      span.classList.add("mask");
      span.title = "masked";
    } else {
      span.textContent = t;
      if (isSpecial(t)) span.classList.add("special");
      if (committed.has(i)) span.classList.add("new");
    }
    if (!inAnswer(i)) span.classList.add("prompt");
    else if (frame.spans) span.classList.add("span");
    el.appendChild(span);
  });
}

// An error leaves no stale run on screen: empty canvas, counters at 0, nothing to scrub.
function resetCanvas(prefix) {
  $(prefix + "-canvas").textContent = "";
  for (const id of ["-step", "-passes", "-rate", "-length"]) if ($(prefix + id)) $(prefix + id).textContent = "0";
  const scrub = $(prefix + "-scrub");
  scrub.max = "0";
  scrub.value = "0";
  scrub.disabled = true;
  scrub.oninput = null;
}

function failCanvas(prefix, message) {
  showError(message);
  resetCanvas(prefix);
  $(prefix + "-state").textContent = "error";
}

// Run a streamed completion with per-step frames; draw each; afterwards the slider scrubs through them.
async function runCanvas(prefix, body) {
  clearError();
  const go = $(prefix + "-go");
  const canvas = $(prefix + "-canvas");
  const scrub = $(prefix + "-scrub");
  const stateEl = $(prefix + "-state");
  const frames = [];
  go.disabled = true;
  scrub.disabled = true;
  stateEl.textContent = "running";
  const started = performance.now();
  try {
    const resp = await fetch("/v1/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ ...body, stream: true, stream_steps: true }),
    });
    if (!resp.ok) { failCanvas(prefix, await errorText(resp)); return; }
    for await (const ev of events(resp)) {
      if (ev.data === "[DONE]") break;
      const data = JSON.parse(ev.data);
      if (data.error) { failCanvas(prefix, data.error.message); return; }
      if (ev.event !== "dreamlm.step") continue;
      frames.push(data);
      drawCanvas(canvas, data);
      $(prefix + "-step").textContent = data.step;
      if ($(prefix + "-length")) $(prefix + "-length").textContent = data.rows[0].tokens.length;
      if ($(prefix + "-passes")) $(prefix + "-passes").textContent = data.passes;
      if ($(prefix + "-rate")) {
        const row = data.rows[0];
        const filled = row.tokens.slice(data.answer[0], data.answer[1]).filter((t) => t !== null).length;
        $(prefix + "-rate").textContent = (filled / ((performance.now() - started) / 1000)).toFixed(0);
      }
    }
    stateEl.textContent = frames.length ? "done" : "nothing to do";
    scrub.max = String(Math.max(frames.length - 1, 0));
    scrub.value = scrub.max;
    scrub.disabled = frames.length < 2;
    scrub.oninput = () => {
      const f = frames[Number(scrub.value)];
      drawCanvas(canvas, f);
      $(prefix + "-step").textContent = f.step;
      if ($(prefix + "-length")) $(prefix + "-length").textContent = f.rows[0].tokens.length;
    };
  } catch (e) {
    failCanvas(prefix, "Could not reach the server: " + e.message);
  } finally {
    go.disabled = false;
  }
}

const numberOrNull = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));

$("text-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const body = {
    model: $("text-model").value, prompt: $("text-prompt").value, max_tokens: Number($("text-max").value),
    temperature: Number($("text-temp").value), alg: $("text-alg").value, seed: 0,
  };
  for (const [key, id] of [["steps", "text-steps"], ["threshold", "text-threshold"], ["block_length", "text-block"]]) {
    const v = numberOrNull(id);
    if (v !== null) body[key] = v;
  }
  runCanvas("text", body);
});

$("infill-mark").addEventListener("click", () => {
  const area = $("infill-template");
  const { selectionStart: a, selectionEnd: b, value } = area;
  const n = Math.max(1, Number($("infill-span").value) || 1);
  area.value = value.slice(0, a) + ($("infill-auto").checked ? `<|mask:auto:${n}|>` : `<|mask:${n}|>`) + value.slice(b);
  area.focus();
});

$("infill-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const template = $("infill-template").value;
  const body = { model: $("infill-model").value, prompt: template, alg: $("infill-alg").value, seed: 0 };
  if ($("infill-auto").checked) {
    // automatic length: the text before the one span is the prompt, the text after it the suffix (no max_tokens)
    const spans = template.match(/<\|mask(:[^|]*)?\|>/g) || [];
    if (spans.length !== 1) {
      failCanvas("infill", `Automatic length fills exactly one span; this text has ${spans.length}.`);
      return;
    }
    const at = template.indexOf(spans[0]);
    body.prompt = template.slice(0, at);
    body.suffix = template.slice(at + spans[0].length);
  }
  runCanvas("infill", body);
});

// ---- puzzles -------------------------------------------------------------------------------------------------
const isSudoku = () => $("puzzle-task").value.startsWith("sudoku4");

function buildSudokuEditor() {
  const editor = $("sudoku-editor");
  editor.textContent = "";
  for (let i = 0; i < 16; i++) {
    const input = document.createElement("input");
    input.maxLength = 1;
    input.inputMode = "numeric";
    input.setAttribute("aria-label", `row ${Math.floor(i / 4) + 1}, column ${(i % 4) + 1}`);
    input.addEventListener("input", () => {
      input.value = input.value.replace(/[^0-4]/g, "");
      syncFromEditor();
    });
    editor.appendChild(input);
  }
}

function syncFromEditor() {
  puzzleVersion++;
  const cells = [...$("sudoku-editor").querySelectorAll("input")].map((i) => i.value || "0");
  $("puzzle-text").value = [0, 1, 2, 3].map((r) => cells.slice(4 * r, 4 * r + 4).join("")).join("\n");
}

function syncToEditor() {
  const digits = $("puzzle-text").value.replace(/[^0-9]/g, "");
  [...$("sudoku-editor").querySelectorAll("input")].forEach((input, i) => {
    input.value = digits[i] && digits[i] !== "0" ? digits[i] : "";
  });
}

function taskChanged() {
  $("sudoku-editor").hidden = !isSudoku();
  for (const kind of ["diffusion", "ar"]) {
    const board = $("board-" + kind);
    board.querySelector(".view").textContent = "";
    board.querySelector(".answer").textContent = "";
    board.querySelector(".verdict").textContent = "";
  }
}

// Bumped by every edit of the puzzle and every random draw: a draw that comes back after the user typed a
// puzzle (or after a later draw) is dropped, so it never overwrites what the user is about to solve.
let puzzleVersion = 0;

async function randomPuzzle() {
  clearError();
  const mine = ++puzzleVersion;
  try {
    const resp = await fetch("/playground/puzzle?task=" + encodeURIComponent($("puzzle-task").value));
    if (!resp.ok) { showError(await errorText(resp)); return; }
    const puzzle = (await resp.json()).puzzle;
    if (mine !== puzzleVersion) return;
    $("puzzle-text").value = puzzle;
    syncToEditor();
    taskChanged();
  } catch (e) {
    showError("Could not reach the server: " + e.message);
  }
}

async function loadTasks() {
  try {
    const resp = await fetch("/playground/tasks");
    const tasks = (await resp.json()).tasks;
    const select = $("puzzle-task");
    for (const t of tasks) select.add(new Option(t, t));
    taskChanged();
    if (tasks.length) await randomPuzzle();
  } catch (e) {
    showError("Could not load the puzzle tasks: " + e.message);
  }
}

function drawSudoku(view, puzzle, tokens, before) {
  const clues = puzzle.replace(/[^0-9]/g, "");
  const grid = document.createElement("div");
  grid.className = "grid";
  grid.setAttribute("role", "img");
  for (let r = 0; r < 4; r++) {
    for (let c = 0; c < 4; c++) {
      const p = 5 * r + c; // answer layout: 4 digits and a newline per row
      const cell = document.createElement("div");
      cell.className = "cell";
      const t = tokens[p];
      if (t === null || t === undefined) cell.classList.add("mask");
      else {
        cell.textContent = t;
        if (before && (before[p] === null || before[p] === undefined)) cell.classList.add("new");
      }
      if (clues[4 * r + c] && clues[4 * r + c] !== "0") cell.classList.add("clue");
      grid.appendChild(cell);
    }
  }
  view.textContent = "";
  view.appendChild(grid);
  grid.setAttribute("aria-label", [...grid.children].map((c) => c.textContent || "blank").join(" "));
}

function parseStar(puzzle) {
  const m = puzzle.trim().match(/^(.*)\/(\d+),(\d+)=$/s);
  if (!m) return null;
  const edges = m[1].split("|").map((e) => e.split(",").map(Number));
  return { edges, start: Number(m[2]), goal: Number(m[3]) };
}

function drawStar(view, puzzle, path) {
  const g = parseStar(puzzle);
  view.textContent = "";
  if (!g) return;
  const children = new Map();
  for (const [a, b] of g.edges) {
    if (!children.has(a)) children.set(a, []);
    children.get(a).push(b);
  }
  const pos = new Map([[g.start, [150, 150]]]);
  const arms = children.get(g.start) || [];
  arms.forEach((first, k) => {
    const angle = (2 * Math.PI * k) / arms.length;
    let node = first;
    let depth = 1;
    while (node !== undefined && depth < 40) {
      const radius = Math.min(130, 26 * depth);
      pos.set(node, [150 + radius * Math.cos(angle), 150 + radius * Math.sin(angle)]);
      node = (children.get(node) || [])[0];
      depth += 1;
    }
  });
  const onPath = new Set(path);
  const pathEdges = new Set(path.slice(1).map((n, i) => `${path[i]},${n}`));
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 300 300");
  svg.setAttribute("width", "100%");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `star graph from ${g.start} to ${g.goal}` + (path.length ? `, path ${path.join(" ")}` : ""));
  for (const [a, b] of g.edges) {
    if (!pos.has(a) || !pos.has(b)) continue;
    const line = document.createElementNS(ns, "line");
    const [x1, y1] = pos.get(a);
    const [x2, y2] = pos.get(b);
    Object.entries({ x1, y1, x2, y2 }).forEach(([k, v]) => line.setAttribute(k, v));
    const hot = pathEdges.has(`${a},${b}`);
    line.setAttribute("stroke", hot ? "#2da44e" : "#b8b8c0");
    line.setAttribute("stroke-width", hot ? "4" : "2");
    svg.appendChild(line);
  }
  for (const [node, [x, y]] of pos) {
    const circle = document.createElementNS(ns, "circle");
    circle.setAttribute("cx", x);
    circle.setAttribute("cy", y);
    circle.setAttribute("r", "11");
    const special = node === g.start || node === g.goal;
    circle.setAttribute("fill", onPath.has(node) ? "#dafbe1" : special ? "#ddf4ff" : "white");
    circle.setAttribute("stroke", special ? "#1f6feb" : "#6b6b70");
    svg.appendChild(circle);
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", x);
    label.setAttribute("y", y + 3);
    label.setAttribute("text-anchor", "middle");
    label.textContent = String(node);
    svg.appendChild(label);
  }
  view.appendChild(svg);
}

const answerText = (tokens) => {
  const out = [];
  for (const t of tokens) {
    if (t !== null && isSpecial(t)) break;
    out.push(t === null ? "\u2592" : t);
  }
  return out.join("");
};

// An error leaves no half-solved board or stale answer beside it.
function clearBoard(kind) {
  const board = $("board-" + kind);
  board.querySelector(".view").textContent = "";
  board.querySelector(".answer").textContent = "";
}

async function solveWith(kind, task, puzzle) {
  const board = $("board-" + kind);
  const view = board.querySelector(".view");
  const answer = board.querySelector(".answer");
  const verdict = board.querySelector(".verdict");
  verdict.textContent = "";
  verdict.className = "verdict";
  let before = null;
  const resp = await fetch("/playground/solve", {
    method: "POST", headers: headers(), body: JSON.stringify({ kind: task, puzzle, solver: kind }),
  });
  const fail = (message) => { showError(message); clearBoard(kind); };
  if (!resp.ok) { fail(await errorText(resp)); return; }
  for await (const ev of events(resp)) {
    if (ev.data === "[DONE]") break;
    const data = JSON.parse(ev.data);
    if (data.type === "error" || data.error) { fail(data.message || data.error.message); return; }
    if (data.type === "step") {
      if (isSudoku()) drawSudoku(view, puzzle, data.tokens, before);
      else if (!view.firstChild) drawStar(view, puzzle, []);
      answer.textContent = answerText(data.tokens);
      before = data.tokens;
      answer.title = "live: names as the model reads them";
    } else if (data.type === "done") {
      answer.textContent = data.answer;  // in the puzzle's own names (live frames show the model's view)
      if (!isSudoku()) drawStar(view, puzzle, data.answer.split(",").map(Number));
      verdict.textContent = (data.valid ? "valid by the rules" : "breaks the rules")
        + ` · ${data.passes} forward passes · ${data.ms} ms`;
      verdict.classList.add(data.valid ? "ok" : "bad");
    }
  }
}

$("puzzle-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  clearError();
  const go = $("puzzle-go");
  go.disabled = true;
  const task = $("puzzle-task").value;
  const puzzle = $("puzzle-text").value;
  try {
    await Promise.all([solveWith("diffusion", task, puzzle), solveWith("ar", task, puzzle)]);
  } catch (err) {
    showError("Could not reach the server: " + err.message);
    clearBoard("diffusion");
    clearBoard("ar");
  } finally {
    go.disabled = false;
  }
});

$("puzzle-random").addEventListener("click", randomPuzzle);
$("puzzle-task").addEventListener("change", () => { taskChanged(); randomPuzzle(); });
$("puzzle-text").addEventListener("input", () => { puzzleVersion++; syncToEditor(); });

buildSudokuEditor();
loadModels();
loadTasks();
