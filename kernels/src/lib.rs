//! aifs' own kernels for quantized weights, where candle's are slow.
//!
//! A crate of its own so that debug builds (the tests' daemon) still
//! optimize it, as they do every dependency (`[profile.dev.package]` in
//! the workspace's Cargo.toml): SIMD code unoptimized runs tens of times
//! slower. Each kernel is a candle quantized type, so candle's matmul, its
//! threads and its tensors run it unchanged.

// Each unsafe operation in its own block with its reason, even in an unsafe fn.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod q4_1;
