//! Pre-initialisation: run a component's init export once, sandboxed, and
//! snapshot the state it leaves into the component itself (wasmtime-wizer),
//! so every request's fresh instance starts from that state for free.

use crate::error::{Error, chain};
use crate::limits::Limits;
use crate::request::{Failure, RequestState};
use crate::runtime::Runtime;
use crate::sandbox::{Sandbox, SharedSandbox};
use std::sync::Arc;
use wasmparser::{Parser, Payload};
use wasmtime::Store;
use wasmtime_wizer::Wizer;

/// The gpuwasm init export (wit/init.wit), as a Wizer function name.
const GPUWASM_INIT_INSTANCE: &str = "gpuwasm:runtime/init@0.1.0";
const GPUWASM_INIT_FUNC: &str = "gpuwasm:runtime/init.init@0.1.0";
/// The Wizer convention: a component-level `wizer-initialize` function.
const WIZER_INIT_FUNC: &str = "wizer-initialize";

/// CPU time an init function may use (it runs once, at deploy time).
pub(crate) const INIT_CPU_MS: u64 = 30_000;

/// The init function `wasm` exports, if any.
pub(crate) fn init_export(wasm: &[u8]) -> Result<Option<&'static str>, Error> {
    let mut depth = 0usize;
    let mut found = None;
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|e| Error::InvalidComponent(e.to_string()))?;
        match payload {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    let export = export.map_err(|e| Error::InvalidComponent(e.to_string()))?;
                    match export.name.name {
                        GPUWASM_INIT_INSTANCE => found = Some(GPUWASM_INIT_FUNC),
                        WIZER_INIT_FUNC => found = found.or(Some(WIZER_INIT_FUNC)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(found)
}

/// Runs `init_func` of `wasm` once under `limits` (memory), [`INIT_CPU_MS`]
/// and `sandbox`, and returns the snapshotted component. Blocking: call
/// it from a blocking thread inside a tokio runtime.
pub(crate) fn snapshot(
    runtime: &Runtime,
    wasm: &[u8],
    init_func: &str,
    limits: &Limits,
    sandbox: &Sandbox,
) -> Result<Vec<u8>, Error> {
    // No outbound hosts at init, whatever the sandbox says.
    let shared = SharedSandbox { models: Arc::new(sandbox.models.clone()), ..SharedSandbox::default() };
    let mut store = runtime.new_store(limits.memory_bytes(), INIT_CPU_MS, sandbox, &shared).map_err(Error::InitFailed)?;
    let mut wizer = Wizer::new();
    // Keep the export: removing it from the core module (Wizer's default)
    // leaves the component lifting a function that is gone, an invalid
    // component, for a `wizer-initialize` export. It is never called again.
    wizer.init_func(init_func).keep_init_func(true);
    let linker = runtime.linker();
    let run = wizer.run_component(&mut store, wasm, async |store: &mut Store<RequestState>, component| {
        linker.instantiate_async(store, component).await
    });
    let result = tokio::runtime::Handle::current().block_on(run);
    let output = store.data().output_text();
    let with_output = |message: String| {
        if output.is_empty() { message } else { format!("{message}; init printed: {output}") }
    };
    let (snapshot, _) = result.map_err(|err| {
        let why = match Failure::from_call(store.data(), &err, INIT_CPU_MS, limits.memory_mb) {
            Failure::CpuTime(ms) => format!("init used more than its {ms} ms of CPU time"),
            Failure::Memory(mb) => format!("init grew a memory past the deployment's limit of {mb} MiB"),
            Failure::Trap(trap) => format!("init trapped: {trap}"),
            _ => chain(&err),
        };
        Error::InitFailed(with_output(why))
    })?;
    let open = store.data_mut().open_resources();
    if open > 0 {
        return Err(Error::InitFailed(with_output(format!(
            "init left {open} host resource(s) open ({}); such state cannot be snapshotted: \
             do not print, open streams, files or sockets, or load models in init",
            store.data_mut().open_resource_kinds().join(", ")
        ))));
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_core_module_has_no_init_export() {
        assert_eq!(init_export(b"\0asm\x01\0\0\0").unwrap(), None);
    }

    #[test]
    fn garbage_is_an_invalid_component() {
        assert!(matches!(init_export(b"\0asm\x0d\0\x01\0\xff\xff"), Err(Error::InvalidComponent(_))));
    }
}
