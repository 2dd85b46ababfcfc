// The draw-a-digit page: draws on a canvas, sends it to POST /v1/predict as a PNG (debounced)
// and shows the answer: the label, ten bars, the 28x28 image the model saw, the time split.
"use strict";

const DEBOUNCE_MS = 150;
const PEN_WIDTH = 18;
const KEY_STEP = 10;

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const labelOut = document.getElementById("label");
const statusOut = document.getElementById("status");
const bars = document.getElementById("bars");
const seen = document.getElementById("seen");
const timing = document.getElementById("timing");
const modelSelect = document.getElementById("model");

let strokes = [];       // each a list of [x, y] points in canvas pixels
let current = null;     // the stroke being drawn
let uploaded = null;    // a file chosen or dropped, shown instead of strokes
let timer = null;
let sequence = 0;       // answers to older requests are dropped
const keyPen = { x: 140, y: 140, down: false };

function redraw() {
  // Strokes on a transparent canvas (the page's paper is the canvas's CSS background): the
  // PNG's alpha is the ink, which the server decodes alone, in about half the time.
  ctx.clearRect(0, 0, pad.width, pad.height);
  ctx.strokeStyle = "#111";
  ctx.lineWidth = PEN_WIDTH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  for (const stroke of strokes) {
    ctx.beginPath();
    ctx.moveTo(stroke[0][0], stroke[0][1]);
    for (const [x, y] of stroke) ctx.lineTo(x, y);
    if (stroke.length === 1) ctx.lineTo(stroke[0][0] + 0.1, stroke[0][1]);
    ctx.stroke();
  }
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width,
          (event.clientY - box.top) * pad.height / box.height];
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  uploaded = null;
  current = [point(event)];
  strokes.push(current);
  redraw();
});
pad.addEventListener("pointermove", (event) => {
  if (!current) return;
  current.push(point(event));
  redraw();
  schedule();
});
function endStroke() {
  if (!current) return;
  current = null;
  schedule();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

pad.addEventListener("keydown", (event) => {
  const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  if (event.key === " ") {
    keyPen.down = !keyPen.down;
    if (keyPen.down) { uploaded = null; strokes.push([[keyPen.x, keyPen.y]]); }
    say(keyPen.down ? "Pen down." : "Pen up.");
  } else if (moves[event.key]) {
    const [dx, dy] = moves[event.key];
    keyPen.x = Math.min(pad.width, Math.max(0, keyPen.x + dx * KEY_STEP));
    keyPen.y = Math.min(pad.height, Math.max(0, keyPen.y + dy * KEY_STEP));
    if (keyPen.down) strokes[strokes.length - 1].push([keyPen.x, keyPen.y]);
  } else {
    return;
  }
  event.preventDefault();
  redraw();
  schedule();
});

document.getElementById("undo").addEventListener("click", () => {
  strokes.pop();
  uploaded = null;
  redraw();
  schedule();
});
document.getElementById("clear").addEventListener("click", () => {
  strokes = [];
  uploaded = null;
  redraw();
  reset();
});

document.getElementById("file").addEventListener("change", (event) => {
  if (event.target.files.length) useFile(event.target.files[0]);
});
const drop = document.getElementById("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) useFile(event.dataTransfer.files[0]);
});

function useFile(file) {
  uploaded = file;
  strokes = [];
  const url = URL.createObjectURL(file);
  const image = new Image();
  image.onload = () => {
    redraw();
    const scale = Math.min(pad.width / image.width, pad.height / image.height);
    const w = image.width * scale, h = image.height * scale;
    ctx.drawImage(image, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    URL.revokeObjectURL(url);
  };
  image.src = url;
  send();
}

modelSelect.addEventListener("change", () => send());

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(send, DEBOUNCE_MS);
}

function say(text) { statusOut.textContent = text; }

function reset() {
  labelOut.textContent = "–";
  showBars(null);
  seen.removeAttribute("src");
  timing.textContent = "";
  say("Draw a digit to start.");
}

async function body() {
  if (uploaded) return uploaded;
  if (!strokes.length) return null;
  return new Promise((resolve) => pad.toBlob(resolve, "image/png"));
}

async function send() {
  clearTimeout(timer);
  const image = await body();
  if (!image) { reset(); return; }
  const mine = ++sequence;
  const query = new URLSearchParams({ explain: "1" });
  if (modelSelect.value) query.set("model", modelSelect.value);
  say("Reading…");
  let response;
  try {
    response = await fetch(`/v1/predict?${query}`, {
      method: "POST",
      headers: { "Content-Type": image.type || "application/octet-stream" },
      body: image,
    });
  } catch (error) {
    if (mine === sequence) say(`The server cannot be reached: ${error.message}`);
    return;
  }
  const answer = await response.json();
  if (mine !== sequence) return;  // a newer drawing is on its way
  if (!response.ok) {
    labelOut.textContent = "?";
    showBars(null);
    say(answer.error ? answer.error.message : `HTTP ${response.status}`);
    return;
  }
  labelOut.textContent = String(answer.label);
  showBars(answer.probabilities, answer.label);
  seen.src = answer.explain.input_png;
  const confidence = (answer.probabilities[answer.label] * 100).toFixed(1);
  say(`It is a ${answer.label} (${confidence} %), says ${answer.model}.`);
  timing.textContent = describeTiming(response.headers.get("server-timing"));
}

function showBars(probabilities, top) {
  bars.replaceChildren();
  for (let digit = 0; digit < 10; digit++) {
    const p = probabilities ? probabilities[digit] : 0;
    const item = document.createElement("li");
    if (probabilities && digit === top) item.className = "top";
    const percent = (p * 100).toFixed(1);
    item.setAttribute("aria-label", `${digit}: ${percent} %`);
    const name = document.createElement("span");
    name.textContent = String(digit);
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${p * 100}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.textContent = `${percent} %`;
    item.append(name, track, value);
    bars.append(item);
  }
}

function describeTiming(header) {
  if (!header) return "";
  const parts = header.split(",").map((entry) => {
    const [name, ...params] = entry.trim().split(";");
    const dur = params.find((p) => p.trim().startsWith("dur="));
    return dur ? `${name} ${Number(dur.split("=")[1]).toFixed(2)} ms` : name;
  });
  return `Server time: ${parts.join(" · ")}`;
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    const { models } = await response.json();
    for (const model of models) {
      const option = document.createElement("option");
      option.value = model.name;
      option.textContent = `${model.name} (${model.architecture})`;
      modelSelect.append(option);
    }
  } catch (error) {
    say(`The model list cannot be read: ${error.message}`);
  }
}

redraw();
showBars(null);
loadModels();
