//! Images in and out of the pipeline: loading a control image the way diffusers does, PIL-exact resizing,
//! pixels to and from tensors, PNG output with text metadata, and file hashes.
//!
//! The diffusers recipe we mirror for a control image file is `load_image(path)` (EXIF transpose, then
//! `convert("RGB")`) followed by the ControlNet pipeline's `VaeImageProcessor(do_convert_rgb=True,
//! do_normalize=False).preprocess`, which resizes with PIL (Lanczos) and divides by 255:
//! `to_tensor01(&resize(&load_rgb(path)?, w, h, ResampleFilter::Lanczos), dev)`.
mod exif;
mod fit;
mod output;
mod png_text;
mod resample;

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

pub use fit::{paste, resize_and_crop, resize_and_fill};
pub use output::{check_quality, read_image_text, save_image, OutputFormat, DEFAULT_JPEG_QUALITY};
pub use png_text::{read_png_text, save_png};
pub use resample::{resize, resize_box, ResampleFilter};

/// The formats this build can read (the `image` crate features enabled in Cargo.toml).
const SUPPORTED_FORMATS: &str = "PNG, JPEG, WebP, BMP";

pub(crate) fn image_error(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Image { path: path.to_path_buf(), msg: msg.to_string() }
}

/// Loads an image file as 8-bit RGB the way `diffusers.utils.load_image` does with PIL: the EXIF orientation is
/// applied, then `convert("RGB")` drops alpha (without compositing), expands grey and palette images, keeps the
/// high byte of 16-bit colour samples and clips 16-bit grey at 255 (PIL's `I;16` → `RGB`).
///
/// The format is detected from the content, falling back to the extension. Lossy formats (JPEG, lossy WebP) are
/// decoded by pure-Rust decoders that may differ from libjpeg/libwebp by a level or two on some pixels.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let reader = ImageReader::open(path).and_then(|r| r.with_guessed_format()).map_err(|e| Error::io(path, e))?;
    let grey16 = || png_is_plain_grey16(BufReader::new(File::open(path)?));
    decode_rgb_from(reader, path, grey16)
}

/// [`load_rgb`] for an image held in memory (a tar member, a parquet cell); `name` says where it came from in
/// errors. The format is detected from the content only.
pub fn decode_rgb(bytes: &[u8], name: &Path) -> Result<RgbImage> {
    let reader = ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| Error::io(name, e))?;
    decode_rgb_from(reader, name, || png_is_plain_grey16(std::io::Cursor::new(bytes)))
}

fn decode_rgb_from<R: std::io::BufRead + std::io::Seek>(
    reader: ImageReader<R>,
    path: &Path,
    grey16: impl Fn() -> std::io::Result<bool>,
) -> Result<RgbImage> {
    let format = reader.format().ok_or_else(|| {
        image_error(path, format!("not an image: unrecognised file format (supported: {SUPPORTED_FORMATS})"))
    })?;
    if !format.reading_enabled() {
        return Err(image_error(
            path,
            format!("unsupported image format {} (supported: {SUPPORTED_FORMATS})", format_name(format)),
        ));
    }
    let not_an_image = |e: image::ImageError| {
        image_error(path, format!("not an image or a damaged {} file: {e}", format_name(format)))
    };
    let mut decoder = reader.into_decoder().map_err(not_an_image)?;
    // PIL's exif_transpose ignores an unreadable EXIF block; so do we.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let decoded = DynamicImage::from_decoder(decoder).map_err(not_an_image)?;
    let grey16_is_pil_i16 = format == ImageFormat::Png && grey16().unwrap_or(false);
    let mut rgb = DynamicImage::ImageRgb8(pil_convert_rgb(decoded, grey16_is_pil_i16));
    rgb.apply_orientation(orientation);
    Ok(rgb.into_rgb8())
}

/// A format's usual name for messages ("PNG", "JPEG", ...).
fn format_name(format: ImageFormat) -> String {
    match format {
        ImageFormat::WebP => "WebP".into(),
        other => other.extensions_str().first().map_or_else(|| format!("{other:?}"), |ext| ext.to_uppercase()),
    }
}

/// Whether a PNG is 16-bit greyscale without an alpha channel, which PIL opens as mode `I;16` (even when a tRNS
/// chunk makes the `image` crate hand it over with alpha).
fn png_is_plain_grey16(png: impl std::io::Read) -> std::io::Result<bool> {
    let mut decoder = png::Decoder::new(png);
    Ok(match decoder.read_header_info() {
        Ok(info) => info.color_type == png::ColorType::Grayscale && info.bit_depth == png::BitDepth::Sixteen,
        Err(_) => false,
    })
}

/// PIL's `convert("RGB")` for each pixel layout the `image` decoders produce.
fn pil_convert_rgb(img: DynamicImage, grey16_is_pil_i16: bool) -> RgbImage {
    /// PIL reads 16-bit PNG colour samples (`RGB;16B`, `RGBA;16B`, `LA;16B`) by keeping the high byte.
    fn high_byte(v: u16) -> u8 {
        (v >> 8) as u8
    }
    /// PIL's `I;16` → `RGB` saturates instead of scaling.
    fn clip_i16(v: u16) -> u8 {
        v.min(255) as u8
    }
    let grey16 = if grey16_is_pil_i16 { clip_i16 } else { high_byte };
    let (w, h) = (img.width(), img.height());
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(rgba) => RgbImage::from_fn(w, h, |x, y| {
            let [r, g, b, _] = rgba.get_pixel(x, y).0;
            image::Rgb([r, g, b])
        }),
        DynamicImage::ImageLuma8(l) => RgbImage::from_fn(w, h, |x, y| image::Rgb([l.get_pixel(x, y).0[0]; 3])),
        DynamicImage::ImageLumaA8(la) => RgbImage::from_fn(w, h, |x, y| image::Rgb([la.get_pixel(x, y).0[0]; 3])),
        DynamicImage::ImageLuma16(l) => RgbImage::from_fn(w, h, |x, y| image::Rgb([grey16(l.get_pixel(x, y).0[0]); 3])),
        DynamicImage::ImageLumaA16(la) => {
            RgbImage::from_fn(w, h, |x, y| image::Rgb([grey16(la.get_pixel(x, y).0[0]); 3]))
        }
        DynamicImage::ImageRgb16(rgb) => {
            RgbImage::from_fn(w, h, |x, y| image::Rgb(rgb.get_pixel(x, y).0.map(high_byte)))
        }
        DynamicImage::ImageRgba16(rgba) => RgbImage::from_fn(w, h, |x, y| {
            let [r, g, b, _] = rgba.get_pixel(x, y).0;
            image::Rgb([r, g, b].map(high_byte))
        }),
        // Float images come only from formats this build does not decode.
        other => other.to_rgb8(),
    }
}

/// An RGB image as diffusers' `VaeImageProcessor` hands it to the ControlNet (without normalisation):
/// shape (1, 3, H, W), f32 in [0, 1], each value `u8 as f32 / 255.0` (a true division, as numpy does,
/// so the floats are bit-identical).
pub fn to_tensor01(img: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let raw = img.as_raw();
    // Planar (CHW) order.
    let mut data = Vec::with_capacity(3 * w * h);
    for c in 0..3 {
        data.extend(raw.iter().skip(c).step_by(3).map(|&v| f32::from(v) / 255.0));
    }
    Tensor::from_vec(data, (1, 3, h, w), device)
}

/// Splits a (B, 3, H, W) u8 tensor (the pipeline's decoded, quantised output) into RGB images.
pub fn tensor_to_images(pixels_u8: &Tensor) -> candle_core::Result<Vec<RgbImage>> {
    let (b, c, h, w) = pixels_u8.dims4()?;
    if c != 3 || pixels_u8.dtype() != DType::U8 {
        candle_core::bail!(
            "tensor_to_images expects a (B, 3, H, W) u8 tensor, found shape {:?} dtype {:?}",
            pixels_u8.shape(),
            pixels_u8.dtype()
        );
    }
    if h == 0 || w == 0 {
        return Ok(vec![RgbImage::new(w as u32, h as u32); b]);
    }
    let hwc = pixels_u8.to_device(&Device::Cpu)?.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1::<u8>()?;
    Ok(hwc
        .chunks_exact(h * w * 3)
        .map(|one| RgbImage::from_raw(w as u32, h as u32, one.to_vec()).expect("h * w * 3 bytes per image"))
        .collect())
}

/// Bytes of one 8-bit RGB image of `width`×`height`.
pub fn rgb_bytes(width: u32, height: u32) -> u64 {
    3 * u64::from(width) * u64::from(height)
}

/// An image operation (annotating, fitting, saving) holds about this many RGB buffers' worth at once: the
/// input, the output and a few float planes (4 bytes per pixel each).
pub const IMAGE_WORKING_COPIES: u64 = 8;

/// Refuses an image size that is empty or whose buffers cannot fit in the memory available, before anything
/// is allocated (a 100000×100000 image would abort in the allocator). `setting` names the size setting for the
/// error (`width`, `resolution`).
pub fn check_image_size(setting: &str, width: u32, height: u32) -> Result<()> {
    check_image_size_with(setting, width, height, crate::memory::available_bytes())
}

fn check_image_size_with(setting: &str, width: u32, height: u32, available: Option<u64>) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::setting(setting, format!("{width}x{height} is empty: width and height must be at least 1")));
    }
    let need = rgb_bytes(width, height).saturating_mul(IMAGE_WORKING_COPIES);
    crate::memory::check_fits(setting, &format!("a {width}x{height} image"), need, available)
}

/// The SHA-256 of a file as lowercase hex, read in blocks (weight files can be many GB).
pub fn sha256_file(path: &Path) -> Result<String> {
    /// Read block size: large enough for throughput, small enough to never matter for memory.
    const BLOCK: usize = 1 << 20;
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests;
