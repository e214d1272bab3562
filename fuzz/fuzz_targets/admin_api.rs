//! What the admin API decodes from a request: a deploy's settings (as
//! the gpuwasm-spec header's JSON, or as query parameters) checked and
//! normalised, and the JSON bodies of tenant and model requests.
//!
//! Input: byte 0 picks what the rest is.
#![no_main]

use gpuwasm_server::api::{Domains, ModelPush, NewTenant};
use gpuwasm_server::control_store::TenantLimits;
use gpuwasm_server::{DeploymentSpec, SPEC_HEADER};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let [what, rest @ ..] = data else { return };
    match what % 6 {
        0 => {
            if let Ok(value) = http::HeaderValue::from_bytes(rest) {
                let mut headers = http::HeaderMap::new();
                headers.insert(SPEC_HEADER, value);
                let _ = DeploymentSpec::from_request("", &headers);
            }
        }
        1 => {
            if let Ok(query) = std::str::from_utf8(rest) {
                let _ = DeploymentSpec::from_request(query, &http::HeaderMap::new());
            }
        }
        2 => drop(serde_json::from_slice::<NewTenant>(rest)),
        3 => drop(serde_json::from_slice::<Domains>(rest)),
        4 => drop(serde_json::from_slice::<TenantLimits>(rest)),
        _ => drop(serde_json::from_slice::<ModelPush>(rest)),
    }
});
