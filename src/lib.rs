//! aifs: AI models, compute devices and inference jobs as files.
//!
//! The library holds everything but the process (`mountd/` is the binary):
//!
//! - [`store`]: content-addressed blobs and the sled catalog of models,
//!   versions and aliases; atomic imports, dedup, GC, crash recovery.
//! - [`tensor`]: element types, typed tensors, signatures and the input check.
//! - [`codec`]: JSON, KServe v2, .npy and .npz requests and responses.
//! - [`backend`]: the [`backend::Backend`] trait and ONNX Runtime behind it.
//! - [`engine`]: jobs, the queue, workers and loaded models.
//! - [`sched`]: scheduling decisions as pure functions (order, aging,
//!   batching, placement, eviction).
//! - [`journal`]: the append-only journal that makes accepted jobs survive a crash.
//! - [`metrics`]: request counters and latencies; `/metrics` and `stats`.
//! - [`device`]: device probes ([`device::Probe`]); the CPU from `/proc`.
//! - [`fs`]: the tree and its semantics as plain Rust, testable without FUSE.
//! - [`fuse`]: the thin `fuser::Filesystem` adapter over [`fs::Fs`].
//! - [`error`]: the one error type and the one errno mapping.

pub mod backend;
mod codec;
pub mod device;
pub mod engine;
pub mod error;
pub mod fs;
pub mod fuse;
mod journal;
mod metrics;
mod sched;
pub mod store;
pub mod tensor;

pub use error::{Error, Result};
