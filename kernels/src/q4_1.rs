//! Q4_1 weights for candle's quantized matmul, with a SIMD dot product.
//!
//! candle's own Q4_1 type has only a scalar dot product, so a Q4_1 model
//! ran at a quarter of llama.cpp's speed. [`BlockQ4_1`] is the same 20-byte
//! block (an f16 scale `d`, an f16 minimum `m`, 32 four-bit values: the
//! first 16 in the low nibbles, the last 16 in the high ones), and
//! [`BlockQ8_1`] the activations it is multiplied by (an f16 scale, the f16
//! `d·Σq`, 32 signed bytes), as ggml defines both. They implement candle's
//! `GgmlType`, so candle's own `matmul` (its thread pool, its work split)
//! runs them; what is ours is the arithmetic.
//!
//! Promises: a dot product is `Σ_blocks d_x·d_y·Σ q_x·q_y + m_x·s_y`, the
//! integer part exact, on AVX2 (chosen when the CPU has it, at run time:
//! the build targets baseline x86-64) or in portable code that computes
//! the same float for finite activations; activations are quantized as
//! ggml's `quantize_row_q8_1` does (scale `max|x|/127`, ties to even), so
//! results follow llama.cpp's.

use candle_core::quantized::k_quants::GgmlType;
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

/// Values in one block of either type.
pub const BLOCK: usize = 32;

/// 32 weights: `x = d·q + m`, `q` in 0..=15.
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ4_1 {
    d: f16,
    m: f16,
    qs: [u8; BLOCK / 2],
}

/// 32 activations: `x = d·q`, and `s = d·Σq` for the Q4_1 minimum's term.
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct BlockQ8_1 {
    d: f16,
    s: f16,
    qs: [i8; BLOCK],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20 && std::mem::size_of::<BlockQ8_1>() == 36);

impl BlockQ4_1 {
    /// The 32 four-bit values in order.
    fn values(&self) -> [u8; BLOCK] {
        let mut q = [0u8; BLOCK];
        for (j, b) in self.qs.iter().enumerate() {
            q[j] = b & 0x0F;
            q[j + BLOCK / 2] = b >> 4;
        }
        q
    }
}

/// A candle quantized tensor of `shape` (rows, columns) from a GGUF Q4_1
/// tensor's raw bytes, whose matmuls run on this kernel.
pub fn qtensor(bytes: &[u8], shape: (usize, usize)) -> candle_core::Result<QTensor> {
    crate::qtensor::<BlockQ4_1>(bytes, shape)
}

impl GgmlType for BlockQ4_1 {
    const DTYPE: GgmlDType = GgmlDType::Q4_1;
    const BLCK_SIZE: usize = BLOCK;
    type VecDotType = BlockQ8_1;

    fn to_float(xs: &[Self], ys: &mut [f32]) {
        for (x, ys) in xs.iter().zip(ys.chunks_exact_mut(BLOCK)) {
            let (d, m) = (x.d.to_f32(), x.m.to_f32());
            for (y, q) in ys.iter_mut().zip(x.values()) {
                *y = f32::from(q) * d + m;
            }
        }
    }

    /// ggml's `quantize_row_q4_1_ref`: the block's range in 16 steps.
    fn from_float(xs: &[f32], ys: &mut [Self]) {
        for (xs, y) in xs.chunks_exact(BLOCK).zip(ys.iter_mut()) {
            let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
            let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = |x: f32| (((x - min) * id + 0.5) as u8).min(15);
            for j in 0..BLOCK / 2 {
                y.qs[j] = q(xs[j]) | (q(xs[j + BLOCK / 2]) << 4);
            }
            y.d = f16::from_f32(d);
            y.m = f16::from_f32(min);
        }
    }

    fn vec_dot(n: usize, xs: &[Self], ys: &[BlockQ8_1]) -> f32 {
        let [d] = dot_rows(n, [xs], ys);
        d
    }

    fn vec_dot_2(n: usize, xs0: &[Self], xs1: &[Self], ys: &[BlockQ8_1]) -> (f32, f32) {
        let [a, b] = dot_rows(n, [xs0, xs1], ys);
        (a, b)
    }

    fn vec_dot_4(
        n: usize,
        xs0: &[Self],
        xs1: &[Self],
        xs2: &[Self],
        xs3: &[Self],
        ys: &[BlockQ8_1],
    ) -> (f32, f32, f32, f32) {
        let [a, b, c, d] = dot_rows(n, [xs0, xs1, xs2, xs3], ys);
        (a, b, c, d)
    }

    fn vec_dot_unopt(_n: usize, xs: &[Self], ys: &[BlockQ8_1]) -> f32 {
        dot(xs, ys)
    }
}

/// `N` rows' dot products with the first `n` values of `ys`, on AVX2 when
/// the CPU has it.
fn dot_rows<const N: usize>(n: usize, rows: [&[BlockQ4_1]; N], ys: &[BlockQ8_1]) -> [f32; N] {
    let blocks = n / BLOCK;
    let (rows, ys) = (rows.map(|r| &r[..blocks]), &ys[..blocks]);
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { x86::dot(rows, ys) };
    }
    rows.map(|xs| dot(xs, ys))
}

/// The portable dot product, in the order the AVX2 one adds.
fn dot(xs: &[BlockQ4_1], ys: &[BlockQ8_1]) -> f32 {
    let mut acc = [0f32; 8];
    let mut mins = 0f32;
    for (x, y) in xs.iter().zip(ys) {
        let dd = x.d.to_f32() * y.d.to_f32();
        let q = x.values();
        for (lane, acc) in acc.iter_mut().enumerate() {
            // Lane `l` of the AVX2 sum holds values 4l..4l+3 (pairs, then pairs of pairs).
            let i: i32 = (4 * lane..4 * lane + 4).map(|j| i32::from(q[j]) * i32::from(y.qs[j])).sum();
            *acc = dd.mul_add(i as f32, *acc);
        }
        mins += x.m.to_f32() * y.s.to_f32();
    }
    hsum8(acc) + mins
}

/// The eight lanes added as the AVX2 code adds them.
pub(crate) fn hsum8(a: [f32; 8]) -> f32 {
    let q = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let h = [q[0] + q[2], q[1] + q[3]];
    h[0] + h[1]
}

impl BlockQ8_1 {
    fn set_scale(&mut self, max: f32, sum: i32) {
        let d = max / 127.0;
        self.d = f16::from_f32(d);
        self.s = f16::from_f32(d * sum as f32);
    }
}

impl GgmlType for BlockQ8_1 {
    const DTYPE: GgmlDType = GgmlDType::Q8_1;
    const BLCK_SIZE: usize = BLOCK;
    type VecDotType = BlockQ8_1;

    fn to_float(xs: &[Self], ys: &mut [f32]) {
        for (x, ys) in xs.iter().zip(ys.chunks_exact_mut(BLOCK)) {
            dequantize_q8(x.d, &x.qs, ys);
        }
    }

    /// ggml's `quantize_row_q8_1` (its AVX2 form: `127/max`, ties to even).
    fn from_float(xs: &[f32], ys: &mut [Self]) {
        for (xs, y) in xs.chunks_exact(BLOCK).zip(ys.iter_mut()) {
            let max = max_abs(xs);
            let sum = round_block(xs, max, &mut y.qs);
            y.set_scale(max, sum);
        }
    }

    fn vec_dot(n: usize, xs: &[Self], ys: &[Self]) -> f32 {
        Self::vec_dot_unopt(n, xs, ys)
    }

    fn vec_dot_unopt(n: usize, xs: &[Self], ys: &[Self]) -> f32 {
        let blocks = n / BLOCK;
        xs[..blocks]
            .iter()
            .zip(&ys[..blocks])
            .map(|(x, y)| {
                let i: i32 = x.qs.iter().zip(y.qs).map(|(a, b)| i32::from(*a) * i32::from(b)).sum();
                x.d.to_f32() * y.d.to_f32() * i as f32
            })
            .sum()
    }
}

/// One block of activations as `round(x·127/max)` (ties to even) into
/// `qs`, as ggml's AVX2 code rounds them; their sum.
pub(crate) fn round_block(xs: &[f32], max: f32, qs: &mut [i8; BLOCK]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { x86::quantize(xs, max, qs) };
    }
    let id = if max != 0.0 { 127.0 / max } else { 0.0 };
    let mut sum = 0i32;
    for (q, x) in qs.iter_mut().zip(xs) {
        *q = (x * id).round_ties_even() as i8;
        sum += i32::from(*q);
    }
    sum
}

/// A Q8 block's values, `d·q`, into `ys`.
pub(crate) fn dequantize_q8(d: f16, qs: &[i8; BLOCK], ys: &mut [f32]) {
    let d = d.to_f32();
    for (y, &q) in ys.iter_mut().zip(qs) {
        *y = f32::from(q) * d;
    }
}

/// The largest magnitude among `xs` (a Q8 block's scale is it / 127).
pub(crate) fn max_abs(xs: &[f32]) -> f32 {
    xs.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// Whether the AVX2 dot product can run (std caches the CPUID answer).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{BlockQ4_1, BlockQ8_1};

    /// `N` rows of weights against one row of activations: each block of
    /// activations is loaded and converted once for the `N`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot<const N: usize>(rows: [&[BlockQ4_1]; N], ys: &[BlockQ8_1]) -> [f32; N] {
        let nibble = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        // Lane 1 of each: the sum of m·s (lane 0 gathers nothing of use).
        let mut mins = [_mm_setzero_ps(); N];
        for (i, y) in ys.iter().enumerate() {
            // SAFETY: `qs` is 32 bytes; an unaligned load.
            let qy = unsafe { _mm256_loadu_si256(y.qs.as_ptr().cast()) };
            let dy_sy = f16_pair(y.d, y.s);
            for r in 0..N {
                let x = &rows[r][i];
                // The same block of the next N rows (the next call's), which
                // follow these in memory: fetched while these compute.
                let ahead = (x as *const BlockQ4_1).wrapping_add(N * rows[r].len());
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                // [d_x·d_y, m_x·s_y, 0, 0]
                let scales = _mm_mul_ps(f16_pair(x.d, x.m), dy_sy);
                mins[r] = _mm_add_ps(mins[r], scales);
                // SAFETY: `qs` is 16 bytes; an unaligned load.
                let bytes = unsafe { _mm_loadu_si128(x.qs.as_ptr().cast()) };
                let qx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(bytes), bytes), nibble);
                let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), ones);
                acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), _mm256_cvtepi32_ps(sums), acc[r]);
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) + _mm_cvtss_f32(_mm_movehdup_ps(mins[r])))
    }

    /// One block of activations as `round(x·127/max)` into `qs`; their sum.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize(xs: &[f32], max: f32, qs: &mut [i8; 32]) -> i32 {
        assert_eq!(xs.len(), 32);
        let id = _mm256_set1_ps(if max != 0.0 { 127.0 / max } else { 0.0 });
        // SAFETY: xs has 32 floats (asserted above); unaligned loads.
        let q = [0, 8, 16, 24].map(|o| unsafe {
            let x = _mm256_mul_ps(_mm256_loadu_ps(xs.as_ptr().add(o)), id);
            _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x))
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_extracti128_si256::<1>(s), _mm256_castsi256_si128(s));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<1>(s)));
        // Narrowed to bytes lane by lane; the permutation puts them back in order.
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: qs is 32 bytes; an unaligned store.
        unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), bytes) };
        sum
    }

    /// Two f16 as [a, b, 0, 0] in f32.
    #[target_feature(enable = "avx2,f16c")]
    fn f16_pair(a: half::f16, b: half::f16) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128((u32::from(a.to_bits()) | (u32::from(b.to_bits()) << 16)) as i32))
    }

    #[target_feature(enable = "avx2")]
    pub(crate) fn hsum(x: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
        let h = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
    }
}

#[cfg(test)]
mod tests {
    use bytemuck::Zeroable;

    use super::*;

    /// Rows of weights and activations from a fixed generator.
    use crate::test_data as data;

    #[test]
    fn the_dot_products_agree_with_the_dequantized_ones() {
        let k = 576;
        let rows: Vec<Vec<BlockQ4_1>> = (0..4)
            .map(|r| {
                let mut b = vec![BlockQ4_1::zeroed(); k / BLOCK];
                BlockQ4_1::from_float(&data(r, k), &mut b);
                b
            })
            .collect();
        let x = data(9, k);
        let mut y = vec![BlockQ8_1::zeroed(); k / BLOCK];
        BlockQ8_1::from_float(&x, &mut y);
        let (a, b, c, d) = BlockQ4_1::vec_dot_4(k, &rows[0], &rows[1], &rows[2], &rows[3], &y);
        for (r, got) in [a, b, c, d].into_iter().enumerate() {
            // The portable code adds in the same order: the same float;
            // and one row at a time gives what four at a time do.
            assert_eq!(got, dot(&rows[r], &y), "row {r}");
            assert_eq!(got, BlockQ4_1::vec_dot(k, &rows[r], &y), "row {r}");
            // And both are the dot product of what the blocks stand for.
            let mut w = vec![0f32; k];
            BlockQ4_1::to_float(&rows[r], &mut w);
            let mut a = vec![0f32; k];
            BlockQ8_1::to_float(&y, &mut a);
            let want: f32 = w.iter().zip(&a).map(|(w, a)| w * a).sum();
            assert!((got - want).abs() < 1e-3 * want.abs().max(1.0), "row {r}: {got} vs {want}");
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_simd_quantization_is_the_portable_one() {
        if !avx2() {
            return;
        }
        // Values at exact ties (x·127/max = k + 0.5) round to even either way.
        let mut x = data(5, 4 * BLOCK);
        x[1] = 2.5 * 3.0 / 127.0;
        x[2] = 3.0;
        for xs in x.chunks_exact(BLOCK) {
            let max = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
            let mut simd = [0i8; BLOCK];
            // SAFETY: the CPU has AVX2 (checked above).
            let sum = unsafe { x86::quantize(xs, max, &mut simd) };
            let portable: Vec<i8> = xs.iter().map(|x| (x * (127.0 / max)).round_ties_even() as i8).collect();
            assert_eq!(simd.to_vec(), portable);
            assert_eq!(sum, portable.iter().map(|&q| i32::from(q)).sum::<i32>());
        }
    }

    #[test]
    fn activations_quantize_as_ggml_does() {
        let mut x = data(3, BLOCK);
        x[5] = -2.0; // the largest magnitude: -127 exactly
        let mut y = [BlockQ8_1::zeroed()];
        BlockQ8_1::from_float(&x, &mut y);
        assert_eq!(y[0].qs[5], -127);
        assert_eq!(y[0].d, f16::from_f32(2.0 / 127.0));
        let sum: i32 = y[0].qs.iter().map(|&q| i32::from(q)).sum();
        assert_eq!(y[0].s, f16::from_f32(2.0 / 127.0 * sum as f32));
        let mut zero = [BlockQ8_1::zeroed()];
        BlockQ8_1::from_float(&[0.0; BLOCK], &mut zero);
        assert_eq!(zero[0], BlockQ8_1::zeroed());
    }
}
