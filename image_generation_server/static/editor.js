// The editor: an image, a mask painted over it (brush and eraser), a prompt and a strength, sent to
// `POST /v1/images/edits`. What is painted is what changes: the mask sent is transparent exactly where it is painted.

import { editImage } from "./api.js";

const $ = (id) => document.getElementById(id);
let current = null; // {blob, params, done, painting, last}

/** Opens the editor on `blob` (an image of the history or an upload); `done(result, source)` gets the edit. */
export async function openEditor(blob, params, done) {
  const bitmap = await createImageBitmap(blob);
  const picture = $("edit-image");
  const mask = $("edit-mask");
  for (const canvas of [picture, mask]) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  picture.getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();
  mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  current = { blob, params, done, painting: false, last: null };
  $("edit-prompt").value = params.prompt || "";
  $("edit-error").hidden = true;
  $("edit-dialog").showModal();
}

/** The canvas pixel under a pointer event. */
function point(event) {
  const mask = $("edit-mask");
  const box = mask.getBoundingClientRect();
  return { x: ((event.clientX - box.left) * mask.width) / box.width, y: ((event.clientY - box.top) * mask.height) / box.height };
}

function stroke(from, to) {
  const context = $("edit-mask").getContext("2d");
  const eraser = document.querySelector('input[name="tool"]:checked').value === "eraser";
  context.globalCompositeOperation = eraser ? "destination-out" : "source-over";
  context.strokeStyle = context.fillStyle = "rgb(255, 0, 64)"; // opaque: the overlay's CSS opacity shows the image
  context.lineWidth = Number($("brush-size").value);
  context.lineCap = context.lineJoin = "round";
  context.beginPath();
  context.moveTo(from.x, from.y);
  context.lineTo(to.x, to.y);
  context.stroke();
  context.beginPath(); // a dab: a stroke of no length draws nothing
  context.arc(to.x, to.y, context.lineWidth / 2, 0, 2 * Math.PI);
  context.fill();
}

/**
 * The mask to send: transparent where painted (at least half covered, so that a stroke's soft edge counts once),
 * opaque elsewhere; null when nothing is painted.
 */
function maskBlob() {
  const painted = $("edit-mask");
  const overlay = painted.getContext("2d").getImageData(0, 0, painted.width, painted.height);
  const mask = new ImageData(painted.width, painted.height);
  let any = false;
  for (let i = 3; i < overlay.data.length; i += 4) {
    const edit = overlay.data[i] >= 128;
    any ||= edit;
    mask.data[i] = edit ? 0 : 255; // black, transparent where to edit
  }
  if (!any) return Promise.resolve(null);
  const out = document.createElement("canvas");
  out.width = painted.width;
  out.height = painted.height;
  out.getContext("2d").putImageData(mask, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

async function apply() {
  const prompt = $("edit-prompt").value.trim();
  if (!prompt) {
    $("edit-error").textContent = "Say what the edited image should show.";
    $("edit-error").hidden = false;
    return;
  }
  const button = $("edit-apply");
  button.disabled = true;
  $("edit-error").hidden = true;
  try {
    const strength = Number($("strength").value);
    const mask = await maskBlob();
    const result = await editImage(current.blob, mask, { ...current.params, prompt, strength });
    $("edit-dialog").close();
    await current.done(result, { blob: current.blob, params: current.params, strength, masked: mask !== null });
  } catch (error) {
    $("edit-error").textContent = error.message;
    $("edit-error").hidden = false;
  } finally {
    button.disabled = false;
  }
}

export function setUpEditor() {
  const mask = $("edit-mask");
  mask.addEventListener("pointerdown", (event) => {
    mask.setPointerCapture(event.pointerId);
    current.painting = true;
    current.last = point(event);
    stroke(current.last, current.last);
  });
  mask.addEventListener("pointermove", (event) => {
    if (!current?.painting) return;
    const next = point(event);
    stroke(current.last, next);
    current.last = next;
  });
  for (const name of ["pointerup", "pointercancel"]) {
    mask.addEventListener(name, () => {
      if (current) current.painting = false;
    });
  }
  $("strength").addEventListener("input", () => {
    $("strength-value").value = $("strength").value;
  });
  $("edit-clear").addEventListener("click", () => mask.getContext("2d").clearRect(0, 0, mask.width, mask.height));
  $("edit-apply").addEventListener("click", apply);
  $("edit-cancel").addEventListener("click", () => $("edit-dialog").close());
}
