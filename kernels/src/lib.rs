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

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::{QStorage, QTensor};

/// A candle quantized tensor of `shape` (rows, columns) from a GGUF
/// tensor's raw bytes of blocks `T` (copied: they need not be aligned),
/// whose matmuls run on `T`'s kernel.
///
/// Made here, not by the caller, on purpose: the tensor's storage is a
/// `Box<dyn QuantizedType>`, and the crate that makes that box compiles
/// candle's generic matmul loop for these blocks. This crate is optimized
/// in debug builds; a caller may not be (the matmul's bookkeeping,
/// unoptimized, cost a tenth of a token's time).
fn qtensor<T: GgmlType + bytemuck::Pod + Send + Sync>(
    bytes: &[u8],
    shape: (usize, usize),
) -> candle_core::Result<QTensor> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) || bytes.len() / size * T::BLCK_SIZE != shape.0 * shape.1 {
        candle_core::bail!("{} bytes are not the {:?} blocks of a {shape:?} tensor", bytes.len(), T::DTYPE);
    }
    let blocks: Vec<T> = bytemuck::pod_collect_to_vec(bytes);
    QTensor::new(QStorage::Cpu(Box::new(blocks)), shape)
}

/// Test values: `n` floats in [-2, 2) from `seed`.
#[cfg(test)]
fn test_data(seed: u32, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}
