// Live additions to the page: the transcript while the person speaks (a realtime WebSocket
// session), drafts of the picture from the words so far, and preview frames of a job while it
// is drawn. Each degrades to the page's plain behaviour: without WebSockets (or when the
// server refuses the session) the recording is uploaded when it stops, as before; without
// previews the progress bar is all there is.

const $ = (id) => document.getElementById(id);
const CHUNK = 4096; // samples per message at 24 kHz (~170 ms)
const DRAFT_MIN_NEW_WORDS = 2; // redraw when the words changed by at least this many

const live = {
  socket: null,
  audio: null,
  processor: null,
  transcript: "", // completed utterances
  partial: "", // the utterance being transcribed
  drafted: "", // the words of the newest draft
  draft: null, // AbortController of the draft being followed
  headers: () => ({}),
};

function words(text) {
  return text.toLowerCase().match(/[\p{L}\p{N}']+/gu) || [];
}

function showTranscript() {
  const box = $("live-transcript");
  box.hidden = false;
  box.textContent = `${live.transcript} ${live.partial}`.trim() || "…";
}

function pcm16(samples) {
  const bytes = new Uint8Array(samples.length * 2);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

/** Start a realtime session for the microphone ``stream``; false if it cannot be had. */
export function startLive(stream, key, headers) {
  if (!window.WebSocket || !window.AudioContext) return false;
  live.transcript = live.partial = live.drafted = "";
  live.headers = headers;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const protocols = ["realtime"];
  if (key) protocols.push(`openai-insecure-api-key.${key}`);
  let socket;
  try {
    socket = new WebSocket(`${scheme}://${location.host}/v1/realtime?intent=transcription`, protocols);
  } catch {
    return false;
  }
  live.socket = socket;
  socket.addEventListener("open", () => {
    const audio = new AudioContext({ sampleRate: 24000 });
    const source = audio.createMediaStreamSource(stream);
    // A ScriptProcessor needs no extra module file; the gain of 0 keeps it silent.
    const processor = audio.createScriptProcessor(CHUNK, 1, 1);
    const mute = audio.createGain();
    mute.gain.value = 0;
    processor.addEventListener("audioprocess", (event) => {
      if (socket.readyState !== WebSocket.OPEN) return;
      const audioData = pcm16(event.inputBuffer.getChannelData(0));
      socket.send(JSON.stringify({ type: "input_audio_buffer.append", audio: audioData }));
    });
    source.connect(processor);
    processor.connect(mute);
    mute.connect(audio.destination);
    live.audio = audio;
    live.processor = processor;
    showTranscript();
  });
  socket.addEventListener("message", (message) => {
    const event = JSON.parse(message.data);
    if (event.type === "conversation.item.input_audio_transcription.delta") {
      live.partial += event.delta;
      showTranscript();
    } else if (event.type === "conversation.item.input_audio_transcription.completed") {
      live.transcript = `${live.transcript} ${event.transcript}`.trim();
      live.partial = "";
      showTranscript();
      maybeDraft();
    }
  });
  return true;
}

/** Stop sending audio; the session closes once the last transcript has come. */
export function stopLive() {
  const { socket, audio, processor } = live;
  live.socket = live.audio = live.processor = null;
  processor?.disconnect();
  audio?.close();
  if (socket?.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "input_audio_buffer.commit" }));
    setTimeout(() => socket.close(), 15000);
  }
}

async function maybeDraft() {
  const now = words(live.transcript);
  const before = words(live.drafted);
  const changed = now.filter((word, i) => word !== before[i]).length + Math.max(0, before.length - now.length);
  if (changed < DRAFT_MIN_NEW_WORDS) return;
  live.drafted = live.transcript;
  live.draft?.abort(); // the server cancels the superseded draft itself
  const controller = new AbortController();
  live.draft = controller;
  try {
    const response = await fetch("/drafts", {
      method: "POST",
      headers: { ...live.headers(), "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: live.transcript }),
      signal: controller.signal,
    });
    if (!response.ok) return; // busy: skip this draft
    const job = await response.json();
    const events = await fetch(`${job.events}?previews=true`, {
      headers: { ...live.headers(), Accept: "text/event-stream" },
      signal: controller.signal,
    });
    const reader = events.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5));
        if (data.length) showDraft(JSON.parse(data.join("\n")));
      }
    }
  } catch (error) {
    if (!controller.signal.aborted) console.warn("draft failed", error);
  }
}

function showDraft(snapshot) {
  const figure = $("draft");
  const img = $("draft-image");
  const preview = snapshot.partial?.preview;
  if (snapshot.state === "succeeded") {
    img.src = `data:image/png;base64,${snapshot.result.b64_png}`;
    img.dataset.state = "draft";
    $("draft-caption").textContent = `Draft: “${snapshot.result.prompt}”`;
    figure.hidden = false;
  } else if (preview) {
    img.src = `data:image/png;base64,${preview.b64_png}`;
    img.dataset.state = "forming";
    figure.hidden = false;
  }
}

/** A frame of the followed job while it is drawn (its events are asked with previews). */
export function showPreview(snapshot) {
  const preview = snapshot.partial?.preview;
  const img = $("preview");
  if (snapshot.state !== "running" || !preview) {
    if (snapshot.state !== "running") img.hidden = true;
    return;
  }
  img.src = `data:image/png;base64,${preview.b64_png}`;
  img.hidden = false;
}
