//! aifs: AI models, compute devices and inference jobs as files.
//!
//! The library holds everything but the process (`mountd/` is the binary,
//! and the composition root: it builds these parts and wires them).
//!
//! Public, because the binary or the tests build with them:
//!
//! - [`store`]: content-addressed blobs and the sled catalog of models,
//!   versions and aliases; atomic imports, dedup, GC, crash recovery.
//! - [`backend`]: the [`backend::Backend`] trait over a version's files;
//!   ONNX Runtime, sentence embeddings on candle, and a fake backend for
//!   tests (feature `fake-backend`).
//! - [`engine`]: jobs, the queues, workers, loaded models, job records.
//! - [`device`]: device probes ([`device::Probe`]); the CPU from `/proc`,
//!   NVIDIA GPUs, simulated ones.
//! - [`fs`]: the tree and its semantics as plain Rust, testable without FUSE.
//! - [`fuse`]: the thin `fuser::Filesystem` adapter over [`fs::Fs`].
//! - [`repository`]: watched model repositories on the host, kept in step
//!   with the store.
//! - [`cluster`]: the store shared by many nodes (etcd catalog, S3 blobs).
//! - [`tensor`]: element types, typed tensors, signatures and the input check.
//! - [`error`]: the one error type and the one errno mapping.
//!
//! Internal:
//!
//! - `codec`: JSON, KServe v2, .npy and .npz requests and responses.
//! - `sched`: scheduling decisions as pure functions (order, aging,
//!   batching, placement, eviction).
//! - `journal`: the append-only journal that makes accepted jobs survive a crash.
//! - `metrics`: request counters and latencies; `/metrics` and `stats`.

pub mod backend;
pub mod cluster;
mod codec;
pub mod device;
pub mod engine;
pub mod error;
pub mod fs;
pub mod fuse;
mod journal;
mod metrics;
pub mod repository;
mod sched;
pub mod store;
pub mod tensor;

pub use error::{Error, Result};
