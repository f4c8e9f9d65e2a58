//! Generated images out as PNG, JPEG or WebP (chosen by the file's extension), with their text metadata: PNG
//! text chunks, or for JPEG and WebP an EXIF block ([`super::exif`]) as A1111 writes it. Read back with
//! [`read_image_text`] whatever the format.
use std::io::{BufWriter, Write};
use std::path::Path;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageDecoder, ImageEncoder, ImageFormat, ImageReader, RgbImage};

use super::{exif, image_error, read_png_text, save_png};
use crate::io::atomic::write_atomic;
use crate::{Error, Result};

/// JPEG quality when none is asked for (PIL's default is 75; A1111 saves at 80).
pub const DEFAULT_JPEG_QUALITY: u8 = 80;

/// The formats a generated image can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
    /// Lossless: the pure-Rust encoder of the `image` crate has no lossy mode.
    WebP,
}

impl OutputFormat {
    /// The format an output path asks for by its extension; `setting` names the path's setting in the error.
    pub fn from_path(setting: &str, path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("png") => Ok(Self::Png),
            Some("jpg" | "jpeg") => Ok(Self::Jpeg),
            Some("webp") => Ok(Self::WebP),
            _ => Err(Error::setting(
                setting,
                format!("{}: the file name must end in .png, .jpg, .jpeg or .webp", path.display()),
            )),
        }
    }
}

/// Checks a JPEG quality: 1 to 100.
pub fn check_quality(quality: u8) -> Result<()> {
    if !(1..=100).contains(&quality) {
        return Err(Error::setting("quality", format!("{quality} must lie in 1..=100")));
    }
    Ok(())
}

/// Writes `img` in the format its extension names, with `text` as metadata (PNG text chunks; EXIF for JPEG and
/// WebP). `quality` is JPEG's (default [`DEFAULT_JPEG_QUALITY`]). Atomic: an existing file is replaced only by a
/// complete new one.
pub fn save_image(path: &Path, img: &RgbImage, text: &[(String, String)], quality: Option<u8>) -> Result<()> {
    let format = OutputFormat::from_path("output", path)?;
    if format == OutputFormat::Png {
        return save_png(path, img, text);
    }
    let quality = quality.unwrap_or(DEFAULT_JPEG_QUALITY);
    check_quality(quality)?;
    let exif = exif::build(text);
    write_atomic(path, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let mut out = BufWriter::new(file);
        let (w, h) = img.dimensions();
        let encoded = match format {
            OutputFormat::Jpeg => {
                let mut enc = JpegEncoder::new_with_quality(&mut out, quality);
                enc.set_exif_metadata(exif).map_err(|e| image_error(path, e))?;
                enc.write_image(img.as_raw(), w, h, ExtendedColorType::Rgb8)
            }
            _ => {
                let mut enc = WebPEncoder::new_lossless(&mut out);
                enc.set_exif_metadata(exif).map_err(|e| image_error(path, e))?;
                enc.write_image(img.as_raw(), w, h, ExtendedColorType::Rgb8)
            }
        };
        encoded.map_err(|e| image_error(path, format!("cannot write the image: {e}")))?;
        out.flush().map_err(|e| Error::io(tmp, e))?;
        out.get_ref().sync_all().map_err(|e| Error::io(tmp, e))
    })
}

/// The text metadata of an image written by [`save_image`] (or any PNG): PNG text chunks, or the entries of a
/// JPEG's or WebP's EXIF block. The format is read from the content.
pub fn read_image_text(path: &Path) -> Result<Vec<(String, String)>> {
    let reader = ImageReader::open(path).and_then(|r| r.with_guessed_format()).map_err(|e| Error::io(path, e))?;
    match reader.format() {
        Some(ImageFormat::Png) => read_png_text(path),
        Some(format @ (ImageFormat::Jpeg | ImageFormat::WebP)) => {
            let bad = |e: image::ImageError| image_error(path, format!("not a readable {format:?} file: {e}"));
            let mut decoder = reader.into_decoder().map_err(bad)?;
            let block = decoder.exif_metadata().map_err(bad)?;
            Ok(block.and_then(|b| exif::read(&b)).unwrap_or_default())
        }
        _ => Err(image_error(path, "not a PNG, JPEG or WebP file")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> RgbImage {
        RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 15, y as u8 * 30, 90]))
    }

    #[test]
    fn jpeg_and_webp_carry_the_text_and_the_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let text: Vec<(String, String)> =
            [("parameters", "a cat \u{1f408}\nSteps: 3"), ("controlnet-rs", "{\"seed\":1}")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        for name in ["out.jpg", "out.JPEG", "out.webp", "out.png"] {
            let path = dir.path().join(name);
            save_image(&path, &tiny(), &text, None).unwrap();
            assert_eq!(read_image_text(&path).unwrap(), text, "{name}");
            let back = super::super::load_rgb(&path).unwrap();
            assert_eq!(back.dimensions(), (16, 8));
            if !name.ends_with("jpg") && !name.ends_with("JPEG") {
                assert_eq!(back, tiny(), "{name} is lossless");
            }
        }
        let lossy = dir.path().join("q.jpg");
        save_image(&lossy, &tiny(), &text, Some(10)).unwrap();
        let small = std::fs::metadata(&lossy).unwrap().len();
        save_image(&lossy, &tiny(), &text, Some(100)).unwrap();
        assert!(std::fs::metadata(&lossy).unwrap().len() > small, "quality changes the file");
    }

    #[test]
    fn unknown_extensions_and_bad_quality_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = save_image(&dir.path().join("out.gif"), &tiny(), &[], None).unwrap_err().to_string();
        assert!(err.starts_with("output: ") && err.contains(".webp"), "{err}");
        let err = save_image(&dir.path().join("out.jpg"), &tiny(), &[], Some(0)).unwrap_err().to_string();
        assert!(err.starts_with("quality: 0"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");
    }
}
