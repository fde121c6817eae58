// The server's public API, used as a script would use it: OpenAI's image route, the model list, and the native
// route (which answers the image itself) for "copy as curl". Paths are relative, so a root path prefix just works.

const KEY = "image-generation-api-key";

/** The API key for this tab (sessionStorage only), or "". */
export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

/**
 * A refused request: the server's own message, the parameter it names (if any), Retry-After in seconds, and for a
 * failed job the failure's kind (the server's error class, such as "MissingTokenError").
 */
export class ApiError extends Error {
  constructor(status, message, param, retryAfter, kind = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.param = param;
    this.retryAfter = retryAfter;
    this.kind = kind;
  }
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function retryAfterSeconds(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

/** Reads either error shape: OpenAI's {"error": {message, param}} or FastAPI's {"detail": str | [{loc, msg}]}. */
async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: the status line says it
  }
  let message = `${response.status} ${response.statusText}`.trim();
  let param = null;
  if (typeof body?.error?.message === "string") {
    message = body.error.message;
    param = body.error.param ?? null;
  } else if (typeof body?.detail === "string") {
    message = body.detail;
  } else if (Array.isArray(body?.detail) && body.detail.length) {
    message = body.detail.map((d) => d.msg).join("; ");
    param = body.detail[0].loc?.at(-1) ?? null;
  }
  return new ApiError(response.status, message, param, retryAfterSeconds(response.headers.get("Retry-After")));
}

/** The model ids `GET /v1/models` lists. */
export async function listModels() {
  const response = await fetch("v1/models", { headers: headers() });
  if (!response.ok) throw await failure(response);
  const body = await response.json();
  return (body.data || []).map((model) => model.id).filter((id) => typeof id === "string");
}

/** The request's optional fields, without the empty ones (the server then uses the model's defaults). */
function optional(params) {
  const out = {};
  for (const name of ["negative_prompt", "num_inference_steps", "guidance_scale", "seed", "model"]) {
    if (params[name] != null && params[name] !== "") out[name] = params[name]; // neither null nor undefined
  }
  return out;
}

/** The body of the native route (`/image_generation/run`) for `params`. */
function nativeBody(params) {
  return {
    prompt: params.prompt,
    width: params.width,
    height: params.height,
    output_format: params.output_format,
    ...optional(params),
  };
}

function blobFromBase64(b64, type) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return new Blob([bytes], { type });
}

/**
 * `POST /v1/images/generations` with `b64_json`: `n` images of `params`. Aborting `signal` drops the connection, and
 * the server then cancels the generation. Returns [{blob, seed}], the size and the format.
 */
export async function generateImages(params, n, signal) {
  const body = {
    prompt: params.prompt,
    n,
    size: `${params.width}x${params.height}`,
    response_format: "b64_json",
    output_format: params.output_format,
    ...optional(params),
  };
  const response = await fetch("v1/images/generations", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await failure(response);
  return imagesOf(await response.json(), params);
}

/** An OpenAI images answer as [{blob, seed}], the size and the format. */
function imagesOf(result, params) {
  const format = result.output_format || params.output_format;
  const [width, height] = (result.size || `${params.width}x${params.height}`).split("x").map(Number);
  return {
    format,
    width,
    height,
    images: result.data.map((image) => ({
      blob: blobFromBase64(image.b64_json, `image/${format}`),
      seed: image.seed ?? null,
    })),
  };
}

/**
 * `POST /v1/images/edits`: one edit of `image` (a Blob) at its own size, changed where `mask` (a PNG Blob) is
 * transparent, everywhere when `mask` is null. A new seed each time. Returns what `generateImages` returns.
 */
export async function editImage(image, mask, params) {
  const form = new FormData();
  form.append("image", image, "image");
  if (mask) form.append("mask", mask, "mask.png");
  form.append("prompt", params.prompt);
  form.append("strength", String(params.strength));
  form.append("response_format", "b64_json");
  form.append("output_format", params.output_format || "png");
  for (const [name, value] of Object.entries(optional(params))) {
    if (name !== "seed") form.append(name, String(value));
  }
  const response = await fetch("v1/images/edits", { method: "POST", headers: headers(), body: form });
  if (!response.ok) throw await failure(response);
  return imagesOf(await response.json(), params);
}

/** Whether the server runs jobs for the image pipeline (its durable mode): they report progress as they go. */
export async function jobsOffered() {
  try {
    const response = await fetch("openapi.json");
    return response.ok && Boolean((await response.json()).paths?.["/image_generation/run-durable"]);
  } catch {
    return false;
  }
}

/** The events of a server-sent event stream, as {event, data} with `data` parsed as JSON. */
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

// Previews per image a job's stream carries (a local model sends them; the Hugging Face API backend none).
const PREVIEWS = 3;

/**
 * A job (`POST /image_generation/run-durable`): `n` images of `params`, with `onProgress(event)` called for each
 * progress event of its stream; a `preview` event carries its small image as a Blob (`event.blob`), and while the
 * job is queued `{phase: "waiting", ahead, estimated_start_seconds}` says where. Aborting `signal` cancels the job.
 * Returns what `generateImages` returns.
 */
export async function runJob(params, n, signal, onProgress) {
  const response = await fetch("image_generation/run-durable", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ ...nativeBody(params), n, partial_images: PREVIEWS }),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const execution = new URL(response.headers.get("Location"), document.baseURI);
  const cancel = () => fetch(`${execution}/cancel`, { method: "POST", headers: headers(), keepalive: true });
  signal.addEventListener("abort", cancel, { once: true });
  const stream = await fetch(`${execution}/stream`, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!stream.ok) throw await failure(stream);
  let why = null; // the job's "failed" progress event: the sentence /run would have answered, with its status
  for await (const { event, data } of serverSentEvents(stream)) {
    if (event === "chunk" && data.payload?.phase === "failed") why = data.payload;
    else if (event === "chunk" && data.payload?.phase === "preview") {
      const { image, mime_type: type, ...preview } = data.payload;
      onProgress({ ...preview, blob: blobFromBase64(image, type) });
    } else if (event === "chunk") onProgress(data.payload);
    else if (event === "queue") onProgress({ phase: "waiting", ...data }); // jobs ahead of it, an estimated start
    else if (event === "completed") return fetchImages(data.result.images, params, signal);
    else if (event === "failed" && why) throw new ApiError(why.status, why.message, null, why.retry_after, why.error);
    else if (event === "failed") throw new ApiError(502, data.error?.message || "the job failed", null, null);
    else if (event === "canceled") throw new DOMException("the job was cancelled", "AbortError");
  }
  throw new ApiError(502, "the job's progress stream ended early", null, null);
}

/** The job's images as blobs; once the browser holds them, the server's copies are deleted (its URLs then 404). */
async function fetchImages(images, params, signal) {
  const blobs = await Promise.all(
    images.map(async (image) => {
      const response = await fetch(new URL(image.url, document.baseURI), { headers: headers(), signal });
      if (!response.ok) throw await failure(response);
      return { blob: await response.blob(), seed: image.seed };
    }),
  );
  await Promise.all(
    images.map((image) =>
      fetch(new URL(image.url, document.baseURI), { method: "DELETE", headers: headers() }).catch(() => null),
    ),
  ); // a copy the page failed to delete is swept when it expires
  const [first] = images;
  return { format: first?.format ?? params.output_format, width: first?.width, height: first?.height, images: blobs };
}

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

/** A curl command that asks the native route for the same image: same parameters, same seed, same bytes. */
export function curlCommand(params) {
  const body = nativeBody(params);
  const lines = [
    `curl --fail-with-body -X POST ${shellQuote(new URL("image_generation/run", document.baseURI).href)}`,
    "-H 'Content-Type: application/json'",
  ];
  if (apiKey()) lines.push('-H "Authorization: Bearer $IMAGE_GENERATION_API_KEY"');
  lines.push(`-d ${shellQuote(JSON.stringify(body))}`, `--output image-${params.seed}.${params.output_format}`);
  return lines.join(" \\\n  ");
}
