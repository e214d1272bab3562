//! Pre-initialisation: run a component's init export once, sandboxed, and
//! snapshot the state it leaves into the component itself, so every
//! request's fresh instance starts from that state for free.
//!
//! wasmtime-wizer instruments the component (exports that read its globals
//! and memories) and rewrites it from the snapshot; running it is ours:
//! compiled by this runtime's engine, instantiated with its linker and
//! store (limits, capabilities), its init export called with the runtime's
//! CPU deadline. (Wizer's own runner would also pull in wasmtime's cache
//! and its configuration parser, which the core does without.)

use crate::error::{Error, chain};
use crate::limits::Limits;
use crate::capabilities::{Capabilities, SharedCapabilities};
use crate::failure::Failure;
use crate::host_state::RequestState;
use crate::runtime::Runtime;
use std::sync::Arc;
use wasmparser::{Parser, Payload};
use wasmtime::Store;
use wasmtime::component::{Component, Instance, Lift, WasmList};
use wasmtime_wizer::{ComponentInstanceState, Wizer};

/// An init function a component exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InitFunc {
    /// The exported instance holding it, if any.
    instance: Option<&'static str>,
    /// Its name.
    func: &'static str,
    /// Its name as Wizer spells it.
    wizer_name: &'static str,
}

/// The gpuwasm init export (wit/init.wit): `init` in `gpuwasm:runtime/init`.
const GPUWASM_INIT: InitFunc =
    InitFunc { instance: Some("gpuwasm:runtime/init@0.1.0"), func: "init", wizer_name: "gpuwasm:runtime/init.init@0.1.0" };
/// The Wizer convention: a component-level `wizer-initialize` function.
const WIZER_INIT: InitFunc = InitFunc { instance: None, func: "wizer-initialize", wizer_name: "wizer-initialize" };

/// CPU time an init function may use (it runs once, at deploy time).
pub(crate) const INIT_CPU_MS: u64 = 30_000;

/// The init function `wasm` exports, if any.
pub(crate) fn init_export(wasm: &[u8]) -> Result<Option<InitFunc>, Error> {
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
                    match Some(export.name.name) {
                        name if name == GPUWASM_INIT.instance => found = Some(GPUWASM_INIT),
                        Some(name) if name == WIZER_INIT.func => found = found.or(Some(WIZER_INIT)),
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
/// and `capabilities`, and returns the snapshotted component. Blocking: call
/// it from a blocking thread inside a tokio runtime.
pub(crate) fn snapshot(
    runtime: &Runtime,
    wasm: &[u8],
    init_func: InitFunc,
    limits: &Limits,
    capabilities: &Capabilities,
) -> Result<Vec<u8>, Error> {
    // No outbound hosts at init, whatever the capabilities say.
    let shared = SharedCapabilities { models: Arc::new(capabilities.models.clone()), ..SharedCapabilities::default() };
    let mut store = runtime.new_store(limits.memory_bytes(), INIT_CPU_MS, capabilities, &shared).map_err(Error::InitFailed)?;
    let mut wizer = Wizer::new();
    // Keep the export: removing it from the core module (Wizer's default)
    // leaves the component lifting a function that is gone, an invalid
    // component, for a `wizer-initialize` export. It is never called again.
    wizer.init_func(init_func.wizer_name).keep_init_func(true);
    let run = async {
        let (cx, instrumented) = wizer.instrument_component(wasm)?;
        let component = Component::new(store.engine(), &instrumented)?;
        let instance = runtime.linker().instantiate_async(&mut store, &component).await?;
        let func = export_func(&mut store, &instance, init_func.instance, init_func.func)?;
        instance.get_typed_func::<(), ()>(&mut store, func)?.call_async(&mut store, ()).await?;
        wizer.snapshot_component(&cx, &mut Snapshotting { store: &mut store, instance }).await
    };
    let result = tokio::runtime::Handle::current().block_on(run);
    let output = store.data().output_text();
    let with_output = |message: String| {
        if output.is_empty() { message } else { format!("{message}; init printed: {output}") }
    };
    let snapshot = result.map_err(|err| {
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

/// The export `func` of `instance` (or of the component itself).
fn export_func(
    store: &mut Store<RequestState>,
    instance: &Instance,
    within: Option<&str>,
    func: &str,
) -> wasmtime::Result<wasmtime::component::ComponentExportIndex> {
    let parent = match within {
        Some(name) => Some(instance.get_export_index(&mut *store, None, name).ok_or_else(|| wasmtime::format_err!("no export {name}"))?),
        None => None,
    };
    instance.get_export_index(&mut *store, parent.as_ref(), func).ok_or_else(|| wasmtime::format_err!("no export {func}"))
}

/// What Wizer reads the initialised state through: the accessor exports
/// its instrumentation added, called on our store.
struct Snapshotting<'a> {
    store: &'a mut Store<RequestState>,
    instance: Instance,
}

impl Snapshotting<'_> {
    async fn call<R: Lift + 'static, T>(&mut self, instance: &str, func: &str, read: impl FnOnce(&mut Store<RequestState>, R) -> T) -> T {
        // The accessors are Wizer's own instrumentation: missing or
        // failing ones are a bug in it, not something the guest can cause.
        let index = export_func(self.store, &self.instance, Some(instance), func).expect("wizer's accessor exports exist");
        let typed = self.instance.get_typed_func::<(), (R,)>(&mut *self.store, index).expect("wizer's accessors have their types");
        let (value,) = typed.call_async(&mut *self.store, ()).await.expect("wizer's accessors do not trap");
        read(self.store, value)
    }
}

impl ComponentInstanceState for Snapshotting<'_> {
    async fn call_func_ret_list_u8(&mut self, instance: &str, func: &str, contents: impl FnOnce(&[u8]) + Send) {
        self.call(instance, func, |store, list: WasmList<u8>| contents(list.as_le_slice(&*store))).await
    }

    async fn call_func_ret_s32(&mut self, instance: &str, func: &str) -> i32 {
        self.call(instance, func, |_, v| v).await
    }

    async fn call_func_ret_s64(&mut self, instance: &str, func: &str) -> i64 {
        self.call(instance, func, |_, v| v).await
    }

    async fn call_func_ret_f32(&mut self, instance: &str, func: &str) -> u32 {
        self.call(instance, func, |_, v: f32| v.to_bits()).await
    }

    async fn call_func_ret_f64(&mut self, instance: &str, func: &str) -> u64 {
        self.call(instance, func, |_, v: f64| v.to_bits()).await
    }
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
