//! An init function that leaves a host resource open (the stdout stream it
//! printed to): such state cannot be snapshotted, so the deploy is refused.

use gpuwasm_guest::{Request, Response};

fn setup() {
    println!("initialising");
}

fn handle(_request: Request) -> Response {
    Response::text(200, "unreachable")
}

gpuwasm_guest::export!(handle, init = setup);
