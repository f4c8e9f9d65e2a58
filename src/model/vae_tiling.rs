//! Tiled VAE decoding, as diffusers' `AutoencoderKL.enable_tiling()`: latents larger than one tile are
//! decoded in overlapping tiles whose seams are cross-faded, so the decoder's memory stays that of one tile
//! whatever the image size (at 2048 px an untiled decode holds several 2048x2048x128-channel activations and a
//! 65536-token attention).
//!
//! Same tiles, order and blending as diffusers' `tiled_decode`: tiles of `sample_size` pixels (the VAE
//! config's, 512 for SD1.x) start every `(1 - overlap)` tile in latent space; each tile is blended with the
//! already blended tile above and to its left over `overlap` of a tile, with linear weights; then each keeps its
//! first `(1 - overlap)` of a tile in pixels. The result differs slightly from an untiled decode (each tile's
//! group norms and attention see only the tile).
use candle_core::{Result, Tensor};

use super::vae::AutoencoderKL;

/// diffusers' `tile_overlap_factor`.
pub const DEFAULT_OVERLAP: f64 = 0.25;

/// Tile size and overlap of a tiled decode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeTiling {
    /// Tile size in pixels (diffusers' `tile_sample_min_size`).
    pub tile_sample_size: usize,
    /// Fraction of a tile shared with each neighbour (diffusers' `tile_overlap_factor`).
    pub overlap: f64,
}

impl VaeTiling {
    /// diffusers' defaults for a VAE: its config's `sample_size` and an overlap of 1/4.
    pub fn for_vae(vae: &AutoencoderKL) -> Self {
        Self { tile_sample_size: vae.config().sample_size.first(), overlap: DEFAULT_OVERLAP }
    }
}

/// `b` with its first rows (`dim` 2) or columns (`dim` 3) cross-faded from the last ones of `a`:
/// row y of `extent` gets `a[-extent + y] · (1 - y/extent) + b[y] · y/extent` (diffusers' `blend_v`/`blend_h`).
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let mut shape = vec![1usize; 4];
    shape[dim] = extent;
    let ramp: Vec<f32> = (0..extent).map(|y| (y as f64 / extent as f64) as f32).collect();
    let w_b = Tensor::from_vec(ramp.clone(), shape.as_slice(), b.device())?.to_dtype(b.dtype())?;
    let w_a = Tensor::from_vec(
        ramp.iter().map(|&t| (1.0 - t as f64) as f32).collect::<Vec<_>>(),
        shape.as_slice(),
        b.device(),
    )?
    .to_dtype(b.dtype())?;
    let tail = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let head = (tail.broadcast_mul(&w_a)? + b.narrow(dim, 0, extent)?.broadcast_mul(&w_b)?)?;
    let rest = b.narrow(dim, extent, b.dim(dim)? - extent)?;
    Tensor::cat(&[head, rest], dim)
}

impl AutoencoderKL {
    /// [`AutoencoderKL::decode`] in overlapping tiles when the latents are larger than one tile (see the module
    /// docs); smaller latents are decoded whole, as diffusers does with tiling enabled.
    pub fn decode_tiled(&self, latents: &Tensor, tiling: VaeTiling) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        let factor = self.config().downsample_factor();
        let tile_latent = tiling.tile_sample_size / factor;
        if !(0.0..1.0).contains(&tiling.overlap) || tile_latent == 0 {
            candle_core::bail!("VAE tiling: tile of {} px with overlap {}", tiling.tile_sample_size, tiling.overlap)
        }
        if h <= tile_latent && w <= tile_latent {
            return self.decode(latents);
        }
        // diffusers truncates each of these to an integer.
        let stride = ((tile_latent as f64 * (1.0 - tiling.overlap)) as usize).max(1);
        let extent = (tiling.tile_sample_size as f64 * tiling.overlap) as usize;
        let keep = tiling.tile_sample_size - extent;
        // 1. decode every tile
        let mut grid = (0..h)
            .step_by(stride)
            .map(|i| {
                (0..w)
                    .step_by(stride)
                    .map(|j| {
                        let tile =
                            latents.narrow(2, i, tile_latent.min(h - i))?.narrow(3, j, tile_latent.min(w - j))?;
                        self.decode(&tile)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        // 2. blend each tile with its (already blended) upper and left neighbours, in diffusers' order
        for i in 0..grid.len() {
            for j in 0..grid[i].len() {
                let mut tile = grid[i][j].clone();
                if i > 0 {
                    tile = blend(&grid[i - 1][j], &tile, extent, 2)?;
                }
                if j > 0 {
                    tile = blend(&grid[i][j - 1], &tile, extent, 3)?;
                }
                grid[i][j] = tile;
            }
        }
        // 3. keep the first `keep` pixels of each tile and stitch
        let rows = grid
            .iter()
            .map(|row| {
                let kept = row
                    .iter()
                    .map(|t| t.narrow(2, 0, keep.min(t.dim(2)?))?.narrow(3, 0, keep.min(t.dim(3)?)))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&kept, 3)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{fixture_path, max_abs};
    use candle_core::{DType, Device};

    fn tiny_vae() -> AutoencoderKL {
        let dir = fixture_path("models/tiny-sd15/vae");
        AutoencoderKL::load(&dir, DType::F32, &Device::Cpu).unwrap()
    }

    /// diffusers' tiled_decode with 64-px tiles on a 14x11 latent (tools/fixtures/gen_vae_tiling.py): partial
    /// edge tiles, blends in both directions. Metric: max |ours - ref| <= 1e-4 * max(1, max |ref|).
    #[test]
    fn matches_diffusers_tiled_decode() {
        let fx = crate::test_support::fixture_tensors("vae/tiled_decode.safetensors");
        let vae = tiny_vae();
        let ours = vae.decode_tiled(&fx["latents"], VaeTiling { tile_sample_size: 64, overlap: 0.25 }).unwrap();
        let reference = &fx["decoded"];
        assert_eq!(ours.dims(), reference.dims());
        let diff = max_abs(&(&ours - reference).unwrap());
        let tol = 1e-4 * max_abs(reference).max(1.0);
        assert!(diff <= tol, "max abs diff {diff} > {tol}");
        // Tiling is visible: the untiled decode differs.
        let plain = vae.decode(&fx["latents"]).unwrap();
        assert!(max_abs(&(&plain - reference).unwrap()) > 10.0 * tol);
    }

    /// Latents no larger than a tile are decoded whole; the tile comes from the config (128 px here).
    #[test]
    fn small_latents_are_not_tiled() {
        let vae = tiny_vae();
        let tiling = VaeTiling::for_vae(&vae);
        assert_eq!(tiling, VaeTiling { tile_sample_size: 128, overlap: 0.25 });
        let z = Tensor::randn(0f32, 1., (1, 4, 16, 12), &Device::Cpu).unwrap();
        let diff = max_abs(&(vae.decode_tiled(&z, tiling).unwrap() - vae.decode(&z).unwrap()).unwrap());
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn blend_cross_fades_linearly() {
        let dev = Device::Cpu;
        let a = Tensor::ones((1, 1, 4, 2), DType::F32, &dev).unwrap();
        let b = Tensor::zeros((1, 1, 3, 2), DType::F32, &dev).unwrap();
        let out = blend(&a, &b, 2, 2).unwrap();
        let rows: Vec<f32> = out
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(rows, vec![1.0, 0.5, 0.0]);
    }
}
