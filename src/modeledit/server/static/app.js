// The modeledit page: ask the model, make an edit, see before/after, revert any edit from the history.
// Plain DOM, no build step; user text is only ever set with textContent.
"use strict";

const TOKEN_KEY = "modeledit-token";
const $ = (id) => document.getElementById(id);
let pending = 0;

function busy(delta) {
  pending += delta;
  document.body.dataset.busy = pending > 0 ? "1" : "0";
}

function status(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  busy(+1);
  try {
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
    return data;
  } finally {
    busy(-1);
  }
}

function showTokenState() {
  $("token-state").textContent = localStorage.getItem(TOKEN_KEY) ? "token saved" : "no token";
}

async function ask() {
  const prompt = $("prompt").value;
  if (!prompt.trim()) return;
  const maxNewTokens = parseInt($("max-tokens").value, 10) || 12;
  try {
    const chat = $("ask-chat").checked;
    const out = await api("POST", "/v1/generate", { prompt, max_new_tokens: maxNewTokens, chat });
    $("answer").textContent = out.text;
    $("answer").dataset.prompt = prompt;
  } catch (err) {
    status(err.message, true);
  }
}

function fmt(p) {
  return typeof p === "number" ? p.toFixed(3) : "";
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function editText(entry) {
  const r = (entry.requests || [])[0] || {};
  const prompt = String(r.prompt || "");
  const text = prompt.includes("{}") ? prompt.replace("{}", r.subject || "") : prompt;
  return `${text} → ${r.target_new || ""}`;
}

async function loadHistory() {
  let entries, health;
  try {
    [entries, health] = await Promise.all([api("GET", "/v1/edits"), api("GET", "/healthz")]);
  } catch (err) {
    status(err.message, true);
    return;
  }
  $("model-info").textContent = `${health.model} · ${health.applied_edits} edits applied`;
  for (const el of document.querySelectorAll(".chat-only")) el.hidden = !health.chat;
  const body = $("history").querySelector("tbody");
  body.replaceChildren();
  for (const entry of entries.slice().reverse()) {
    const row = document.createElement("tr");
    row.className = entry.state;
    row.dataset.id = entry.id;
    cell(row, entry.id);
    cell(row, (entry.created_at || "").replace("T", " ").slice(0, 19));
    cell(row, entry.method);
    cell(row, editText(entry));
    const m = ((entry.metrics || {}).requests || [])[0] || {};
    cell(row, m.p_new_before === undefined ? "" : `${fmt(m.p_new_before)} → ${fmt(m.p_new_after)}`);
    const holds = (entry.metrics || {}).holds;
    const verdict = cell(row, holds === undefined ? "" : holds ? "yes" : "NO");
    verdict.className = holds === undefined ? "" : holds ? "holds" : "fails";
    cell(row, entry.state).className = "state";
    const actions = cell(row, "");
    if (entry.state === "applied") {
      const button = document.createElement("button");
      button.className = "revert";
      button.dataset.id = entry.id;
      button.textContent = "Revert";
      button.addEventListener("click", () => revert(entry.id));
      actions.appendChild(button);
    }
    body.appendChild(row);
  }
}

async function makeEdit() {
  let hparams = {};
  const text = $("edit-hparams").value.trim();
  if (text) {
    try {
      hparams = JSON.parse(text);
    } catch (err) {
      status("settings must be a JSON object, e.g. {\"steps\": 25}", true);
      return;
    }
  }
  const paraphrase = $("edit-paraphrase").value.trim();
  const body = {
    method: $("edit-method").value,
    prompt: $("edit-prompt").value,
    subject: $("edit-subject").value || null,
    target_new: $("edit-target").value,
    target_true: $("edit-old").value || null,
    paraphrase_prompts: paraphrase ? [paraphrase] : [],
    chat: $("edit-chat").checked,
    hparams,
  };
  status("computing the edit…");
  $("edit-submit").disabled = true;
  try {
    const entry = await api("POST", "/v1/edits", body);
    const m = ((entry.metrics || {}).requests || [])[0] || {};
    $("answer-before").textContent = m.answer_before || "";
    $("answer-after").textContent = m.answer_after || "";
    $("p-before").textContent = fmt(m.p_new_before);
    $("p-after").textContent = fmt(m.p_new_after);
    $("edit-result").hidden = false;
    showVerdict(entry);
    status(`edit ${entry.id} applied`);
    await Promise.all([loadHistory(), ask()]);
  } catch (err) {
    status(err.message, true);
  } finally {
    $("edit-submit").disabled = false;
  }
}

// The check in generation: the edit holds (green) or not (red), and each checked prompt's answer.
function showVerdict(entry) {
  const checks = (entry.metrics || {}).verify;
  const verdict = $("edit-verdict");
  const body = $("edit-checks").querySelector("tbody");
  body.replaceChildren();
  verdict.hidden = $("edit-checks").hidden = !checks;
  if (!checks) return;
  const failed = checks.prompts.find((p) => p.kind === "edit" && !p.holds);
  verdict.textContent = failed
    ? `The edit does NOT hold: the model answers "${failed.answer}"`
    : "The edit holds: the model answers with the new answer.";
  verdict.className = failed ? "fails" : "holds";
  for (const p of checks.prompts) {
    const row = document.createElement("tr");
    cell(row, p.kind);
    cell(row, p.prompt);
    cell(row, p.answer);
    cell(row, p.holds ? "yes" : "no").className = p.holds ? "holds" : "fails";
    body.appendChild(row);
  }
}

async function revert(id) {
  try {
    await api("DELETE", `/v1/edits/${encodeURIComponent(id)}`);
    status(`edit ${id} reverted`);
    await Promise.all([loadHistory(), ask()]);
  } catch (err) {
    status(err.message, true);
  }
}

async function init() {
  busy(0);
  showTokenState();
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("token").value.trim();
    if (value) localStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    showTokenState();
  });
  $("forget-token").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    showTokenState();
  });
  $("ask-form").addEventListener("submit", (e) => {
    e.preventDefault();
    ask();
  });
  $("edit-form").addEventListener("submit", (e) => {
    e.preventDefault();
    makeEdit();
  });
  try {
    const methods = await api("GET", "/v1/methods");
    const select = $("edit-method");
    for (const name of methods.methods) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      option.selected = name === methods.default;
      select.appendChild(option);
    }
  } catch (err) {
    status(err.message, true);
  }
  await loadHistory();
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", init);
