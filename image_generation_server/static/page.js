// The page: the form, the generation in progress (Generate becomes Cancel), the results and the history.

import { ApiError, apiKey, curlCommand, generateImages, jobsOffered, listModels, runJob, setApiKey } from "./api.js";
import { openEditor, setUpEditor } from "./editor.js";
import * as history from "./history.js";

const $ = (id) => document.getElementById(id);
const form = $("form");
const button = $("generate");
const status = $("status");
const FIELDS = ["prompt", "negative_prompt", "size", "steps", "guidance", "seed", "model", "output_format", "n"];
// The server's parameter names, as OpenAI's `param` or FastAPI's `loc` give them, to the field that shows the error.
const FIELD_OF = {
  size: "size",
  width: "size",
  height: "size",
  num_inference_steps: "steps",
  guidance_scale: "guidance",
};
const THUMB_PX = 192;
const FORM_KEY = "image-generation-form"; // the last form, in localStorage, so that it survives a reload
const SAVED_FIELDS = ["prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed-mode", "seed", "model",
  "output_format", "n"];
const UNDO_MS = 10000; // how long a deletion can be undone

let running = null; // {controller, timer} while a request is out
let cooldown = null; // the Retry-After countdown's timer
let afterKey = null; // what to do once an API key is given
let resultUrls = [];
const jobs = jobsOffered(); // with jobs, the page shows each step; without, the time elapsed
let thumbUrls = [];
let undoable = null; // {entries, timer}: what the last deletion removed, until it can no longer be undone

function number(input) {
  const text = input.value.trim();
  return text === "" ? null : Number(text);
}

/** The form as the API's parameters (native names); empty fields are null. */
function readParams() {
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value.trim() === "" ? null : $("negative_prompt").value,
    width: number($("width")),
    height: number($("height")),
    num_inference_steps: number($("steps")),
    guidance_scale: number($("guidance")),
    seed: $("seed-mode").value === "keep" ? number($("seed")) : null,
    output_format: $("output_format").value,
    model: $("model").value || null,
  };
}

/** Puts `params` back into the form; a seed is kept. */
function writeParams(params) {
  $("prompt").value = params.prompt;
  $("negative_prompt").value = params.negative_prompt ?? "";
  $("width").value = params.width;
  $("height").value = params.height;
  $("steps").value = params.num_inference_steps ?? "";
  $("guidance").value = params.guidance_scale ?? "";
  $("output_format").value = params.output_format;
  if (params.model && ![...$("model").options].some((o) => o.value === params.model)) {
    $("model").add(new Option(params.model, params.model));
  }
  $("model").value = params.model ?? "";
  if (params.seed !== null && params.seed !== undefined) setSeed(params.seed, "keep");
  syncPreset();
  clearErrors();
  saveForm();
  $("prompt").focus();
}

function saveForm() {
  try {
    localStorage.setItem(FORM_KEY, JSON.stringify(Object.fromEntries(SAVED_FIELDS.map((id) => [id, $(id).value]))));
  } catch {
    // storage full or disabled: the form just does not survive a reload
  }
}

function restoreForm() {
  let saved = null;
  try {
    saved = JSON.parse(localStorage.getItem(FORM_KEY) ?? "null");
  } catch {
    // nothing usable saved
  }
  for (const id of SAVED_FIELDS) {
    const value = saved?.[id];
    if (typeof value !== "string") continue;
    if (id === "model" && value && ![...$("model").options].some((o) => o.value === value)) {
      $("model").add(new Option(value, value));
    }
    $(id).value = value;
  }
}

function setSeed(seed, mode) {
  $("seed").value = seed;
  if (mode) $("seed-mode").value = mode;
  $("seed").disabled = $("seed-mode").value === "random";
}

function syncPreset() {
  const size = `${$("width").value}x${$("height").value}`;
  const preset = [...$("preset").options].find((o) => o.value === size);
  $("preset").value = preset ? size : "custom";
}

function clearErrors() {
  $("error").hidden = true;
  for (const name of FIELDS) {
    const message = $(`${name}-error`);
    if (message) message.hidden = true;
  }
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

/** The server's sentence at its field (if it names one), and above the results with what to do next (if known). */
function showError(text, param, next = "") {
  const field = FIELD_OF[param] ?? param;
  const message = field && $(`${field}-error`);
  if (message) {
    message.textContent = text;
    message.hidden = false;
    const inputs = field === "size" ? [$("width"), $("height")] : [$(field)];
    for (const input of inputs) input?.setAttribute("aria-invalid", "true");
    inputs[0]?.focus();
  }
  $("error").textContent = next ? `${text}. ${next}` : text;
  $("error").hidden = false;
}

function setRunning(on) {
  button.textContent = on ? "Cancel" : "Generate";
  button.classList.toggle("cancel", on);
  status.setAttribute("aria-live", on ? "off" : "polite"); // the running clock is not read out ten times a second
  $("progress").removeAttribute("value"); // indeterminate until the server reports steps
  $("progress").hidden = !on;
  $("results").setAttribute("aria-busy", String(on));
}

/** Where the image will appear, the size it will have, shown as soon as Generate is pressed; with a Cancel of its
 * own, as Generate may be out of view on a phone. */
function showPlaceholder(params, n) {
  for (const url of resultUrls) URL.revokeObjectURL(url);
  resultUrls = [];
  const boxes = Array.from({ length: n }, () => {
    const box = element("div", { className: "placeholder" });
    box.style.aspectRatio = `${params.width || 512} / ${params.height || 512}`;
    box.style.maxWidth = `${params.width || 512}px`;
    return box;
  });
  const cancel = element("button", { type: "button", className: "cancel-run", textContent: "Cancel" });
  cancel.addEventListener("click", () => running?.controller.abort());
  $("results").replaceChildren(element("figure", { className: "pending" }, ...boxes, cancel));
  bringIntoView(document.querySelector("#output .stage"), boxes[0]);
}

/**
 * Scrolls so that everything from `first`'s top to `last`'s bottom is in the window, or at least its start when it
 * is taller; nothing moves when it is in view already (a wide layout).
 */
function bringIntoView(first, last = first) {
  const { top } = first.getBoundingClientRect();
  if (top >= 0 && last.getBoundingClientRect().bottom <= window.innerHeight) return;
  const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  window.scrollBy({ top: top - 8, behavior: smooth ? "smooth" : "auto" });
}

function elapsed(started) {
  return `${((performance.now() - started) / 1000).toFixed(1)} s`;
}

async function generate() {
  clearErrors();
  const params = readParams();
  const n = Number($("n").value);
  const controller = new AbortController();
  const started = performance.now();
  let doing = "Generating";
  const timer = setInterval(() => {
    status.textContent = `${doing}… ${elapsed(started)}`;
  }, 100);
  const previews = { image: 0, urls: [] }; // which image's placeholder the previews draw in, and their URLs
  const onProgress = (event) => {
    if (event.phase === "preview") {
      showPreview(event, previews, n);
      return;
    }
    doing = progressText(event, n);
    if (event.phase === "step") $("progress").value = event.step / event.steps;
  };
  running = { controller, timer };
  saveForm();
  setRunning(true);
  showPlaceholder(params, n);
  status.textContent = "Generating…";
  try {
    const result = (await jobs)
      ? await runJob(params, n, controller.signal, onProgress)
      : await generateImages(params, n, controller.signal);
    clearInterval(timer);
    const ms = Math.round(performance.now() - started);
    const entries = [];
    for (const image of result.images) {
      const entry = {
        created: Date.now(),
        params: { ...params, width: result.width, height: result.height, seed: image.seed },
        format: result.format,
        ms,
        image: image.blob,
        thumb: await thumbnail(image.blob),
      };
      entry.id = await history.add(entry);
      entries.push(entry);
    }
    if (entries.length) setSeed(entries[0].params.seed);
    showResults(entries);
    status.textContent = `Done in ${(ms / 1000).toFixed(1)} s`;
    await renderHistory();
  } catch (error) {
    $("results").replaceChildren();
    failed(error);
  } finally {
    clearInterval(timer);
    for (const url of previews.urls) URL.revokeObjectURL(url);
    running = null;
    setRunning(false);
  }
}

/** Draws a preview of the generation in progress in its image's placeholder, with the step it shows; each one
 * replaces the last, and the final image replaces them all. */
function showPreview(event, previews, n) {
  if (event.index === 0 && previews.urls.length) previews.image = Math.min(previews.image + 1, n - 1);
  const box = $("results").querySelectorAll(".placeholder")[previews.image];
  if (!box) return;
  const url = URL.createObjectURL(event.blob);
  previews.urls.push(url);
  let image = box.querySelector("img.preview");
  if (!image) {
    image = element("img", { className: "preview", alt: "Preview of the image being generated" });
    box.replaceChildren(image, element("span", { className: "preview-step" }));
  }
  image.src = url;
  box.querySelector(".preview-step").textContent = `Preview at step ${event.step} of ${event.steps}`;
}

function progressText(event, n) {
  const image = n > 1 && event.image ? ` (image ${event.image} of ${n})` : "";
  switch (event.phase) {
    case "queued":
      return "Waiting for the model";
    case "waiting": {
      const wait = event.estimated_start_seconds;
      return event.ahead ? `${event.ahead} ahead${wait === null ? "" : `, about ${wait} s`}` : "Starting";
    }
    case "sent":
      return "Sent to the model";
    case "step":
      return `Step ${event.step} of ${event.steps}${image}`;
    case "stored":
      return `Image ${event.image} of ${event.images} done`;
    default:
      return "Generating";
  }
}

function failed(error) {
  if (error.name === "AbortError") {
    status.textContent = "Cancelled";
    return;
  }
  status.textContent = "";
  if (!(error instanceof ApiError)) {
    showError(error instanceof TypeError ? "The server could not be reached." : String(error.message || error));
    return;
  }
  if (error.status === 401) {
    askForKey(() => form.requestSubmit());
    return;
  }
  showError(error.message, error.param, nextStep(error));
  if (error.retryAfter !== null && [429, 503].includes(error.status)) countdown(error.retryAfter);
}

// What a person can do about a failure: by its kind where the server names it (a job), else by its status.
const NEXT_STEP_OF_KIND = {
  MissingTokenError:
    "Whoever runs the server sets HF_TOKEN to a Hugging Face token with the permission “Make calls to Inference " +
    "Providers” (or starts it with ./scripts/serve.sh --demo to try it without one).",
  UpstreamAuthError:
    "Whoever runs the server checks its Hugging Face token: valid, and with the permission “Make calls to " +
    "Inference Providers”.",
  UpstreamQuotaError: "The account behind the server's token needs more Inference Providers credits.",
};
const NEXT_STEP_OF_STATUS = {
  429: "Generate comes back when the countdown ends.",
  502: "Try again in a moment; if it keeps failing, the server's log says more.",
  503: "Generate comes back when the countdown ends.",
  504: "Try again, or ask for a smaller image or fewer steps.",
};

function nextStep(error) {
  return NEXT_STEP_OF_KIND[error.kind] ?? NEXT_STEP_OF_STATUS[error.status] ?? "";
}

/** Generate stays off until Retry-After has passed, with the seconds left shown on it. */
function countdown(seconds) {
  clearInterval(cooldown);
  let left = seconds;
  const tick = () => {
    if (left <= 0) {
      clearInterval(cooldown);
      button.disabled = false;
      button.textContent = "Generate";
      return;
    }
    button.disabled = true;
    button.textContent = `Retry in ${left} s`;
    left -= 1;
  };
  tick();
  cooldown = setInterval(tick, 1000);
}

function askForKey(then) {
  afterKey = then;
  $("api-key").value = apiKey();
  $("key-dialog").showModal();
}

async function thumbnail(blob) {
  const bitmap = await createImageBitmap(blob);
  const scale = Math.min(1, THUMB_PX / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  return new Promise((resolve) => canvas.toBlob(resolve, "image/webp", 0.8));
}

function element(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function showResults(entries) {
  for (const url of resultUrls) URL.revokeObjectURL(url);
  resultUrls = [];
  $("results").replaceChildren(...entries.map(resultFigure));
}

function resultFigure(entry) {
  const { params } = entry;
  const url = URL.createObjectURL(entry.image);
  resultUrls.push(url);
  const name = `image-${params.seed}.${entry.format}`;
  const image = element("img", { src: url, alt: params.prompt, width: params.width, height: params.height });
  const caption = element(
    "figcaption",
    {},
    "seed ",
    element("span", { className: "seed", textContent: String(params.seed) }),
    ` · ${params.width}×${params.height} · ${params.model || "server default model"} · ${(entry.ms / 1000).toFixed(1)} s`,
  );
  const curl = element("pre", { className: "curl", hidden: true, tabIndex: 0 });
  const download = element("a", { href: url, download: name, textContent: "Download", className: "download" });
  const reuse = element("button", { type: "button", textContent: "Use these settings", className: "reuse" });
  reuse.addEventListener("click", () => writeParams(params));
  const reuseSeed = element("button", { type: "button", textContent: "Reuse seed", className: "reuse-seed" });
  reuseSeed.addEventListener("click", () => setSeed(params.seed, "keep"));
  const edit = element("button", { type: "button", textContent: "Edit", className: "edit" });
  edit.addEventListener("click", () => openEditor(entry.image, params, keepEdit));
  const copy = element("button", { type: "button", textContent: "Copy as curl", className: "copy-curl" });
  copy.addEventListener("click", async () => {
    curl.textContent = curlCommand(params);
    curl.hidden = false;
    try {
      await navigator.clipboard.writeText(curl.textContent);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Select and copy below";
    }
  });
  if (entry.source) {
    const source = URL.createObjectURL(entry.source);
    resultUrls.push(source);
    const from = entry.masked ? "masked edit" : "edit";
    caption.append(` · ${from} (strength ${entry.strength}) of `, element("img", { src: source, alt: "the source", className: "source" }));
  }
  const actions = element("div", { className: "actions" }, download, edit, reuse, reuseSeed, copy);
  return element("figure", { className: "result" }, image, caption, actions, curl);
}

/** An edit's result goes into the history with its source (a thumbnail of it), as a generation's does. */
async function keepEdit(result, source) {
  const entries = [];
  for (const image of result.images) {
    const entry = {
      created: Date.now(),
      params: { ...source.params, prompt: $("edit-prompt").value.trim(), width: result.width, height: result.height, seed: image.seed },
      format: result.format,
      ms: 0,
      image: image.blob,
      thumb: await thumbnail(image.blob),
      source: await thumbnail(source.blob),
      strength: source.strength,
      masked: source.masked,
    };
    entry.id = await history.add(entry);
    entries.push(entry);
  }
  showResults(entries);
  status.textContent = "Edited";
  await renderHistory();
}

/** Opens the editor on an image file the person picked or dropped. */
function editFile(file) {
  if (!file || !file.type.startsWith("image/")) return;
  openEditor(file, { prompt: "", output_format: "png" }, keepEdit);
}

async function renderHistory() {
  const entries = await history.all();
  for (const url of thumbUrls) URL.revokeObjectURL(url);
  thumbUrls = [];
  $("clear-history").disabled = entries.length === 0;
  $("history").replaceChildren(
    ...entries.map((entry) => {
      const url = URL.createObjectURL(entry.thumb || entry.image);
      thumbUrls.push(url);
      const label = `${entry.params.prompt.slice(0, 60)} (seed ${entry.params.seed})`;
      const restore = element(
        "button",
        { type: "button", className: "restore", title: entry.params.prompt },
        element("img", { src: url, alt: "" }),
        element("span", { className: "prompt", textContent: entry.params.prompt }),
      );
      restore.setAttribute("aria-label", `Open: ${label}`);
      restore.addEventListener("click", () => {
        clearErrors();
        status.textContent = "";
        showResults([entry]); // larger, with Download and "Use these settings"
        const shown = $("results").querySelector("figure.result");
        if (shown) bringIntoView(shown);
      });
      const remove = element("button", { type: "button", className: "delete", textContent: "×" });
      remove.setAttribute("aria-label", `Delete: ${label}`);
      remove.addEventListener("click", async () => {
        await history.remove(entry.id);
        offerUndo([entry], `Deleted “${entry.params.prompt.slice(0, 40)}”.`);
        await renderHistory();
        ($("history").querySelector(".restore") ?? $("undo-button")).focus();
      });
      return element("li", {}, restore, remove);
    }),
  );
}

/** Deleting is immediate; for a while, Undo puts back what it removed. */
function offerUndo(entries, text) {
  clearTimeout(undoable?.timer);
  undoable = { entries, timer: setTimeout(hideUndo, UNDO_MS) };
  $("undo-text").textContent = text;
  $("undo").hidden = false;
}

function hideUndo() {
  clearTimeout(undoable?.timer);
  undoable = null;
  $("undo").hidden = true;
}

async function loadModels() {
  try {
    const models = await listModels();
    if (!models.length) return;
    const current = $("model").value;
    $("model").replaceChildren(...models.map((id) => new Option(id, id)));
    if (models.includes(current)) $("model").value = current;
  } catch {
    // No model list (or no key yet): the server's default model is used.
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (running) running.controller.abort();
  else generate();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !running && !button.disabled) {
    event.preventDefault();
    form.requestSubmit();
  }
});
$("preset").addEventListener("change", () => {
  if ($("preset").value === "custom") return;
  [$("width").value, $("height").value] = $("preset").value.split("x");
});
$("width").addEventListener("input", syncPreset);
$("height").addEventListener("input", syncPreset);
$("seed-mode").addEventListener("change", () => setSeed($("seed").value));
$("clear-history").addEventListener("click", async () => {
  const entries = await history.all();
  await history.clear();
  offerUndo(entries, `Deleted ${entries.length} image${entries.length === 1 ? "" : "s"}.`);
  await renderHistory();
  $("undo-button").focus();
});
$("undo-button").addEventListener("click", async () => {
  const entries = undoable?.entries ?? [];
  hideUndo();
  await history.restore(entries);
  await renderHistory();
});
$("key-form").addEventListener("submit", () => {
  setApiKey($("api-key").value.trim());
  loadModels();
  const then = afterKey;
  afterKey = null;
  then?.();
});
$("key-cancel").addEventListener("click", () => $("key-dialog").close());
$("edit-upload").addEventListener("change", (event) => editFile(event.target.files[0]));
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  editFile(event.dataTransfer.files[0]);
});
setUpEditor();

restoreForm();
setSeed($("seed").value);
syncPreset();
form.addEventListener("input", saveForm);
form.addEventListener("change", saveForm);
loadModels();
renderHistory().catch((error) => showError(`History is unavailable: ${error.message}`));
