//! Init builds a 20 MB heap; the snapshot carries it, and copy-on-write
//! means an instance maps it rather than copying it.

use gpuwasm_guest::{Request, Response};
use std::sync::OnceLock;

static HEAP: OnceLock<Vec<u8>> = OnceLock::new();

fn setup() {
    HEAP.get_or_init(|| (0..20 << 20).map(|i: usize| (i % 251) as u8).collect());
}

fn handle(_request: Request) -> Response {
    match HEAP.get() {
        Some(heap) => Response::text(200, format!("{} bytes, byte[1000]={}", heap.len(), heap[1000])),
        None => Response::text(500, "not initialised"),
    }
}

gpuwasm_guest::export!(handle, init = setup);
