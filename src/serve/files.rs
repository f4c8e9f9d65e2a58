//! The server's files: pictures clients send (base64 or uploads), kept under a work folder for as long as the
//! server runs (the images' metadata names them), and the PNGs it sends back.
use std::path::PathBuf;

use base64::Engine;
use image::RgbImage;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::io::images;
use crate::{Error, Result};

/// The largest picture a client may send, in pixels a side (the body limit bounds the bytes; this bounds what
/// they decode to).
pub const MAX_IMAGE_SIDE: u32 = 8192;

/// A folder of the server's own, removed when the server stops.
pub struct WorkDir {
    root: PathBuf,
}

impl WorkDir {
    /// `<temp>/controlnet-serve-<pid>-<n>` (created).
    pub fn create() -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("controlnet-serve-{}-{n}", std::process::id()));
        for dir in [root.join("inputs"), root.join("out")] {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        Ok(Self { root })
    }

    /// Keeps a picture a client sent (already checked by [`decode_image`]) as `inputs/<sha256>.<ext>`, the bytes
    /// unchanged so the condition is read exactly as the command line reads the same file.
    pub fn save_input(&self, bytes: &[u8]) -> Result<PathBuf> {
        let hash: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        let ext = image::guess_format(bytes).ok().and_then(|f| f.extensions_str().first().copied()).unwrap_or("png");
        let path = self.root.join("inputs").join(format!("{hash}.{ext}"));
        if !path.exists() {
            crate::io::atomic::write_atomic(&path, |tmp| std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e)))?;
        }
        Ok(path)
    }

    /// Keeps a picture the server made (an annotated condition) as a PNG input.
    pub fn save_picture(&self, image: &RgbImage) -> Result<PathBuf> {
        self.save_input(&png_bytes(self, image, &[])?)
    }

    fn out_path(&self) -> PathBuf {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.root.join("out").join(format!("{n}.png"))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `image` as PNG bytes with `text` chunks (the same encoder the command line writes files with).
pub fn png_bytes(work: &WorkDir, image: &RgbImage, text: &[(String, String)]) -> Result<Vec<u8>> {
    let path = work.out_path();
    images::save_png(&path, image, text)?;
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e));
    let _ = std::fs::remove_file(&path);
    bytes
}

/// The bytes of a base64 picture as clients send it: plain, or a `data:image/...;base64,` URL.
pub fn decode_base64(field: &str, text: &str) -> std::result::Result<Vec<u8>, ApiError> {
    let data = match text.split_once(";base64,") {
        Some((head, data)) if head.starts_with("data:") => data,
        _ => text,
    };
    let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|e| ApiError::malformed(field, format!("not base64: {e}")))
}

/// Checks that `bytes` are a picture this server reads and not larger than [`MAX_IMAGE_SIDE`] a side (413),
/// without decoding more than the header for the size check; returns the decoded picture.
pub fn decode_image(field: &str, bytes: &[u8]) -> std::result::Result<RgbImage, ApiError> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::field(field, format!("cannot read the picture: {e}")))?;
    if reader.format().is_none() {
        return Err(ApiError::field(field, "not a picture (PNG, JPEG, WebP or BMP)"));
    }
    let (w, h) =
        reader.into_dimensions().map_err(|e| ApiError::field(field, format!("not a readable picture: {e}")))?;
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
        return Err(ApiError::too_large(
            field,
            format!("the picture is {w}x{h}; this server takes at most {MAX_IMAGE_SIDE} pixels a side"),
        ));
    }
    images::check_image_size(field, w, h).map_err(|e| ApiError::too_large(field, e.to_string()))?;
    let decoded =
        image::load_from_memory(bytes).map_err(|e| ApiError::field(field, format!("not a readable picture: {e}")))?;
    Ok(decoded.to_rgb8())
}

/// Base64 of `bytes` (no data-URL prefix, as A1111 answers).
pub fn encode_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A short id for a job: the clock's nanoseconds and a counter, in hex.
pub fn new_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}{n:04x}", (nanos as u64) & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_with_or_without_a_data_url() {
        assert_eq!(decode_base64("image", "aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("image", "data:image/png;base64,aGk=").unwrap(), b"hi");
        let e = decode_base64("image", "not base64!").unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.detail().starts_with("image: not base64"), "{}", e.detail());
    }

    #[test]
    fn pictures_are_checked() {
        let e = decode_image("image", b"hello").unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::UNPROCESSABLE_ENTITY);
        let work = WorkDir::create().unwrap();
        let png = png_bytes(&work, &RgbImage::new(4, 2), &[]).unwrap();
        assert_eq!(decode_image("image", &png).unwrap().dimensions(), (4, 2));
        let saved = work.save_input(&png).unwrap();
        assert!(saved.extension().is_some_and(|e| e == "png"));
        assert_eq!(std::fs::read(&saved).unwrap(), png);
    }
}
