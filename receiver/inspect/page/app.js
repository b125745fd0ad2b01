// tap-receiver recordings page: plain JavaScript, no build step, no outside requests.
// The page may be opened at /?token=... or /t/<token>/: API URLs are relative to it, and a
// ?token= is passed on to every request (including the <audio> element's).
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const PAGE_SIZE = 50;
const LIST_REFRESH_MS = 3000;
const LIVE_REFRESH_MS = 1000;
const LIVE_WAVE_REFRESH_MS = 2500;

const $ = (id) => document.getElementById(id);
const list = { offset: 0, total: 0, timer: null, seq: 0 };
let detail = null; // the open recording: {name, data, wave, duration, timers...}

class AuthError extends Error {}

function apiUrl(path, query = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== "" && v != null) q.set(k, v);
  if (TOKEN) q.set("token", TOKEN);
  const s = q.toString();
  return "api/" + path + (s ? "?" + s : "");
}

const tapPath = (name, action) => "taps/" + encodeURIComponent(name) + (action ? "/" + action : "");

async function api(path, query, options = {}) {
  const response = await fetch(apiUrl(path, query), { headers: { Accept: "application/json" }, ...options });
  if (response.status === 401) throw new AuthError("token");
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) throw new Error((body && body.error) || response.status + " " + response.statusText);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

// -- formatting ------------------------------------------------------------------------------

function fmtTime(seconds, precise = false) {
  if (seconds == null || !isFinite(seconds)) return "–";
  const neg = seconds < 0;
  let s = Math.abs(seconds);
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  const sec = precise ? s.toFixed(s < 10 ? 2 : 1) : Math.floor(s).toString();
  const ss = (s < 10 ? "0" : "") + sec;
  return (neg ? "-" : "") + (h ? h + ":" + String(m).padStart(2, "0") + ":" + ss : m + ":" + ss);
}

function fmtDuration(seconds) {
  if (seconds == null) return "–";
  if (seconds < 60) return seconds.toFixed(seconds < 10 ? 2 : 1) + " s";
  return fmtTime(seconds);
}

function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : n) + " " + units[i];
}

function fmtDate(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (isNaN(d)) return iso;
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return sameDay ? time : d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + time;
}

function ago(iso) {
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  if (!isFinite(s)) return "";
  if (s < 5) return "just now";
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  if (s < 129600) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " days ago";
}

const fmtDb = (v) => (v == null ? "−∞" : v.toFixed(1).replace("-", "−")) + " dBFS";
const TRANSPORTS = { websocket: "WebSocket", rtp: "RTP" };

function stateBadge(state) {
  return el("span", { class: "badge " + state, text: state });
}

function lossCell(loss) {
  if (loss == null) return el("span", { class: "muted", text: "–" });
  const cls = loss >= 5 ? "loss-bad" : loss > 0 ? "loss-warn" : "";
  return el("span", { class: cls, text: loss.toFixed(loss && loss < 1 ? 2 : 1) + " %" });
}

function showError(err) {
  const banner = $("error-banner");
  if (err instanceof AuthError) return showToken(true);
  banner.textContent = String(err.message || err);
  banner.hidden = false;
}

function clearError() { $("error-banner").hidden = true; }

// -- views -----------------------------------------------------------------------------------

function showView(id) {
  for (const v of ["token-view", "list-view", "detail-view"]) $(v).hidden = v !== id;
}

function showToken(rejected) {
  stopDetail();
  clearInterval(list.timer);
  showView("token-view");
  $("token-error").hidden = !(rejected && TOKEN);
  $("token-input").focus();
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const params = new URLSearchParams(location.search);
  params.set("token", $("token-input").value.trim());
  location.search = params.toString();
});

function route() {
  clearError();
  const m = location.hash.match(/^#\/tap\/(.+)$/);
  if (m) openDetail(decodeURIComponent(m[1]));
  else openList();
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);

// -- the list --------------------------------------------------------------------------------

function openList() {
  stopDetail();
  showView("list-view");
  document.title = "Recordings · tap-receiver";
  loadList();
  clearInterval(list.timer);
  list.timer = setInterval(() => { if (!document.hidden) loadList(); }, LIST_REFRESH_MS);
}

async function loadList() {
  const seq = ++list.seq;
  let data;
  try {
    data = await api("taps", {
      limit: PAGE_SIZE, offset: list.offset, q: $("filter-q").value.trim(),
      state: $("filter-state").value, transport: $("filter-transport").value,
    });
  } catch (err) { return showError(err); }
  if (seq !== list.seq) return; // a newer request is on its way
  clearError();
  list.total = data.total;
  const pill = $("server-status");
  pill.hidden = false;
  pill.textContent = data.active ? data.active + " recording now" : "idle";
  pill.classList.toggle("live", data.active > 0);
  const body = $("tap-table").tBodies[0];
  const rows = data.taps.map((t) => {
    const href = "#/tap/" + encodeURIComponent(t.name);
    const sub = [t.remote, t.tap_id !== t.name ? "tap id " + t.tap_id : null,
      t.instance ? "on " + t.instance : null].filter(Boolean).join(" · ");
    const channels = t.channel_names && t.channels > 1 ? " · " + t.channel_names.join(" + ")
      : t.channels > 1 ? " ×" + t.channels : "";
    const rate = t.sample_rate ? (t.sample_rate / 1000) + " kHz" + channels : "";
    return el("tr", { "data-name": t.name, onclick: () => { location.hash = href; } },
      el("td", { class: "c-id id" }, el("a", { href, text: t.name }), sub ? el("span", { class: "sub", text: sub }) : null),
      el("td", { class: "c-transport", text: TRANSPORTS[t.transport] || t.transport || "–" }),
      el("td", { class: "c-codec" }, t.codec || "–", rate ? el("span", { class: "sub", text: rate }) : null),
      el("td", { class: "c-start", title: t.started_at || "" }, fmtDate(t.started_at), el("span", { class: "sub", text: ago(t.started_at) })),
      el("td", { class: "c-duration num", text: fmtDuration(t.duration_seconds) }),
      el("td", { class: "c-state" }, stateBadge(t.state)),
      el("td", { class: "c-loss num" }, lossCell(t.loss_percent)),
    );
  });
  body.replaceChildren(...rows);
  $("list-empty").hidden = rows.length > 0;
  loadConnect(data.total === 0);
  const first = data.total ? list.offset + 1 : 0;
  $("page-info").textContent = `${first}–${list.offset + rows.length} of ${data.total}`;
  $("page-prev").disabled = list.offset === 0;
  $("page-next").disabled = list.offset + rows.length >= data.total;
}

// The URIs to paste into a tap, as the server printed them at start (GET /api/connect); the
// panel is open while there is nothing recorded yet.
async function loadConnect(open) {
  const panel = $("connect");
  if (!list.connect) {
    try { list.connect = await api("connect"); } catch (_) { return; }
    const c = list.connect;
    const rows = [
      ["WebSocket tap", c.tap_uri, "device.params.uri; {tap_id} becomes the file name"],
      ["RTP tap", c.rtp_uri, "send plain RTP (PCMU/PCMA) here"],
      ["Check it", "tap-receiver send '" + c.tap_uri + "'", "plays a test call and compares the recording"],
    ];
    $("connect-rows").replaceChildren(...rows.flatMap(([k, v, hint]) => [
      el("dt", { text: k }),
      el("dd", {}, el("code", { class: "uri", text: v }), el("span", { class: "sub muted", text: hint })),
    ]));
    panel.hidden = false;
  }
  if (open && !list.connectShown) panel.open = true;
  list.connectShown = list.connectShown || open;
}

let filterTimer = null;
$("filters").addEventListener("input", () => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => { list.offset = 0; loadList(); }, 200);
});
$("filters").addEventListener("submit", (e) => e.preventDefault());
$("page-prev").addEventListener("click", () => { list.offset = Math.max(0, list.offset - PAGE_SIZE); loadList(); });
$("page-next").addEventListener("click", () => { list.offset += PAGE_SIZE; loadList(); });

// -- the detail view -------------------------------------------------------------------------

// -- live listening: GET api/taps/<name>/live (receiver/live), played with Web Audio ----------

const LIVE_KEEP_SAMPLES = 8000 * 60; // first channel's samples kept for tests and automation
let listener = null; // {ws, ctx, next, channels, rate}

function stopListening(text) {
  if (!listener) return;
  const l = listener;
  listener = null;
  l.ws.onclose = null;
  try { l.ws.close(); } catch (_) { /* closed */ }
  if (l.ctx) l.ctx.close();
  $("d-listen").textContent = "▶ Listen live";
  $("d-listen-state").textContent = text || "";
}

function startListening(name) {
  const url = new URL(apiUrl(tapPath(name, "live")), location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const l = { ws, ctx: null, next: 0, channels: 1, rate: 8000 };
  listener = l;
  // What the page got, for tests and automation: the announced position, the frames since.
  window.tapLive = { name, position: null, frames: 0, gaps: 0, ended: false, samples: [] };
  $("d-listen").textContent = "■ Stop";
  $("d-listen-state").textContent = "connecting…";
  ws.onmessage = (event) => {
    if (listener !== l) return;
    if (typeof event.data === "string") return liveEvent(l, JSON.parse(event.data));
    livePcm(l, new Int16Array(event.data));
  };
  ws.onclose = () => { if (listener === l) stopListening("ended"); };
}

function liveEvent(l, message) {
  const live = window.tapLive;
  if (message.type === "start") {
    l.channels = message.channels;
    l.rate = message.sample_rate;
    live.position = message.position;
    l.ctx = new AudioContext({ sampleRate: l.rate });
    $("d-listen-state").textContent = "live, " + l.rate + " Hz";
  } else if (message.type === "gap") {
    live.gaps += 1;
    $("d-listen-state").textContent = "fell behind: skipped " + fmtTime(message.skipped_frames / l.rate, true);
  } else if (message.type === "end") {
    live.ended = true;
    stopListening("the tap ended");
  }
}

function livePcm(l, pcm) {
  const frames = pcm.length / l.channels;
  const live = window.tapLive;
  live.frames += frames;
  document.body.dataset.liveFrames = String(live.frames);
  for (let i = 0; i < pcm.length && live.samples.length < LIVE_KEEP_SAMPLES; i += l.channels) live.samples.push(pcm[i]);
  if (!l.ctx || !frames) return;
  const buffer = l.ctx.createBuffer(l.channels, frames, l.rate);
  for (let c = 0; c < l.channels; c++) {
    const out = buffer.getChannelData(c);
    for (let i = 0; i < frames; i++) out[i] = pcm[i * l.channels + c] / 32768;
  }
  const source = l.ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(l.ctx.destination);
  l.next = Math.max(l.next, l.ctx.currentTime + 0.05); // a little ahead, never in the past
  source.start(l.next);
  l.next += buffer.duration;
  scrollLiveWave(buffer.getChannelData(0));
}

function scrollLiveWave(samples) {
  const canvas = $("d-live-wave");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const columns = Math.max(1, Math.round(samples.length / 160)); // 20 ms at 8 kHz a column
  ctx.drawImage(canvas, -columns, 0);
  ctx.fillStyle = "#0b1220";
  ctx.fillRect(width - columns, 0, columns, height);
  ctx.fillStyle = "#39d98a";
  const per = samples.length / columns;
  for (let x = 0; x < columns; x++) {
    let lo = 0, hi = 0;
    for (let i = Math.floor(x * per); i < Math.floor((x + 1) * per); i++) {
      lo = Math.min(lo, samples[i]);
      hi = Math.max(hi, samples[i]);
    }
    const top = (1 - hi) * height / 2, bottom = (1 - lo) * height / 2;
    ctx.fillRect(width - columns + x, top, 1, Math.max(1, bottom - top));
  }
}

function stopDetail() {
  if (!detail) return;
  stopListening();
  clearInterval(detail.liveTimer);
  cancelAnimationFrame(detail.frame);
  detail.closed = true;
  const audio = $("d-audio");
  audio.pause();
  audio.removeAttribute("src");
  audio.load();
  detail = null;
}

async function openDetail(name) {
  clearInterval(list.timer);
  stopDetail();
  showView("detail-view");
  document.title = name + " · tap-receiver";
  detail = { name, data: null, wave: null, duration: 0, liveTimer: null, frame: 0, lastWave: 0 };
  const d = detail;
  $("d-title").textContent = name;
  $("d-badges").replaceChildren();
  $("d-subtitle").textContent = "";
  $("d-waves").replaceChildren();
  $("d-markers").replaceChildren();
  $("d-axis").replaceChildren();
  $("d-levels").replaceChildren(el("p", { class: "muted", text: "Measuring…" }));
  $("d-spectrogram").removeAttribute("src");
  $("d-download").href = apiUrl(tapPath(name, "audio"), { download: 1 });
  let data;
  try {
    data = await api(tapPath(name));
  } catch (err) { return showError(err); }
  if (d.closed) return;
  renderDetail(data);
  const audio = $("d-audio");
  audio.src = apiUrl(tapPath(name, "audio"));
  await loadWave();
  if (data.state === "recording") {
    d.liveTimer = setInterval(pollLive, LIVE_REFRESH_MS);
  } else {
    loadLevels();
  }
  animatePlayhead();
}

async function pollLive() {
  const d = detail;
  if (!d || document.hidden) return;
  let data;
  try { data = await api(tapPath(d.name)); } catch (err) { return showError(err); }
  if (d.closed) return;
  const wasLive = d.data && d.data.state === "recording";
  renderDetail(data);
  const ended = data.state !== "recording";
  if (ended || Date.now() - d.lastWave > LIVE_WAVE_REFRESH_MS) await loadWave();
  if (ended && wasLive) {
    clearInterval(d.liveTimer);
    const audio = $("d-audio");
    const at = audio.currentTime;
    audio.src = apiUrl(tapPath(d.name, "audio"));
    audio.addEventListener("loadedmetadata", () => { audio.currentTime = at; }, { once: true });
    loadLevels();
  }
}

function renderDetail(data) {
  const d = detail;
  d.data = data;
  const side = data.sidecar || {};
  const live = data.live;
  const badges = [stateBadge(data.state)];
  if (data.transport) badges.push(el("span", { class: "badge plain", text: TRANSPORTS[data.transport] || data.transport }));
  if (data.codec) badges.push(el("span", { class: "badge plain", text: data.codec }));
  const mismatch = side.codec_mismatch;  // the writer's G.711 law check (codecs/law_check.py)
  if (mismatch) badges.push(el("span", { class: "badge interrupted", id: "d-codec-warning",
    text: "looks like " + mismatch.likely, title: mismatch.message }));
  $("d-badges").replaceChildren(...badges);
  const sub = [data.tap_id !== data.name ? "tap id " + data.tap_id : null,
    data.remote ? "from " + data.remote : null, data.started_at ? fmtDate(data.started_at) : null];
  $("d-subtitle").textContent = sub.filter(Boolean).join(" · ");

  const banner = $("d-live");
  banner.hidden = !live;
  $("d-listen-row").hidden = !live && !listener;
  if (live) {
    const parts = ["● Recording", fmtTime(live.duration_seconds, true) + " of audio",
      (live.frames - live.frames_written) + " frames buffered"];
    if (live.rtp) parts.push(live.rtp.received + " packets, " + live.rtp.lost + " lost");
    banner.textContent = parts.join("  ·  ");
  }
  $("d-delete").hidden = data.state === "recording";

  const facts = [
    ["Duration", fmtDuration(data.duration_seconds)],
    ["Format", data.wav ? data.wav.format : (side.sample_rate ? side.sample_rate + " Hz, " + side.channels + " ch" : "–")],
    ["Started", side.started_at ? new Date(side.started_at).toLocaleString() : "–"],
    ["Ended", side.ended_at ? new Date(side.ended_at).toLocaleString() : "–"],
    ["End reason", side.end_reason || (data.state === "interrupted" ? "server stopped while recording" : "–")],
    ["Frames", live ? live.frames.toLocaleString() + (live.frames_written < live.frames ? " (" + live.frames_written.toLocaleString() + " on disk)" : "")
      : side.frames_written != null ? side.frames_written.toLocaleString() : (data.wav ? data.wav.frames.toLocaleString() : "–")],
    ["File", data.wav ? data.wav.file + " (" + fmtBytes(data.wav.size_bytes) + ")" : "missing"],
  ];
  if (data.wav && !data.wav.header_matches_data && data.state !== "recording") {
    facts.push(["Header", data.wav.problem || "does not match the data: run tap-receiver repair"]);
  }
  if (side.content_type) facts.push(["Content type", side.content_type]);
  if (side.error) facts.push(["Error", side.error]);
  if (mismatch) facts.push(["Codec check", mismatch.message]);
  const decoding = side.decoding;  // Opus / G.722 taps (codecs/decoders.py)
  if (decoding) facts.push(["Decoding", (side.codec || "") + " at " + side.sample_rate + " Hz; concealment "
    + decoding.concealment + ": " + decoding.concealed_frames + " frames concealed, "
    + decoding.corrupt_packets + " corrupt packets"]);
  fillFacts($("d-facts"), facts);

  const rtp = side.rtp;
  const counters = side.counters || {};
  const network = [];
  if (rtp) {
    $("d-network-title").textContent = "RTP";
    network.push(
      ["Packets", rtp.received.toLocaleString() + " received"],
      ["Lost", rtp.lost + " (" + (data.loss_percent ?? 0).toFixed(2) + " %)"],
      ["Late / reordered", rtp.late + " / " + rtp.reordered],
      ["Duplicates", String(rtp.duplicate)],
      ["Jitter", rtp.jitter_ms + " ms"],
      ["SSRCs", (rtp.ssrcs || []).join(", ") || "–"],
      ["Payload types", (rtp.payload_types || []).join(", ") || "–"],
      ["DTMF", (rtp.dtmf || []).map((x) => x.digit).join(" ") || "–"],
    );
    if (rtp.malformed) network.push(["Malformed", String(rtp.malformed)]);
    if (rtp.comfort_noise) network.push(["Comfort noise", String(rtp.comfort_noise)]);
  } else {
    $("d-network-title").textContent = TRANSPORTS[data.transport] || "Transport";
    for (const [k, v] of Object.entries(counters)) network.push([k.replace(/_/g, " "), Number(v).toLocaleString()]);
    if (side.close_code != null) network.push(["close code", String(side.close_code)]);
  }
  $("d-network-card").hidden = network.length === 0;
  fillFacts($("d-network"), network);

  const events = $("d-events");
  events.replaceChildren(...data.markers.map((m) => el("li", { onclick: () => seek(m.at) },
    el("span", { class: "t", text: fmtTime(m.at, true) }),
    el("span", { class: "kind muted", text: m.type.replace(/_/g, " ") }),
    el("span", { text: m.label + (m.duration ? " · " + Math.round(m.duration * 1000) + " ms" : "") }))));
  $("d-events-empty").hidden = data.markers.length > 0;
  $("d-raw").textContent = JSON.stringify(side, null, 2);
  if (d.wave) renderMarkers();
}

// What channel i carries: the sidecar's names (inbound/outbound, caller/callee), else its number.
function channelName(i, count) {
  const names = detail && detail.data && detail.data.channel_names;
  if (names && names[i]) return names[i];
  return count > 1 ? "Channel " + (i + 1) : null;
}

function fillFacts(dl, rows) {
  dl.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
}

async function loadWave() {
  const d = detail;
  const scope = $("scope");
  const dpr = window.devicePixelRatio || 1;
  const width = Math.max(64, Math.min(4000, Math.round(scope.clientWidth * dpr)));
  let wave;
  try {
    wave = await api(tapPath(d.name, "waveform"), { width });
  } catch (err) { return showError(err); }
  if (d.closed) return;
  d.wave = wave;
  d.duration = wave.duration_seconds;
  d.lastWave = Date.now();
  drawWaves();
  renderAxis();
  renderMarkers();
  document.body.dataset.waveReady = d.name + ":" + wave.frames; // for tests and automation
  const spectro = $("d-spectrogram");
  const height = Math.round(140 * dpr);
  spectro.src = apiUrl(tapPath(d.name, "spectrogram"), { width: Math.min(width, 4000), height, v: wave.frames });
  const nyquist = wave.sample_rate / 2000;
  const names = Array.from({ length: wave.channels }, (_, c) => channelName(c, wave.channels));
  $("d-spectro-label").textContent = "Spectrogram, 0–" + nyquist + " kHz" +
    (wave.channels > 1 ? " · top to bottom: " + names.join(", ") : "");
}

function drawWaves() {
  const wave = detail.wave;
  const box = $("d-waves");
  let canvases = Array.from(box.querySelectorAll("canvas"));
  const names = Array.from({ length: wave.channels }, (_, c) => channelName(c, wave.channels));
  if (canvases.length !== wave.channels || box.dataset.names !== names.join("\n")) {
    canvases = [];
    box.replaceChildren();
    box.dataset.names = names.join("\n");
    for (let c = 0; c < wave.channels; c++) {
      // the name in a strip of its own above its waveform, never over the audio
      if (names[c]) box.append(el("div", { class: "channel-name", text: names[c] }));
      const canvas = el("canvas", { class: "wave", "data-channel": c });
      canvases.push(canvas);
      box.append(canvas);
    }
  }
  const styles = getComputedStyle(document.documentElement);
  canvases.forEach((canvas, c) => drawWave(canvas, wave.min[c], wave.max[c], styles));
}

function drawWave(canvas, mins, maxs, styles) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(canvas.clientWidth * dpr));
  const h = Math.max(1, Math.round(canvas.clientHeight * dpr));
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = styles.getPropertyValue("--scope").trim() || "#0e1420";
  ctx.fillRect(0, 0, w, h);
  const mid = h / 2;
  const half = h / 2 - 2 * dpr;
  ctx.fillStyle = styles.getPropertyValue("--scope-grid").trim() || "#1f2940";
  for (const level of [-0.5, 0.5]) ctx.fillRect(0, Math.round(mid - level * half), w, 1);
  const n = mins.length;
  if (!n) return;
  const gradient = ctx.createLinearGradient(0, 0, 0, h);
  const waveColor = styles.getPropertyValue("--wave").trim() || "#3dd6c5";
  gradient.addColorStop(0, "#8ff5e8");
  gradient.addColorStop(0.5, waveColor);
  gradient.addColorStop(1, "#8ff5e8");
  ctx.fillStyle = gradient;
  // one bar per pixel column: the extremes of every waveform column that falls into it
  const perPixel = n / w;
  for (let x = 0; x < w; x++) {
    const from = Math.floor(x * perPixel);
    const to = Math.max(from + 1, Math.floor((x + 1) * perPixel));
    if (from >= n) break;
    let lo = 32767, hi = -32768;
    for (let i = from; i < Math.min(to, n); i++) {
      if (mins[i] < lo) lo = mins[i];
      if (maxs[i] > hi) hi = maxs[i];
    }
    const top = mid - (hi / 32768) * half;
    const bottom = mid - (lo / 32768) * half;
    ctx.fillRect(x, Math.floor(top), 1, Math.max(1, Math.ceil(bottom - top)));
  }
  ctx.fillStyle = "rgba(255,255,255,0.12)";
  ctx.fillRect(0, Math.round(mid), w, 1);
}

function renderAxis() {
  const axis = $("d-axis");
  const duration = detail.duration;
  if (!duration) return axis.replaceChildren();
  const width = axis.clientWidth || 800;
  const target = duration / Math.max(2, Math.floor(width / 90));
  const steps = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600];
  const step = steps.find((s) => s >= target) || 7200;
  const ticks = [];
  for (let t = step; t < duration - step * 0.3; t += step) {
    const label = step < 1 ? t.toFixed(step < 0.1 ? 2 : 1) + " s" : fmtTime(t);
    ticks.push(el("span", { style: "left:" + (100 * t / duration) + "%", text: label }));
  }
  axis.replaceChildren(...ticks);
}

function renderMarkers() {
  const d = detail;
  const box = $("d-markers");
  if (!d.data || !d.duration) return box.replaceChildren();
  const items = d.data.markers.filter((m) => m.at <= d.duration + 0.001).map((m) => {
    const left = 100 * m.at / d.duration;
    const width = m.duration ? Math.max(0.25, 100 * m.duration / d.duration) : 0;
    const style = "left:" + left + "%" + (width ? ";width:" + width + "%" : "");
    return el("div", { class: "marker " + m.type, style, title: fmtTime(m.at, true) + " · " + m.label,
      onclick: (e) => { e.stopPropagation(); seek(m.at); } }, el("span", { text: m.label }));
  });
  box.replaceChildren(...items);
}

function loadLevels() {
  const d = detail;
  api(tapPath(d.name, "levels")).then((levels) => {
    if (d.closed) return;
    const rows = levels.channels.map((c, i) => {
      const pct = (v) => (v == null ? 0 : Math.max(0, Math.min(100, 100 + (v * 100) / 60)));
      return el("div", { class: "meter-row" },
        el("div", { class: "meter-head" },
          el("strong", { text: channelName(i, levels.channels.length) || "Level" }),
          el("span", { text: "peak " + fmtDb(c.peak_dbfs) + " · RMS " + fmtDb(c.rms_dbfs) })),
        el("div", { class: "meter", title: "−60 to 0 dBFS" },
          el("div", { class: "rms", style: "width:" + pct(c.rms_dbfs) + "%" }),
          el("div", { class: "peak", style: "left:calc(" + pct(c.peak_dbfs) + "% - 3px)" })),
        el("div", { class: "meter-scale" }, el("span", { text: "−60" }), el("span", { text: "−30" }), el("span", { text: "0 dBFS" })),
        c.clipped_samples ? el("p", { class: "error", text: c.clipped_samples.toLocaleString() + " clipped samples" }) : null);
    });
    const silence = levels.longest_silence;
    const facts = el("dl", { class: "facts" },
      el("dt", { text: "Clipping" }),
      el("dd", { text: levels.channels.some((c) => c.clipped_samples) ? "yes" : "none" }),
      el("dt", { text: "Longest silence" }),
      el("dd", {}, silence.duration_seconds
        ? el("a", { href: "#", onclick: (e) => { e.preventDefault(); seek(silence.start_seconds); },
          text: fmtDuration(silence.duration_seconds) + " at " + fmtTime(silence.start_seconds, true) })
        : "none over 20 ms"),
      el("dt", { text: "Silence means" }),
      el("dd", { text: "below " + levels.silence_threshold_dbfs + " dBFS" }));
    $("d-levels").replaceChildren(...rows, facts);
  }).catch((err) => {
    if (!d.closed) $("d-levels").replaceChildren(el("p", { class: "muted", text: String(err.message || err) }));
  });
}

function seek(seconds) {
  const audio = $("d-audio");
  audio.currentTime = Math.max(0, seconds);
  updatePlayhead();
}

function updatePlayhead() {
  const d = detail;
  if (!d || !d.duration) return;
  const t = $("d-audio").currentTime;
  const left = Math.min(100, (100 * t) / d.duration) + "%";
  $("d-playhead").style.left = left;
  $("d-playhead2").style.left = left;
}

function animatePlayhead() {
  // a frame loop only while playing; seeks and pauses update the playhead through events
  const d = detail;
  cancelAnimationFrame(d ? d.frame : 0);
  if (!d || d.closed) return;
  updatePlayhead();
  if (!$("d-audio").paused) d.frame = requestAnimationFrame(animatePlayhead);
}

for (const type of ["play", "seeked", "timeupdate", "pause", "loadedmetadata"]) {
  $("d-audio").addEventListener(type, animatePlayhead);
}

function timeAt(event, target) {
  const rect = target.getBoundingClientRect();
  const x = Math.max(0, Math.min(rect.width, event.clientX - rect.left));
  return { x, t: detail && detail.duration ? (x / rect.width) * detail.duration : 0 };
}

for (const id of ["scope", "spectro-wrap"]) {
  $(id).addEventListener("click", (e) => { if (detail) seek(timeAt(e, e.currentTarget).t); });
}
$("scope").addEventListener("mousemove", (e) => {
  if (!detail || !detail.duration) return;
  const { x, t } = timeAt(e, e.currentTarget);
  const hover = $("d-hover");
  hover.hidden = false;
  hover.style.left = x + "px";
  hover.textContent = fmtTime(t, true);
});
$("scope").addEventListener("mouseleave", () => { $("d-hover").hidden = true; });

$("d-listen").addEventListener("click", () => {
  if (listener) stopListening();
  else if (detail) startListening(detail.name);
});
$("d-delete").addEventListener("click", async () => {
  const d = detail;
  if (!d || !confirm("Delete " + d.name + " (WAV and sidecar)? This cannot be undone.")) return;
  try {
    await api(tapPath(d.name), {}, { method: "DELETE" });
  } catch (err) { return showError(err); }
  location.hash = "#/";
});

let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { if (detail && detail.wave) { drawWaves(); renderAxis(); } }, 150);
});

document.addEventListener("keydown", (e) => {
  if (!detail || e.target.closest("input, select, textarea")) return;
  const audio = $("d-audio");
  if (e.key === " ") { e.preventDefault(); audio.paused ? audio.play() : audio.pause(); }
  else if (e.key === "ArrowLeft") seek(audio.currentTime - 5);
  else if (e.key === "ArrowRight") seek(audio.currentTime + 5);
  else if (e.key === "Escape") location.hash = "#/";
});
