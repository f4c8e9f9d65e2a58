//! Inpainting as diffusers' `StableDiffusionControlNetInpaintPipeline`: the mask read and checked, brought to the
//! latents' size, and the two ways a UNet is told what to keep:
//!
//! - a 4-channel UNet (any SD model): after every step the latents outside the mask are replaced by the
//!   picture's latents noised to the next step's level ("latent blending");
//! - a 9-channel inpainting UNet (`runwayml/stable-diffusion-inpainting`): the mask and the masked picture's
//!   latents are concatenated to its input at every step.
use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::io::images;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// A mask grey level at or above this is repainted (diffusers' `do_binarize`: `x / 255 >= 0.5`).
pub const REPAINT_FROM: u8 = 128;
/// Grey levels strictly between these are "mid grey": neither clearly kept nor clearly repainted.
const MID_GREY: (u8, u8) = (32, 224);

/// PIL's `convert("L")`: `(19595 R + 38470 G + 7471 B + 2^15) >> 16`.
pub(super) fn luma(p: &image::Rgb<u8>) -> u8 {
    ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16) as u8
}

/// Checks a mask as given against the init picture: same size, and a mask rather than a picture. The rule:
/// the mask is binarised at half grey as diffusers does, so soft edges (antialiasing, JPEG noise, a light blur)
/// are fine; a mask where more than half the pixels are mid grey (between 32 and 224) is refused, because
/// halving it would be a guess (most likely the picture itself was given as the mask).
pub fn check_mask(mask: &RgbImage, init_size: (u32, u32)) -> Result<()> {
    if mask.dimensions() != init_size {
        return Err(Error::setting(
            "mask",
            format!(
                "is {}x{} but init_image is {}x{}: a mask covers the picture pixel for pixel",
                mask.width(),
                mask.height(),
                init_size.0,
                init_size.1
            ),
        ));
    }
    let mid = mask.pixels().filter(|p| (MID_GREY.0 + 1..MID_GREY.1).contains(&luma(p))).count();
    let total = mask.pixels().len();
    if 2 * mid > total {
        return Err(Error::setting(
            "mask",
            format!(
                "{}% of its pixels are mid grey (between {} and {}): this is not a black-and-white mask (white: \
                 repaint, black: keep); soften edges with mask_blur instead",
                100 * mid / total,
                MID_GREY.0,
                MID_GREY.1
            ),
        ));
    }
    Ok(())
}

/// The mask at the output size as diffusers' mask processor makes it: grey, binarised at half; (1, 1, H, W) with
/// 1 where the picture is repainted.
pub fn mask_tensor(mask: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = mask.dimensions();
    let data: Vec<f32> = mask.pixels().map(|p| if luma(p) >= REPAINT_FROM { 1.0 } else { 0.0 }).collect();
    Ok(Tensor::from_vec(data, (1, 1, h as usize, w as usize), device)?)
}

/// The mask fitted to the output size: resized (Lanczos, as the picture) when the size differs.
pub fn fit_mask(mask: &RgbImage, width: u32, height: u32) -> RgbImage {
    images::resize(mask, width, height, images::ResampleFilter::Lanczos)
}

/// PIL's `ImageFilter.GaussianBlur(radius)` (what diffusers' `mask_processor.blur(mask, blur_factor)` runs):
/// three box blurs per direction whose fractional radius approximates the Gaussian (Gwosdek et al. 2011), in
/// PIL's 8-bit fixed point, so blurred masks binarise exactly as diffusers' do.
pub fn gaussian_blur(img: &RgbImage, radius: f32) -> RgbImage {
    if radius <= 0.0 {
        return img.clone();
    }
    const PASSES: usize = 3;
    let box_radius = gaussian_box_radius(radius, PASSES as f32);
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = img.clone();
    for c in 0..3 {
        // One channel, row-major; blurred along rows, then along columns (PIL transposes).
        let mut plane: Vec<u8> = img.pixels().map(|p| p[c]).collect();
        for _ in 0..PASSES {
            for row in plane.chunks_mut(w) {
                let line = box_blur_line(row, box_radius);
                row.copy_from_slice(&line);
            }
        }
        let mut col = vec![0u8; h];
        for x in 0..w {
            for (y, v) in col.iter_mut().enumerate() {
                *v = plane[y * w + x];
            }
            for _ in 0..PASSES {
                col = box_blur_line(&col, box_radius);
            }
            for (y, v) in col.iter().enumerate() {
                plane[y * w + x] = *v;
            }
        }
        for (p, v) in out.pixels_mut().zip(plane) {
            p[c] = v;
        }
    }
    out
}

/// PIL's `_gaussian_blur_radius`: the (fractional) box radius whose `passes` box blurs make a Gaussian of `radius`.
fn gaussian_box_radius(radius: f32, passes: f32) -> f32 {
    let sigma2 = radius * radius / passes;
    let big_l = (12.0 * f64::from(sigma2) + 1.0).sqrt() as f32;
    let l = ((f64::from(big_l) - 1.0) / 2.0).floor() as f32;
    let a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2) / (6.0 * (sigma2 - (l + 1.0) * (l + 1.0)));
    l + a
}

/// PIL's `ImagingLineBoxBlur8`: a box of `radius` (integer part full weight, the fraction on the two far pixels),
/// edges extended, in 24-bit fixed point.
fn box_blur_line(line: &[u8], radius: f32) -> Vec<u8> {
    let r = radius as usize;
    let ww = ((1u32 << 24) as f32 / (radius * 2.0 + 1.0)) as u32;
    let fw = ((1u32 << 24) - (r as u32 * 2 + 1) * ww) / 2;
    let last = line.len() - 1;
    // The pixel at `x`, the edge pixels repeated outside the line.
    let at = |x: isize| u32::from(line[x.clamp(0, last as isize) as usize]);
    // Sum over [x - r, x + r] for x = -1, then slid one pixel per output.
    let mut acc: u32 = (-(r as isize) - 1..r as isize).map(at).sum();
    (0..line.len())
        .map(|x| {
            let x = x as isize;
            let r = r as isize;
            acc = acc + at(x + r) - at(x - r - 1);
            let bulk = acc.wrapping_mul(ww).wrapping_add((at(x - r - 1) + at(x + r + 1)).wrapping_mul(fw));
            (bulk.wrapping_add(1 << 23) >> 24) as u8
        })
        .collect()
}

/// The inpaint ControlNet's condition (`control_v11p_sd15_inpaint`, diffusers' `make_inpaint_condition`): the
/// picture in [0, 1] with masked pixels at -1; and, to show it, the picture with masked pixels black.
pub fn condition(picture: &RgbImage, mask: &RgbImage, device: &Device) -> Result<(Tensor, RgbImage)> {
    let tensor = crate::annotate::inpaint::condition(picture, mask)?.to_device(device)?;
    let shown = RgbImage::from_fn(picture.width(), picture.height(), |x, y| {
        if luma(mask.get_pixel(x, y)) >= REPAINT_FROM {
            image::Rgb([0; 3])
        } else {
            *picture.get_pixel(x, y)
        }
    });
    Ok((tensor, shown))
}

/// A (1, 1, H, W) pixel mask at the latents' size, as `torch.nn.functional.interpolate(mask, size)` (nearest:
/// the top-left pixel of each `factor`×`factor` block).
pub fn latent_mask(mask: &Tensor, factor: usize) -> Result<Tensor> {
    let (b, c, h, w) = mask.dims4()?;
    let (lh, lw) = (h / factor, w / factor);
    let blocks = mask.reshape((b, c, lh, factor, lw, factor))?;
    Ok(blocks.narrow(3, 0, 1)?.narrow(5, 0, 1)?.reshape((b, c, lh, lw))?)
}

/// What the masked area starts from before it is noised (A1111's "Masked content", `inpainting_fill`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskedContent {
    /// The picture's latents (A1111's "original", 1; diffusers).
    #[default]
    Original,
    /// Fresh noise from the seed's generator (A1111's "latent noise", 2).
    LatentNoise,
    /// Zeros (A1111's "latent nothing", 3).
    LatentNothing,
}

impl MaskedContent {
    pub const NAMES: &'static [&'static str] = &["original", "latent-noise", "latent-nothing"];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "original" => Ok(Self::Original),
            "latent-noise" => Ok(Self::LatentNoise),
            "latent-nothing" => Ok(Self::LatentNothing),
            _ => Err(Error::setting("masked_content", format!("{name:?}; expected one of {}", Self::NAMES.join(", ")))),
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The name A1111 writes after "Masked content: " in its parameters.
    pub fn a1111_name(self) -> &'static str {
        ["original", "latent noise", "latent nothing"][self as usize]
    }
}

/// A1111's masked content (`StableDiffusionProcessingImg2Img.init`): the picture's latents `image_latents`
/// (n, c, h, w) keep their unmasked part; where the latent `mask` (1 or n, 1, h, w) is 1 they become noise drawn
/// for image `i` by a fresh generator seeded `seed + i` (A1111's `create_random_tensors` with the image's seed),
/// or zeros. The result is what the first step noises.
pub fn fill_masked_latents(image_latents: &Tensor, mask: &Tensor, content: MaskedContent, seed: u64) -> Result<Tensor> {
    let mask = mask.to_dtype(image_latents.dtype())?;
    // 1. The kept part: `init_latent * (1 - mask)`.
    let kept = image_latents.broadcast_mul(&(1.0 - &mask)?)?;
    match content {
        MaskedContent::Original => Ok(image_latents.clone()),
        MaskedContent::LatentNothing => Ok(kept),
        MaskedContent::LatentNoise => {
            // 2. One draw of the latent shape per image, each from its own seed, as A1111 draws them.
            let (n, c, h, w) = image_latents.dims4()?;
            let device = image_latents.device();
            let noise = (0..n)
                .map(|i| TorchGenerator::new(seed.wrapping_add(i as u64)).randn_tensor(&[1, c, h, w], device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let noise = Tensor::cat(&noise, 0)?.to_dtype(image_latents.dtype())?;
            Ok((kept + noise.broadcast_mul(&mask)?)?)
        }
    }
}

/// What the denoising loop needs to inpaint.
pub(super) struct Inpainting {
    /// (n, 1, h, w) at the latents' size: 1 where repainted.
    mask: Tensor,
    /// 4-channel UNet: the picture's latents and the noise drawn for them, to blend the kept area back after
    /// each step.
    blend: Option<(Tensor, Tensor)>,
    /// 9-channel UNet: mask and masked picture latents, (batch, 5, h, w), concatenated to the UNet's input.
    unet_extra: Option<Tensor>,
}

impl Inpainting {
    /// Diffusers' `prepare_mask_latents`: the masked picture (masked pixels 0, i.e. grey) encoded by the VAE,
    /// whose posterior sample is the generator's next draw even for a 4-channel UNet, which does not use it.
    /// `image_latents` and `noise` are the picture's latents and the noise of `prepare_latents`.
    pub fn prepare(
        image: &Tensor,
        pixel_mask: &Tensor,
        encode: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
        image_latents: Option<Tensor>,
        noise: Tensor,
        nine_channels: bool,
        unet_batch: usize,
    ) -> Result<Self> {
        let n = noise.dim(0)?;
        let dtype = noise.dtype();
        let factor = image.dim(2)? / noise.dim(2)?;
        let keep = (1.0 - pixel_mask)?;
        let masked_image = image.broadcast_mul(&keep)?;
        let masked_latents = encode(&masked_image)?;
        let mask = latent_mask(pixel_mask, factor)?.to_dtype(dtype)?;
        let repeat = |t: &Tensor, times: usize| Tensor::cat(&vec![t; times], 0);
        let unet_extra =
            if nine_channels { Some(repeat(&Tensor::cat(&[&mask, &masked_latents], 1)?, unet_batch)?) } else { None };
        let blend = match (nine_channels, image_latents) {
            (false, Some(latents)) => Some((latents, noise)),
            (false, None) => {
                return Err(Error::Invalid("inpainting with a 4-channel UNet needs the picture's latents".into()))
            }
            (true, _) => None,
        };
        Ok(Self { mask: repeat(&mask, n)?, blend, unet_extra })
    }

    /// The UNet's input: the (scaled) latents, then for a 9-channel UNet the mask and the masked picture's latents.
    pub fn unet_input(&self, latent_input: &Tensor) -> Result<Tensor> {
        Ok(match &self.unet_extra {
            Some(extra) => Tensor::cat(&[latent_input, &extra.to_dtype(latent_input.dtype())?], 1)?,
            None => latent_input.clone(),
        })
    }

    /// After a step (4-channel UNet): the kept area is the picture's latents noised to the level of the next step
    /// (`next`: its index into the scheduler's timesteps; `None` after the last step: the clean latents).
    pub fn blend(
        &self,
        latents: &Tensor,
        next: Option<usize>,
        add_noise: &dyn Fn(&Tensor, &Tensor, usize) -> candle_core::Result<Tensor>,
    ) -> Result<Tensor> {
        let Some((image_latents, noise)) = &self.blend else {
            return Ok(latents.clone());
        };
        let proper = match next {
            Some(i) => add_noise(image_latents, noise, i)?,
            None => image_latents.clone(),
        };
        let mask = self.mask.to_dtype(latents.dtype())?;
        let keep = (1.0 - &mask)?;
        Ok((keep.broadcast_mul(&proper)? + mask.broadcast_mul(latents)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn grey(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([f(x, y); 3]))
    }

    #[test]
    fn masks_must_match_the_picture_and_be_black_and_white() {
        let mask = grey(16, 8, |x, _| if x < 8 { 0 } else { 255 });
        check_mask(&mask, (16, 8)).unwrap();
        let err = check_mask(&mask, (16, 16)).unwrap_err().to_string();
        assert_eq!(err, "mask: is 16x8 but init_image is 16x16: a mask covers the picture pixel for pixel");
        // Soft edges pass; a picture does not.
        check_mask(&grey(16, 8, |x, _| [0, 0, 0, 0, 0, 100, 180, 255][x as usize % 8]), (16, 8)).unwrap();
        let err = check_mask(&grey(16, 8, |x, y| (40 + 10 * x + y) as u8), (16, 8)).unwrap_err().to_string();
        assert!(err.starts_with("mask: 100% of its pixels are mid grey"), "{err}");
    }

    /// Pillow 12's `ImageFilter.GaussianBlur(2)` of `Image.new("L", (12, 1))` and `(12, 3)` with white at x = 4..8
    /// (of row 1 for the second); the `inp_mask_blur` CLI case compares a blurred mask with diffusers end to end.
    #[test]
    fn gaussian_blur_is_pils() {
        let line = grey(12, 1, |x, _| if (4..8).contains(&x) { 255 } else { 0 });
        let blurred: Vec<u8> = gaussian_blur(&line, 2.0).pixels().map(|p| p[0]).collect();
        assert_eq!(blurred, [11, 28, 59, 101, 142, 168, 168, 142, 101, 59, 28, 11]);
        assert_eq!(gaussian_blur(&line, 0.0), line);
        let band = grey(12, 3, |x, y| if y == 1 && (4..8).contains(&x) { 255 } else { 0 });
        let row = [3, 7, 16, 27, 38, 45, 45, 38, 27, 16, 7, 3];
        let blurred: Vec<u8> = gaussian_blur(&band, 2.0).pixels().map(|p| p[0]).collect();
        assert_eq!(blurred, [row, row, row].concat());
    }

    #[test]
    fn masks_are_binarised_at_half_grey() {
        let mask = grey(4, 1, |x, _| [0, 127, 128, 255][x as usize]);
        let t = mask_tensor(&mask, &Device::Cpu).unwrap();
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn latent_mask_takes_each_blocks_top_left_pixel() {
        // 16×16 pixels, factor 8: the latent (0, 1) cell reads pixel (0, 8).
        let mut v = vec![0f32; 256];
        v[8] = 1.0; // row 0, column 8
        v[9 * 16 + 1] = 1.0; // inside block (1, 0) but not its top-left pixel
        let m = Tensor::from_vec(v, (1, 1, 16, 16), &Device::Cpu).unwrap();
        let l = latent_mask(&m, 8).unwrap();
        assert_eq!(l.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn blending_keeps_the_picture_outside_the_mask() {
        let dev = Device::Cpu;
        let mask = Tensor::from_vec(vec![0f32, 1.0, 1.0, 0.0], (1, 1, 2, 2), &dev).unwrap();
        let image = Tensor::full(5f32, (1, 1, 2, 2), &dev).unwrap();
        let noise = Tensor::zeros((1, 1, 2, 2), DType::F32, &dev).unwrap();
        let inp = Inpainting { mask, blend: Some((image, noise)), unet_extra: None };
        let latents = Tensor::full(-1f32, (1, 1, 2, 2), &dev).unwrap();
        let add = |x: &Tensor, _: &Tensor, i: usize| x + i as f64;
        let out = inp.blend(&latents, Some(2), &add).unwrap();
        assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [7.0, -1.0, -1.0, 7.0]);
        let last = inp.blend(&latents, None, &add).unwrap();
        assert_eq!(last.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [5.0, -1.0, -1.0, 5.0]);
    }

    /// A1111's fills against `tools/fixtures/gen_masked_content.py` (torch: `init * mask + randn(seed + i) * nmask`).
    #[test]
    fn masked_content_is_a1111s() {
        let dev = Device::Cpu;
        let init = Tensor::arange(0f32, 24.0, &dev).unwrap().reshape((2, 3, 2, 2)).unwrap();
        let mask = Tensor::from_vec(vec![0f32, 1.0, 1.0, 0.0], (1, 1, 2, 2), &dev).unwrap();
        let run = |c| fill_masked_latents(&init, &mask, c, 7).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(run(MaskedContent::Original), init.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let nothing = run(MaskedContent::LatentNothing);
        assert_eq!(&nothing[..8], [0.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 7.0]);
        let noise = run(MaskedContent::LatentNoise);
        // Printed by the generator: image 1 draws with seed 7, image 2 with seed 8.
        const WANT_LATENT_NOISE: [f32; 24] = [
            0.0, 0.7861413, 0.9468216, 3.0, 4.0, -0.8948279, -0.355625, 7.0, 8.0, -1.682199, 0.3176783, 11.0, 12.0,
            -1.272918, 0.5026971, 15.0, 16.0, -0.6607707, -0.1433144, 19.0, 20.0, 0.6318015, -1.344768, 23.0,
        ];
        let want = WANT_LATENT_NOISE;
        for (got, want) in noise.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{noise:?}");
        }
        assert_eq!(MaskedContent::parse("latent-noise").unwrap(), MaskedContent::LatentNoise);
        assert_eq!(MaskedContent::LatentNothing.name(), "latent-nothing");
        assert!(MaskedContent::parse("fill").unwrap_err().to_string().starts_with("masked_content: \"fill\""));
    }
}
