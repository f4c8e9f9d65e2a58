//! The floor: what each matrix-product kernel reaches on one large square product on this machine, the
//! ceiling a denoising step (mostly products) can approach. `controlnet bench --floor` prints it.
use std::time::Instant;

use half::bf16;

use crate::model::ops::bf16::{self as kernels, Kernel, Operand, Values};
use crate::{Error, Result};

/// One kernel's rate on an `size`³ product.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloorRow {
    /// "f32 (gemm)" or the bf16 kernel's name.
    pub kernel: String,
    pub size: usize,
    /// Median seconds of one product, operand packing included (as a layer pays it).
    pub median_s: f64,
    pub gflops_per_s: f64,
}

/// Times `c = a · b` for `size`x`size` matrices: f32 `gemm` (the f32 path's kernel), then every bf16 kernel
/// this CPU runs (a bf16 left operand as the weights are, an f32 right one as activations are).
pub fn run(size: usize, iters: usize) -> Result<Vec<FloorRow>> {
    if size == 0 || iters == 0 {
        return Err(Error::setting(if size == 0 { "floor_size" } else { "iters" }, "must be at least 1"));
    }
    let a: Vec<f32> = (0..size * size).map(|i| ((i * 7919) % 1013) as f32 / 1013. - 0.5).collect();
    let b: Vec<f32> = (0..size * size).map(|i| ((i * 104729) % 997) as f32 / 997. - 0.5).collect();
    let a16: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
    let mut c = vec![0f32; size * size];
    let flop = 2.0 * (size as f64).powi(3);
    let mut rows = Vec::new();
    let mut time = |name: String, f: &mut dyn FnMut(&mut [f32]) -> Result<()>| -> Result<()> {
        let mut samples = Vec::with_capacity(iters);
        for i in 0..=iters {
            let start = Instant::now();
            f(&mut c)?;
            if i > 0 {
                samples.push(start.elapsed().as_secs_f64());
            }
        }
        samples.sort_by(f64::total_cmp);
        let median_s = samples[samples.len() / 2];
        rows.push(FloorRow { kernel: name, size, median_s, gflops_per_s: flop / median_s / 1e9 });
        Ok(())
    };
    time("f32 (gemm)".into(), &mut |c| {
        f32_gemm(size, &a, &b, c);
        Ok(())
    })?;
    for kernel in Kernel::available() {
        time(format!("bf16 {}", kernel.name()), &mut |c| {
            let (lhs, rhs) = (Operand::new(Values::Bf16(&a16), size, 1), Operand::new(Values::F32(&b), size, 1));
            kernels::matmul_with(kernel, size, size, size, lhs, rhs, c, (size, 1), false).map_err(Error::from)
        })?;
    }
    Ok(rows)
}

/// The f32 product as the f32 layers run it (gemm with its AVX-512 kernels, rayon threads).
fn f32_gemm(size: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let n = size as isize;
    assert!(a.len() >= size * size && b.len() >= size * size && c.len() >= size * size);
    // SAFETY: the three slices hold size x size row-major matrices (asserted above), and c is a unique borrow.
    unsafe {
        gemm::gemm(
            size,
            size,
            size,
            c.as_mut_ptr(),
            1,
            n,
            false,
            a.as_ptr(),
            1,
            n,
            b.as_ptr(),
            1,
            n,
            0f32,
            1f32,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_per_kernel() {
        let rows = run(64, 1).unwrap();
        assert_eq!(rows.len(), 1 + Kernel::available().len());
        assert_eq!(rows[0].kernel, "f32 (gemm)");
        assert!(rows.iter().all(|r| r.gflops_per_s > 0. && r.size == 64));
    }

    #[test]
    fn zero_size_names_its_setting() {
        let err = run(0, 1).unwrap_err().to_string();
        assert!(err.contains("floor_size"), "{err}");
    }
}
