//! A gpuwasm handler: every request runs in a fresh instance of this
//! component. Build it with `gpuwasm build`, try it with `gpuwasm dev` or
//! `gpuwasm run`, deploy it with `gpuwasm deploy`.

use gpuwasm_guest::{Request, Response};

fn handle(request: Request) -> Response {
    Response::text(200, format!("hello from {{name}}, you asked for {}\n", request.path()))
}

gpuwasm_guest::export!(handle);
