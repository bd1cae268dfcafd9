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
pub const LANES: usize = 16;

/// Defines a function whose body is compiled twice, for AVX2, FMA and
/// F16C (run when the CPU has them: `mul_add` is then one instruction, not
/// a call to the C library) and portably; both compute the same floats.
macro_rules! with_fma {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if crate::q4_1::avx2() {
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
                return unsafe { fast($($arg),*) };
            }
            body($($arg),*)
        }
    };
}

/// ggml's AVX-512 `ggml_v_expf` for one value: a polynomial on the
/// fraction, scaled by a power of two; 0 below about -104, inf above 88.4.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
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
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf(0.0 - x))
}

with_fma! {
    /// `gate ← silu(gate)·up`, ggml's `swiglu`.
    pub fn swiglu(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = silu(*g) * u;
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
    pub fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
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
        KvCache { kv_heads, head_dim, room, keys: vec![f16::ZERO; size], values_t: vec![f16::ZERO; size] }
    }

    /// Keys and values (position by position, head by head) for the
    /// positions from `start`, rounded to f16.
    pub fn store(&mut self, start: usize, k: &[f32], v: &[f32]) {
        let (d, room) = (self.head_dim, self.room);
        let width = self.kv_heads * d;
        assert!(k.len() == v.len() && start + k.len() / width <= room);
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
    /// itself and those before it; the result in the same layout. A
    /// batch's rows run in parallel on rayon's pool.
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
        if order == Order::Single {
            // A few rows of little work: not worth waking the pool.
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
pub enum Order {
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
pub enum Tail {
    /// They are padded with zeros to a whole register.
    Zeros,
    /// They are multiplied one by one and added in f64, after the
    /// registers' sum (as `ggml_vec_dot_f16` does).
    F64,
}

/// Scratch space for [`attend`], reused between calls.
#[derive(Default)]
pub struct Scratch {
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
    // ggml's rows of positions are padded (to 256) with probability 0.
    dots(order, Tail::Zeros, &values_t[..(d - 1) * stride + n], stride, probs, out);
}

with_fma! {
    /// ggml's `soft_max` of `scores · scale` in place: `exp(s - max)` with
    /// [`expf`], summed in f64 one 16-lane reduction at a time, then
    /// scaled by the sum's inverse rounded to f32.
    fn softmax(scores: &mut [f32], scale: f32) {
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
pub fn dot(order: Order, tail: Tail, a: &[f16], b: &[f16]) -> f32 {
    let mut out = [0.0];
    dots(order, tail, a, a.len(), b, &mut out);
    out[0]
}

/// `out[r] = Σ rows[r·stride..][..x.len()] · x` for each `r`, summed in
/// `order` (see [`dot`]).
pub fn dots(order: Order, tail: Tail, rows: &[f16], stride: usize, x: &[f16], out: &mut [f32]) {
    assert!(out.is_empty() || rows.len() >= (out.len() - 1) * stride + x.len());
    #[cfg(target_arch = "x86_64")]
    if crate::q4_1::avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { x86::dots(order, tail, rows, stride, x, out) };
    }
    for (r, o) in out.iter_mut().enumerate() {
        *o = finish(
            order,
            tail,
            &rows[r * stride..][..x.len()],
            x,
            registers(order, tail, &rows[r * stride..][..x.len()], x),
        );
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

/// The 16 lanes of `order`'s registers over the elements that go through
/// them (missing ones zero), the registers added together pairwise.
fn registers(order: Order, tail: Tail, a: &[f16], b: &[f16]) -> [f32; LANES] {
    let w = whole(order, tail, a.len());
    let mut acc = [[0.0f32; LANES]; 4];
    let per = width(order) / LANES;
    for (c, (ca, cb)) in a[..w].chunks(LANES).zip(b[..w].chunks(LANES)).enumerate() {
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
        let load = |s: &[f16]| {
            // SAFETY: `s` has 8 f16 (16 bytes); an unaligned load.
            _mm256_cvtph_ps(unsafe { _mm_loadu_si128(s.as_ptr().cast()) })
        };
        let full = a.len() / LANES * LANES;
        for (c, i) in (0..full).step_by(LANES).enumerate() {
            let r = 2 * (c % per);
            acc[r] = _mm256_fmadd_ps(load(&a[i..i + 8]), load(&b[i..i + 8]), acc[r]);
            acc[r + 1] = _mm256_fmadd_ps(load(&a[i + 8..i + 16]), load(&b[i + 8..i + 16]), acc[r + 1]);
        }
        if full < a.len() {
            let pad = |s: &[f16]| {
                let mut p = [f16::ZERO; LANES];
                p[..s.len()].copy_from_slice(s);
                p
            };
            let (pa, pb) = (pad(&a[full..]), pad(&b[full..a.len()]));
            let r = 2 * (full / LANES % per);
            acc[r] = _mm256_fmadd_ps(load(&pa[..8]), load(&pb[..8]), acc[r]);
            acc[r + 1] = _mm256_fmadd_ps(load(&pa[8..]), load(&pb[8..]), acc[r + 1]);
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

    fn data(seed: u32, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn expf_is_close_to_exp_and_saturates_like_ggml() {
        for x in data(1, 10_000).iter().map(|x| x * 40.0) {
            let (ours, exact) = (expf(x), (x as f64).exp());
            assert!(((ours as f64 - exact) / exact).abs() < 3e-7, "{x}: {ours} vs {exact}");
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(200.0), f32::INFINITY);
        assert_eq!(expf(0.0), 1.0);
        // Results below f32's normal range are rounded once, not flushed.
        assert!(expf(-100.0) > 0.0 && expf(-100.0) < f32::MIN_POSITIVE);
    }

    /// The sum of `a·b` as ggml's registers form it, one product at a time.
    fn lanes(order: Order, tail: Tail, a: &[f16], b: &[f16]) -> f32 {
        let (registers, width) = match order {
            Order::Batch => (1, LANES),
            Order::Single => (4, 4 * LANES),
        };
        let whole = if tail == Tail::F64 { a.len() / width * width } else { a.len() };
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
        let mut sum = reduce(&acc[0]) as f64;
        if whole == a.len() {
            return sum as f32;
        }
        for i in whole..a.len() {
            sum += (a[i].to_f32() * b[i].to_f32()) as f64;
        }
        sum as f32
    }

    #[test]
    fn dot_products_sum_in_ggml_registers_order() {
        for n in [1, 15, 16, 17, 63, 64, 80, 200, 256] {
            let a: Vec<f16> = data(2, n).iter().map(|&x| f16::from_f32(x)).collect();
            let b: Vec<f16> = data(3, n).iter().map(|&x| f16::from_f32(x)).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| x.to_f64() * y.to_f64()).sum();
            for (order, tail) in [(Order::Batch, Tail::Zeros), (Order::Single, Tail::Zeros), (Order::Single, Tail::F64)]
            {
                let ours = dot(order, tail, &a, &b);
                let want = lanes(order, tail, &a, &b);
                assert_eq!(ours.to_bits(), want.to_bits(), "{order:?} {tail:?} n = {n}");
                let portable = finish(order, tail, &a, &b, registers(order, tail, &a, &b));
                assert_eq!(portable.to_bits(), want.to_bits(), "portable: {order:?} {tail:?} n = {n}");
                assert!((ours as f64 - exact).abs() < 1e-4);
            }
        }
        // The orders differ: they are not the same sum twice.
        let a: Vec<f16> = data(4, 256).iter().map(|&x| f16::from_f32(x)).collect();
        let b: Vec<f16> = data(5, 256).iter().map(|&x| f16::from_f32(x)).collect();
        assert!((0..200).any(|s| {
            let (a, b) = (&a[s % 50..s % 50 + 128], &b[s / 50..s / 50 + 128]);
            dot(Order::Batch, Tail::Zeros, a, b) != dot(Order::Single, Tail::Zeros, a, b)
        }));
    }

    #[test]
    fn attention_weighs_the_values_by_the_softmax_of_the_scores() {
        let (d, n) = (8, 5);
        let h = |v: Vec<f32>| v.into_iter().map(f16::from_f32).collect::<Vec<_>>();
        let (q, k, v) = (h(data(4, d)), h(data(5, n * d)), h(data(6, n * d)));
        let mut out = vec![0.0; d];
        for order in [Order::Batch, Order::Single] {
            attend(order, &q, &k, &v, n, n, &mut Scratch::default(), &mut out);
            let s: Vec<f64> = (0..n)
                .map(|p| (0..d).map(|i| q[i].to_f64() * k[p * d + i].to_f64()).sum::<f64>() / (d as f64).sqrt())
                .collect();
            let z: f64 = s.iter().map(|s| s.exp()).sum();
            for (i, o) in out.iter().enumerate() {
                let want: f64 = (0..n).map(|p| s[p].exp() / z * v[i * n + p].to_f64()).sum();
                assert!((*o as f64 - want).abs() < 2e-3, "{i}: {o} vs {want}");
            }
        }
    }
}
