// The speak-to-image page: record, upload or type; follow the job; show the images and history.
// Plain ES module, no dependencies, no build step. Talks only to this server's API.

import { initConversation } from "./conversation.js";
import { showPreview, startLive, stopLive } from "./live.js";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "speech2image.apiKey";
const PER_PAGE = 8;
const FINAL_STATES = new Set(["succeeded", "failed", "cancelled"]);
const STAGES = { transcribing: "Transcribing speech", generating: "Generating" };

const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  config: null, // GET /config, or null where the server has none
  job: null, // the job being followed: {id, stream: AbortController}
  page: 1,
  recording: null,
  galleryUrls: [],
  resultUrls: [],
  countdown: null, // the timer that keeps "Try again in N s" current
};

// --- talking to the API -------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

function authHeaders(extra = {}) {
  const headers = { ...extra };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  return headers;
}

function retryAfterSeconds(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const when = Date.parse(value); // Retry-After may also be an HTTP date
  return Number.isNaN(when) ? null : Math.max(0, Math.round((when - Date.now()) / 1000));
}

async function errorFrom(response) {
  let code = "";
  let message = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    code = body.error?.code || "";
    message = body.error?.message || message;
  } catch {
    // not the JSON error shape (a proxy's page): keep the status text
  }
  return new ApiError(
    response.status, code, message, retryAfterSeconds(response.headers.get("Retry-After")),
  );
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (!response.ok) throw await errorFrom(response);
  return response;
}

function seconds(value) {
  if (value < 90) return `${Math.ceil(value)} s`;
  return `${Math.ceil(value / 60)} min`;
}

/** A sentence for a person: what went wrong and what to do about it. */
function describe(error, retryAfter = error.retryAfter) {
  if (!(error instanceof ApiError)) {
    return `The server could not be reached (${error.message}). Check the connection and try again.`;
  }
  const { status, code, message } = error;
  let wait = "";
  if (retryAfter > 0) wait = ` Try again in ${seconds(retryAfter)}.`;
  else if (retryAfter === 0) wait = " You can try again now.";
  if (status === 401) return `An API key is needed: ${message}. Enter it at the top of the page.`;
  if (status === 403) return `Not allowed with this key: ${message}.`;
  if (status === 413) return `The upload is too large: ${message}.`;
  if (status === 415 || status === 422) return `The recording cannot be used: ${message}.`;
  if (status === 429) {
    const what = code === "queue_full" ? "You already have many requests waiting" : "Too many requests";
    return `${what}: ${message}.${wait || " Try again in a moment."}`;
  }
  if (status === 503) return `The service is busy or a model is unavailable: ${message}.${wait}`;
  if (status === 409 && code === "job_cancelled") return "The request was cancelled.";
  if (status >= 400 && status < 500) return `The request was refused (${status} ${code}): ${message}.`;
  return `The server failed (${status}): ${message}. Try again; if it persists, report the time.`;
}

function showError(error) {
  clearError();
  $("error").textContent = typeof error === "string" ? error : describe(error);
  $("error").hidden = false;
  if (error instanceof ApiError && error.status === 401) showKeyForm(true);
  if (error instanceof ApiError && error.retryAfter > 0) countDown(error);
}

/** Keep "Try again in N s" true while it is shown, then say that now is fine. */
function countDown(error) {
  const until = Date.now() + error.retryAfter * 1000;
  state.countdown = setInterval(() => {
    const left = Math.max(0, (until - Date.now()) / 1000);
    $("error").textContent = describe(error, left);
    if (left === 0) clearInterval(state.countdown);
  }, 1000);
}

function clearError() {
  clearInterval(state.countdown);
  $("error").hidden = true;
  $("error").textContent = "";
}

function say(text) {
  $("status").textContent = text;
}

// --- API key ----------------------------------------------------------------------------

function showKeyForm(needed) {
  $("key-form").hidden = !needed && !state.key;
  $("api-key").value = state.key;
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  if (state.key) localStorage.setItem(KEY_STORAGE, state.key);
  else localStorage.removeItem(KEY_STORAGE);
  clearError();
  say(state.key ? "Key saved in this browser." : "Key removed.");
  loadConfig().then(() => loadGallery(1));
});

$("forget-key").addEventListener("click", () => {
  state.key = "";
  localStorage.removeItem(KEY_STORAGE);
  $("api-key").value = "";
  say("Key removed from this browser.");
});

// --- limits and models from GET /config ---------------------------------------------------

function setLimit(input, limit) {
  if (!limit) return;
  if (limit.min != null) input.min = limit.min;
  if (limit.max != null) input.max = limit.max;
  if (limit.multiple_of) input.step = limit.multiple_of;
  if (limit.default != null) input.placeholder = `default ${limit.default}`;
}

function applyConfig(config) {
  const limits = config.limits || {};
  setLimit($("opt-width"), limits.width);
  setLimit($("opt-height"), limits.height);
  setLimit($("opt-steps"), limits.steps);
  setLimit($("opt-num-images"), limits.num_images);
  if (limits.prompt_chars?.max) {
    $("prompt").maxLength = limits.prompt_chars.max;
    $("opt-negative").maxLength = limits.prompt_chars.max;
  }
  const select = $("opt-model");
  const chosen = select.value;
  select.replaceChildren(new Option("auto (chosen from the prompt)", "auto"));
  for (const model of config.models?.image || []) {
    const name = typeof model === "string" ? model : model.name;
    select.add(new Option(name, name));
  }
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "auto";
  const notes = [];
  if (limits.width) notes.push(`size ${limits.width.min}–${limits.width.max} px in steps of ${limits.width.multiple_of || 8}`);
  if (limits.steps) notes.push(`steps ${limits.steps.min}–${limits.steps.max}`);
  if (limits.num_images) notes.push(`up to ${limits.num_images.max} images`);
  if (limits.audio_seconds?.max) notes.push(`recordings up to ${seconds(limits.audio_seconds.max)}`);
  $("limits").textContent = notes.length ? `Limits: ${notes.join(", ")}.` : "";
  if (config.auth?.required) showKeyForm(true);
}

async function loadConfig() {
  try {
    const response = await fetch("/config", { headers: authHeaders() });
    if (response.status === 401) {
      showKeyForm(true);
      return;
    }
    if (!response.ok) {
      // An older server without /config: it still checks every field and says what is wrong.
      $("limits").textContent = "Leave a field empty for the server's default; it checks the limits.";
      return;
    }
    state.config = await response.json();
    applyConfig(state.config);
  } catch {
    // offline: the first request will say so
  }
}

// --- the request fields -------------------------------------------------------------------

/** The optional image fields that were filled in, as [name, value] pairs; null if invalid. */
function imageFields() {
  const form = $("options");
  if (!form.checkValidity()) {
    $("options-box").open = true;
    form.reportValidity();
    return null;
  }
  const fields = [];
  for (const input of form.elements) {
    if (!input.name || input.value.trim() === "") continue;
    if (input.name === "model" && input.value === "auto") continue;
    const value = input.type === "number" ? Number(input.value) : input.value.trim();
    fields.push([input.name, value]);
  }
  return fields;
}

function setBusy(busy) {
  for (const id of ["record", "generate"]) $(id).disabled = busy;
  $("audio-file").disabled = busy;
}

// --- submitting and following a job ---------------------------------------------------------

async function submitSpeech(blob, filename) {
  const fields = imageFields();
  if (!fields) return;
  const maxBytes = state.config?.limits?.upload_bytes?.max;
  if (maxBytes && blob.size > maxBytes) {
    showError(`The recording is ${(blob.size / 1e6).toFixed(1)} MB; this server takes up to ${(maxBytes / 1e6).toFixed(1)} MB.`);
    return;
  }
  const form = new FormData();
  form.append("audio", blob, filename);
  for (const [name, value] of fields) form.append(name, String(value));
  if (!$("understand").checked) form.append("understand", "false");
  form.append("async", "true");
  await startJob("/speech-to-image", { method: "POST", body: form }, "Sending the recording…");
}

async function submitPrompt(prompt) {
  const fields = imageFields();
  if (!fields) return;
  const body = JSON.stringify({ prompt, ...Object.fromEntries(fields), async: true });
  await startJob(
    "/generate-image",
    { method: "POST", body, headers: { "Content-Type": "application/json" } },
    "Sending the prompt…",
  );
}

function resetJobView() {
  for (const url of state.resultUrls) URL.revokeObjectURL(url);
  state.resultUrls = [];
  $("images").replaceChildren();
  $("changes").replaceChildren();
  for (const id of ["fact-transcript", "fact-prompt", "fact-negative", "fact-changes", "fact-model"]) {
    $(id).hidden = true;
  }
  $("stage").textContent = "Waiting";
  $("step").textContent = "";
  $("progress").removeAttribute("value"); // indeterminate until a step is known
  $("cancel").hidden = false;
  $("cancel").disabled = false;
  $("job").hidden = false;
}

async function startJob(path, options, message) {
  clearError();
  stopFollowing();
  setBusy(true);
  say(message);
  try {
    const response = await api(path, { ...options, headers: { Prefer: "respond-async", ...options.headers } });
    const body = await response.json();
    resetJobView();
    if (response.status === 202) {
      await follow(body);
    } else {
      showResult(body); // a server that answered synchronously
      say("Done.");
    }
  } catch (error) {
    showError(error);
    say("");
  } finally {
    setBusy(false);
  }
}

function stopFollowing() {
  state.job?.stream.abort();
  state.job = null;
}

/** Follow a job's Server-Sent Events (read with fetch, so the API key can be sent). */
async function follow(job) {
  const stream = new AbortController();
  state.job = { id: job.id, stream };
  render(job);
  let last = job;
  try {
    // With preview frames while the picture is drawn (only this job's owner gets them).
    const response = await api(`${job.events || `/jobs/${job.id}/events`}?previews=true`, {
      signal: stream.signal,
      headers: { Accept: "text/event-stream" },
    });
    for await (const snapshot of serverSentEvents(response)) {
      last = snapshot;
      render(snapshot);
      showPreview(snapshot);
      if (FINAL_STATES.has(snapshot.state)) return;
    }
  } catch (error) {
    if (stream.signal.aborted) return;
    if (!(error instanceof ApiError && [429, 503].includes(error.status))) throw error;
    // Too many streams open on the server (503), or for this key (429): poll instead.
  }
  if (!FINAL_STATES.has(last.state)) await poll(job.id, stream.signal);
}

async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""));
      if (data.length) yield JSON.parse(data.join("\n")); // comments (keep-alive) carry no data
    }
  }
}

async function poll(jobId, signal) {
  while (!signal.aborted) {
    await new Promise((resolve) => setTimeout(resolve, 700));
    const snapshot = await (await api(`/jobs/${jobId}`, { signal })).json();
    render(snapshot);
    if (FINAL_STATES.has(snapshot.state)) return;
  }
}

function render(snapshot) {
  const progress = snapshot.progress || {};
  const bar = $("progress");
  if (snapshot.state === "queued") {
    setStage("Waiting in the queue");
  } else if (snapshot.state === "running") {
    setStage(STAGES[progress.stage] || "Working");
  }
  if (progress.total > 0) {
    bar.max = progress.total;
    bar.value = progress.step;
    const unit = progress.stage === "transcribing" ? "s of audio" : "steps";
    const eta = progress.eta_seconds != null ? ` · about ${seconds(progress.eta_seconds)} left` : "";
    const count = (n) => (Number.isInteger(n) ? String(n) : n.toFixed(1)); // audio: seconds
    $("step").textContent = `${count(progress.step)} of ${count(progress.total)} ${unit}${eta}`;
  } else if (!FINAL_STATES.has(snapshot.state)) {
    bar.removeAttribute("value");
    $("step").textContent = "";
  }
  if (snapshot.state === "succeeded") {
    bar.max = 1;
    bar.value = 1;
    setStage("Done");
    $("step").textContent = "";
    $("cancel").hidden = true;
    showResult(snapshot.result);
    const total = snapshot.result?.timings?.total;
    say(total != null ? `Done in ${total.toFixed(1)} s.` : "Done.");
    loadGallery(1);
  } else if (snapshot.state === "failed") {
    setStage("Failed");
    $("cancel").hidden = true;
    const e = snapshot.error || {};
    showError(new ApiError(e.status || 500, e.code || "", e.message || "the job failed", null));
    say("");
  } else if (snapshot.state === "cancelled") {
    setStage("Cancelled");
    $("cancel").hidden = true;
    bar.removeAttribute("value");
    $("step").textContent = "";
    say("Cancelled.");
  }
}

function setStage(text) {
  if ($("stage").textContent === text) return;
  $("stage").textContent = text;
  // Announce stage changes, not every step, so screen readers are not flooded.
  if (!["Done", "Failed", "Cancelled"].includes(text)) say(`${text}…`);
}

$("cancel").addEventListener("click", async () => {
  if (!state.job) return;
  $("cancel").disabled = true;
  say("Cancelling…");
  try {
    const response = await api(`/jobs/${state.job.id}`, { method: "DELETE" });
    render(await response.json()); // 200: cancelled now; 202: stops after the current step
  } catch (error) {
    showError(error);
    $("cancel").disabled = false;
  }
});

// --- results ----------------------------------------------------------------------------------

function fact(id, text) {
  const row = $(`fact-${id}`);
  row.hidden = !text;
  return row;
}

function showResult(result) {
  if (!result) return;
  const understood = result.prompt_from_speech;
  const transcript = result.transcript?.text || understood?.transcript;
  fact("transcript", transcript);
  $("transcript").textContent = transcript || "";
  if (result.transcript?.language) {
    $("transcript").textContent += ` (${result.transcript.language}${understood?.translated ? ", translated" : ""})`;
  }
  fact("prompt", result.prompt);
  $("prompt-used").textContent = result.prompt || "";
  const negative = result.parameters?.negative_prompt || understood?.negative_prompt;
  fact("negative", negative);
  $("negative-used").textContent = negative || "";
  const changes = understood?.changes || [];
  fact("changes", changes.length);
  $("changes").replaceChildren(
    ...changes.map((change) => {
      const item = document.createElement("li");
      const edit = change.after ? `“${change.before}” → “${change.after}”` : `“${change.before}” removed`;
      item.textContent = `${edit}${change.why ? `: ${change.why}` : ""}`;
      item.dataset.rule = change.rule;
      return item;
    }),
  );
  fact("model", result.model);
  $("model").textContent = result.model || "";
  $("model-reason").textContent = result.model_choice?.reason ? `— ${result.model_choice.reason}` : "";
  const p = result.parameters || {};
  $("images").replaceChildren(
    ...(result.images || []).map((image) =>
      figure(image, [
        `seed ${image.seed}`,
        `${image.width}×${image.height}`,
        p.steps != null ? `${p.steps} steps` : "",
        p.scheduler || "",
        p.guidance_scale != null ? `guidance ${p.guidance_scale}` : "",
      ], state.resultUrls),
    ),
  );
}

/** A figure whose image is fetched with the API key and shown from a blob: URL. */
function figure(image, lines, urls) {
  const box = document.createElement("figure");
  const img = document.createElement("img");
  img.alt = image.prompt ? `Generated image: ${image.prompt}` : "Generated image";
  img.width = image.width;
  img.height = image.height;
  const caption = document.createElement("figcaption");
  for (const line of lines.filter(Boolean)) {
    const part = document.createElement("span");
    part.textContent = line;
    caption.append(part);
  }
  const link = document.createElement("a");
  link.textContent = "Download";
  link.download = image.filename || "image.png";
  link.hidden = true;
  caption.append(link);
  box.append(img, caption);
  api(image.url)
    .then((response) => response.blob())
    .then((blob) => {
      const url = URL.createObjectURL(blob);
      urls.push(url);
      img.src = url;
      link.href = url;
      link.hidden = false;
    })
    .catch((error) => {
      img.alt = `Image not loaded: ${describe(error)}`;
    });
  return box;
}

// --- history ----------------------------------------------------------------------------------

async function loadGallery(page) {
  try {
    const response = await api(`/images?page=${page}&per_page=${PER_PAGE}`);
    const body = await response.json();
    for (const url of state.galleryUrls) URL.revokeObjectURL(url);
    state.galleryUrls = [];
    state.page = body.page;
    $("gallery").replaceChildren(
      ...body.images.map((row) =>
        figure(row, [
          row.prompt,
          `${row.model} · seed ${row.seed} · ${row.width}×${row.height} · ${row.steps} steps`,
          row.transcript ? `Said: “${row.transcript.text}”` : "",
          new Date(row.created_at).toLocaleString(),
        ], state.galleryUrls),
      ),
    );
    $("gallery-empty").hidden = body.total > 0;
    $("page-info").textContent = body.total
      ? `Page ${body.page} of ${body.pages} · ${body.total} image${body.total === 1 ? "" : "s"}`
      : "";
    $("newer").disabled = body.page <= 1;
    $("older").disabled = body.page >= body.pages;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      showKeyForm(true);
      say("This server needs an API key: enter it at the top of the page.");
      return;
    }
    showError(error);
  }
}

$("newer").addEventListener("click", () => loadGallery(state.page - 1));
$("older").addEventListener("click", () => loadGallery(state.page + 1));

// --- recording --------------------------------------------------------------------------------

const RECORDING_TYPES = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/mp4", "audio/webm"];

async function startRecording() {
  clearError();
  if (!navigator.mediaDevices?.getUserMedia || !window.MediaRecorder) {
    showError("This browser cannot record here (recording needs https or localhost). Upload a file instead.");
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    showError(`The microphone could not be opened (${error.message}). Allow it, or upload a file.`);
    return;
  }
  const mimeType = RECORDING_TYPES.find((type) => MediaRecorder.isTypeSupported(type));
  const recorder = new MediaRecorder(stream, mimeType ? { mimeType } : undefined);
  const chunks = [];
  recorder.addEventListener("dataavailable", (event) => {
    if (event.data.size) chunks.push(event.data);
  });

  const audio = new AudioContext();
  const analyser = audio.createAnalyser();
  analyser.fftSize = 1024;
  audio.createMediaStreamSource(stream).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  const started = performance.now();
  const maxSeconds = state.config?.limits?.audio_seconds?.max;
  const meter = setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    const rms = Math.sqrt(sum / samples.length);
    // -60 dBFS .. 0 dBFS onto 0 .. 1
    $("level").value = Math.max(0, Math.min(1, (20 * Math.log10(rms || 1e-9) + 60) / 60));
    const elapsed = (performance.now() - started) / 1000;
    $("rec-time").textContent = `${elapsed.toFixed(1)} s`;
    if (maxSeconds && elapsed >= maxSeconds - 1) stopRecording();
  }, 50);

  recorder.addEventListener("stop", () => {
    stopLive();
    clearInterval(meter);
    for (const track of stream.getTracks()) track.stop();
    audio.close();
    $("level").value = 0;
    $("record").classList.remove("live");
    $("stop").disabled = true;
    const blob = new Blob(chunks, { type: recorder.mimeType || "audio/webm" });
    const extension = blob.type.includes("ogg") ? "ogg" : blob.type.includes("mp4") ? "m4a" : "webm";
    submitSpeech(blob, `recording.${extension}`);
  });
  recorder.start(250);
  // The words while the person speaks, and drafts of the picture (when WebSockets work).
  startLive(stream, state.key, () => authHeaders());
  state.recording = recorder;
  $("record").disabled = true;
  $("record").classList.add("live");
  $("stop").disabled = false;
  $("stop").focus();
  say("Recording… press Stop when you are done.");
}

function stopRecording() {
  const recorder = state.recording;
  state.recording = null;
  if (recorder && recorder.state !== "inactive") {
    say("Recording stopped.");
    recorder.stop();
  }
}

$("record").addEventListener("click", startRecording);
$("stop").addEventListener("click", stopRecording);

$("audio-file").addEventListener("change", () => {
  const file = $("audio-file").files[0];
  if (file) submitSpeech(file, file.name).finally(() => ($("audio-file").value = ""));
});

$("prompt-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (prompt) submitPrompt(prompt);
});

// --- start ------------------------------------------------------------------------------------

showKeyForm(false);
initConversation(api);
await loadConfig();
await loadGallery(1);
document.documentElement.dataset.ready = "true";
