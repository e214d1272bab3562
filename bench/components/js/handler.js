// The JavaScript twin of examples/hello, for `scripts/bench-serve.sh`:
// a wasi:http handler built by componentize-js (StarlingMonkey).
addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  event.respondWith(
    new Response(`hello from JavaScript, you asked for ${url.pathname}\n`, {
      headers: { "content-type": "text/plain" },
    }),
  );
});
