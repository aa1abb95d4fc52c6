// The annotation page. It fetches this annotator's items as JSON from under its own link (every
// URL here is relative) and writes every text with textContent, so whatever a response contains
// is shown as text, never read as HTML. It moves on only after the server says the vote is stored.
"use strict";

const CHOICE_KEYS = { "1": "1", "2": "2", "3": "draw", "d": "draw" };

let text = {};
let total = 0;
let current = null; // the item on screen, or null on the closing screen
let busy = false; // a request is under way: further clicks and keys wait for it

function byId(id) {
  return document.getElementById(id);
}

function setText(id, value) {
  byId(id).textContent = value;
}

function format(template, values) {
  return template.replace(/\{(\w+)\}/g, (_, key) => String(values[key]));
}

async function request(path, options = {}) {
  const response = await fetch(path, { ...options, cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    throw new Error((body && body.error) || `HTTP ${response.status}`);
  }
  return body;
}

function setMessage(message, isError = false) {
  const element = byId("message");
  element.textContent = message;
  element.classList.toggle("error", isError);
}

function setBusy(value) {
  busy = value;
  for (const button of document.querySelectorAll("button")) {
    button.disabled = value;
  }
  if (!value && current) {
    byId("previous").disabled = current.position <= 1;
    byId("next").disabled = current.position >= total;
  }
  document.body.dataset.busy = String(value);
}

function showProgress(done, all) {
  total = all;
  setText("progress", `${done} / ${all}`);
}

function choiceLabel(choice) {
  return { "1": text.response_1, "2": text.response_2, draw: text.choose_draw }[choice];
}

function fillList(id, entries, render) {
  const list = byId(id);
  list.replaceChildren();
  for (const entry of entries) {
    const item = document.createElement("li");
    render(item, entry);
    list.append(item);
  }
}

function showItem(item) {
  current = item;
  byId("item").hidden = false;
  byId("done").hidden = true;
  setText("position", format(text.item, { position: item.position, total }));
  fillList("persona", item.persona, (li, line) => {
    li.textContent = line;
  });
  if (item.history.length) {
    fillList("history", item.history, (li, turn) => {
      const speaker = document.createElement("span");
      speaker.className = "speaker";
      speaker.textContent = `${turn.speaker}:`;
      li.append(speaker, document.createTextNode(turn.text));
    });
  } else {
    fillList("history", [text.empty_history], (li, line) => {
      li.className = "empty";
      li.textContent = line;
    });
  }
  setText("response-1", item.response_1);
  setText("response-2", item.response_2);
  for (const button of document.querySelectorAll(".choices button")) {
    button.classList.toggle("chosen", button.dataset.choice === item.choice);
  }
  setMessage(item.choice ? format(text.voted, { choice: choiceLabel(item.choice) }) : "");
  document.body.dataset.position = String(item.position);
  document.body.dataset.view = "item";
}

function showDone() {
  current = null;
  byId("item").hidden = true;
  byId("done").hidden = false;
  setText("position", "");
  document.body.dataset.position = "";
  document.body.dataset.view = "done";
}

async function open(position) {
  setBusy(true);
  try {
    const item = await request(`api/items/${position}`);
    showProgress(item.done, item.total);
    showItem(item);
  } catch (error) {
    setMessage(error.message, true);
  } finally {
    setBusy(false);
  }
}

async function choose(choice) {
  if (busy || !current) {
    return;
  }
  setBusy(true);
  setMessage(text.saving);
  let result;
  try {
    result = await request(`api/items/${current.position}/vote`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ choice }),
    });
  } catch (error) {
    setMessage(format(text.failed, { error: error.message }), true);
    setBusy(false);
    return;
  }
  showProgress(result.done, result.total);
  setBusy(false);
  if (result.next === null) {
    showDone();
  } else {
    await open(result.next);
  }
}

function step(delta) {
  if (busy) {
    return;
  }
  const from = current ? current.position : total + 1;
  const target = from + delta;
  if (target >= 1 && target <= total) {
    open(target);
  }
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) {
    return;
  }
  const choice = CHOICE_KEYS[event.key.toLowerCase()];
  if (choice) {
    event.preventDefault();
    choose(choice);
  } else if (event.key === "ArrowLeft") {
    event.preventDefault();
    step(-1);
  } else if (event.key === "ArrowRight") {
    event.preventDefault();
    step(1);
  }
}

async function start() {
  const state = await request("api/state");
  text = state.text;
  document.documentElement.lang = state.language;
  document.title = text.title;
  const labels = {
    title: text.title, "instructions-title": text.instructions_title, instructions: text.instructions,
    "persona-title": text.persona, "history-title": text.history, "response-1-title": text.response_1,
    "response-2-title": text.response_2, "choose-1": text.choose_1, "choose-2": text.choose_2,
    "choose-draw": text.choose_draw, previous: text.previous, next: text.next, keys: text.keys,
    "done-text": text.done, back: text.previous, annotator: state.annotator,
  };
  for (const [id, label] of Object.entries(labels)) {
    setText(id, label);
  }
  for (const button of document.querySelectorAll(".choices button")) {
    button.addEventListener("click", () => choose(button.dataset.choice));
  }
  byId("previous").addEventListener("click", () => step(-1));
  byId("next").addEventListener("click", () => step(1));
  byId("back").addEventListener("click", () => step(-1));
  document.addEventListener("keydown", onKey);
  showProgress(state.done, state.total);
  if (state.next === null) {
    showDone();
  } else {
    await open(state.next);
  }
}

start().catch((error) => {
  document.body.textContent = error.message;
});
