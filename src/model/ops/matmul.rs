//! The f32 (and f64) matrix product the fused ops share: gemm over strided operands, on all threads or (inside
//! an already parallel loop) on the calling one.
use candle_core::{Result, WithDType};
use std::sync::OnceLock;

/// A read-only matrix: element (i, j) is `data[i * rs + j * cs]`, so a transpose is a swap of strides.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major, `rs` elements from one row to the next.
    pub(crate) fn rows(data: &'a [T], rs: usize) -> Self {
        Mat { data, rs, cs: 1 }
    }

    /// The transpose of a row-major matrix whose rows are `rs` elements apart.
    pub(crate) fn transposed(data: &'a [T], rs: usize) -> Self {
        Mat { data, rs: 1, cs: rs }
    }

    /// Any strides: element (i, j) at `data[i * rs + j * cs]`.
    pub(crate) fn strided(data: &'a [T], rs: usize, cs: usize) -> Self {
        Mat { data, rs, cs }
    }

    /// Whether every element of an (m, n) matrix lies inside `data`.
    fn covers(&self, m: usize, n: usize) -> bool {
        spans(self.data.len(), m, n, self.rs, self.cs)
    }
}

/// Whether `len` elements hold an (m, n) matrix with strides `rs` and `cs`.
fn spans(len: usize, m: usize, n: usize, rs: usize, cs: usize) -> bool {
    m == 0 || n == 0 || (m - 1) * rs + (n - 1) * cs < len
}

/// `dst (m, n; element (i, j) at i * dst_rs + j * dst_cs) = [dst +] lhs (m, k) x rhs (k, n)` on all threads:
/// added onto `dst` when `accumulate`, else overwriting it (with zeros when `k` is 0).
///
/// Strides decide the speed: gemm makes `dst` column-major (transposing the whole product if `dst_rs` is the
/// larger stride), then wants its left operand column-major too; a left operand with contiguous rows is
/// re-packed, a strided copy as large as that operand.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
) -> Result<()> {
    // candle 0.11.1 works the count out from /proc/cpuinfo at every call: read it once, not per product (in
    // training at 128 px, the re-reads took about 4% of the time).
    static THREADS: OnceLock<usize> = OnceLock::new();
    let threads = *THREADS.get_or_init(candle_core::utils::get_num_threads);
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    product(m, n, k, dst, dst_strides, accumulate, lhs, rhs, T::one(), parallelism)
}

/// [`matmul`] on the calling thread with the product scaled by `scale`: one task's block inside a loop that is
/// already parallel (the attention kernels' query blocks).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_in_task<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    scale: T,
) -> Result<()> {
    product(m, n, k, dst, dst_strides, accumulate, lhs, rhs, scale, gemm::Parallelism::None)
}

/// The checked gemm call behind [`matmul`] and [`matmul_in_task`].
#[allow(clippy::too_many_arguments)]
fn product<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    scale: T,
    parallelism: gemm::Parallelism,
) -> Result<()> {
    // They guard the raw-pointer product below (the callers derive every size from checked dims).
    if !(spans(dst.len(), m, n, dst_rs, dst_cs) && lhs.covers(m, k) && rhs.covers(k, n)) {
        candle_core::bail!("matmul: a ({m}x{k}) x ({k}x{n}) product does not fit its buffers")
    }
    // SAFETY: the asserts above check that the slices cover every element the strides address, and dst (a
    // unique borrow) cannot overlap the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::one(),
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
    Ok(())
}
