//! A test handler whose path picks a behaviour: well-behaved ones
//! (echo, streaming, headers, a CPU burn of a given length) and misbehaving ones (trap, endless loop,
//! memory hog, long sleep) that the runtime must contain.

use gpuwasm_guest::{Request, Response};
use std::io::{Read, Write};

fn query_number(request: &Request, key: &str, default: u64) -> u64 {
    request
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix(&format!("{key}="))?.parse().ok()))
        .unwrap_or(default)
}

fn handle(request: Request) -> Response {
    match request.path().as_str() {
        // Streams the request body back as it arrives.
        "/echo" => {
            let mut reader = match request.body_reader() {
                Ok(r) => r,
                Err(e) => return Response::text(500, format!("{e}")),
            };
            Response::stream(200, move |out| {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = reader.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    out.write_all(&buf[..n])?;
                }
            })
        }
        // Streams `n` numbered lines, flushing each.
        "/stream" => {
            let n = query_number(&request, "n", 10);
            Response::stream(200, move |out| {
                for i in 0..n {
                    writeln!(out, "chunk {i}")?;
                    out.flush()?;
                }
                Ok(())
            })
        }
        "/header" => Response::text(200, request.header("x-test").unwrap_or_default()),
        "/slow-read" => {
            // Busy (sleeping) before it reads its body at all.
            let ms = query_number(&request, "ms", 1000);
            wasip2::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
            match request.body() {
                Ok(body) => Response::text(200, body.len().to_string()),
                Err(e) => Response::text(400, format!("body error: {e}")),
            }
        }
        "/body-length" => match request.body() {
            Ok(body) => Response::text(200, body.len().to_string()),
            Err(e) => Response::text(400, format!("body error: {e}")),
        },
        "/trap" => panic!("deliberate trap for the tests"),
        "/loop" => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "/burn" => {
            // Computes for `ms` milliseconds of the guest's clock.
            let until = std::time::Instant::now() + std::time::Duration::from_millis(query_number(&request, "ms", 100));
            let mut x: u64 = 0;
            while std::time::Instant::now() < until {
                for _ in 0..10_000 {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            Response::text(200, format!("burned {x}"))
        }
        "/hog" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "/sleep" => {
            let ms = query_number(&request, "ms", 1000);
            wasip2::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
            Response::text(200, "slept")
        }
        "/outbound" => {
            let to = request.query().and_then(|q| q.strip_prefix("to=").map(str::to_string));
            Response::text(200, outbound(to.as_deref().unwrap_or("127.0.0.1:9")))
        }
        // Reads a file of the deployment's read-only tree.
        "/read" => {
            let path = request.query().unwrap_or_default();
            match std::fs::read_to_string(&path) {
                Ok(text) => Response::text(200, text),
                Err(e) => Response::text(200, format!("error: {e}")),
            }
        }
        "/write" => {
            let path = request.query().unwrap_or_default();
            match std::fs::write(&path, b"x") {
                Ok(()) => Response::text(200, "written"),
                Err(e) => Response::text(200, format!("error: {e}")),
            }
        }
        "/env" => {
            let name = request.query().unwrap_or_default();
            Response::text(200, std::env::var(&name).unwrap_or_else(|_| format!("{name} is not set")))
        }
        // Prints its query to stdout and to stderr.
        "/say" => {
            let text = request.query().unwrap_or_default();
            println!("out: {text}");
            eprintln!("err: {text}");
            Response::text(200, "said")
        }
        // Logs 5 MB: the runtime keeps the tail and must not stop the guest.
        "/chatty" => {
            let line = "x".repeat(1023);
            for _ in 0..5 * 1024 {
                println!("{line}");
            }
            Response::text(200, "still here")
        }
        _ => Response::text(200, "behaviors ok"),
    }
}

/// Tries an outgoing HTTP request to `authority` and reports what happened.
fn outbound(authority: &str) -> String {
    use wasip2::http::{outgoing_handler, types};
    let request = types::OutgoingRequest::new(types::Fields::new());
    let _ = request.set_scheme(Some(&types::Scheme::Http));
    let _ = request.set_authority(Some(authority));
    let _ = request.set_path_with_query(Some("/"));
    let future = match outgoing_handler::handle(request, None) {
        Ok(future) => future,
        Err(code) => return format!("refused: {code:?}"),
    };
    future.subscribe().block();
    match future.get() {
        Some(Ok(Ok(response))) => format!("allowed: status {}", response.status()),
        Some(Ok(Err(code))) => format!("refused: {code:?}"),
        other => format!("unexpected: {other:?}"),
    }
}

gpuwasm_guest::export!(handle);
