// A gpuwasm handler in JavaScript: every request runs in a fresh instance
// of this component (built by componentize-js, StarlingMonkey's engine).
// Build it with `gpuwasm build`, try it with `gpuwasm run`, deploy it with
// `gpuwasm deploy`.
addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  event.respondWith(
    new Response(`hello from {{name}}, you asked for ${url.pathname}\n`, {
      headers: { "content-type": "text/plain" },
    }),
  );
});
