//! Scalar functions for the fused kernels, written so the compiler can vectorise loops over them.
use candle_core::WithDType;

use super::attention::BLOCK_ROWS;

/// The element types the fused kernels run on (f32 for inference, f64 for the finite-difference tests).
pub trait Real: WithDType {
    fn exp(self) -> Self;
    /// `gelu(x) = x Φ(x)` with the normal CDF through `erf` (torch's default `F.gelu`).
    #[inline(always)]
    fn gelu_erf(self) -> Self {
        self.normal_cdf() * self
    }
    /// Softmax of one row in place.
    fn softmax_row(row: &mut [Self]) {
        softmax_row_lanes(row)
    }
    /// The standard normal CDF `Φ(x) = (1 + erf(x / √2)) / 2`.
    fn normal_cdf(self) -> Self;
    /// GEGLU's gate on one row: `o = a · gelu(g)` element-wise.
    fn gate_row(o: &mut [Self], a: &[Self], g: &[Self]) {
        gate_row_plain(o, a, g)
    }
    /// Group norm's output with SiLU on one run: `o = silu(x · scale + shift)`, SiLU being `z / (1 + e^-z)`.
    fn silu_affine_row(o: &mut [Self], xs: &[Self], scale: Self, shift: Self) {
        silu_affine_plain(o, xs, scale, shift)
    }
    /// The backward of [`Real::silu_affine_row`] on one run, before the affine map: `o = g · σ(z) · (1 + z (1 -
    /// σ(z)))`, `z = x · scale + shift`.
    fn silu_affine_grad_row(o: &mut [Self], xs: &[Self], gs: &[Self], scale: Self, shift: Self) {
        silu_affine_grad_plain(o, xs, gs, scale, shift)
    }
    /// The gate's backward on one row: `da = grad · gelu(g)`, `dg = grad · a · (Φ(g) + g φ(g))`.
    fn gate_grad_row(da: &mut [Self], dg: &mut [Self], a: &[Self], g: &[Self], grad: &[Self]) {
        gate_grad_row_plain(da, dg, a, g, grad)
    }
    /// Softmax's numerators `e^(x - row max)` for each row of a column-major block (`rows` values per column,
    /// one column per key) in place; `inv_sum` gets each row's `1 / Σ`, `max` is scratch of `rows` values.
    /// The attention forward scales its (rows, width) result instead of the (rows, keys) block.
    fn exp_columns(block: &mut [Self], rows: usize, max: &mut [Self], inv_sum: &mut [Self]) {
        exp_columns_plain(block, rows, max, inv_sum)
    }
    /// Softmax of each row of a column-major block in place; `max` and `sum` are scratch of `rows` values.
    fn softmax_columns(block: &mut [Self], rows: usize, max: &mut [Self], sum: &mut [Self]) {
        softmax_columns_plain(block, rows, max, sum)
    }
    /// Softmax's backward for each row of a column-major block in place: `dp` (the probabilities' gradient)
    /// becomes the scores' gradient `p ⊙ (dp - Σ_row dp ⊙ p) · scale`; `dot` is scratch of `rows` values.
    fn softmax_grad_columns(dp: &mut [Self], p: &[Self], rows: usize, scale: Self, dot: &mut [Self]) {
        softmax_grad_columns_plain(dp, p, rows, scale, dot)
    }
}

#[inline(always)]
fn gate_grad_row_plain<T: Real>(da: &mut [T], dg: &mut [T], a: &[T], g: &[T], grad: &[T]) {
    let inv_sqrt_2pi = T::from_f64(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    let minus_half = T::from_f64(-0.5);
    for ((((da, dg), &a), &g), &grad) in da.iter_mut().zip(dg.iter_mut()).zip(a).zip(g).zip(grad) {
        let cdf = g.normal_cdf();
        let pdf = (minus_half * g * g).exp() * inv_sqrt_2pi;
        *da = grad * g * cdf;
        *dg = grad * a * (cdf + g * pdf);
    }
}

#[inline(always)]
fn silu_affine_plain<T: Real>(o: &mut [T], xs: &[T], scale: T, shift: T) {
    for (o, &x) in o.iter_mut().zip(xs) {
        let z = x * scale + shift;
        *o = z / (T::one() + (T::zero() - z).exp());
    }
}

#[inline(always)]
fn silu_affine_grad_plain<T: Real>(o: &mut [T], xs: &[T], gs: &[T], scale: T, shift: T) {
    for ((o, &x), &g) in o.iter_mut().zip(xs).zip(gs) {
        // d/dz z·σ(z) = σ(z)·(1 + z·(1 - σ(z))).
        let z = x * scale + shift;
        let s = T::one() / (T::one() + (T::zero() - z).exp());
        *o = g * s * (T::one() + z * (T::one() - s));
    }
}

#[inline(always)]
fn gate_row_plain<T: Real>(o: &mut [T], a: &[T], g: &[T]) {
    for ((o, &a), &g) in o.iter_mut().zip(a).zip(g) {
        *o = a * g.gelu_erf();
    }
}

/// Softmax of one row in place (scale the scores first).
pub fn softmax_row<T: Real>(row: &mut [T]) {
    T::softmax_row(row)
}

/// Independent accumulators per reduction: float additions are not associative, so the compiler vectorises a
/// reduction only when it is written over separate lanes.
const LANES: usize = 16;

/// max, then `e^(x - max)` with their sum, then a multiply by its inverse; reductions over [`LANES`] lanes.
#[inline(always)]
fn softmax_row_lanes<T: Real>(row: &mut [T]) {
    let inv = T::one() / exp_row_lanes(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `e^(x - max)` in place; returns their sum (one for an empty row).
#[inline(always)]
fn exp_row_lanes<T: Real>(row: &mut [T]) -> T {
    let Some(&first) = row.first() else { return T::one() };
    let mut maxima = [first; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in maxima.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = chunks.remainder().iter().chain(&maxima).fold(first, |m, &v| if v > m { v } else { m });
    let mut sums = [T::zero(); LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c.iter_mut()) {
            *v = (*v - max).exp();
            *s += *v;
        }
    }
    let mut sum = T::zero();
    for v in chunks.into_remainder() {
        *v = (*v - max).exp();
        sum += *v;
    }
    sums.iter().fold(sum, |a, &b| a + b)
}

/// [`Real::exp_columns`]: the row maxima, then `e^(x - max)` with the row sums; every loop runs down a column,
/// one lane per row. Blocks of [`BLOCK_ROWS`] rows keep the maxima and sums in registers (as memory operands,
/// the maxima's conditional update compiled to masked stores, which took a quarter of the softmax on Zen 3).
#[inline(always)]
fn exp_columns_plain<T: Real>(block: &mut [T], rows: usize, max: &mut [T], inv_sum: &mut [T]) {
    if rows == BLOCK_ROWS {
        return exp_columns_fixed::<T, BLOCK_ROWS>(block, &mut inv_sum[..BLOCK_ROWS]);
    }
    if rows == 0 {
        return;
    }
    let (max, sum) = (&mut max[..rows], &mut inv_sum[..rows]);
    max.copy_from_slice(&block[..rows]);
    for col in block.chunks_exact(rows) {
        for (m, &v) in max.iter_mut().zip(col) {
            *m = if v > *m { v } else { *m };
        }
    }
    sum.fill(T::zero());
    for col in block.chunks_exact_mut(rows) {
        for ((v, &m), s) in col.iter_mut().zip(max.iter()).zip(sum.iter_mut()) {
            *v = (*v - m).exp();
            *s += *v;
        }
    }
    for s in sum.iter_mut() {
        *s = T::one() / *s;
    }
}

/// [`exp_columns_plain`] for blocks of exactly `R` rows, per-row values in local arrays.
#[inline(always)]
fn exp_columns_fixed<T: Real, const R: usize>(block: &mut [T], inv_sum: &mut [T]) {
    let (cols, _) = block.as_chunks_mut::<R>();
    let Some(&first) = cols.first() else { return };
    let mut max = first;
    for col in cols.iter() {
        for (m, &v) in max.iter_mut().zip(col) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut sum = [T::zero(); R];
    for col in cols.iter_mut() {
        for ((v, &m), s) in col.iter_mut().zip(&max).zip(&mut sum) {
            *v = (*v - m).exp();
            *s += *v;
        }
    }
    for (inv, s) in inv_sum.iter_mut().zip(sum) {
        *inv = T::one() / s;
    }
}

/// [`Real::softmax_columns`]: [`exp_columns_plain`], then the rows scaled by their inverse sums.
#[inline(always)]
fn softmax_columns_plain<T: Real>(block: &mut [T], rows: usize, max: &mut [T], sum: &mut [T]) {
    if rows == 0 {
        return;
    }
    exp_columns_plain(block, rows, max, sum);
    let inv = &sum[..rows];
    for col in block.chunks_exact_mut(rows) {
        for (v, &inv) in col.iter_mut().zip(inv) {
            *v *= inv;
        }
    }
}

/// [`Real::softmax_grad_columns`], one lane per row; blocks of [`BLOCK_ROWS`] rows keep the dot products in
/// registers.
#[inline(always)]
fn softmax_grad_columns_plain<T: Real>(dp: &mut [T], p: &[T], rows: usize, scale: T, dot: &mut [T]) {
    if rows == BLOCK_ROWS {
        let mut acc = [T::zero(); BLOCK_ROWS];
        column_dots(dp, p, &mut acc);
        return softmax_grad_scale(dp, p, &acc, scale);
    }
    if rows == 0 {
        return;
    }
    let dot = &mut dot[..rows];
    column_dots(dp, p, dot);
    softmax_grad_scale(dp, p, dot, scale);
}

/// `dot[i] = Σ_col dp[col][i] · p[col][i]` over the columns of `dot.len()` rows.
#[inline(always)]
fn column_dots<T: Real>(dp: &[T], p: &[T], dot: &mut [T]) {
    let rows = dot.len();
    dot.fill(T::zero());
    for (d_col, p_col) in dp.chunks_exact(rows).zip(p.chunks_exact(rows)) {
        for ((acc, &d), &pv) in dot.iter_mut().zip(d_col).zip(p_col) {
            *acc += d * pv;
        }
    }
}

/// `dp = p ⊙ (dp - dot) · scale`, column by column.
#[inline(always)]
fn softmax_grad_scale<T: Real>(dp: &mut [T], p: &[T], dot: &[T], scale: T) {
    let rows = dot.len();
    for (d_col, p_col) in dp.chunks_exact_mut(rows).zip(p.chunks_exact(rows)) {
        for ((d, &pv), &dt) in d_col.iter_mut().zip(p_col).zip(dot) {
            *d = pv * (*d - dt) * scale;
        }
    }
}

/// Defines `fn $name($args) -> $ret` calling `$plain($args)` compiled for the widest vector unit the CPU has
/// (AVX-512F, else AVX2 + FMA, else the crate's baseline, 4-wide SSE2): the same f32 operations in wider lanes,
/// so the same bits.
macro_rules! widest {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $plain:path) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $plain($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $plain($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $plain($($arg),*)
        }
    };
}
pub(crate) use widest;

widest! {
    /// Softmax's numerators in place, `e^(x - max)` for an f32 row, and their sum (one for an empty row): the
    /// bf16 attention scales and rounds them itself.
    pub fn exp_row(row: &mut [f32]) -> f32 = exp_row_lanes
}

impl Real for f32 {
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn normal_cdf(self) -> Self {
        (erf_f32(self * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5
    }
    widest! { fn gate_grad_row(da: &mut [f32], dg: &mut [f32], a: &[f32], g: &[f32], grad: &[f32]) = gate_grad_row_plain }
    widest! { fn silu_affine_row(o: &mut [f32], xs: &[f32], scale: f32, shift: f32) = silu_affine_plain }
    widest! { fn silu_affine_grad_row(o: &mut [f32], xs: &[f32], gs: &[f32], scale: f32, shift: f32) = silu_affine_grad_plain }
    widest! { fn softmax_row(row: &mut [f32]) = softmax_row_lanes }
    widest! { fn gate_row(o: &mut [f32], a: &[f32], g: &[f32]) = gate_row_plain }
    widest! { fn exp_columns(block: &mut [f32], rows: usize, max: &mut [f32], inv_sum: &mut [f32]) = exp_columns_plain }
    widest! { fn softmax_columns(block: &mut [f32], rows: usize, max: &mut [f32], sum: &mut [f32]) = softmax_columns_plain }
    widest! { fn softmax_grad_columns(dp: &mut [f32], p: &[f32], rows: usize, scale: f32, dot: &mut [f32]) = softmax_grad_columns_plain }
}

impl Real for f64 {
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn normal_cdf(self) -> Self {
        (candle_core::cpu::erf::erf_f64(self * std::f64::consts::FRAC_1_SQRT_2) + 1.) * 0.5
    }
}

/// `e^x` in f32 within 2 ulp, branch-free so that loops vectorise (libm's `expf` is a call per element; the
/// softmax of the 4096-token self-attention takes hundreds of millions of them per step). Range reduction
/// `x = k ln2 + r` with ln2 split in two (Cody–Waite), the Cephes polynomial for `e^r` on |r| <= ln2/2, and
/// `2^k` built in the exponent bits. Inputs are clamped to [-87, 88], the range of normal f32 results. Written
/// with fused multiply-adds: the dispatched kernels (`widest!`) run it on AVX2+FMA or AVX-512, where each is one
/// instruction (half the polynomial's work of separate multiplies and adds); only the SSE2 fallback for CPUs
/// without FMA calls libm's `fmaf`, and every caller is such a kernel.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    /// 1.5 * 2^23: adding and subtracting it rounds an f32 of magnitude < 2^22 to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    /// ln 2 = LN2_HI + LN2_LO, LN2_HI with few mantissa bits so that k * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [1.987_569_1e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
    // Selects rather than `clamp` (NaN rules): they vectorise; a NaN fails both tests and propagates.
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let shifted = x.mul_add(std::f32::consts::LOG2_E, ROUND);
    let k = shifted - ROUND;
    let r = k.mul_add(-LN2_LO, k.mul_add(-LN2_HI, x));
    let p = P.iter().fold(0.0, |acc: f32, &c| acc.mul_add(r, c));
    let er = p.mul_add(r * r, r) + 1.0;
    // `shifted`'s low mantissa bits hold k (its bits are ROUND's plus k), so `bits + 127` shifted into the
    // exponent field is 2^k: ROUND's own bits leave through the top. Integer lane operations, where `k as
    // i32` (a saturating cast with NaN checks) was a scalar conversion per element.
    er * f32::from_bits(shifted.to_bits().wrapping_add(EXP_BIAS) << 23)
}

/// The f32 exponent bias.
const EXP_BIAS: u32 = 127;

/// Abramowitz & Stegun 7.1.26: `erf(x) = sign(x) (1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^(-x²))`,
/// `t = 1 / (1 + p|x|)`, absolute error below 1.5e-7 (5e-7 after f32 rounding near |x| = 0.17); branch-free so that loops vectorise (libm's `erff` is a
/// call with branches per element). PyTorch's vectorised CPU `erf`, which its f32 `F.gelu` uses, is this
/// formula too, so diffusers' reference images were made with it.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_72, 1.421_413_8, -1.453_152, 1.061_405_4];
    let ax = x.abs();
    let t = 1.0 / P.mul_add(ax, 1.0);
    let poly = A.iter().rev().fold(0.0, |acc: f32, &a| acc.mul_add(t, a)) * t;
    (1.0 - poly * exp_f32(-ax * ax)).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_f32_within_the_formulas_bound() {
        let mut worst = 0f64;
        for i in 0..=400_000 {
            let x = -10.0 + 20.0 * i as f32 / 400_000.0;
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((erf_f32(x) as f64 - want).abs());
        }
        // A&S's bound is 1.5e-7 in exact arithmetic (1.4e-7 measured); in f32 the near-cancelling
        // 1 - poly·e^(-x²) for small |x| rounds to at most 5.04e-7 (at x ≈ ±0.17, numpy float32 likewise).
        assert!(worst < 6e-7, "worst absolute error {worst:e}");
        assert!(erf_f32(0.0).abs() < 2e-7, "the formula's 1 - Σa is one f32 ulp off 0 at 0");
        assert_eq!((erf_f32(30.0), erf_f32(-30.0), erf_f32(f32::INFINITY)), (1.0, -1.0, 1.0));
        assert!(erf_f32(f32::NAN).is_nan());
    }

    #[test]
    fn exp_f32_within_two_ulp_of_libm() {
        let mut worst = 0f64;
        for i in 0..=2_000_000 {
            let x = -87.0 + 175.0 * i as f32 / 2_000_000.0;
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        // One f32 ulp is 2^-23 ≈ 1.19e-7 relative.
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e30) < 1e-37 && exp_f32(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_f32(f32::NAN).is_nan());
        // 2^k from the rounding constant's bits is the saturating cast's 2^k, bit for bit, over the whole range.
        for i in 0..=400_000 {
            let x = -90.0 + 180.0 * i as f32 / 400_000.0;
            let c = x.clamp(-87.0, 88.0);
            let k = (c * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let cast = f32::from_bits(((k as i32 + 127) << 23) as u32);
            let bits = f32::from_bits((c * std::f32::consts::LOG2_E + 12_582_912.0).to_bits().wrapping_add(127) << 23);
            assert_eq!(cast.to_bits(), bits.to_bits(), "x {x}");
        }
    }

    /// The vectorised SiLU affine (whatever the CPU dispatches to) gives the plain loop's bits: the same f32
    /// operations, lane by lane.
    #[test]
    fn silu_affine_row_is_the_plain_loop() {
        let xs: Vec<f32> = (0..1037).map(|i| ((i * 7919 % 1009) as f32 - 504.0) * 0.05).collect();
        let (mut fast, mut plain) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
        f32::silu_affine_row(&mut fast, &xs, 1.7, -0.3);
        silu_affine_plain(&mut plain, &xs, 1.7, -0.3);
        assert!(fast.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()));
        for (&x, &o) in xs.iter().zip(&plain) {
            let z = x as f64 * 1.7 - 0.3;
            let want = z / (1.0 + (-z).exp());
            assert!((o as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "silu({z}) = {o}, want {want}");
        }
    }

    /// The lane-wise row softmax (every dispatch path) against the plain formula, rows shorter and longer than
    /// the lanes.
    #[test]
    fn softmax_row_matches_definition() {
        for len in [1usize, 5, 16, 77, 4099] {
            let row: Vec<f32> = (0..len).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3).collect();
            let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let mut ours = row.clone();
            softmax_row(&mut ours);
            let mut lanes = row.clone();
            softmax_row_lanes(&mut lanes);
            for ((&o, &l), &v) in ours.iter().zip(&lanes).zip(&row) {
                let want = (v as f64 - max).exp() / sum;
                assert!((o as f64 - want).abs() < 1e-6 * want.max(1e-3) + 1e-9, "len {len}: {o} vs {want}");
                assert!((l as f64 - want).abs() < 1e-6 * want.max(1e-3) + 1e-9, "len {len}: {l} vs {want}");
            }
        }
    }

    /// A column-major block (rows x keys) of scores: row `i`, key `j`.
    fn scores(rows: usize, keys: usize) -> Vec<f32> {
        (0..rows * keys).map(|e| (((e % rows) * 31 + (e / rows) * 37) % 101) as f32 * 0.1 - 5.0).collect()
    }

    /// The column-major block softmax (every dispatch path) against the formula in f64 row by row, for
    /// blocks of one row, of a vector's width and wider, short and long rows.
    #[test]
    fn softmax_columns_match_definition() {
        for (rows, keys) in [(1usize, 5usize), (8, 77), (32, 4099), (13, 16)] {
            let block = scores(rows, keys);
            let (mut ours, mut plain) = (block.clone(), block.clone());
            let (mut max, mut sum) = (vec![0f32; rows], vec![0f32; rows]);
            f32::softmax_columns(&mut ours, rows, &mut max, &mut sum);
            softmax_columns_plain(&mut plain, rows, &mut max, &mut sum);
            // The numerators with the inverse sums, scaled here, are the same probabilities.
            let mut numerators = block.clone();
            f32::exp_columns(&mut numerators, rows, &mut max, &mut sum);
            let scaled: Vec<f32> = numerators.iter().enumerate().map(|(e, &v)| v * sum[e % rows]).collect();
            for i in 0..rows {
                let row: Vec<f64> = (0..keys).map(|j| block[j * rows + i] as f64).collect();
                let m = row.iter().copied().fold(f64::MIN, f64::max);
                let total: f64 = row.iter().map(|v| (v - m).exp()).sum();
                for (j, v) in row.iter().enumerate() {
                    let want = (v - m).exp() / total;
                    for got in [ours[j * rows + i], plain[j * rows + i], scaled[j * rows + i]] {
                        // Each row's sum runs key by key in f32: rounding grows with the row's length.
                        let err = (got as f64 - want).abs();
                        let tol = 1e-7 * (keys as f64).sqrt().max(10.0) * want.max(1e-3);
                        assert!(err < tol, "{rows}x{keys} ({i}, {j}): {got} vs {want}");
                    }
                }
            }
        }
    }

    /// The column-major softmax backward (every dispatch path) against its formula in f64.
    #[test]
    fn softmax_grad_columns_match_definition() {
        for (rows, keys) in [(1usize, 5usize), (8, 77), (32, 4099)] {
            let mut p = scores(rows, keys);
            let (mut max, mut sum) = (vec![0f32; rows], vec![0f32; rows]);
            f32::softmax_columns(&mut p, rows, &mut max, &mut sum);
            let dp: Vec<f32> = (0..rows * keys).map(|e| ((e * 53 % 97) as f32 - 48.0) * 0.02).collect();
            let (mut ours, mut plain) = (dp.clone(), dp.clone());
            f32::softmax_grad_columns(&mut ours, &p, rows, 0.25, &mut max);
            softmax_grad_columns_plain(&mut plain, &p, rows, 0.25, &mut sum);
            for i in 0..rows {
                let dot: f64 = (0..keys).map(|j| dp[j * rows + i] as f64 * p[j * rows + i] as f64).sum();
                for j in 0..keys {
                    let e = j * rows + i;
                    let want = p[e] as f64 * (dp[e] as f64 - dot) * 0.25;
                    for got in [ours[e], plain[e]] {
                        // The difference dp - dot cancels: an absolute bound scaled by the probability.
                        let err = (got as f64 - want).abs();
                        assert!(err < 1e-6 * (p[e] as f64).max(1e-6), "{rows}x{keys} ({i}, {j}): {got} vs {want}");
                    }
                }
            }
        }
    }
}
