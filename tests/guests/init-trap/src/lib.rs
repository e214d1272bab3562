//! An init function that fails: the deploy must be refused.

use gpuwasm_guest::{Request, Response};

fn setup() {
    panic!("configuration is missing");
}

fn handle(_request: Request) -> Response {
    Response::text(200, "unreachable")
}

gpuwasm_guest::export!(handle, init = setup);
