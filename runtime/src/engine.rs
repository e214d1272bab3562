//! The wasmtime engine configured for serving: pooling allocator,
//! copy-on-write memory images, and epoch interruption driven by one ticker.

use std::time::Duration;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the ticker thread advances the engine's epoch. Guests yield to
/// the async executor and have their CPU time checked once per tick.
pub(crate) const TICK: Duration = Duration::from_millis(5);

/// Sizes of the instance pool shared by every deployment.
#[derive(Clone, Debug)]
pub(crate) struct PoolSettings {
    /// Component instances that may be live at once, over all deployments.
    pub max_instances: u32,
    /// Largest linear memory any deployment may be given, in MiB.
    pub max_memory_mb: u64,
}

pub(crate) fn new_engine(pool: &PoolSettings) -> wasmtime::Result<Engine> {
    let n = pool.max_instances;
    let mut pooling = PoolingAllocationConfig::new();
    pooling
        .total_component_instances(n)
        // A Rust wasip2 component holds its module, the WASI adapter and a
        // few shims: several core instances, memories and tables each.
        .total_core_instances(n.saturating_mul(8))
        .total_memories(n.saturating_mul(2))
        .total_tables(n.saturating_mul(4))
        .total_stacks(n)
        .max_core_instances_per_component(16)
        .max_memories_per_component(4)
        .max_tables_per_component(8)
        .max_memory_size(usize::try_from(pool.max_memory_mb << 20).unwrap_or(usize::MAX))
        // Keep a little memory resident per slot so a reused slot does not
        // fault in fresh pages for the most common small heaps.
        .linear_memory_keep_resident(64 << 10)
        .table_keep_resident(16 << 10);

    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .memory_init_cow(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    Engine::new(&config)
}

/// Advances `engine`'s epoch every [`TICK`] on a dedicated thread until the
/// engine is dropped.
pub(crate) fn start_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("gpuwasm-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(TICK);
            }
        })
        .expect("spawning the epoch ticker thread");
}
