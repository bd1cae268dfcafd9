//! aifs' own kernels: for quantized weights where candle's are slow or
//! round otherwise than ggml ([`q4_1`], [`q8_0`], as candle quantized
//! types, so candle's matmul, its threads and its tensors run them
//! unchanged), and attention and activations in ggml's float arithmetic
//! ([`ggml`]), so that a llama gives llama.cpp's logits to the bit.
//!
//! A crate of its own so that debug builds (the tests' daemon) still
//! optimize it, as they do every dependency (`[profile.dev.package]` in
//! the workspace's Cargo.toml): SIMD code unoptimized runs tens of times
//! slower.

// Each unsafe operation in its own block with its reason, even in an unsafe fn.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod ggml;
pub mod q4_1;
pub mod q8_0;
