// A conversation as a thread: speak (or type) the first picture, then say what to change.
// Each turn shows what was heard, what the service decided, the composed prompt, every change
// with its reason, and the image; Undo takes the last turn back. Keyboard: Enter sends the
// typed turn; every control is a button or a form field in document order.

const $ = (id) => document.getElementById(id);
const RECORDING_TYPES = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/mp4", "audio/webm"];

export function initConversation(api) {
  const convo = { id: null, recorder: null, urls: [] };

  function status(text) {
    $("conv-status").textContent = text;
  }

  async function ensure() {
    if (convo.id) return convo.id;
    const response = await api("/conversations", { method: "POST" });
    convo.id = (await response.json()).id;
    return convo.id;
  }

  async function imageUrl(image) {
    const response = await api(image.url);
    const url = URL.createObjectURL(await response.blob());
    convo.urls.push(url);
    return url;
  }

  async function renderTurn(turn) {
    const item = document.createElement("li");
    item.className = "turn";
    item.dataset.decision = turn.decision;
    const said = document.createElement("p");
    said.className = "said";
    said.textContent = `${turn.source === "speech" ? "🎤" : "⌨"} ${turn.transcript}`;
    const decided = document.createElement("p");
    decided.className = "decision";
    const what = turn.decision === "edit" ? `Edit (${turn.operation || "change"}, strength ${turn.strength})` : "New picture";
    decided.textContent = `${what}: ${turn.prompt}`;
    item.append(said, decided);
    if (turn.negative_prompt) {
      const negative = document.createElement("p");
      negative.className = "muted";
      negative.textContent = `Without: ${turn.negative_prompt}`;
      item.append(negative);
    }
    const changes = document.createElement("ul");
    changes.className = "changes";
    for (const change of turn.changes || []) {
      const line = document.createElement("li");
      line.textContent = `${change.rule}: ${change.before || "—"} → ${change.after || "—"} (${change.why})`;
      changes.append(line);
    }
    item.append(changes);
    for (const image of turn.images || []) {
      const img = document.createElement("img");
      img.alt = turn.prompt;
      img.width = image.width;
      img.height = image.height;
      img.src = await imageUrl(image);
      item.append(img);
    }
    return item;
  }

  async function show(thread) {
    for (const url of convo.urls.splice(0)) URL.revokeObjectURL(url);
    const list = $("conv-thread");
    const items = [];
    for (const turn of thread.turns) items.push(await renderTurn(turn));
    list.replaceChildren(...items);
    $("conv-undo").disabled = thread.turns.length === 0;
  }

  async function send(body, label) {
    status(label);
    $("conv-send").disabled = true;
    try {
      const id = await ensure();
      const turn = await (await api(`/conversations/${id}/turns`, { method: "POST", body })).json();
      await show(await (await api(`/conversations/${id}`)).json());
      status(turn.decision === "edit" ? "Changed." : "Drawn.");
    } catch (error) {
      status(`Could not do that: ${error.message}`);
    } finally {
      $("conv-send").disabled = false;
    }
  }

  $("conv-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("conv-text").value.trim();
    if (!text) return;
    const body = new FormData();
    body.append("text", text);
    $("conv-text").value = "";
    send(body, "Working on it…");
  });

  $("conv-record").addEventListener("click", async () => {
    if (!navigator.mediaDevices?.getUserMedia || !window.MediaRecorder) {
      status("This browser cannot record here; type instead.");
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (error) {
      status(`The microphone could not be opened (${error.message}).`);
      return;
    }
    const mimeType = RECORDING_TYPES.find((type) => MediaRecorder.isTypeSupported(type));
    const recorder = new MediaRecorder(stream, mimeType ? { mimeType } : undefined);
    const chunks = [];
    recorder.addEventListener("dataavailable", (event) => event.data.size && chunks.push(event.data));
    recorder.addEventListener("stop", () => {
      for (const track of stream.getTracks()) track.stop();
      $("conv-record").disabled = false;
      $("conv-stop").disabled = true;
      const blob = new Blob(chunks, { type: recorder.mimeType || "audio/webm" });
      const body = new FormData();
      body.append("audio", blob, blob.type.includes("ogg") ? "turn.ogg" : "turn.webm");
      send(body, "Listening to what you said…");
    });
    recorder.start(250);
    convo.recorder = recorder;
    $("conv-record").disabled = true;
    $("conv-stop").disabled = false;
    $("conv-stop").focus();
    status("Recording… press Stop when you are done.");
  });

  $("conv-stop").addEventListener("click", () => {
    const recorder = convo.recorder;
    convo.recorder = null;
    if (recorder && recorder.state !== "inactive") recorder.stop();
  });

  $("conv-undo").addEventListener("click", async () => {
    if (!convo.id) return;
    try {
      const body = await (await api(`/conversations/${convo.id}/undo`, { method: "POST" })).json();
      await show(body.conversation);
      status("Undone: back to the previous picture.");
    } catch (error) {
      status(`Could not undo: ${error.message}`);
    }
  });

  $("conv-new").addEventListener("click", async () => {
    convo.id = null;
    await show({ turns: [] });
    status("A new conversation: say or type the first picture.");
    $("conv-text").focus();
  });
}
