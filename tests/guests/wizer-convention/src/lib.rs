//! A handler pre-initialised through the Wizer convention: a component-level
//! `wizer-initialize` export instead of gpuwasm's init interface.

use gpuwasm_guest::{Request, Response};
use std::sync::OnceLock;

wit_bindgen::generate!({
    inline: "
        package gpuwasm-test:wizer;
        world wizer-convention {
            export wizer-initialize: func();
        }
    ",
});

static GREETING: OnceLock<String> = OnceLock::new();

struct Init;

impl Guest for Init {
    fn wizer_initialize() {
        GREETING.get_or_init(|| "set by wizer-initialize".to_string());
    }
}

export!(Init);

fn handle(_request: Request) -> Response {
    Response::text(200, GREETING.get().map_or("not initialised", String::as_str))
}

gpuwasm_guest::export!(handle);
