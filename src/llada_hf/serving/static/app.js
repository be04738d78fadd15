// The llada-hf chat page: streams /v1/chat/completions with `drafts: true` and draws every denoising step.
// Masked positions are drawn as ░; tokens committed by the latest step are highlighted, so the answer is seen
// being decided out of order. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, messages: [], busy: false, images: null, attached: [] };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim() || localStorage.getItem("llada-api-key") || "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadInfo() {
  try {
    const info = await (await fetch("/health")).json();
    state.model = info.model;
    $("model").textContent = info.model;
    $("status").textContent = info.status;
    $("status").className = "status " + (info.status === "ok" ? "ok" : "bad");
    if (info.auth) {
      $("key-row").hidden = false;
      $("api_key").value = localStorage.getItem("llada-api-key") || "";
    }
    const d = info.defaults || {};
    for (const name of ["max_tokens", "steps", "block_length", "confidence_threshold", "temperature"]) {
      if (d[name] !== null && d[name] !== undefined) $(name).value = d[name];
    }
    if (d.kv_cache) $("kv_cache").value = d.kv_cache;
    state.images = info.images;  // the image limits of a LLaDA-V server; null for a text model
    $("image-row").hidden = !info.images;
  } catch (error) {
    $("status").textContent = "unreachable";
    $("status").className = "status bad";
  }
}

function thumbnail(url) {
  const img = document.createElement("img");
  img.className = "thumb";
  img.src = url;
  return img;
}

function addMessage(role, text, images = []) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  for (const url of images) div.appendChild(thumbnail(url));
  if (text !== undefined) div.appendChild(document.createTextNode(text));
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function requestBody() {
  const body = {
    model: state.model, messages: state.messages, stream: true, drafts: true,
    stream_options: { include_usage: true },
    max_tokens: number("max_tokens"), steps: number("steps"), block_length: number("block_length"),
    confidence_threshold: number("confidence_threshold"), temperature: number("temperature"),
    remasking: $("remasking").value,
  };
  if ($("kv_cache").value) body.kv_cache = $("kv_cache").value;
  for (const name of Object.keys(body)) if (body[name] === undefined) delete body[name];
  return body;
}

// One draft frame: the whole canvas; null for a masked position; positions from the first committed end token
// on are not part of the answer (drawn dimmed, the end token as ∎).
function drawDraft(canvas, draft, previous) {
  canvas.textContent = "";
  draft.tokens.forEach((piece, i) => {
    const span = document.createElement("span");
    const after = draft.end_at !== null && i >= draft.end_at;
    if (piece === null) {
      span.className = "mask" + (after ? " after" : "");
      span.textContent = "░";
    } else {
      const fresh = previous[i] === null || previous[i] === undefined;
      span.className = "tok" + (fresh ? " new" : "") + (after ? " after" : "");
      span.textContent = i === draft.end_at ? "∎" : piece;
    }
    canvas.appendChild(span);
  });
}

// Server-sent events from a fetch body: yields {event, data}.
async function* events(response) {
  const reader = response.body.getReader();
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
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

// Attached images travel as data: URLs in OpenAI `image_url` parts, before the text (LLaDA-V's prompt order).
function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function showAttachments(note) {
  const box = $("attachments");
  box.textContent = "";
  for (const url of state.attached) box.appendChild(thumbnail(url));
  if (note) {
    const span = document.createElement("span");
    span.className = "note";
    span.textContent = note;
    box.appendChild(span);
  }
  box.hidden = !state.attached.length && !note;
}

async function attach(files) {
  const limits = state.images;
  let note = "";
  for (const file of files) {
    if (state.attached.length >= limits.max_images) { note = `at most ${limits.max_images} images`; break; }
    if (file.size > limits.max_bytes) { note = `${file.name} is over ${limits.max_bytes} bytes`; continue; }
    state.attached.push(await readAsDataUrl(file));
  }
  showAttachments(note);
}

function userContent(text, images) {
  if (!images.length) return text;
  return [...images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }];
}

async function send(text) {
  state.busy = true;
  $("send").disabled = true;
  const images = state.attached;
  state.attached = [];
  showAttachments();
  state.messages.push({ role: "user", content: userContent(text, images) });
  addMessage("user", text, images);
  const bubble = addMessage("assistant");
  bubble.dataset.frames = "0";
  bubble.dataset.state = "denoising";
  const canvas = document.createElement("div");
  canvas.className = "canvas";
  const stats = document.createElement("div");
  stats.className = "stats";
  bubble.append(canvas, stats);
  let answer = "";
  let previous = [];
  let lastDraft = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()),
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || response.statusText);
    }
    if ($("api_key").value.trim()) localStorage.setItem("llada-api-key", $("api_key").value.trim());
    for await (const { event, data } of events(response)) {
      if (data === "[DONE]") break;
      const payload = JSON.parse(data);
      if (payload.error) throw new Error(payload.error.message);
      if (event === "draft") {
        drawDraft(canvas, payload, previous);
        previous = payload.tokens;
        lastDraft = payload;
        bubble.dataset.frames = String(Number(bubble.dataset.frames) + 1);
        stats.textContent = `step ${payload.step} · ${payload.committed} tokens final`;
        continue;
      }
      for (const choice of payload.choices || []) {
        if (choice.delta && choice.delta.content) answer += choice.delta.content;
      }
      if (payload.usage) {
        const u = payload.usage;
        stats.textContent = `NFE ${u.nfe} · ${u.completion_tokens} tokens · ` +
          `${u.tokens_per_second === null ? "–" : u.tokens_per_second.toFixed(1)} tok/s · ${u.elapsed_seconds.toFixed(2)} s`;
        bubble.dataset.nfe = String(u.nfe);
        bubble.dataset.tokensPerSecond = String(u.tokens_per_second);
      }
    }
    canvas.remove();
    const final = document.createElement("div");
    final.className = "text";
    final.textContent = answer;
    bubble.insertBefore(final, stats);
    if (lastDraft) bubble.dataset.lastDraft = JSON.stringify(lastDraft.tokens);
    bubble.dataset.state = "done";
    state.messages.push({ role: "assistant", content: answer });
  } catch (error) {
    bubble.className = "msg error";
    bubble.dataset.state = "error";
    bubble.textContent = "Error: " + error.message;
    state.messages.pop();
  } finally {
    state.busy = false;
    $("send").disabled = false;
    bubble.scrollIntoView({ block: "end" });
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.busy) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("clear").addEventListener("click", () => {
  state.messages = [];
  state.attached = [];
  showAttachments();
  $("messages").textContent = "";
});
$("image").addEventListener("change", async (event) => {
  await attach([...event.target.files]);
  event.target.value = "";  // the same file may be picked again
});
loadInfo();
