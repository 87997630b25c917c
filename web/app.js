// breeze-stream browser demo: microphone or audio file -> AudioWorklet (16 kHz pcm_s16le,
// 40 ms frames) -> native protocol (/v1/stream) -> live partial + finals with latency.
//
// Latency bookkeeping, the replay harness's convention (streaming/replay.py): every binary
// frame is logged as (cumulative samples sent, performance.now() right after ws.send).
//   final latency         = final's arrival - send time of the frame holding the last sample
//                           before its `end` (sample round(end * 16000) - 1)
//   first-partial latency = a segment's first partial's arrival - send time of the frame
//                           holding its `start` sample (round(start * 16000))
//   partial lag           = a partial's arrival - send time of its `end`
// Sample indices past the stream clamp to the last frame sent. `window.breezeDemo`
// exposes the numbers for automation (tests/test_web_demo.py).

const RATE = 16000;
const FRAME_MS = 40;
const FRAME_SAMPLES = (RATE * FRAME_MS) / 1000;
const READY_TIMEOUT_MS = 15000;
const END_TIMEOUT_MS = 60000;
const ONSET_RMS = 0.01;   // -40 dBFS: the page's own, rough "speech started" detector

const $ = (id) => document.getElementById(id);
const ui = {
  status: document.querySelector('[data-testid="status"]'),
  statusText: document.querySelector('[data-testid="status"] .status-text'),
  start: $("start"),
  stop: $("stop"),
  clear: $("clear"),
  language: $("language"),
  file: $("file"),
  audible: $("audible"),
  partial: $("partial"),
  partialMeta: $("partial-meta"),
  finals: $("finals"),
  meter: $("meter"),
  clock: $("clock"),
  alert: $("alert"),
  alertTitle: $("alert-title"),
  alertText: $("alert-text"),
  alertClose: $("alert-close"),
  statFirst: $("stat-first"),
  statFinal: $("stat-final"),
  statCount: $("stat-count"),
  statLag: $("stat-lag"),
  statModel: $("stat-model"),
  endpoint: $("endpoint"),
};

// Public, read-only view for tests and the curious (devtools: `breezeDemo`).
const demo = {
  state: "idle",
  url: null,
  session: null,
  model: null,
  contextRate: null,
  resampling: null,
  clickedAt: null,          // performance.now() of the Start click
  streamingAt: null,        // first frame sent
  firstPartialAfterClickMs: null,
  voiceOnsetSample: null,   // first frame louder than -40 dBFS (stream sample index)
  firstPartialAfterOnsetMs: null,  // first partial's arrival - send time of that frame
  segments: {},             // segment -> {start, end, firstPartialMs, finalMs, text}
  partials: 0,
  partialLagsMs: [],        // every partial: arrival - send time of its `end`
  lastPartial: null,        // {segment, start, end, text, stable}
  finals: [],
  ended: false,             // the server sent `end`
  errors: [],
  framesSent: 0,
  samplesSent: 0,
};
window.breezeDemo = demo;

// ---------------------------------------------------------------- helpers

function streamUrl() {
  const params = new URLSearchParams(location.search);
  let url = params.get("server");
  if (!url) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    url = `${scheme}//${location.host}/v1/stream`;
  }
  const token = params.get("token");
  if (token) {
    const u = new URL(url);
    u.searchParams.set("token", token);
    url = u.toString();
  }
  return url;
}

// The address as shown on the page: the key of ?token= is not put on screen (or in screenshots).
function shownUrl(url) {
  try {
    const u = new URL(url);
    if (u.searchParams.has("token")) u.searchParams.set("token", "…");
    return u.toString();
  } catch (err) {
    return url;
  }
}

function fmtSec(s, digits = 2) {
  return Number.isFinite(s) ? `${s.toFixed(digits)}` : "?";
}

function fmtMs(ms) {
  if (ms == null || !Number.isFinite(ms)) return "–";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function median(xs) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

const STATE_TEXT = {
  idle: "idle",
  connecting: "connecting…",
  ready: "ready",
  streaming: "streaming",
  stopping: "finishing…",
  closed: "closed",
  error: "error",
};

function setState(state, detail = "") {
  demo.state = state;
  ui.status.dataset.state = state;
  document.body.dataset.state = state;
  ui.statusText.textContent = STATE_TEXT[state] + (detail ? ` · ${detail}` : "");
  const active = ["connecting", "ready", "streaming", "stopping"].includes(state);
  ui.start.disabled = active;
  ui.stop.disabled = !active || state === "stopping";
  ui.language.disabled = active;
  for (const r of document.querySelectorAll('input[name="source"]')) r.disabled = active;
  ui.file.disabled = active;
}

function showError(title, text) {
  demo.errors.push({ title, text });
  ui.alertTitle.textContent = title;
  ui.alertText.textContent = text;
  ui.alert.hidden = false;
}

function hideError() {
  ui.alert.hidden = true;
}

/** Wall time at which each cumulative sample count left the page. */
class SendLog {
  constructor() {
    this.totals = [];
    this.times = [];
  }
  record(total, t) {
    this.totals.push(total);
    this.times.push(t);
  }
  /** performance.now() at which the frame holding sample `index` (0-based) was sent;
   *  clamped to the stream like the replay harness; null before anything was sent. */
  timeOf(index) {
    const { totals, times } = this;
    if (!totals.length) return null;
    let lo = 0;
    let hi = totals.length - 1;
    while (lo < hi) {                     // first frame whose cumulative total exceeds `index`
      const mid = (lo + hi) >> 1;
      if (totals[mid] > index) hi = mid; else lo = mid + 1;
    }
    return times[lo];
  }
  /** Send time of an event's `start` (first sample at or after t) or `end` (last sample before t). */
  timeAt(seconds, edge) {
    const index = Math.round(seconds * RATE);
    return this.timeOf(edge === "end" ? index - 1 : index);
  }
}

// ---------------------------------------------------------------- audio

// `?resample=worklet` forces the device-rate context + in-worklet resampler (for testing
// the path browsers without 16 kHz AudioContexts take).
const FORCE_WORKLET_RESAMPLE = new URLSearchParams(location.search).get("resample") === "worklet";

async function makeContext(wantNative16k) {
  let ctx = null;
  if (wantNative16k && !FORCE_WORKLET_RESAMPLE) {
    try {
      ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
    } catch {
      ctx = null;                         // rate not supported: resample in the worklet
    }
  }
  if (!ctx) ctx = new AudioContext({ latencyHint: "interactive" });
  await ctx.audioWorklet.addModule(new URL("./pcm-worklet.js", import.meta.url));
  return ctx;
}

function micErrorMessage(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone permission was denied. Allow the microphone for this site (the icon in the address bar), or choose 'Audio file' to transcribe a recording.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Plug one in, or choose 'Audio file' to transcribe a recording.";
    case "NotReadableError":
      return "The microphone is in use by another application or could not be opened.";
    default:
      return `Could not open the microphone: ${err && err.message ? err.message : err}`;
  }
}

// ---------------------------------------------------------------- session

class Session {
  constructor({ source, file, language, audible }) {
    this.source = source;
    this.file = file;
    this.language = language;
    this.audible = audible;
    this.sendLog = new SendLog();
    this.ws = null;
    this.ctx = null;
    this.node = null;
    this.input = null;          // MediaStreamAudioSourceNode | AudioBufferSourceNode
    this.stream = null;
    this.ended = false;         // server sent `end`
    this.stopping = false;
    this.closedByUs = false;
    this.gotReady = false;
    this.serverError = null;
    this.voiceOnsetAt = null;
    this.waiters = { ready: null, end: null, flushed: null };
    this.firstPartialSeen = new Set();
    this.lastPartialSegment = null;
  }

  // --- lifecycle

  async start() {
    setState("connecting", this.source === "file" ? "audio file" : "microphone");
    demo.url = streamUrl();
    ui.endpoint.textContent = shownUrl(demo.url);

    // Audio context first, while the click's user activation is fresh.
    try {
      this.ctx = await makeContext(true);
    } catch (err) {
      throw new UserError("Audio unavailable", window.isSecureContext
        ? `This browser could not start Web Audio with an AudioWorklet: ${err.message || err}`
        : "Browsers only allow audio capture and AudioWorklets on https:// pages or http://localhost. Open the demo over https (or through an SSH tunnel to localhost).");
    }

    const ready = this.connect();
    const input = this.source === "file" ? this.prepareFile() : this.prepareMic();
    // Either failing ends the attempt; the other is cleaned up by teardown().
    const [, inputNode] = await Promise.all([ready, input]);
    this.input = inputNode;
    if (this.stopping) { this.teardown(); return; }     // Stop pressed while connecting

    this.node = new AudioWorkletNode(this.ctx, "pcm-frame-processor", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { frameSamples: FRAME_SAMPLES },
    });
    this.node.port.onmessage = (e) => this.onWorklet(e.data);
    this.input.connect(this.node);
    this.node.connect(this.ctx.destination);   // silent output keeps the node pulled
    if (this.source === "file") {
      if (this.audible) this.input.connect(this.ctx.destination);
      this.input.onended = () => { if (!this.stopping) this.stop("file finished"); };
      this.input.start();
    }
    if (this.ctx.state === "suspended") await this.ctx.resume();
    setState("streaming", this.source === "file" ? `file: ${this.file.name}` : "microphone");
  }

  connect() {
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WebSocket(demo.url);
      } catch (err) {
        reject(new UserError("Bad server address", `${shownUrl(demo.url)}: ${err.message || err}`));
        return;
      }
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      const timer = setTimeout(() => {
        reject(new UserError("Server did not answer", `No "ready" from ${shownUrl(demo.url)} within ${READY_TIMEOUT_MS / 1000} s.`));
      }, READY_TIMEOUT_MS);
      this.waiters.ready = { resolve: () => { clearTimeout(timer); resolve(); }, reject: (e) => { clearTimeout(timer); reject(e); } };
      ws.onopen = () => {
        ws.send(JSON.stringify({
          type: "start",
          sample_rate: RATE,
          encoding: "pcm_s16le",
          channels: 1,
          language: this.language,
          partials: true,
        }));
      };
      ws.onmessage = (e) => this.onMessage(e);
      ws.onerror = () => { /* details arrive with onclose */ };
      ws.onclose = (e) => this.onClose(e);
    });
  }

  async prepareMic() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new UserError("Microphone unavailable",
        window.isSecureContext
          ? "This browser has no getUserMedia support."
          : "Browsers only allow the microphone on https:// pages or http://localhost. Open the demo over https, or choose 'Audio file'.");
    }
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
        video: false,
      });
    } catch (err) {
      throw new UserError("Microphone", micErrorMessage(err));
    }
    try {
      return this.ctx.createMediaStreamSource(this.stream);
    } catch (err) {
      // Firefox cannot connect a microphone to a context of another rate: use the
      // device rate and let the worklet resample.
      await this.ctx.close();
      this.ctx = await makeContext(false);
      return this.ctx.createMediaStreamSource(this.stream);
    }
  }

  async prepareFile() {
    if (!this.file) throw new UserError("No file chosen", "Choose an audio file first (wav, mp3, flac, ogg, m4a…).");
    let buffer;
    try {
      buffer = await this.ctx.decodeAudioData(await this.file.arrayBuffer());
    } catch (err) {
      throw new UserError("Cannot decode the file", `${this.file.name}: the browser could not decode it (${err && err.message ? err.message : err}).`);
    }
    const src = this.ctx.createBufferSource();
    src.buffer = buffer;
    return src;
  }

  setAudible(on) {
    this.audible = on;
    if (this.source !== "file" || !this.input || !this.ctx) return;
    try {
      if (on) this.input.connect(this.ctx.destination);
      else this.input.disconnect(this.ctx.destination);
    } catch { /* not connected */ }
  }

  async stop(reason = "") {
    if (this.stopping) return;
    this.stopping = true;
    setState("stopping", reason);
    // 1. stop capture and push out the partial frame held by the worklet
    if (this.input) {
      try { this.input.disconnect(); } catch { /* ignore */ }
      if (this.source === "file") { this.input.onended = null; try { this.input.stop(); } catch { /* ignore */ } }
    }
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    if (this.node) {
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, 500);
        this.waiters.flushed = () => { clearTimeout(timer); resolve(); };
        this.node.port.postMessage({ type: "flush" });
      });
    }
    // 2. tell the server, wait for its last finals and `end`
    const ws = this.ws;
    if (ws && ws.readyState === WebSocket.OPEN && this.gotReady) {
      ws.send(JSON.stringify({ type: "stop" }));
      await new Promise((resolve) => {
        if (this.ended || ws.readyState !== WebSocket.OPEN) return resolve();
        const timer = setTimeout(() => {
          showError("No end from server", `The server did not confirm the end of the stream within ${END_TIMEOUT_MS / 1000} s.`);
          resolve();
        }, END_TIMEOUT_MS);
        this.waiters.end = () => { clearTimeout(timer); resolve(); };
      });
    }
    this.teardown();
    if (current === this) current = null;
    if (demo.state !== "error") setState("closed", this.ended ? "stream complete" : reason);
  }

  teardown() {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) {
      this.closedByUs = true;
      try { this.ws.close(1000, "client done"); } catch { /* ignore */ }
    }
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    if (this.node) { try { this.node.disconnect(); } catch { /* ignore */ } this.node.port.onmessage = null; }
    if (this.ctx && this.ctx.state !== "closed") this.ctx.close().catch(() => {});
    ui.meter.style.width = "0%";
  }

  // --- audio frames -> websocket

  onWorklet(msg) {
    if (msg.type === "frame") {
      const ws = this.ws;
      if (!ws || ws.readyState !== WebSocket.OPEN || this.ended) return;
      ws.send(msg.pcm);
      const now = performance.now();
      this.sendLog.record(msg.total, now);
      if (demo.streamingAt == null) demo.streamingAt = now;
      if (demo.voiceOnsetSample == null && msg.rms >= ONSET_RMS) {
        demo.voiceOnsetSample = msg.total - msg.samples;
        this.voiceOnsetAt = now;
      }
      demo.framesSent += 1;
      demo.samplesSent = msg.total;
      ui.clock.textContent = `${(msg.total / RATE).toFixed(1)} s`;
      const db = 20 * Math.log10(Math.max(msg.rms, 1e-5));          // -100..0 dBFS
      ui.meter.style.width = `${Math.max(0, Math.min(100, (db + 60) * (100 / 60)))}%`;
    } else if (msg.type === "flushed") {
      if (this.waiters.flushed) { this.waiters.flushed(); this.waiters.flushed = null; }
    } else if (msg.type === "info") {
      demo.contextRate = msg.contextRate;
      demo.resampling = msg.resampling;
    }
  }

  // --- server events

  onMessage(e) {
    if (typeof e.data !== "string") return;
    let ev;
    try {
      ev = JSON.parse(e.data);
    } catch {
      console.warn("non-JSON message from server", e.data);
      return;
    }
    const now = performance.now();
    switch (ev.type) {
      case "ready":
        this.gotReady = true;
        demo.session = ev.session || null;
        demo.model = ev.model || null;
        ui.statModel.textContent = ev.model || "–";
        ui.statModel.title = ev.session ? `session ${ev.session}` : "";
        setState("ready");
        if (this.waiters.ready) { this.waiters.ready.resolve(); this.waiters.ready = null; }
        break;
      case "partial":
        this.onPartial(ev, now);
        break;
      case "final":
        this.onFinal(ev, now);
        break;
      case "error":
        this.serverError = { code: ev.code || "error", message: ev.message || "The server reported an error." };
        showError(`Server error: ${ev.code || "error"}`, ev.message || "The server reported an error.");
        break;
      case "end":
        this.ended = true;
        demo.ended = true;
        if (this.waiters.end) { this.waiters.end(); this.waiters.end = null; }
        break;
      default:
        break;                              // extra event types are allowed
    }
  }

  segmentInfo(ev) {
    const key = String(ev.segment);
    if (!demo.segments[key]) demo.segments[key] = { segment: ev.segment, start: ev.start, end: ev.end, firstPartialMs: null, firstPartialEnd: null, finalMs: null, text: "" };
    return demo.segments[key];
  }

  onPartial(ev, now) {
    const seg = this.segmentInfo(ev);
    if (!this.firstPartialSeen.has(ev.segment)) {
      this.firstPartialSeen.add(ev.segment);
      const sent = this.sendLog.timeAt(ev.start, "start");
      seg.firstPartialMs = sent == null ? null : now - sent;
      seg.firstPartialEnd = ev.end;         // how much audio the first partial covered
      if (demo.firstPartialAfterClickMs == null && demo.clickedAt != null) demo.firstPartialAfterClickMs = now - demo.clickedAt;
      if (demo.firstPartialAfterOnsetMs == null && this.voiceOnsetAt != null) demo.firstPartialAfterOnsetMs = now - this.voiceOnsetAt;
      this.updateStats();
    }
    demo.partials += 1;
    demo.lastPartial = { segment: ev.segment, start: ev.start, end: ev.end, text: ev.text || "", stable: ev.stable || "" };
    const text = ev.text || "";
    let stable = ev.stable || "";
    if (!text.startsWith(stable)) stable = "";
    const sent = this.sendLog.timeAt(ev.end, "end");
    const lag = sent == null ? null : now - sent;
    if (lag != null) demo.partialLagsMs.push(lag);
    this.updateStats();
    renderPartial(stable, text.slice(stable.length));
    ui.partialMeta.textContent = `segment ${ev.segment} · ${fmtSec(ev.start)}–${fmtSec(ev.end)} s · lag ${fmtMs(lag)}`;
    this.lastPartialSegment = ev.segment;
  }

  onFinal(ev, now) {
    const seg = this.segmentInfo(ev);
    const sent = this.sendLog.timeAt(ev.end, "end");
    const latency = sent == null ? null : now - sent;
    Object.assign(seg, { start: ev.start, end: ev.end, finalMs: latency, text: ev.text || "" });
    demo.finals.push({ segment: ev.segment, start: ev.start, end: ev.end, text: ev.text || "", latencyMs: latency, firstPartialMs: seg.firstPartialMs });

    const li = document.createElement("li");
    li.className = "final";
    li.dataset.segment = String(ev.segment);
    const meta = document.createElement("div");
    meta.className = "final-meta";
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = `${fmtSec(ev.start)}–${fmtSec(ev.end)} s`;
    const lat = document.createElement("span");
    lat.className = "badge";
    lat.title = "Final latency: arrival minus the moment the audio at the segment's end was sent";
    lat.textContent = `final ${fmtMs(latency)}`;
    meta.append(time, lat);
    if (seg.firstPartialMs != null) {
      const fp = document.createElement("span");
      fp.className = "badge subtle";
      fp.title = "First partial: arrival minus the moment the audio at the segment's start was sent";
      fp.textContent = `first partial ${fmtMs(seg.firstPartialMs)}`;
      meta.append(fp);
    }
    const text = document.createElement("p");
    text.className = "final-text";
    text.textContent = ev.text || "";
    li.append(meta, text);
    ui.finals.append(li);
    li.scrollIntoView({ block: "nearest" });

    if (this.lastPartialSegment == null || this.lastPartialSegment === ev.segment) {
      renderPartial("", "");
      ui.partialMeta.textContent = "";
    }
    this.updateStats();
  }

  updateStats() {
    const firsts = Object.values(demo.segments).map((s) => s.firstPartialMs).filter((x) => x != null);
    const finals = demo.finals.map((f) => f.latencyMs).filter((x) => x != null);
    ui.statFirst.textContent = fmtMs(median(firsts));
    ui.statFinal.textContent = fmtMs(median(finals));
    ui.statLag.textContent = fmtMs(median(demo.partialLagsMs));
    ui.statCount.textContent = String(demo.finals.length);
  }

  onClose(e) {
    const detail = `close code ${e.code}${e.reason ? `: ${e.reason}` : ""}`;
    if (this.waiters.ready) {
      let err;
      if (this.serverError) {
        err = new UserError(`Server error: ${this.serverError.code}`, `${this.serverError.message} (${detail})`);
      } else if (e.code === 1006) {
        err = new UserError("Connection failed", `Cannot reach the server at ${shownUrl(demo.url)}. Is breeze-stream running ` +
          "(and done loading its model: GET /healthz answers 200), and is this the right address?");
      } else {
        err = new UserError("Connection failed", `The server closed the connection (${detail}).`);
      }
      this.waiters.ready.reject(err);
      this.waiters.ready = null;
      return;
    }
    if (this.waiters.end) { this.waiters.end(); this.waiters.end = null; }
    if (this.closedByUs || this.ended || this.stopping) return;
    // The server ended the stream on its own.
    if (e.code !== 1000 && !this.serverError) showError("Connection lost", `The server closed the stream (${detail}).`);
    this.stopping = true;
    this.teardown();
    if (current === this) current = null;
    setState(e.code === 1000 ? "closed" : "error", e.code === 1000 ? "server closed the stream" : `close code ${e.code}`);
  }
}

class UserError extends Error {
  constructor(title, message) {
    super(message);
    this.title = title;
  }
}

// ---------------------------------------------------------------- rendering

function renderPartial(stable, tail) {
  ui.partial.replaceChildren();
  if (!stable && !tail) {
    ui.partial.classList.add("empty");
    return;
  }
  ui.partial.classList.remove("empty");
  const s = document.createElement("span");
  s.className = "stable";
  s.textContent = stable;
  const u = document.createElement("span");
  u.className = "unstable";
  u.textContent = tail;
  const caret = document.createElement("span");
  caret.className = "caret";
  caret.setAttribute("aria-hidden", "true");
  ui.partial.append(s, u, caret);
}

// ---------------------------------------------------------------- wiring

let current = null;

function selectedSource() {
  return document.querySelector('input[name="source"]:checked').value;
}

ui.start.addEventListener("click", async () => {
  if (current) return;
  hideError();
  demo.clickedAt = performance.now();
  demo.streamingAt = null;
  demo.firstPartialAfterClickMs = null;
  demo.voiceOnsetSample = null;
  demo.firstPartialAfterOnsetMs = null;
  demo.ended = false;
  demo.framesSent = 0;
  demo.samplesSent = 0;
  demo.segments = {};
  demo.partials = 0;
  demo.partialLagsMs = [];
  demo.lastPartial = null;
  const session = new Session({
    source: selectedSource(),
    file: ui.file.files[0] || null,
    language: ui.language.value,
    audible: ui.audible.checked,
  });
  current = session;
  try {
    await session.start();
  } catch (err) {
    if (session.stopping) return;           // Stop pressed while connecting: not an error
    const title = err instanceof UserError ? err.title : "Could not start";
    showError(title, err.message || String(err));
    session.stopping = true;
    session.teardown();
    if (current === session) current = null;
    setState("error", title.toLowerCase());
  }
});

ui.stop.addEventListener("click", async () => {
  const session = current;
  if (!session) return;
  await session.stop("stopped");
});

ui.clear.addEventListener("click", () => {
  ui.finals.replaceChildren();
  renderPartial("", "");
  ui.partialMeta.textContent = "";
  demo.finals = [];
  demo.segments = {};
  ui.statFirst.textContent = "–";
  ui.statFinal.textContent = "–";
  ui.statLag.textContent = "–";
  ui.statCount.textContent = "0";
  ui.clock.textContent = "0.0 s";
});

ui.file.addEventListener("change", () => {
  if (ui.file.files.length) document.querySelector('input[name="source"][value="file"]').checked = true;
});

ui.audible.addEventListener("change", () => {
  if (current) current.setAudible(ui.audible.checked);
});

ui.alertClose.addEventListener("click", hideError);

ui.endpoint.textContent = shownUrl(streamUrl());
setState("idle");
