//! Setup that takes 200 ms. With pre-initialisation it runs once at deploy
//! time; without it (`--no-preinit`), every fresh instance pays for it on
//! its first (and only) request.

use gpuwasm_guest::{Request, Response};
use std::sync::OnceLock;

static TABLE: OnceLock<u64> = OnceLock::new();

fn build_table() -> u64 {
    let start = std::time::Instant::now();
    let mut acc: u64 = 0;
    while start.elapsed() < std::time::Duration::from_millis(200) {
        for i in 0..10_000u64 {
            acc = std::hint::black_box(acc.wrapping_mul(31).wrapping_add(i));
        }
    }
    acc
}

fn setup() {
    TABLE.get_or_init(build_table);
}

fn handle(_request: Request) -> Response {
    let value = TABLE.get_or_init(build_table);
    Response::text(200, format!("table ready ({})", value % 1000))
}

gpuwasm_guest::export!(handle, init = setup);
