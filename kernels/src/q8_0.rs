//! Q8_0 weights for candle's quantized matmul, with activations quantized
//! as ggml quantizes them.
//!
//! candle's own Q8_0 rounds activations to `round(x/d)` (ties away from
//! zero, `d = max/127`); ggml rounds `x·(127/max)` ties to even. The two
//! disagree now and then on a value's last step, which is enough to move a
//! logit near a tie, so a Q8_0 model (or output matrix) ran otherwise than
//! in llama.cpp. [`BlockQ8_0`] is ggml's block (an f16 scale and 32 signed
//! bytes) for weights and activations both.
//!
//! Promises: a dot product is `Σ_blocks d_x·d_y·Σ q_x·q_y`, each block's
//! integer sum in eight lanes of four products, the lanes accumulated with
//! fused multiply-adds and added as ggml's AVX2 code adds them, on AVX2 or
//! in portable code that computes the same float.

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use crate::q4_1::{avx2, dequantize_q8, hsum8, max_abs, round_block, BLOCK};

/// 32 values: `x = d·q`.
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ8_0 {
    d: f16,
    qs: [i8; BLOCK],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// A candle quantized tensor of `shape` (rows, columns) from a GGUF Q8_0
/// tensor's raw bytes, whose matmuls run on this kernel.
pub fn qtensor(bytes: &[u8], shape: (usize, usize)) -> candle_core::Result<QTensor> {
    crate::qtensor::<BlockQ8_0>(bytes, shape)
}

impl GgmlType for BlockQ8_0 {
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    const BLCK_SIZE: usize = BLOCK;
    type VecDotType = BlockQ8_0;

    fn to_float(xs: &[Self], ys: &mut [f32]) {
        for (x, ys) in xs.iter().zip(ys.chunks_exact_mut(BLOCK)) {
            dequantize_q8(x.d, &x.qs, ys);
        }
    }

    /// ggml's `quantize_row_q8_0` (its AVX2 form: `127/max`, ties to even).
    fn from_float(xs: &[f32], ys: &mut [Self]) {
        for (xs, y) in xs.chunks_exact(BLOCK).zip(ys.iter_mut()) {
            let max = max_abs(xs);
            round_block(xs, max, &mut y.qs);
            y.d = f16::from_f32(max / 127.0);
        }
    }

    fn vec_dot(n: usize, xs: &[Self], ys: &[Self]) -> f32 {
        let blocks = n / BLOCK;
        let (xs, ys) = (&xs[..blocks], &ys[..blocks]);
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
            return unsafe { x86::dot(xs, ys) };
        }
        Self::vec_dot_unopt(n, xs, ys)
    }

    /// The portable dot product, in the order the AVX2 one adds.
    fn vec_dot_unopt(n: usize, xs: &[Self], ys: &[Self]) -> f32 {
        let blocks = n / BLOCK;
        let mut acc = [0f32; 8];
        for (x, y) in xs[..blocks].iter().zip(&ys[..blocks]) {
            let dd = x.d.to_f32() * y.d.to_f32();
            for (lane, acc) in acc.iter_mut().enumerate() {
                let i: i32 = (4 * lane..4 * lane + 4).map(|j| i32::from(x.qs[j]) * i32::from(y.qs[j])).sum();
                *acc = dd.mul_add(i as f32, *acc);
            }
        }
        hsum8(acc)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::BlockQ8_0;
    use crate::q4_1::x86::hsum;

    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(xs: &[BlockQ8_0], ys: &[BlockQ8_0]) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for (x, y) in xs.iter().zip(ys) {
            let d = _mm256_set1_ps(x.d.to_f32() * y.d.to_f32());
            // SAFETY: `qs` is 32 bytes; unaligned loads.
            let (qx, qy) =
                unsafe { (_mm256_loadu_si256(x.qs.as_ptr().cast()), _mm256_loadu_si256(y.qs.as_ptr().cast())) };
            // |x|·(y with x's sign): unsigned × signed bytes, as maddubs needs.
            let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
            let sums = _mm256_madd_epi16(pairs, ones);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums), acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_data as data;

    #[test]
    fn the_simd_dot_is_the_portable_one_and_the_dequantized_one() {
        let n = 8 * BLOCK;
        let mut xs = vec![BlockQ8_0 { d: f16::ZERO, qs: [0; BLOCK] }; n / BLOCK];
        let mut ys = xs.clone();
        BlockQ8_0::from_float(&data(1, n), &mut xs);
        BlockQ8_0::from_float(&data(2, n), &mut ys);
        let simd = BlockQ8_0::vec_dot(n, &xs, &ys);
        assert_eq!(simd.to_bits(), BlockQ8_0::vec_dot_unopt(n, &xs, &ys).to_bits());
        let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
        BlockQ8_0::to_float(&xs, &mut a);
        BlockQ8_0::to_float(&ys, &mut b);
        let exact: f64 = a.iter().zip(&b).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
        assert!((f64::from(simd) - exact).abs() < 1e-3, "{simd} vs {exact}");
    }

    #[test]
    fn activations_round_as_ggml_rounds_them() {
        // 127/max = 1: 2.5 and -0.5 are ties, to even (candle rounds them away).
        let mut xs = vec![0.0f32; BLOCK];
        xs[..4].copy_from_slice(&[127.0, 2.5, -0.5, 3.5]);
        let mut y = [BlockQ8_0 { d: f16::ZERO, qs: [0; BLOCK] }];
        BlockQ8_0::from_float(&xs, &mut y);
        assert_eq!(&y[0].qs[..4], &[127, 2, 0, 4]);
        assert_eq!(y[0].d, f16::ONE);
    }
}
