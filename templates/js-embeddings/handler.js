// OpenAI-compatible embeddings in JavaScript: `POST /v1/embeddings` and
// `GET /v1/models`, computed by the host's engine through wasi-nn (the
// bindings come from wit/: componentize-js turns each imported interface
// into a module). Try it locally with
//   gpuwasm build . && gpuwasm run . --model minilm=PATH_TO_MODEL_FOLDER
import { loadByName } from "wasi:nn/graph@0.2.0-rc-2024-10-28";
import { Tensor } from "wasi:nn/tensor@0.2.0-rc-2024-10-28";

// The models this handler serves; each must be allowed under [models] in
// gpuwasm.toml.
const MODELS = ["minilm"];

// Strings one request may embed (OpenAI allows 2048).
const MAX_INPUTS = 2048;

addEventListener("fetch", (event) => event.respondWith(handle(event.request)));

async function handle(request) {
  const path = new URL(request.url).pathname;
  try {
    if (path === "/v1/models" && request.method === "GET") return models();
    if (path === "/v1/embeddings" && request.method === "POST") return embeddings(await request.text());
    if (path === "/v1/models" || path === "/v1/embeddings") throw new ApiError(405, "method not allowed");
    throw new ApiError(404, "unknown endpoint: try POST /v1/embeddings or GET /v1/models");
  } catch (e) {
    if (e instanceof ApiError) return e.response();
    return new ApiError(500, String(e), "server_error").response();
  }
}

// An OpenAI-style error answer.
class ApiError extends Error {
  constructor(status, message, type = "invalid_request_error", code = null) {
    super(message);
    Object.assign(this, { status, type, code });
  }
  response() {
    const error = { message: this.message, type: this.type, param: null, code: this.code };
    return json(this.status, { error });
  }
}

function json(status, value) {
  return new Response(JSON.stringify(value), { status, headers: { "content-type": "application/json" } });
}

function models() {
  const data = MODELS.map((id) => ({ id, object: "model", created: 0, owned_by: "gpuwasm" }));
  return json(200, { object: "list", data });
}

function embeddings(body) {
  let req;
  try {
    req = JSON.parse(body);
  } catch (e) {
    throw new ApiError(400, `invalid JSON body: ${e.message}`);
  }
  if (req === null || typeof req !== "object" || Array.isArray(req)) throw new ApiError(400, "the body must be a JSON object");
  if (typeof req.model !== "string") throw new ApiError(400, "missing field `model` (a string)");
  const texts = typeof req.input === "string" ? [req.input] : req.input;
  if (!Array.isArray(texts)) throw new ApiError(400, "`input` must be a string or an array of strings");
  if (texts.length === 0) throw new ApiError(400, "`input` must not be empty");
  if (texts.some((t) => typeof t !== "string")) {
    throw new ApiError(400, "`input` must be a string or an array of strings (token arrays are not supported)");
  }
  if (texts.length > MAX_INPUTS) throw new ApiError(400, `at most ${MAX_INPUTS} inputs per request`);
  const format = req.encoding_format ?? "float";
  if (format !== "float" && format !== "base64") {
    throw new ApiError(400, `\`encoding_format\` must be float or base64, not ${JSON.stringify(format)}`);
  }
  if (!MODELS.includes(req.model)) {
    const message = `The model \`${req.model}\` does not exist or you do not have access to it.`;
    throw new ApiError(404, message, "invalid_request_error", "model_not_found");
  }

  const outputs = nn(() => loadByName(req.model).initExecutionContext().compute([["text", textTensor(texts)]]));
  const output = (name) => {
    const found = outputs.find(([n]) => n === name);
    if (!found) throw new ApiError(500, `the model gave no \`${name}\` output`, "server_error");
    return found[1].data();
  };
  const vectors = new Float32Array(output("embeddings").slice().buffer); // little-endian f32
  const tokens = new BigInt64Array(output("token_counts").slice().buffer).reduce((a, b) => a + b, 0n);
  const dim = vectors.length / texts.length;
  if (req.dimensions != null && req.dimensions !== dim) {
    throw new ApiError(400, `model \`${req.model}\` has ${dim} dimensions and cannot shorten them to ${req.dimensions}`);
  }
  const data = texts.map((_, index) => {
    const vector = vectors.subarray(index * dim, (index + 1) * dim);
    const embedding = format === "base64" ? base64(new Uint8Array(vector.slice().buffer)) : Array.from(vector);
    return { object: "embedding", index, embedding };
  });
  const usage = { prompt_tokens: Number(tokens), total_tokens: Number(tokens) };
  return json(200, { object: "list", data, model: req.model, usage });
}

// Texts as the engine takes them: a U8 tensor [n, width], each row one
// text's UTF-8 bytes padded with zeros.
function textTensor(texts) {
  const encoded = texts.map((t) => new TextEncoder().encode(t));
  if (encoded.some((bytes) => bytes.includes(0))) throw new ApiError(400, "a text contains a NUL character");
  const width = Math.max(1, ...encoded.map((bytes) => bytes.length));
  const data = new Uint8Array(texts.length * width);
  encoded.forEach((bytes, row) => data.set(bytes, row * width));
  return new Tensor(new Uint32Array([texts.length, width]), "U8", data);
}

// Runs a wasi-nn call; its error (thrown with the wasi-nn error resource as
// payload) becomes an OpenAI-style answer.
function nn(call) {
  try {
    return call();
  } catch (e) {
    if (e instanceof ApiError) throw e;
    const error = e?.payload;
    if (!error?.code) throw new ApiError(500, String(e), "server_error");
    const [code, message] = [error.code(), error.data()];
    if (code === "invalid-argument") throw new ApiError(400, message);
    if (code === "not-found") throw new ApiError(404, `${code}: ${message}`, "invalid_request_error", "model_not_found");
    throw new ApiError(500, `${code}: ${message}`, "server_error");
  }
}

function base64(bytes) {
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary);
}
