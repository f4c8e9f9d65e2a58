//! A1111's "hires fix": generate, upscale the result, then run img2img at the larger size with the same prompt,
//! seed and ControlNets (their conditions fitted again to the new size). Upscaling is either of the final
//! latents (bilinear, A1111's "Latent") or of the decoded 8-bit images (Lanczos, as PIL), which are then
//! encoded again; the second pass is exactly `generate --init-image FIRST.png --width W --height H`.
use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::io::images::{self, ResampleFilter};
use crate::{Error, Result};

/// A1111's default denoising strength of the second pass.
pub const DEFAULT_HIRES_STRENGTH: f64 = 0.7;

/// How the first pass is brought to the larger size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Upscaler {
    /// The final latents, bilinearly (`torch.nn.functional.interpolate(mode="bilinear")`, A1111's "Latent").
    #[default]
    Latent,
    /// The decoded images, with PIL's Lanczos filter; the second pass encodes them again.
    Lanczos,
}

impl Upscaler {
    pub const NAMES: &'static [&'static str] = &["latent", "lanczos"];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "latent" => Ok(Self::Latent),
            "lanczos" => Ok(Self::Lanczos),
            other => Err(Error::setting("hires.upscaler", format!("{other:?}: expected latent or lanczos"))),
        }
    }
}

/// The second pass of a hires fix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiresFix {
    /// The larger size is the first pass's times this, rounded down to a multiple of 8; more than 1.
    pub scale: f64,
    /// Steps of the second pass (before the strength cuts them); `None`: the first pass's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// In (0, 1]: how much of the upscaled picture is repainted.
    pub strength: f64,
    pub upscaler: Upscaler,
}

impl HiresFix {
    pub fn new(scale: f64) -> Self {
        Self { scale, steps: None, strength: DEFAULT_HIRES_STRENGTH, upscaler: Upscaler::default() }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.scale.is_finite() && self.scale > 1.0) {
            return Err(Error::setting("hires.scale", format!("{} must be a number above 1", self.scale)));
        }
        if self.steps == Some(0) {
            return Err(Error::setting("hires.steps", "must be at least 1"));
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return Err(Error::setting("hires.strength", format!("{} must lie in (0, 1]", self.strength)));
        }
        Ok(())
    }

    /// The second pass's size: the first's times `scale`, rounded down to a multiple of `factor`.
    pub fn size(&self, (width, height): (usize, usize), factor: usize) -> (usize, usize) {
        let up = |v: usize| ((v as f64 * self.scale).floor() as usize / factor) * factor;
        (up(width), up(height))
    }
}

/// `torch.nn.functional.interpolate(x, size, mode="bilinear", align_corners=False)` on (batch, channels, h, w).
pub fn upscale_latents(latents: &Tensor, (out_h, out_w): (usize, usize)) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    let dtype = latents.dtype();
    let v: Vec<f32> = latents.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
    // Source coordinate of an output index (half-pixel centres, clamped at 0), as torch's
    // `area_pixel_compute_source_index`.
    let source = |i: usize, scale: f32, len: usize| {
        let x = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (x as usize).min(len - 1);
        let i1 = (i0 + 1).min(len - 1);
        let l1 = x - i0 as f32;
        (i0, i1, 1.0 - l1, l1)
    };
    let (sy, sx) = (h as f32 / out_h as f32, w as f32 / out_w as f32);
    let mut out = Vec::with_capacity(b * c * out_h * out_w);
    for plane in v.chunks(h * w) {
        for oy in 0..out_h {
            let (y0, y1, wy0, wy1) = source(oy, sy, h);
            for ox in 0..out_w {
                let (x0, x1, wx0, wx1) = source(ox, sx, w);
                let at = |y: usize, x: usize| plane[y * w + x];
                out.push(wy0 * (wx0 * at(y0, x0) + wx1 * at(y0, x1)) + wy1 * (wx0 * at(y1, x0) + wx1 * at(y1, x1)));
            }
        }
    }
    Ok(Tensor::from_vec(out, (b, c, out_h, out_w), latents.device())?.to_dtype(dtype)?)
}

/// The first pass's images at the larger size (PIL's Lanczos), as one img2img batch in [-1, 1].
pub fn upscale_images(images_in: &[RgbImage], (width, height): (usize, usize), device: &Device) -> Result<Tensor> {
    let batch = images_in
        .iter()
        .map(|img| {
            let img = images::resize(img, width as u32, height as u32, ResampleFilter::Lanczos);
            (images::to_tensor01(&img, device)? * 2.0)? - 1.0
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&batch, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_by_name() {
        HiresFix::new(2.0).validate().unwrap();
        let err = |h: HiresFix| h.validate().unwrap_err().to_string();
        assert_eq!(err(HiresFix::new(1.0)), "hires.scale: 1 must be a number above 1");
        assert_eq!(err(HiresFix { steps: Some(0), ..HiresFix::new(2.0) }), "hires.steps: must be at least 1");
        assert_eq!(err(HiresFix { strength: 0.0, ..HiresFix::new(2.0) }), "hires.strength: 0 must lie in (0, 1]");
        assert_eq!(HiresFix::new(1.5).size((128, 96), 8), (192, 144));
        assert_eq!(HiresFix::new(1.3).size((128, 96), 8), (160, 120));
        assert_eq!(Upscaler::parse("lanczos").unwrap(), Upscaler::Lanczos);
        assert!(Upscaler::parse("esrgan").is_err());
    }

    /// torch 2.15: `F.interpolate(torch.arange(6.).reshape(1, 1, 2, 3), size=(3, 5), mode="bilinear")`.
    #[test]
    fn latents_upscale_as_torch_bilinear() {
        let x = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((1, 1, 2, 3)).unwrap();
        let y = upscale_latents(&x, (3, 5)).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let torch = [0.0, 0.4, 1.0, 1.6, 2.0, 1.5, 1.9, 2.5, 3.1, 3.5, 3.0, 3.4, 4.0, 4.6, 5.0];
        for (a, b) in v.iter().zip(torch) {
            assert!((a - b).abs() < 1e-5, "{v:?}");
        }
    }
}
