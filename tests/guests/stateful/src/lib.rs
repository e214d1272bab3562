//! Init builds state; requests read it and change it. Every request must
//! see exactly what init built, never another request's changes.

use gpuwasm_guest::{Request, Response};
use std::sync::Mutex;

static STATE: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn setup() {
    let mut state = STATE.lock().unwrap();
    state.push("built-by-init".to_string());
    state.extend((0..3).map(|i| format!("entry-{i}")));
}

fn handle(request: Request) -> Response {
    let mut state = STATE.lock().unwrap();
    let seen = state.join(",");
    // A change that must not leak into the next request.
    state.push(format!("changed-by-{}", request.path()));
    Response::text(200, seen)
}

gpuwasm_guest::export!(handle, init = setup);
