//! One module per command (`gpuwasm bench` is in `bench/`).

pub mod build;
pub mod deploy;
pub mod deployments;
pub mod dev;
pub mod info;
pub mod invoke;
pub mod logs;
pub mod model;
pub mod new;
pub mod run;
pub mod serve;
pub mod tenant;
pub mod token;
pub mod usage;
pub mod whoami;
pub mod workers;
