//! Init builds a 20 MB heap; the snapshot carries it, and copy-on-write
//! means an instance maps it rather than copying it. `/scribble` checks
//! that the heap is exactly as init left it, then writes over every other
//! page of it and over a fresh 4 MiB allocation (checked to read as zero
//! first): whatever a request wrote, the next instance in the same pool
//! slot must see init's heap and zeroed fresh memory again.

use gpuwasm_guest::{Request, Response};
use std::sync::Mutex;

static HEAP: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn expected(i: usize) -> u8 {
    (i % 251) as u8
}

fn setup() {
    *HEAP.lock().unwrap() = (0..20 << 20).map(expected).collect();
}

fn handle(request: Request) -> Response {
    let mut heap = HEAP.lock().unwrap();
    if heap.is_empty() {
        return Response::text(500, "not initialised");
    }
    if request.path() != "/scribble" {
        return Response::text(200, format!("{} bytes, byte[1000]={}", heap.len(), heap[1000]));
    }
    let wrong = heap.iter().enumerate().filter(|&(i, &b)| b != expected(i)).count();
    let mut pages = 0;
    for page in heap.chunks_mut(4096).step_by(2) {
        page.fill(0xEE);
        pages += 1;
    }
    // Memory beyond the snapshot (grown by an earlier instance in this slot)
    // must read as zero too: the allocator trusts fresh memory to be.
    let mut fresh = std::hint::black_box(vec![0u8; 4 << 20]);
    let dirty = fresh.iter().filter(|&&b| b != 0).count();
    fresh.fill(0xAA);
    std::hint::black_box(&fresh);
    let status = if wrong == 0 && dirty == 0 { 200 } else { 500 };
    Response::text(
        status,
        format!("{wrong} bytes differed from init's heap, {dirty} fresh bytes were not zero; wrote {pages} pages and {} more bytes", fresh.len()),
    )
}

gpuwasm_guest::export!(handle, init = setup);
