//! The smallest gpuwasm handler: answers every request with a greeting.

use gpuwasm_guest::{Request, Response};

fn handle(request: Request) -> Response {
    Response::text(200, format!("hello from gpuwasm! you asked for {} {}\n", request.method(), request.path()))
}

gpuwasm_guest::export!(handle);
