//! Matrix products of bf16 operands with f32 accumulation, on the CPU's own bf16 dot-product units.
//!
//! candle 0.11.1 and the `gemm` crate have no bf16 kernel (candle converts), so bf16 weights would only save
//! memory. Intel Xeons since Sapphire Rapids multiply bf16 tiles in their AMX unit (`tdpbf16ps`, 16x16x32 per
//! instruction: about 6x the f32 AVX-512 rate PyTorch reaches there), and Zen 4/5 and Intel have AVX512-BF16's
//! `vdpbf16ps` (pairs of bf16 products summed into f32 lanes: 2x the f32 rate). Which one runs is decided at run
//! time from the CPU ([`Kernel::detect`]); without either, linear layers and convolutions take their f32
//! products on the widened bf16 weights with the f32 activations as they are (`model::layers`, `conv2d`: bf16
//! saves memory there, not time; the products are those of f32 weights rounded to bf16), and the `widen`
//! kernel here serves autocast's products.
//!
//! Both native kernels share one packed layout, built per call from f32 or bf16 operands with any strides:
//! - left operand (m, k): tiles of 16 rows x 32 bf16 (1 KiB, one AMX tile), `[m tile][k tile]`;
//! - right operand (k, n): tiles of 16 pairs of k x 16 columns x 2 bf16 (the "VNNI" layout `tdpbf16ps` and
//!   `vdpbf16ps` read: the two k values a lane sums are adjacent), `[n tile][k tile]`;
//!
//! zero-padded to even tile counts, so that every microkernel call computes a full 32x32 block of f32 sums
//! with k in 32-wide steps (zeros add nothing). f32 inputs are rounded to nearest-even bf16 while packing.
pub mod amx;
pub mod attention;
pub mod autocast;
pub mod avx512;

use candle_core::Result;
use half::bf16;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows and columns of one tile; bf16 values along k per tile.
pub const TILE: usize = 16;
pub const TILE_K: usize = 32;
/// bf16 values in one packed tile.
const TILE_ELEMS: usize = TILE * TILE_K;
/// Rows (and columns) of the f32 block one microkernel call computes: 2x2 tiles.
pub const BLOCK: usize = 2 * TILE;
/// Bytes of packed operands one task works on (within a core's L2 cache: 2 MiB on Sapphire Rapids, 1 MiB
/// on Zen 4/5).
const L2_BUDGET: usize = 512 * 1024;

/// Which bf16 matrix-product kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Intel AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX512-BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// No bf16 dot products: `gemm` in f32 on bf16 operands widened (exactly) and f32 ones as they are, unless
    /// both are f32 (autocast's products: then both are rounded to bf16 first, as the bf16 units would).
    Widen,
}

impl Kernel {
    /// The fastest kernel this CPU (and OS) runs, found once. `CONTROLNET_BF16_KERNEL=amx|avx512bf16|widen`
    /// picks a slower one (for comparisons); a faster one than the CPU has is ignored.
    pub fn detect() -> Kernel {
        static KERNEL: OnceLock<Kernel> = OnceLock::new();
        *KERNEL.get_or_init(|| {
            let best = if amx::available() {
                Kernel::Amx
            } else if avx512::available() {
                Kernel::Avx512Bf16
            } else {
                Kernel::Widen
            };
            match std::env::var("CONTROLNET_BF16_KERNEL").ok().and_then(|v| Kernel::from_name(&v)) {
                Some(wanted) if wanted.rank() <= best.rank() => wanted,
                _ => best,
            }
        })
    }

    /// Whether the CPU multiplies bf16 natively (what `dtype: auto` asks).
    pub fn native(self) -> bool {
        self != Kernel::Widen
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Bf16 => "avx512bf16",
            Kernel::Widen => "widen",
        }
    }

    fn from_name(name: &str) -> Option<Kernel> {
        [Kernel::Amx, Kernel::Avx512Bf16, Kernel::Widen].into_iter().find(|k| k.name() == name.trim())
    }

    fn rank(self) -> u8 {
        match self {
            Kernel::Widen => 0,
            Kernel::Avx512Bf16 => 1,
            Kernel::Amx => 2,
        }
    }

    /// Every kernel this CPU can run, fastest first (the bench's floor table, the tests).
    pub fn available() -> Vec<Kernel> {
        let best = Kernel::detect().rank().max(if amx::available() {
            2
        } else if avx512::available() {
            1
        } else {
            0
        });
        [Kernel::Amx, Kernel::Avx512Bf16, Kernel::Widen].into_iter().filter(|k| k.rank() <= best).collect()
    }
}

/// Whether a layer has half-precision weights for f32 activations here: `x` f32 on the CPU, the weight bf16 or
/// f16. bf16 weights run on the bf16 kernels where the CPU has a bf16 unit ([`native_products`]); f16 ones (no
/// x86 unit multiplies f16 faster than f32, and rounding f16's 11-bit significands to bf16's 8 would throw away
/// what f16 keeps), and bf16 ones elsewhere, are widened to f32 by the layers, which run the f32 products on the
/// activations as they are.
pub fn mixed(x: &candle_core::Tensor, weight: &candle_core::Tensor) -> bool {
    use candle_core::DType;
    x.device().is_cpu() && x.dtype() == DType::F32 && matches!(weight.dtype(), DType::BF16 | DType::F16)
}

/// Whether [`mixed`] holds with a bf16 weight: the products, attention's included, round to bf16.
pub fn bf16_products(x: &candle_core::Tensor, weight: &candle_core::Tensor) -> bool {
    mixed(x, weight) && weight.dtype() == candle_core::DType::BF16
}

/// Whether [`bf16_products`] holds on a CPU with a bf16 unit (the chosen [`Kernel`] is native): the linear
/// layers' products run on the bf16 kernels.
pub fn native_products(x: &candle_core::Tensor, weight: &candle_core::Tensor) -> bool {
    bf16_products(x, weight) && Kernel::detect().native()
}

/// `x (..., in) · weightᵀ + bias` for f32 `x` and a bf16 `weight` (out, in) on the CPU: `nn.Linear` with bf16
/// weights. The output is f32. (This records no backward: a locked layer on a tracked input gets its input
/// gradient from [`linear_input_grad`].)
pub fn linear(
    x: &candle_core::Tensor,
    weight: &candle_core::Tensor,
    bias: Option<&candle_core::Tensor>,
) -> Result<candle_core::Tensor> {
    linear_with(x, weight, bias, |x, w| x.apply_op2_no_bwd(w, &LinearOp))
}

/// `x (..., in) · weightᵀ + bias` for f32 `x` and a trained f32 `weight` under mixed precision's autocast
/// ([`autocast`]): the products on the bf16 kernels (both operands rounded as read, f32 sums), and so are the
/// backward's input and weight gradients; the bias adds in f32.
pub fn autocast_linear(
    x: &candle_core::Tensor,
    weight: &candle_core::Tensor,
    bias: Option<&candle_core::Tensor>,
) -> Result<candle_core::Tensor> {
    linear_with(x, weight, bias, |x, w| x.apply_op2(w, LinearOp))
}

/// [`linear`] and [`autocast_linear`]: `product(x (rows, in), weight)` on the flattened input, then the bias.
fn linear_with(
    x: &candle_core::Tensor,
    weight: &candle_core::Tensor,
    bias: Option<&candle_core::Tensor>,
    product: impl FnOnce(&candle_core::Tensor, &candle_core::Tensor) -> Result<candle_core::Tensor>,
) -> Result<candle_core::Tensor> {
    let (out_d, in_d) = weight.dims2()?;
    let weight = weight.contiguous()?;
    let y = on_rows(x, in_d, out_d, "bf16 linear", |x| product(x, &weight))?;
    match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(candle_core::DType::F32)?),
        None => Ok(y),
    }
}

/// `f` on `t` (..., from) seen as (rows, from); its (rows, to) result seen as (..., to).
fn on_rows(
    t: &candle_core::Tensor,
    from: usize,
    to: usize,
    what: &str,
    f: impl FnOnce(&candle_core::Tensor) -> Result<candle_core::Tensor>,
) -> Result<candle_core::Tensor> {
    let mut dims = t.dims().to_vec();
    if dims.last() != Some(&from) {
        candle_core::bail!("{what}: {:?} does not end in the weight's {from}", t.shape())
    }
    let rows = t.elem_count() / from.max(1);
    let y = f(&t.contiguous()?.reshape((rows, from))?)?;
    if let Some(last) = dims.last_mut() {
        *last = to;
    }
    y.reshape(dims)
}

/// x (rows, in) f32 · W (out, in)ᵀ, W bf16 (a bf16 layer) or f32 (autocast, both rounded as read); backward
/// (autocast only records one) likewise on the bf16 kernels.
struct LinearOp;

impl candle_core::CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let ((x, (rows, in_d)), (w, (out_d, _))) =
            matrix_pair(self.name(), (s1, l1), (s2, l2), |(_, in_d), (_, w_in)| w_in == in_d)?;
        // The product (accumulate = false) writes every element.
        let mut out = super::unfilled::<f32>(rows * out_d);
        // yᵀ (out, rows) = W (out, in) · xᵀ (in, rows), written transposed into y: the weights are then the
        // left operand, bf16 ones read where they lie (no per-call packing of a matrix as large as the layer).
        let (lhs, rhs) = (Operand::new(w, in_d, 1), Operand::new(Values::F32(x), 1, in_d));
        matmul(out_d, rows, in_d, lhs, rhs, &mut out, (1, out_d), false)?;
        Ok((candle_core::CpuStorage::F32(out), candle_core::Shape::from((rows, out_d))))
    }

    fn bwd(
        &self,
        x: &candle_core::Tensor,
        weight: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
        let grad = grad.contiguous()?;
        let grad_x = if x.track_op() { Some(grad.apply_op2_no_bwd(weight, &InputGradOp)?) } else { None };
        let grad_w = if weight.track_op() { Some(grad.apply_op2_no_bwd(x, &WeightGradOp)?) } else { None };
        Ok((grad_x, grad_w))
    }
}

/// A linear layer's weight as product values: bf16, or f32 (autocast).
fn weight_values<'a>(s: &'a candle_core::CpuStorage, w0: usize, w1: usize, op: &str) -> Result<Values<'a>> {
    match s {
        candle_core::CpuStorage::BF16(w) => Ok(Values::Bf16(&w[w0..w1])),
        candle_core::CpuStorage::F32(w) => Ok(Values::F32(&w[w0..w1])),
        _ => candle_core::bail!("{op}: a bf16 or f32 weight expected"),
    }
}

/// A matrix operand's values with its (rows, columns).
type Matrix<V> = (V, (usize, usize));

/// The two matrices of a linear layer's op, checked as each such op needs them: both 2-D and contiguous, the
/// first f32 (input or gradient), the second a weight's values ([`weight_values`]), and their sizes as `fits`
/// says (else an error naming both shapes).
fn matrix_pair<'a>(
    op: &str,
    (s1, l1): (&'a candle_core::CpuStorage, &candle_core::Layout),
    (s2, l2): (&'a candle_core::CpuStorage, &candle_core::Layout),
    fits: impl Fn((usize, usize), (usize, usize)) -> bool,
) -> Result<(Matrix<&'a [f32]>, Matrix<Values<'a>>)> {
    let (d1, d2) = (l1.shape().dims2()?, l2.shape().dims2()?);
    let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
        candle_core::bail!("{op}: operands must be contiguous")
    };
    let candle_core::CpuStorage::F32(a) = s1 else { candle_core::bail!("{op}: an f32 first operand expected") };
    let b = weight_values(s2, b0, b1, op)?;
    if !fits(d1, d2) {
        candle_core::bail!("{op}: {:?} and {:?} do not fit", l1.shape(), l2.shape())
    }
    Ok(((&a[a0..a1], d1), (b, d2)))
}

/// `grad (..., out) · weight (out, in)` for f32 `grad` and a bf16 `weight` on the CPU: the input gradient of
/// [`linear`], which a locked layer's backward needs when training through bf16 weights (mixed precision). The
/// gradient is rounded to bf16 as the product reads it, as PyTorch's autocast does; the sums are f32.
pub fn linear_input_grad(grad: &candle_core::Tensor, weight: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    let (out_d, in_d) = weight.dims2()?;
    let weight = weight.contiguous()?;
    on_rows(grad, out_d, in_d, "bf16 linear backward", |g| g.apply_op2_no_bwd(&weight, &InputGradOp))
}

/// grad (rows, out) f32 · W (out, in) bf16 (or f32 under autocast).
struct InputGradOp;

impl candle_core::CustomOp2 for InputGradOp {
    fn name(&self) -> &'static str {
        "linear-bf16-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let ((g, (rows, out_d)), (w, (_, in_d))) =
            matrix_pair(self.name(), (s1, l1), (s2, l2), |(_, out_d), (w_out, _)| w_out == out_d)?;
        // The product (accumulate = false) writes every element.
        let mut out = super::unfilled::<f32>(rows * in_d);
        let (lhs, rhs) = (Operand::new(Values::F32(g), out_d, 1), Operand::new(w, in_d, 1));
        matmul(rows, in_d, out_d, lhs, rhs, &mut out, (in_d, 1), false)?;
        Ok((candle_core::CpuStorage::F32(out), candle_core::Shape::from((rows, in_d))))
    }
}

/// gradᵀ (out, rows) · x (rows, in): the weight gradient of an autocast [`LinearOp`], on the bf16 kernels.
struct WeightGradOp;

impl candle_core::CustomOp2 for WeightGradOp {
    fn name(&self) -> &'static str {
        "linear-autocast-bf16-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let ((g, (_, out_d)), (x, (rows, in_d))) =
            matrix_pair(self.name(), (s1, l1), (s2, l2), |(rows, _), (x_rows, _)| x_rows == rows)?;
        let mut out = super::unfilled::<f32>(out_d * in_d);
        let (lhs, rhs) = (Operand::new(Values::F32(g), 1, out_d), Operand::new(x, in_d, 1));
        matmul(out_d, in_d, rows, lhs, rhs, &mut out, (in_d, 1), false)?;
        Ok((candle_core::CpuStorage::F32(out), candle_core::Shape::from((out_d, in_d))))
    }
}

/// The values of a matrix operand: f32 (rounded to bf16 when packed) or bf16.
#[derive(Clone, Copy)]
pub enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> Values<'a> {
    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::Bf16(v) => v.len(),
        }
    }

    /// Element `i` as bf16 bits (f32 rounded to nearest even).
    #[inline(always)]
    fn bits(&self, i: usize) -> u16 {
        match self {
            Values::F32(v) => bf16::from_f32(v[i]).to_bits(),
            Values::Bf16(v) => v[i].to_bits(),
        }
    }

    /// The values as f32: f32 ones rounded through bf16 when `round` (what the native kernels multiply) or as
    /// they are, bf16 ones widened (exactly).
    fn to_f32(self, round: bool) -> std::borrow::Cow<'a, [f32]> {
        use super::Weight;
        match self {
            Values::F32(v) if round => {
                std::borrow::Cow::Owned(v.par_iter().map(|&x| bf16::from_f32(x).to_f32()).collect())
            }
            Values::F32(v) => Weight::widen_all(v),
            Values::Bf16(v) => Weight::widen_all(v),
        }
    }
}

/// A read-only matrix: element (i, j) is `values[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub values: Values<'a>,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Operand<'a> {
    pub fn new(values: Values<'a>, rs: usize, cs: usize) -> Self {
        Operand { values, rs, cs }
    }
}

/// Whether `len` elements hold an (m, n) matrix with strides `rs` and `cs`.
fn spans(len: usize, m: usize, n: usize, rs: usize, cs: usize) -> bool {
    m == 0 || n == 0 || (m - 1).saturating_mul(rs).saturating_add((n - 1).saturating_mul(cs)) < len
}

/// `c (m, n; element (i, j) at i * c_rs + j * c_cs) = [c +] a (m, k) x b (k, n)`, the products of bf16 values
/// summed in f32, on all threads with the [`Kernel::detect`]ed kernel.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    c: &mut [f32],
    c_strides: (usize, usize),
    accumulate: bool,
) -> Result<()> {
    matmul_with(Kernel::detect(), m, n, k, a, b, c, c_strides, accumulate)
}

/// `c = a x b + bias`, `bias[i]` added to every element of row `i` as the sums are stored: a convolution's
/// product with its bias, without setting `c` to the bias first and reading it back. `b` may come packed
/// already ([`Right::Packed`]; a convolution gathers its patches straight into that layout).
#[allow(clippy::too_many_arguments)]
pub fn matmul_row_bias(
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Right,
    c: &mut [f32],
    c_strides: (usize, usize),
    bias: &[f32],
) -> Result<()> {
    if bias.len() != m {
        candle_core::bail!("bf16 matmul: {} biases for {m} rows", bias.len())
    }
    product(Kernel::detect(), m, n, k, a, b, c, c_strides, Store::RowBias(bias))
}

/// Whether the AVX512-BF16 paths run: a native kernel is chosen (not `CONTROLNET_BF16_KERNEL=widen`) and the
/// CPU has AVX512-BF16 (Zen 4/5, Intel since Cooper Lake, AMX machines too). They are the packers that fill
/// [`Right::Packed`] operands ahead of a product and the bf16 attention.
pub fn avx512_paths() -> bool {
    Kernel::detect().native() && avx512::available()
}

/// Values in a packed right operand of (k, n): `[n tile][k tile][16 pairs of k][16 columns][2 bf16]`, tile
/// counts even.
pub fn packed_len(k: usize, n: usize) -> usize {
    tiles(n, TILE) * k.div_ceil(TILE_K) * TILE_ELEMS
}

/// A product's right operand: values (packed by the product), or already packed ([`packed_len`] values in the
/// layout [`pack_b`] makes; only with [`avx512_paths`]).
#[derive(Clone, Copy)]
pub enum Right<'a> {
    Values(Operand<'a>),
    Packed(&'a [u16]),
}

/// [`matmul`] with a chosen kernel (one the CPU runs: see [`Kernel::available`]).
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    c: &mut [f32],
    c_strides: (usize, usize),
    accumulate: bool,
) -> Result<()> {
    let store = if accumulate { Store::Accumulate } else { Store::Overwrite };
    product(kernel, m, n, k, a, Right::Values(b), c, c_strides, store)
}

/// How the sums reach the output.
#[derive(Clone, Copy)]
enum Store<'a> {
    Overwrite,
    Accumulate,
    /// Overwrite with the sums plus the row's bias.
    RowBias(&'a [f32]),
}

impl Store<'_> {
    /// Stores `sums`, which belong to output row `row` (or to one column of `rows` rows from `row` on, for a
    /// column-major output: then `per_row` is true).
    #[inline(always)]
    fn run(self, dst: &mut [f32], sums: &[f32], row: usize, per_row: bool) {
        match self {
            Store::Overwrite => dst.copy_from_slice(&sums[..dst.len()]),
            Store::Accumulate => dst.iter_mut().zip(sums).for_each(|(d, s)| *d += s),
            Store::RowBias(bias) if per_row => {
                let bias = &bias[row..row + dst.len()];
                dst.iter_mut().zip(sums).zip(bias).for_each(|((d, s), b)| *d = s + b);
            }
            Store::RowBias(bias) => {
                let b = bias[row];
                dst.iter_mut().zip(sums).for_each(|(d, s)| *d = s + b);
            }
        }
    }
}

/// [`matmul_with`], storing as `store` says.
#[allow(clippy::too_many_arguments)]
fn product(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Right,
    c: &mut [f32],
    (c_rs, c_cs): (usize, usize),
    store: Store,
) -> Result<()> {
    let accumulate = matches!(store, Store::Accumulate);
    let b_fits = match b {
        Right::Values(b) => spans(b.values.len(), k, n, b.rs, b.cs),
        Right::Packed(p) => p.len() >= packed_len(k, n),
    };
    if !(spans(c.len(), m, n, c_rs, c_cs) && spans(a.values.len(), m, k, a.rs, a.cs) && b_fits) {
        candle_core::bail!("bf16 matmul: a ({m}x{k}) x ({k}x{n}) product does not fit its buffers")
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let c = &mut c[i * c_rs + j * c_cs];
                *c = match store {
                    Store::Overwrite => 0.,
                    Store::Accumulate => *c,
                    Store::RowBias(bias) => bias[i],
                };
            }
        }
        return Ok(());
    }
    if !Kernel::available().contains(&kernel) {
        candle_core::bail!("bf16 matmul: this CPU cannot run the {} kernel", kernel.name())
    }
    if kernel == Kernel::Widen {
        let Right::Values(b) = b else {
            candle_core::bail!("bf16 matmul: the widening kernel reads no packed operand")
        };
        // bf16 weights without a bf16 unit times f32 activations: f32 products, the activations as they are.
        // Two f32 operands (autocast) are rounded to bf16, as the bf16 units would.
        let round = matches!((a.values, b.values), (Values::F32(_), Values::F32(_)));
        widened(m, n, k, a, b, c, (c_rs, c_cs), accumulate, round)?;
        if let Store::RowBias(bias) = store {
            for (i, &b) in bias.iter().enumerate() {
                for j in 0..n {
                    c[i * c_rs + j * c_cs] += b;
                }
            }
        }
        return Ok(());
    }
    let vector = avx512::available();
    // A bf16 left operand with whole tiles (the weights of most layers) is read where it lies, with its row
    // stride: packing it again at every call cost more than the product for small images.
    let direct = match a.values {
        Values::Bf16(v) if a.cs == 1 && m.is_multiple_of(BLOCK) && k.is_multiple_of(TILE_K) => Some(v),
        _ => None,
    };
    let packed_a = if direct.is_some() { Vec::new() } else { pack_a(a, m, k, vector) };
    let a_bits: &[u16] = match direct {
        // SAFETY: bf16 is a transparent 16-bit value; the slice is reinterpreted, not copied.
        Some(v) => unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u16>(), v.len()) },
        None => &packed_a,
    };
    let packed_values;
    let packed_b: &[u16] = match b {
        Right::Values(b) => {
            packed_values = pack_b(b, k, n, vector);
            &packed_values
        }
        Right::Packed(p) => p,
    };
    let (m_tiles, n_tiles, k_tiles) = (tiles(m, TILE), tiles(n, TILE), k.div_ceil(TILE_K));
    let (m_blocks, n_blocks) = (m_tiles / 2, n_tiles / 2);
    // Tasks: `side` x `side` blocks, whose packed panels (2 * side panels of k_tiles KiB) stay in the core's
    // L2 cache while every block of the task reads them; each block sums over the whole of k.
    let side = (L2_BUDGET / (2 * k_tiles * TILE_ELEMS * 2)).clamp(1, 8);
    let (m_groups, n_groups) = (m_blocks.div_ceil(side), n_blocks.div_ceil(side));
    let out = OutPtr(c.as_mut_ptr());
    let panel = TILE_ELEMS * k_tiles;
    (0..m_groups * n_groups).into_par_iter().for_each_init(
        || kernel.start(),
        |_, task| {
            let (mg, ng) = (task / n_groups, task % n_groups);
            let mut sums = [0f32; BLOCK * BLOCK];
            for nb in ng * side..((ng + 1) * side).min(n_blocks) {
                let b_block = &packed_b[2 * nb * panel..(2 * nb + 2) * panel];
                for mb in mg * side..((mg + 1) * side).min(m_blocks) {
                    let a_tiles = match direct {
                        Some(_) => Tiles { offset: mb * BLOCK * a.rs, row: a.rs, step: TILE_K, second: TILE * a.rs },
                        None => Tiles { offset: 2 * mb * panel, row: TILE_K, step: TILE_ELEMS, second: panel },
                    };
                    // SAFETY: `a_tiles` addresses two rows of `k_tiles` tiles inside `a_bits` (a checked bf16
                    // matrix of whole tiles, or the packed panels), `b_block` two packed panels, `sums` 32x32
                    // f32, and `start` ran on this thread (tile configuration).
                    unsafe { kernel.block(a_bits, a_tiles, b_block, k_tiles, &mut sums) };
                    let (i0, j0) = (mb * BLOCK, nb * BLOCK);
                    let (rows, cols) = (BLOCK.min(m - i0), BLOCK.min(n - j0));
                    if c_rs == 1 && c_cs != 1 {
                        // Column-major output (a transposed product): transpose the block in the cache first,
                        // then write each column's run of rows (reading the sums down a column, element by
                        // element, took 8% of a training update).
                        let mut columns = [0f32; BLOCK * BLOCK];
                        for (r, row_sums) in sums.chunks_exact(BLOCK).enumerate() {
                            for (c, &v) in row_sums.iter().enumerate() {
                                columns[c * BLOCK + r] = v;
                            }
                        }
                        for (col, column) in columns.chunks_exact(BLOCK).take(cols).enumerate() {
                            let start = i0 + (j0 + col) * c_cs;
                            // SAFETY: the column's `rows` elements lie inside the checked (m, n) matrix, and
                            // no other task writes this block.
                            let dst = unsafe { std::slice::from_raw_parts_mut(out.at(start), rows) };
                            store.run(dst, column, i0, true);
                        }
                        continue;
                    }
                    for (r, row_sums) in sums.chunks_exact(BLOCK).take(rows).enumerate() {
                        let row_sums = &row_sums[..cols];
                        let start = (i0 + r) * c_rs + j0 * c_cs;
                        if c_cs == 1 {
                            // SAFETY: the row's `cols` elements lie inside the checked (m, n) matrix, and no
                            // other task writes this block.
                            let dst = unsafe { std::slice::from_raw_parts_mut(out.at(start), cols) };
                            store.run(dst, row_sums, i0 + r, false);
                            continue;
                        }
                        for (col, &v) in row_sums.iter().enumerate() {
                            // SAFETY: as above, one element at a time.
                            unsafe {
                                let p = std::slice::from_raw_parts_mut(out.at(start + col * c_cs), 1);
                                store.run(p, &[v], i0 + r, false);
                            }
                        }
                    }
                }
            }
        },
    );
    Ok(())
}

/// The output's base pointer, shared by tasks that write disjoint blocks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (one block each), and the borrow of `c` outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `offset` lies inside the output slice.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// Tiles of `size` covering `len`, rounded up to an even count (2x2-tile blocks).
fn tiles(len: usize, size: usize) -> usize {
    len.div_ceil(size).div_ceil(2) * 2
}

impl Kernel {
    /// Per-thread set-up before [`Self::block`] (the AMX tile configuration).
    fn start(self) -> ThreadGuard {
        if self == Kernel::Amx {
            amx::configure_thread();
        }
        ThreadGuard
    }

    /// One 32x32 block of sums over `k_tiles` packed tiles.
    ///
    /// # Safety
    /// `a` and `b` hold 2 * `k_tiles` packed tiles each, the kernel is available and started on this thread.
    unsafe fn block(self, a: &[u16], at: Tiles, b: &[u16], k_tiles: usize, sums: &mut [f32; BLOCK * BLOCK]) {
        let last = at.offset + at.second + (TILE - 1) * at.row + (k_tiles - 1) * at.step + TILE_K;
        assert!(last <= a.len(), "bf16 matmul: left tiles outside their operand");
        match self {
            Kernel::Amx => amx::block(a, at, b, k_tiles, sums),
            Kernel::Avx512Bf16 => avx512::block(a, at, b, k_tiles, sums),
            Kernel::Widen => unreachable!("widened products do not pack"),
        }
    }
}

/// Where the two left tiles of a block lie in their slice (in bf16 elements): the first tile row of the
/// block starts at `offset`, rows of a tile are `row` apart, the next k tile `step` further, the second tile
/// row `second` further. Packed panels: 32, 512, one panel; a row-major bf16 matrix: its row stride, 32, 16
/// rows.
#[derive(Clone, Copy, Debug)]
pub struct Tiles {
    pub offset: usize,
    pub row: usize,
    pub step: usize,
    pub second: usize,
}

/// Marks a thread that ran [`Kernel::start`] (the tile state stays configured; the OS saves it on switches).
struct ThreadGuard;

/// `a` (m, k) packed as `[m tile][k tile][16 rows][32 bf16]`, tiles padded to an even count.
fn pack_a(a: Operand, m: usize, k: usize, vector: bool) -> Vec<u16> {
    let (m_tiles, k_tiles) = (tiles(m, TILE), k.div_ceil(TILE_K));
    let mut packed = vec![0u16; m_tiles * k_tiles * TILE_ELEMS];
    packed.par_chunks_mut(k_tiles * TILE_ELEMS).enumerate().for_each(|(mt, panel)| {
        let rows = TILE.min(m.saturating_sub(mt * TILE));
        if rows == 0 {
            return; // a padding tile
        }
        if a.rs == 1 && a.cs != 1 {
            // Column-major (a transposed operand): each k step's rows are adjacent, so read them in runs.
            let i0 = mt * TILE;
            for kk in 0..k {
                let (kt, kc) = (kk / TILE_K, kk % TILE_K);
                let tile = &mut panel[kt * TILE_ELEMS..(kt + 1) * TILE_ELEMS];
                let start = i0 + kk * a.cs;
                match a.values {
                    Values::F32(v) => {
                        for (r, &x) in v[start..start + rows].iter().enumerate() {
                            tile[r * TILE_K + kc] = bf16::from_f32(x).to_bits();
                        }
                    }
                    Values::Bf16(v) => {
                        for (r, x) in v[start..start + rows].iter().enumerate() {
                            tile[r * TILE_K + kc] = x.to_bits();
                        }
                    }
                }
            }
            return;
        }
        for r in 0..rows {
            let i = mt * TILE + r;
            // f32 rows along k: every whole tile of the row in one call, then the rest below.
            let mut first = 0;
            if let Values::F32(v) = a.values {
                let whole = k / TILE_K;
                let start = i * a.rs;
                if a.cs == 1 && vector && whole > 0 && start + whole * TILE_K <= v.len() {
                    // SAFETY: the row's `whole` runs of 32 lie inside `v` (checked just above), the panel holds
                    // `k_tiles >= whole` tiles, and AVX512-BF16 is present (`vector`).
                    unsafe { avx512::round_row_tiles(&v[start..start + whole * TILE_K], whole, panel, r * TILE_K) };
                    first = whole;
                }
            }
            for kt in first..k_tiles {
                let dst = &mut panel[kt * TILE_ELEMS + r * TILE_K..kt * TILE_ELEMS + (r + 1) * TILE_K];
                let k0 = kt * TILE_K;
                let len = TILE_K.min(k - k0);
                let start = i * a.rs + k0 * a.cs;
                match a.values {
                    Values::F32(v) if a.cs == 1 && vector && len == TILE_K => {
                        // SAFETY: 32 f32 from `start` lie inside `v` (spans checked), dst holds 32 u16, and
                        // AVX512-BF16 is present (`vector`).
                        unsafe { avx512::round_32(&v[start..start + TILE_K], dst) }
                    }
                    Values::Bf16(v) if a.cs == 1 => {
                        for (d, s) in dst[..len].iter_mut().zip(&v[start..start + len]) {
                            *d = s.to_bits();
                        }
                    }
                    values => {
                        for (j, d) in dst[..len].iter_mut().enumerate() {
                            *d = values.bits(start + j * a.cs);
                        }
                    }
                }
            }
        }
    });
    packed
}

/// `b` (k, n) packed as `[n tile][k tile][16 pairs of k][16 columns][2 bf16]`, tiles padded to an even count.
pub(crate) fn pack_b(b: Operand, k: usize, n: usize, vector: bool) -> Vec<u16> {
    let (n_tiles, k_tiles) = (tiles(n, TILE), k.div_ceil(TILE_K));
    let mut packed = vec![0u16; n_tiles * k_tiles * TILE_ELEMS];
    packed.par_chunks_mut(k_tiles * TILE_ELEMS).enumerate().for_each(|(nt, panel)| {
        let j0 = nt * TILE;
        let cols = TILE.min(n.saturating_sub(j0));
        if cols == 0 {
            return;
        }
        for kt in 0..k_tiles {
            let tile = &mut panel[kt * TILE_ELEMS..(kt + 1) * TILE_ELEMS];
            let k0 = kt * TILE_K;
            if let Values::F32(v) = b.values {
                if b.rs == 1 && vector && k0 + TILE_K <= k {
                    // k runs along memory (a transposed operand): each column's 32 values round in one go,
                    // then spread over the tile's 16 pair rows.
                    let mut rounded = [0u16; TILE_K];
                    for j in 0..cols {
                        let at = k0 + (j0 + j) * b.cs;
                        // SAFETY: 32 f32 from `at` lie inside `v` (spans checked), AVX512-BF16 is present.
                        unsafe { avx512::round_32(&v[at..at + TILE_K], &mut rounded) };
                        for p in 0..TILE {
                            tile[p * 2 * TILE + 2 * j..p * 2 * TILE + 2 * j + 2]
                                .copy_from_slice(&rounded[2 * p..2 * p + 2]);
                        }
                    }
                    continue;
                }
                if b.cs == 1 && vector && cols == TILE && k0 + TILE_K <= k {
                    // Rows along k, a full tile of 16 pairs x 16 columns: one call packs it.
                    let start = k0 * b.rs + j0;
                    if spans(v.len().saturating_sub(start), TILE_K, TILE, b.rs, 1) {
                        // SAFETY: the 32 rows of 16 values from `start` lie inside `v` (checked just above),
                        // `tile` is a whole tile, and AVX512-BF16 is present (`vector`).
                        unsafe { avx512::round_interleave_tile(v, start, b.rs, tile) };
                        continue;
                    }
                }
            }
            for p in 0..TILE {
                let kk = kt * TILE_K + 2 * p;
                if kk >= k {
                    break;
                }
                let dst = &mut tile[p * 2 * TILE..(p + 1) * 2 * TILE];
                let both = kk + 1 < k;
                match b.values {
                    Values::F32(v) if b.cs == 1 && vector && both && cols == TILE => {
                        let (r0, r1) = (kk * b.rs + j0, (kk + 1) * b.rs + j0);
                        // SAFETY: 16 f32 from each row start lie inside `v` (spans checked), dst holds 32 u16,
                        // AVX512-BF16 is present.
                        unsafe { avx512::round_interleave_16(&v[r0..r0 + TILE], &v[r1..r1 + TILE], dst) }
                    }
                    Values::Bf16(v) if b.cs == 1 && both => {
                        // bf16 rows (a locked weight as the right operand of an input gradient): interleave the
                        // two rows' runs (an element-by-element strided walk took 8% of a training update).
                        let (r0, r1) = (kk * b.rs + j0, (kk + 1) * b.rs + j0);
                        let pairs = v[r0..r0 + cols].iter().zip(&v[r1..r1 + cols]);
                        for (d, (x0, x1)) in dst.chunks_exact_mut(2).zip(pairs) {
                            d[0] = x0.to_bits();
                            d[1] = x1.to_bits();
                        }
                    }
                    values => {
                        for j in 0..cols {
                            let at = kk * b.rs + (j0 + j) * b.cs;
                            dst[2 * j] = values.bits(at);
                            if both {
                                dst[2 * j + 1] = values.bits(at + b.rs);
                            }
                        }
                    }
                }
            }
        }
    });
    packed
}

/// The [`Kernel::Widen`] product: both operands as f32 (`round`: f32 ones through bf16), one f32 product on all
/// threads (the fused ops' checked gemm wrapper).
#[allow(clippy::too_many_arguments)]
fn widened(
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    c: &mut [f32],
    c_strides: (usize, usize),
    accumulate: bool,
    round: bool,
) -> Result<()> {
    use super::matmul::{matmul, Mat};
    let (a32, b32) = (a.values.to_f32(round), b.values.to_f32(round));
    matmul(m, n, k, c, c_strides, accumulate, Mat::strided(&a32, a.rs, a.cs), Mat::strided(&b32, b.rs, b.cs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small integers: exact in bf16, and their products and sums exact in f32, so every kernel must give the
    /// reference bit for bit whatever its order of summation.
    fn integers(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) % 9) as f32 - 4.
            })
            .collect()
    }

    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        a_s: (usize, usize),
        b: &[f32],
        b_s: (usize, usize),
    ) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for l in 0..k {
                    s += a[i * a_s.0 + l * a_s.1] as f64 * b[l * b_s.0 + j * b_s.1] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    /// Odd shapes (partial tiles in every dimension, k below one tile and across several), f32 and bf16
    /// operands, row- and column-major strides, overwrite and accumulate: exactly the f32 reference.
    #[test]
    fn every_kernel_matches_the_reference_exactly() {
        for kernel in Kernel::available() {
            for (m, n, k) in
                [(1, 1, 1), (17, 33, 31), (5, 70, 100), (40, 3, 65), (33, 47, 257), (64, 40, 96), (96, 17, 64)]
            {
                for transposed in [false, true] {
                    let a = integers(m * k, 1);
                    let b = integers(k * n, 2);
                    let a_s = if transposed { (1, m) } else { (k, 1) };
                    let b_s = if transposed { (1, k) } else { (n, 1) };
                    let want = reference(m, n, k, &a, a_s, &b, b_s);
                    let a16: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
                    let mut c = vec![0f32; m * n];
                    let a_op = Operand::new(Values::Bf16(&a16), a_s.0, a_s.1);
                    let b_op = Operand::new(Values::F32(&b), b_s.0, b_s.1);
                    matmul_with(kernel, m, n, k, a_op, b_op, &mut c, (n, 1), false).unwrap();
                    assert_eq!(c, want, "{kernel:?} {m}x{n}x{k} transposed {transposed}");
                    // Accumulating onto a column-major output that already holds the product: twice it.
                    let mut c_t = vec![0f32; m * n];
                    for i in 0..m {
                        for j in 0..n {
                            c_t[j * m + i] = want[i * n + j];
                        }
                    }
                    let a_op = Operand::new(Values::F32(&a), a_s.0, a_s.1);
                    matmul_with(kernel, m, n, k, a_op, b_op, &mut c_t, (1, m), true).unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            assert_eq!(c_t[j * m + i], 2. * want[i * n + j], "{kernel:?} {m}x{n}x{k} accumulate");
                        }
                    }
                }
            }
        }
    }

    /// Without a bf16 unit (the `widen` kernel), bf16 weights multiply f32 activations as they are (f32
    /// products of the widened weights), in either position; a bf16 unit rounds the activations, so those
    /// kernels land on the rounded product.
    #[test]
    fn widen_keeps_activations_against_bf16_weights() {
        let (m, n, k) = (21, 35, 70);
        let a16: Vec<bf16> = integers(m * k, 6).iter().map(|&x| bf16::from_f32(x * 0.1 + 0.0123)).collect();
        let a: Vec<f32> = a16.iter().map(|x| x.to_f32()).collect();
        let b: Vec<f32> = integers(k * n, 7).iter().map(|&x| x * 0.1 + 0.001_234_5).collect();
        let rounded: Vec<f32> = b.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        let (want, rounded_want) =
            (reference(m, n, k, &a, (k, 1), &b, (n, 1)), reference(m, n, k, &a, (k, 1), &rounded, (n, 1)));
        let error = |c: &[f32], want: &[f32]| c.iter().zip(want).map(|(c, w)| (c - w).abs()).fold(0f32, f32::max);
        assert!(error(&rounded_want, &want) > 1e-3, "the test values do not tell f32 from bf16 products");
        for kernel in Kernel::available() {
            let target = if kernel == Kernel::Widen { &want } else { &rounded_want };
            let mut c = vec![f32::NAN; m * n];
            let (a_op, b_op) = (Operand::new(Values::Bf16(&a16), k, 1), Operand::new(Values::F32(&b), n, 1));
            matmul_with(kernel, m, n, k, a_op, b_op, &mut c, (n, 1), false).unwrap();
            assert!(error(&c, target) < 1e-4, "{kernel:?}: bf16 left operand {}", error(&c, target));
            let mut c_t = vec![f32::NAN; m * n];
            let (bt, at) = (Operand::new(Values::F32(&b), 1, n), Operand::new(Values::Bf16(&a16), 1, k));
            matmul_with(kernel, n, m, k, bt, at, &mut c_t, (1, n), false).unwrap();
            assert!(error(&c_t, target) < 1e-4, "{kernel:?}: bf16 right operand {}", error(&c_t, target));
        }
    }

    /// A row bias stored with the sums (convolutions): the product plus `bias[i]` on row i, whatever the output
    /// held, row- and column-major, on every kernel and for k = 0.
    #[test]
    fn row_bias_is_added_as_the_sums_are_stored() {
        for kernel in Kernel::available() {
            for (m, n, k) in [(17, 33, 31), (64, 40, 96), (3, 5, 0)] {
                let (a, b, bias) = (integers(m * k, 1), integers(k * n, 2), integers(m, 6));
                let want = reference(m, n, k, &a, (k, 1), &b, (n, 1));
                let (a_op, b_op) = (Operand::new(Values::F32(&a), k, 1), Operand::new(Values::F32(&b), n, 1));
                for (rs, cs) in [(n, 1), (1, m)] {
                    let mut c = vec![f32::NAN; m * n];
                    let b_op = Right::Values(b_op);
                    product(kernel, m, n, k, a_op, b_op, &mut c, (rs, cs), Store::RowBias(&bias)).unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            assert_eq!(
                                c[i * rs + j * cs],
                                want[i * n + j] + bias[i],
                                "{kernel:?} {m}x{n}x{k} {rs},{cs}"
                            );
                        }
                    }
                }
            }
        }
        let op = Operand::new(Values::F32(&[0.; 4]), 2, 1);
        let err = matmul_row_bias(2, 2, 2, op, Right::Values(op), &mut [0.; 4], (2, 1), &[1.]).unwrap_err().to_string();
        assert!(err.contains("1 biases for 2 rows"), "{err}");
    }

    /// f32 inputs are rounded to nearest-even bf16 (what `bf16::from_f32` does), by the vector packers too.
    #[test]
    fn f32_inputs_round_to_nearest_even() {
        let (m, n, k) = (16, 16, 32);
        let a: Vec<f32> = (0..m * k).map(|i| 1. + (i as f32) * 1.37e-3).collect();
        let b: Vec<f32> = (0..k * n).map(|i| -0.5 + (i as f32) * 7.1e-4).collect();
        let round = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect::<Vec<f32>>();
        let want = reference(m, n, k, &round(&a), (k, 1), &round(&b), (n, 1));
        for kernel in Kernel::available() {
            let mut c = vec![0f32; m * n];
            let (a_op, b_op) = (Operand::new(Values::F32(&a), k, 1), Operand::new(Values::F32(&b), n, 1));
            matmul_with(kernel, m, n, k, a_op, b_op, &mut c, (n, 1), false).unwrap();
            let worst = c.iter().zip(&want).map(|(x, y)| ((x - y) / y.abs().max(1.)).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{kernel:?}: {worst}");
        }
    }

    /// The bf16 linear layer (weights read in place, output written transposed) against candle's f32 product
    /// of the same bf16-rounded values: integer values, so exactly.
    #[test]
    fn linear_matches_the_f32_layer() {
        use candle_core::{DType, Device, Tensor};
        let dev = Device::Cpu;
        for (rows, in_d, out_d) in [(3, 64, 32), (7, 96, 40), (2, 5, 3)] {
            let x = Tensor::from_vec(integers(rows * in_d, 3), (1, rows, in_d), &dev).unwrap();
            let w = Tensor::from_vec(integers(out_d * in_d, 4), (out_d, in_d), &dev).unwrap();
            let b = Tensor::from_vec(integers(out_d, 5), out_d, &dev).unwrap();
            let ours = linear(&x, &w.to_dtype(DType::BF16).unwrap(), Some(&b)).unwrap();
            let want = x.broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
            assert_eq!(ours.dims(), &[1, rows, out_d]);
            assert_eq!(ours.to_vec3::<f32>().unwrap(), want.to_vec3::<f32>().unwrap(), "{rows}x{in_d}x{out_d}");
        }
    }

    /// The input gradient through bf16 weights against candle's f32 product of the same values (integers).
    #[test]
    fn linear_input_grad_matches_the_f32_product() {
        use candle_core::{DType, Device, Tensor};
        let dev = Device::Cpu;
        for (rows, in_d, out_d) in [(3, 64, 32), (7, 96, 40), (2, 5, 3)] {
            let g = Tensor::from_vec(integers(2 * rows * out_d, 6), (2, rows, out_d), &dev).unwrap();
            let w = Tensor::from_vec(integers(out_d * in_d, 7), (out_d, in_d), &dev).unwrap();
            let ours = linear_input_grad(&g, &w.to_dtype(DType::BF16).unwrap()).unwrap();
            let want = g.broadcast_matmul(&w).unwrap();
            assert_eq!(ours.dims(), &[2, rows, in_d]);
            assert_eq!(ours.to_vec3::<f32>().unwrap(), want.to_vec3::<f32>().unwrap(), "{rows}x{in_d}x{out_d}");
        }
    }

    /// The autocast linear layer (trained f32 weights on the bf16 kernels): on integers its output and both
    /// gradients equal candle's f32 layer's; on random values they are close and rounded.
    #[test]
    fn autocast_linear_matches_the_f32_layer() {
        use candle_core::{Device, Tensor, Var};
        let dev = Device::Cpu;
        for exact in [true, false] {
            let make = |len: usize, seed: u64, shape: &[usize]| {
                let v = if exact {
                    integers(len, seed)
                } else {
                    integers(len, seed).iter().enumerate().map(|(i, x)| x * 0.37 + (i as f32 * 0.013).sin()).collect()
                };
                Tensor::from_vec(v, shape, &dev).unwrap()
            };
            let (rows, in_d, out_d) = (7, 96, 40);
            let x = make(2 * rows * in_d, 8, &[2, rows, in_d]);
            let w = make(out_d * in_d, 9, &[out_d, in_d]);
            let b = make(out_d, 10, &[out_d]);
            let r = make(2 * rows * out_d, 11, &[2, rows, out_d]);
            let run = |ours: bool| {
                let (x, w, b) =
                    (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
                let y = if ours {
                    autocast_linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())).unwrap()
                } else {
                    x.as_tensor()
                        .broadcast_matmul(&w.as_tensor().t().unwrap())
                        .unwrap()
                        .broadcast_add(b.as_tensor())
                        .unwrap()
                };
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                [flat(&y), flat(g.get(&x).unwrap()), flat(g.get(&w).unwrap()), flat(g.get(&b).unwrap())]
            };
            let (ours, want) = (run(true), run(false));
            for (which, (a, b)) in
                ["output", "input grad", "weight grad", "bias grad"].iter().zip(ours.iter().zip(&want))
            {
                if exact {
                    assert_eq!(a, b, "{which}");
                } else {
                    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
                    let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
                    assert!(worst < 0.02, "{which}: off by {worst}");
                }
            }
            if !exact {
                assert_ne!(ours[0], want[0], "the products were not rounded to bf16");
            }
        }
    }

    #[test]
    fn rejects_buffers_too_small() {
        let a = vec![0f32; 5];
        let mut c = vec![0f32; 4];
        let op = Operand::new(Values::F32(&a), 3, 1);
        let err = matmul(2, 2, 3, op, op, &mut c, (2, 1), false).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
    }

    #[test]
    fn kernel_names_round_trip() {
        for k in [Kernel::Amx, Kernel::Avx512Bf16, Kernel::Widen] {
            assert_eq!(Kernel::from_name(k.name()), Some(k));
        }
        assert!(Kernel::available().contains(&Kernel::Widen));
        assert_eq!(Kernel::available()[0], Kernel::detect());
    }
}
