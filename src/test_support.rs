//! Helpers shared by the unit tests: where the fixtures are, and the tensor comparisons parity tests use.
//! (Integration tests in `tests/` have their own, `tests/common`.)
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

/// The repository root.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// `tests/fixtures/`, where the generators under `tools/fixtures/` write.
pub fn fixtures() -> PathBuf {
    repo_path("tests/fixtures")
}

/// A file or folder under `tests/fixtures/`.
pub fn fixture_path(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

/// The tensors of a safetensors file under `tests/fixtures/`.
pub fn fixture_tensors(rel: &str) -> HashMap<String, Tensor> {
    let path = fixture_path(rel);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// max |t|, computed in f64 (exact for f32 and f64 tensors).
pub fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

/// max |a - b| (shapes must match).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// max |a - b| / max(1, max |b|).
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff(a, b) / max_abs(b).max(1.0)
}

/// The parity metric of the model tests: max |actual - expected| <= 1e-4 * max(1, max |expected|).
pub fn assert_close(actual: &Tensor, expected: &Tensor, what: &str) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let diff = max_abs_diff(actual, expected);
    let scale = max_abs(expected);
    let tol = 1e-4 * scale.max(1.0);
    assert!(diff <= tol, "{what}: max abs diff {diff:e} > {tol:e} (max |ref| {scale})");
}

/// Largest per-channel difference between two images of the same size.
pub fn max_pixel_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

/// PSNR in dB of two same-sized 8-bit images (infinite when equal).
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let n = a.as_raw().len() as f64;
    let mse = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / n;
    if mse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0f64.powi(2) / mse).log10()
}
