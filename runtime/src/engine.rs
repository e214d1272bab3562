//! The wasmtime engine configured for serving: pooling allocator,
//! copy-on-write memory images, and epoch interruption driven by one ticker.

use std::time::Duration;
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the ticker thread advances the engine's epoch. Guests yield to
/// the async executor and have their CPU time checked once per tick; a
/// guest's first tick starts the measuring that moves a long one to the
/// long lane ([`crate::lanes`]).
pub(crate) const TICK: Duration = Duration::from_millis(5);

/// Sizes of the instance pool shared by every deployment.
#[derive(Clone, Debug)]
pub(crate) struct PoolSettings {
    /// Component instances that may be live at once, over all deployments.
    pub max_instances: u32,
    /// Largest linear memory any deployment may be given, in MiB.
    pub max_memory_mb: u64,
    /// Written memory each pool slot may keep between instances, in MiB
    /// (reset by copying, not unmapping); 0 unmaps everything at reset.
    pub keep_resident_mb: u64,
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
        .max_memory_size(usize::try_from(pool.max_memory_mb << 20).unwrap_or(usize::MAX));
    // Resetting a slot for its next instance. Unmapping pages (madvise)
    // changes the page tables of a process whose threads run on every core,
    // so the reset, and each copy-on-write fault of the next instance on
    // the unmapped pages, interrupts every core to flush its TLB: on a
    // loaded server that took a third of the CPU or more
    // (docs/performance.md). With PAGEMAP_SCAN (Linux 6.7+) wasmtime finds
    // the pages the instance wrote and copies them back from the snapshot
    // or zeroes them, leaving page tables alone, for up to `keep` bytes of
    // each memory and table; only what lies beyond is unmapped. Without the
    // scan, kept bytes are reset whether written or not, so only a little
    // is kept.
    let keep = usize::try_from(pool.keep_resident_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
    if keep > 0 && PoolingAllocationConfig::is_pagemap_scan_available() {
        pooling.pagemap_scan(Enabled::Yes).linear_memory_keep_resident(keep).table_keep_resident(keep);
    } else if keep > 0 {
        pooling.linear_memory_keep_resident(64 << 10).table_keep_resident(16 << 10);
    }

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
