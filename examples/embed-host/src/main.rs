//! Embedding gpuwasm in your own Rust host, with the `gpuwasm` crate alone.
//!
//! ```text
//! embed-host HANDLER.wasm            # invoke it once and print the answer
//! embed-host HANDLER.wasm --serve    # also mount it in our own hyper server
//! ```
//!
//! The runtime does the sandboxing (a fresh instance per request, memory,
//! CPU and concurrency limits); the host owns the process, the listener,
//! the routing and where compiled artifacts are kept. The steps below are
//! the ones `gpuwasm serve` takes for every deploy; `Runtime::load` does
//! them all in memory in one call.

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().context("usage: embed-host HANDLER.wasm [--serve]")?;
    let serve = args.next().as_deref() == Some("--serve");

    // One runtime per process: an engine, an instance pool, an epoch ticker.
    let runtime = gpuwasm::Runtime::builder().max_instances(64).build()?;
    let wasm = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
    let limits = gpuwasm::Limits { memory_mb: 64, cpu_ms: 1_000, ..Default::default() };
    // What the handler may reach: nothing here but one environment variable.
    let capabilities = gpuwasm::Capabilities { env: [("GREETING".into(), "hello".into())].into(), ..Default::default() };

    // 1. Validate, then pre-initialise: when the component exports an init
    //    function, it runs once now and its memory becomes the snapshot
    //    every request starts from (blocking work: off the async threads).
    runtime.validate(&wasm)?;
    let (rt, bytes, l, c) = (runtime.clone(), wasm.clone(), limits.clone(), capabilities.clone());
    let snapshot = tokio::task::spawn_blocking(move || rt.preinitialize(&bytes, &l, &c)).await??;
    let runs = snapshot.as_deref().unwrap_or(&wasm);

    // 2. Compile ahead of time into an artifact the host keeps, named by
    //    the engine's compatibility key; map it back (a restart only maps).
    let artifact = std::env::temp_dir().join(format!("embed-host-{}.cwasm", runtime.compatibility_key()));
    std::fs::write(&artifact, runtime.compile(runs)?).with_context(|| format!("writing {}", artifact.display()))?;
    // SAFETY: this process wrote the file from `Runtime::compile` just now
    // and nothing else changes it while the handler lives.
    let compiled = unsafe { runtime.deserialize_file(&artifact)? };

    // 3. Link it into a deployment and instantiate it once: a component
    //    that cannot start is refused before it takes traffic.
    let handler = runtime.deployment("handler", &compiled, limits, capabilities)?;
    handler.check().await?;

    // Invoke it directly with an `http::Request`.
    let request = http::Request::post("http://localhost/from-the-host").body(Full::new(Bytes::from("hi")))?;
    let response = handler.handle(request).await;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| anyhow::anyhow!(e))?.to_bytes();
    println!("{status} {}", String::from_utf8_lossy(&body).trim_end());

    if serve {
        // Or mount it in our own hyper service.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("serving on http://{}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, std::convert::Infallible>(handler.handle(req).await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    }
    Ok(())
}
