//! Attention and activations in the float arithmetic of ggml's x86 CPU
//! backend (llama.cpp built for a CPU with AVX-512, as on this project's
//! machines), so that a model gives llama.cpp's logits to the bit.
//!
//! Float sums depend on their order, and an 8-bit quantization before every
//! matmul turns a last-bit difference into a different integer; through 30
//! layers that grows to logit differences of about 1, enough to change the
//! greedy choice wherever two tokens nearly tie. So every operation here
//! rounds where ggml rounds:
//! - [`rms_norm`] sums the squares in f64;
//! - [`expf`] is ggml's vector `exp` (`ggml_v_expf`), not the C library's,
//!   and [`swiglu`] uses it;
//! - [`rope`] fuses the multiply-adds GCC fuses in ggml's `rope`;
//! - [`KvCache::attend`] is llama.cpp's attention without flash attention:
//!   keys, values, queries and probabilities rounded to f16; each dot
//!   product summed in 16-lane registers of fused multiply-adds in the
//!   [`Order`] ggml uses for the batch, reduced as `_mm512_reduce_add_ps`
//!   does; softmax summed in f64 one 16-lane reduction at a time.
//!
//! Which ggml code runs where was measured, not guessed: llama.cpp's
//! intermediate tensors (its eval callback) against ours, operation by
//! operation, until every one was equal to the bit.
//!
//! Promises: the results do not depend on the CPU: AVX2 code (chosen at run
//! time, one check per loop) and portable code compute the same floats.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Lanes of an AVX-512 register of f32: ggml's unit of summation.
const LANES: usize = 16;

/// Defines `$name`, whose body is compiled twice: for AVX2, FMA and F16C
/// (run when the CPU has them: `mul_add` is then one instruction, not a
/// call to the C library) and portably, as `$portable` (what runs without
/// them, and what the tests compare with); both compute the same floats.
macro_rules! with_fma {
    ($(#[$m:meta])* $vis:vis fn $name:ident / $portable:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        #[inline(always)]
        fn $portable($($arg: $ty),*) $(-> $ret)? $body

        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if crate::q4_1::avx2() {
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
                return unsafe { fast($($arg),*) };
            }
            $portable($($arg),*)
        }
    };
}

/// ggml's AVX-512 `ggml_v_expf` for one value: a polynomial on the
/// fraction, scaled by a power of two; 0 below about -104, inf above 88.4.
#[inline(always)]
fn expf(x: f32) -> f32 {
    // ggml's constants, written there as hex floats (in the comments).
    let c = f32::from_bits;
    let r = c(0x4B40_0000); // 0x1.8p23: adding it rounds to an integer
    let z = x.mul_add(c(0x3FB8_AA3B), r); // 0x1.715476p+0, log2(e)
    let n = z - r;
    // ln 2 in two parts: 0x1.62e4p-1 and 0x1.7f7d1cp-20.
    let b = (-n).mul_add(c(0x35BF_BE8E), (-n).mul_add(c(0x3F31_7200), x));
    let u = b * b;
    // 0x1.0e4020p-7, 0x1.573e2ep-5, 0x1.555e66p-3, 0x1.fffdb6p-2, 0x1.ffffecp-1.
    let j = c(0x3C07_2010)
        .mul_add(b, c(0x3D2B_9F17))
        .mul_add(u, c(0x3E2A_AF33).mul_add(b, c(0x3EFF_FEDB)))
        .mul_add(u, c(0x3F7F_FFF6).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    scale_by_power_of_two(j, n as i32)
}

/// `j·2^n` rounded once, as `_mm512_scalef_ps` does, for |n| ≤ 192.
#[inline(always)]
fn scale_by_power_of_two(j: f32, n: i32) -> f32 {
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    if n > 100 {
        j * pow2(100) * pow2(n - 100)
    } else if n < -100 {
        j * pow2(n + 100) * pow2(-100)
    } else {
        j * pow2(n)
    }
}

/// SiLU as ggml's vector code computes it.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + expf(0.0 - x))
}

with_fma! {
    /// `gate ← silu(gate)·up` on rows of `width` values, ggml's `swiglu`:
    /// its vector code for each row's whole registers, then its scalar
    /// code (the C library's `exp`) for the rest.
    pub fn swiglu / swiglu_portable(gate: &mut [f32], up: &[f32], width: usize) {
        let vector = width / LANES * LANES;
        for (gate, up) in gate.chunks_mut(width).zip(up.chunks(width)) {
            for (i, (g, &u)) in gate.iter_mut().zip(up).enumerate() {
                *g = if i < vector { silu(*g) } else { *g / (1.0 + (-*g).exp()) } * u;
            }
        }
    }
}

/// RMS normalization of each row of `x` (rows as long as `weight`), as
/// ggml computes it: the squares summed in f64, the scale applied, then
/// the weight.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let n = weight.len();
    for row in x.chunks_exact_mut(n) {
        let sum: f64 = row.iter().map(|&a| f64::from(a * a)).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (a, &w) in row.iter_mut().zip(weight) {
            *a = *a * scale * w;
        }
    }
}

with_fma! {
    /// RoPE on one position's heads (each `head_dim` values, in adjacent
    /// pairs: llama's "normal" mode), `cos` and `sin` one per pair; the
    /// products fused as GCC fuses them in ggml.
    pub fn rope / rope_portable(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        for head in x.chunks_exact_mut(head_dim) {
            for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0.mul_add(c, -(x1 * s));
                pair[1] = x0.mul_add(s, x1 * c);
            }
        }
    }
}

/// One layer's keys and values, in f16 as llama.cpp keeps them. Per
/// key/value head, keys position after position and values dimension after
/// dimension (each over `room` positions), so that both of attention's dot
/// products read contiguous rows.
pub struct KvCache {
    kv_heads: usize,
    head_dim: usize,
    room: usize,
    keys: Vec<f16>,
    values_t: Vec<f16>,
}

impl KvCache {
    /// Room for `room` positions of `kv_heads` heads of `head_dim` values.
    pub fn new(kv_heads: usize, head_dim: usize, room: usize) -> Self {
        let size = kv_heads * head_dim * room;
        // Zeroed by the allocator (untouched pages): a long context's cache
        // costs nothing until its positions are written.
        KvCache { kv_heads, head_dim, room, keys: bytemuck::zeroed_vec(size), values_t: bytemuck::zeroed_vec(size) }
    }

    /// Keys and values (position by position, head by head) for the
    /// positions from `start`, rounded to f16.
    pub fn store(&mut self, start: usize, k: &[f32], v: &[f32]) {
        let (d, room) = (self.head_dim, self.room);
        let width = self.kv_heads * d;
        assert!(k.len() == v.len() && k.len().is_multiple_of(width) && start + k.len() / width <= room);
        for (i, (k, v)) in k.chunks_exact(width).zip(v.chunks_exact(width)).enumerate() {
            let pos = start + i;
            for (g, (k, v)) in k.chunks_exact(d).zip(v.chunks_exact(d)).enumerate() {
                self.keys[(g * room + pos) * d..][..d].convert_from_f32_slice(k);
                for (dim, &x) in v.iter().enumerate() {
                    self.values_t[(g * d + dim) * room + pos] = f16::from_f32(x);
                }
            }
        }
    }

    /// Attention of the queries `q` (`heads` a position, position by
    /// position from `start`, after RoPE) to the positions stored, each to
    /// itself and those before it; the result in the same layout. Rows
    /// run in parallel on rayon's threads (candle's matmuls run on its
    /// own pool), unless there is too little work to share.
    pub fn attend(&self, q: &[f32], heads: usize, start: usize) -> Vec<f32> {
        let (d, room) = (self.head_dim, self.room);
        let mut q16 = vec![f16::ZERO; q.len()];
        q16.convert_from_f32_slice(q);
        let mut out = vec![0.0; q.len()];
        // ggml multiplies one position's rows otherwise than a batch's.
        let order = if q.len() == heads * d { Order::Single } else { Order::Batch };
        let group = heads / self.kv_heads;
        let row = |scratch: &mut Scratch, (row, out): (usize, &mut [f32])| {
            let (i, head) = (row / heads, row % heads);
            // The query heads of a group share one key/value head.
            let g = head / group;
            let keys = &self.keys[g * room * d..(g + 1) * room * d];
            let values_t = &self.values_t[g * d * room..(g + 1) * d * room];
            attend(order, &q16[row * d..(row + 1) * d], keys, values_t, room, start + i + 1, scratch, out);
        };
        if order == Order::Single && q.len() * (start + 1) < 1 << 18 {
            // A few rows of little work: not worth waking rayon's threads.
            let mut scratch = Scratch::default();
            out.chunks_mut(d).enumerate().for_each(|r| row(&mut scratch, r));
        } else {
            out.par_chunks_mut(d).enumerate().for_each_init(Scratch::default, row);
        }
        out
    }
}

/// How ggml sums a dot product of f16 vectors, which depends on how many
/// positions a batch has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Several positions: llamafile's tinyBLAS, one register of 16 lanes
    /// (element `i` in lane `i mod 16`).
    Batch,
    /// One position: `ggml_vec_dot_f16`, four registers of 16 lanes over
    /// each 64 elements, added pairwise before the final reduction.
    Single,
}

/// What a dot product does with the elements after its last whole
/// register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// They are padded with zeros to a whole register.
    Zeros,
    /// They are multiplied one by one and added in f64, after the
    /// registers' sum (as `ggml_vec_dot_f16` does).
    F64,
}

/// Scratch space for [`attend`], reused between calls.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    probs: Vec<f16>,
}

/// One query row's attention over `n` positions: `keys` holds a position's
/// `q.len()` values after another, `values_t` each dimension's values over
/// positions (`stride` apart). The result, one float per dimension, goes to
/// `out`. `q` is already f16, as ggml converts it.
#[allow(clippy::too_many_arguments)]
fn attend(
    order: Order,
    q: &[f16],
    keys: &[f16],
    values_t: &[f16],
    stride: usize,
    n: usize,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let d = q.len();
    assert!(n > 0 && keys.len() >= n * d && out.len() == d && values_t.len() >= (d - 1) * stride + n);
    // tinyBLAS takes only lengths of whole registers; ggml falls back to its own.
    let (by_key, tail) = match order {
        Order::Batch if d.is_multiple_of(LANES) => (Order::Batch, Tail::Zeros),
        _ => (Order::Single, Tail::F64),
    };
    let Scratch { scores, probs } = scratch;
    scores.resize(n, 0.0);
    dots(by_key, tail, &keys[..n * d], d, q, scores);
    softmax(scores, 1.0 / (d as f32).sqrt());
    probs.resize(n, f16::ZERO);
    probs.convert_from_f32_slice(scores);
    // The rows ggml multiplies are as long as its cache's used cells
    // rounded up to 256 (llama.cpp's `get_n_kv`, as in llama-cpp-python
    // 0.3.36), the rest weighing 0: whole registers, no f64 tail.
    dots(order, Tail::Zeros, &values_t[..(d - 1) * stride + n], stride, probs, out);
}

with_fma! {
    /// ggml's `soft_max` of `scores · scale` in place: `exp(s - max)` with
    /// [`expf`], summed in f64 one 16-lane reduction at a time, then
    /// scaled by the sum's inverse rounded to f32.
    fn softmax / softmax_portable(scores: &mut [f32], scale: f32) {
        let mut max = f32::NEG_INFINITY;
        for s in scores.iter_mut() {
            *s *= scale;
            max = max.max(*s);
        }
        let mut sum = 0.0f64;
        for chunk in scores.chunks_mut(LANES) {
            let mut lanes = [0.0; LANES];
            for (s, l) in chunk.iter_mut().zip(&mut lanes) {
                *s = expf(*s - max);
                *l = *s;
            }
            sum += f64::from(reduce(&lanes));
        }
        let inv = (1.0 / sum) as f32;
        for s in scores.iter_mut() {
            *s *= inv;
        }
    }
}

/// The sum of 16 lanes in `_mm512_reduce_add_ps`'s order (halves added
/// until one is left).
#[inline(always)]
fn reduce(l: &[f32; LANES]) -> f32 {
    let a: [f32; 8] = std::array::from_fn(|i| l[i + 8] + l[i]);
    let b: [f32; 4] = std::array::from_fn(|i| a[i + 4] + a[i]);
    (b[0] + b[2]) + (b[1] + b[3])
}

/// `Σ a·b` over f16 values, summed in `order`.
#[cfg(test)]
fn dot(order: Order, tail: Tail, a: &[f16], b: &[f16]) -> f32 {
    let mut out = [0.0];
    dots(order, tail, a, a.len(), b, &mut out);
    out[0]
}

/// `out[r] = Σ rows[r·stride..][..x.len()] · x` for each `r`, summed in
/// `order`.
fn dots(order: Order, tail: Tail, rows: &[f16], stride: usize, x: &[f16], out: &mut [f32]) {
    assert!(out.is_empty() || rows.len() >= (out.len() - 1) * stride + x.len());
    #[cfg(target_arch = "x86_64")]
    if crate::q4_1::avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { x86::dots(order, tail, rows, stride, x, out) };
    }
    dots_portable(order, tail, rows, stride, x, out);
}

/// [`dots`] without AVX2.
fn dots_portable(order: Order, tail: Tail, rows: &[f16], stride: usize, x: &[f16], out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        let a = &rows[r * stride..][..x.len()];
        *o = finish(order, tail, a, x, registers(order, &a[..whole(order, tail, a.len())], x));
    }
}

/// How many elements the registers of `order` hold before they repeat.
fn width(order: Order) -> usize {
    match order {
        Order::Batch => LANES,
        Order::Single => 4 * LANES,
    }
}

/// The elements of a length-`n` product that go through the registers.
#[inline(always)]
fn whole(order: Order, tail: Tail, n: usize) -> usize {
    match tail {
        Tail::Zeros => n,
        Tail::F64 => n / width(order) * width(order),
    }
}

/// The reduced registers of `Σ a·b` and the tail added to them.
#[inline(always)]
fn finish(order: Order, tail: Tail, a: &[f16], b: &[f16], registers: [f32; LANES]) -> f32 {
    let w = whole(order, tail, a.len());
    let mut sum = reduce(&registers);
    if w < a.len() {
        let mut wide = f64::from(sum);
        for (x, y) in a[w..].iter().zip(&b[w..]) {
            wide += f64::from(x.to_f32() * y.to_f32());
        }
        sum = wide as f32;
    }
    sum
}

/// The 16 lanes of `order`'s registers over `a` (the elements that go
/// through them; a last partial register padded with zeros) times `b`,
/// the registers added together pairwise.
fn registers(order: Order, a: &[f16], b: &[f16]) -> [f32; LANES] {
    let mut acc = [[0.0f32; LANES]; 4];
    let per = width(order) / LANES;
    for (c, (ca, cb)) in a.chunks(LANES).zip(b[..a.len()].chunks(LANES)).enumerate() {
        let acc = &mut acc[c % per];
        for ((l, x), y) in acc.iter_mut().zip(ca).zip(cb) {
            *l = x.to_f32().mul_add(y.to_f32(), *l);
        }
    }
    if order == Order::Batch {
        return acc[0];
    }
    std::array::from_fn(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{finish, whole, Order, Tail, LANES};

    /// [`super::dots`] on AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots(order: Order, tail: Tail, rows: &[f16], stride: usize, x: &[f16], out: &mut [f32]) {
        for (r, o) in out.iter_mut().enumerate() {
            let a = &rows[r * stride..][..x.len()];
            *o = finish(order, tail, a, x, registers(order, &a[..whole(order, tail, a.len())], x));
        }
    }

    /// [`super::registers`], each register of 16 lanes as two AVX2
    /// registers (lanes 0-7 and 8-15); `a` is as long as it goes through
    /// them.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn registers(order: Order, a: &[f16], b: &[f16]) -> [f32; LANES] {
        let mut acc = [_mm256_setzero_ps(); 8];
        let per = match order {
            Order::Batch => 1,
            Order::Single => 4,
        };
        let load = |s: &[f16; 8]| {
            // SAFETY: `s` is 8 f16 (16 bytes); an unaligned load.
            _mm256_cvtph_ps(unsafe { _mm_loadu_si128(s.as_ptr().cast()) })
        };
        fn eight(s: &[f16], at: usize) -> &[f16; 8] {
            s[at..].first_chunk().expect("8 values")
        }
        let full = a.len() / LANES * LANES;
        for (c, i) in (0..full).step_by(LANES).enumerate() {
            let r = 2 * (c % per);
            acc[r] = _mm256_fmadd_ps(load(eight(a, i)), load(eight(b, i)), acc[r]);
            acc[r + 1] = _mm256_fmadd_ps(load(eight(a, i + 8)), load(eight(b, i + 8)), acc[r + 1]);
        }
        if full < a.len() {
            let pad = |s: &[f16]| {
                let mut p = [f16::ZERO; LANES];
                p[..s.len()].copy_from_slice(s);
                p
            };
            let (pa, pb) = (pad(&a[full..]), pad(&b[full..a.len()]));
            let r = 2 * (full / LANES % per);
            acc[r] = _mm256_fmadd_ps(load(eight(&pa, 0)), load(eight(&pb, 0)), acc[r]);
            acc[r + 1] = _mm256_fmadd_ps(load(eight(&pa, 8)), load(eight(&pb, 8)), acc[r + 1]);
        }
        let (lo, hi) = match order {
            Order::Batch => (acc[0], acc[1]),
            Order::Single => (
                _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6])),
                _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7])),
            ),
        };
        let mut lanes = [0.0f32; LANES];
        // SAFETY: `lanes` has 16 floats; unaligned stores.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
        }
        lanes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_data as data;

    fn halves(seed: u32, n: usize) -> Vec<f16> {
        data(seed, n).into_iter().map(f16::from_f32).collect()
    }

    /// Pairs (x, result's bits) from llama.cpp's own AVX-512 build
    /// (libggml-cpu of llama-cpp-python 0.3.36): `ggml_vec_soft_max_f32`
    /// with max 0 and `ggml_vec_silu_f32` on 16 values each, called through
    /// ctypes. Subnormal results included.
    const GGML_EXP: [(f32, u32); 16] = [
        (0.0, 0x3f80_0000),
        (-1.0, 0x3ebc_5ab3),
        (1.0, 0x402d_f855),
        (-0.5, 0x3f1b_4597),
        (-10.0, 0x383e_6bce),
        (-87.3, 0x0084_c38b),
        (-103.9, 0x0000_0001),
        (-104.5, 0x0000_0000),
        (88.3, 0x7f27_ba47),
        (88.8, 0x7f80_0000),
        (10.5, 0x470d_db80),
        (-0.001, 0x3f7f_be7f),
        (3.7, 0x4221_ca0b),
        (-50.0, 0x1b69_2beb),
        (20.0, 0x4de7_5844),
        (-20.0, 0x310d_a432),
    ];
    const GGML_SILU: [(f32, u32); 16] = [
        (0.0, 0x0000_0000),
        (-1.0, 0xbe89_b2b0),
        (1.0, 0x3f3b_26a7),
        (-0.5, 0xbe41_4d03),
        (-10.0, 0xb9ee_03fb),
        (-87.3, 0x83b5_1923),
        (-103.9, 0x8000_0000),
        (5.0, 0x409e_eddc),
        (88.3, 0x42b0_999a),
        (100.0, 0x42c8_0000),
        (10.5, 0x4127_fed1),
        (-0.001, 0xba03_01a8),
        (3.7, 0x4067_1634),
        (-50.0, 0x9e36_2a4f),
        (20.0, 0x41a0_0000),
        (-20.0, 0xb331_0d40),
    ];

    #[test]
    fn exp_and_silu_are_ggmls_to_the_bit() {
        for (x, bits) in GGML_EXP {
            assert_eq!(expf(x).to_bits(), bits, "exp({x})");
        }
        for (x, bits) in GGML_SILU {
            assert_eq!(silu(x).to_bits(), bits, "silu({x})");
        }
        for x in data(1, 10_000).iter().map(|x| x * 40.0) {
            let (ours, exact) = (expf(x), f64::from(x).exp());
            assert!(((f64::from(ours) - exact) / exact).abs() < 3e-7, "{x}: {ours} vs {exact}");
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn the_fast_code_computes_the_portable_floats() {
        // SwiGLU over two rows whose width leaves a scalar tail (40 = 2·16 + 8).
        let (gate, up) = (data(2, 80).iter().map(|x| x * 8.0).collect::<Vec<_>>(), data(3, 80));
        let (mut fast, mut portable) = (gate.clone(), gate.clone());
        swiglu(&mut fast, &up, 40);
        swiglu_portable(&mut portable, &up, 40);
        assert_eq!(bits(&fast), bits(&portable));
        // The tail is the C library's exp, the rest ggml's.
        let want = |i: usize| gate[i] / (1.0 + (-gate[i]).exp()) * up[i];
        assert_eq!(fast[39].to_bits(), want(39).to_bits());
        assert_eq!(fast[0].to_bits(), (silu(gate[0]) * up[0]).to_bits());

        let (cos, sin) = (data(4, 8), data(5, 8));
        let (mut fast, mut portable) = (data(6, 32), data(6, 32));
        rope(&mut fast, 16, &cos, &sin);
        rope_portable(&mut portable, 16, &cos, &sin);
        assert_eq!(bits(&fast), bits(&portable));

        let (mut fast, mut portable) = (data(7, 100), data(7, 100));
        softmax(&mut fast, 0.125);
        softmax_portable(&mut portable, 0.125);
        assert_eq!(bits(&fast), bits(&portable));
        assert!((fast.iter().map(|&p| f64::from(p)).sum::<f64>() - 1.0).abs() < 1e-6);

        // Several rows `stride` apart, in both orders and both tails.
        let (rows, x) = (halves(8, 5 * 90), halves(9, 70));
        for (order, tail) in [(Order::Batch, Tail::Zeros), (Order::Single, Tail::Zeros), (Order::Single, Tail::F64)] {
            let (mut fast, mut portable) = ([0.0; 5], [0.0; 5]);
            dots(order, tail, &rows, 90, &x, &mut fast);
            dots_portable(order, tail, &rows, 90, &x, &mut portable);
            assert_eq!(bits(&fast), bits(&portable), "{order:?} {tail:?}");
            assert_eq!(fast[3].to_bits(), dot(order, tail, &rows[270..340], &x).to_bits());
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The sum of `a·b` as ggml's registers form it, one product at a time.
    fn lanes(order: Order, tail: Tail, a: &[f16], b: &[f16]) -> f32 {
        let registers = width(order) / LANES;
        let whole = whole(order, tail, a.len());
        let mut acc = vec![[0.0f32; LANES]; registers];
        for i in 0..whole {
            let l = &mut acc[i / LANES % registers][i % LANES];
            *l = a[i].to_f32().mul_add(b[i].to_f32(), *l);
        }
        while acc.len() > 1 {
            let half = acc.len() / 2;
            for r in 0..half {
                acc[r] = std::array::from_fn(|l| acc[r][l] + acc[r + half][l]);
            }
            acc.truncate(half);
        }
        let mut sum = f64::from(reduce(&acc[0]));
        if whole == a.len() {
            return sum as f32;
        }
        for i in whole..a.len() {
            sum += f64::from(a[i].to_f32() * b[i].to_f32());
        }
        sum as f32
    }

    #[test]
    fn dot_products_sum_in_ggml_registers_order() {
        for n in [1, 15, 16, 17, 63, 64, 80, 200, 256] {
            let (a, b) = (halves(2, n), halves(3, n));
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| x.to_f64() * y.to_f64()).sum();
            for (order, tail) in [(Order::Batch, Tail::Zeros), (Order::Single, Tail::Zeros), (Order::Single, Tail::F64)]
            {
                let ours = dot(order, tail, &a, &b);
                assert_eq!(ours.to_bits(), lanes(order, tail, &a, &b).to_bits(), "{order:?} {tail:?} n = {n}");
                assert!((f64::from(ours) - exact).abs() < 1e-4);
            }
        }
        // The orders differ: they are not the same sum twice.
        let (a, b) = (halves(4, 256), halves(5, 256));
        assert!((0..200).any(|s| {
            let (a, b) = (&a[s % 50..s % 50 + 128], &b[s / 50..s / 50 + 128]);
            dot(Order::Batch, Tail::Zeros, a, b) != dot(Order::Single, Tail::Zeros, a, b)
        }));
    }

    /// Attention through the cache, against softmax(q·k/√d)·v in f64 on
    /// the same f16 values: heads sharing key/value heads, a head size that
    /// is and one that is not a whole number of registers, a cache with
    /// room to spare, filled by a prompt and then one position.
    #[test]
    fn the_cache_attends_each_position_to_those_before_it() {
        let (heads, kv_heads, room) = (4, 2, 12);
        for d in [16, 80] {
            let (q, k, v) = (data(10, 6 * heads * d), data(11, 6 * kv_heads * d), data(12, 6 * kv_heads * d));
            let mut cache = KvCache::new(kv_heads, d, room);
            cache.store(0, &k[..5 * kv_heads * d], &v[..5 * kv_heads * d]);
            let prompt = cache.attend(&q[..5 * heads * d], heads, 0);
            cache.store(5, &k[5 * kv_heads * d..], &v[5 * kv_heads * d..]);
            let last = cache.attend(&q[5 * heads * d..], heads, 5);
            let got: Vec<f32> = prompt.into_iter().chain(last).collect();
            let h = |x: f32| f64::from(f16::from_f32(x).to_f32());
            for pos in 0..6 {
                for head in 0..heads {
                    let g = head / (heads / kv_heads);
                    let qv = |i: usize| h(q[(pos * heads + head) * d + i]);
                    let at = |t: &[f32], p: usize, i: usize| h(t[(p * kv_heads + g) * d + i]);
                    let s: Vec<f64> = (0..=pos)
                        .map(|p| (0..d).map(|i| qv(i) * at(&k, p, i)).sum::<f64>() / (d as f64).sqrt())
                        .collect();
                    let z: f64 = s.iter().map(|s| s.exp()).sum();
                    for i in 0..d {
                        let want: f64 = (0..=pos).map(|p| s[p].exp() / z * at(&v, p, i)).sum();
                        let ours = f64::from(got[(pos * heads + head) * d + i]);
                        assert!((ours - want).abs() < 2e-3, "d {d} position {pos} head {head} [{i}]: {ours} vs {want}");
                    }
                }
            }
        }
    }
}
