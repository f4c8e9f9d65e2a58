//! PNG output with text metadata (the generation settings travel inside the image), written atomically.
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use image::RgbImage;
use png::text_metadata::{ITXtChunk, TEXtChunk};

use super::image_error;
use crate::{Error, Result};

/// Longest keyword the PNG specification allows, in Latin-1 bytes.
const MAX_KEYWORD_BYTES: usize = 79;

fn is_latin1(s: &str) -> bool {
    s.chars().all(|c| (c as u32) <= 0xFF)
}

/// Checks a text chunk keyword before anything is written, so the error names it.
fn check_keyword(path: &Path, key: &str) -> Result<()> {
    if key.is_empty() || key.chars().count() > MAX_KEYWORD_BYTES || !is_latin1(key) {
        return Err(image_error(
            path,
            format!("PNG text key {key:?} must be 1 to {MAX_KEYWORD_BYTES} Latin-1 characters"),
        ));
    }
    if key.contains('\0') {
        return Err(image_error(path, format!("PNG text key {key:?} contains a NUL")));
    }
    Ok(())
}

/// Writes `img` as an 8-bit RGB PNG with `text` as (key, value) chunks in the given order: tEXt when the value is
/// Latin-1 (what every PNG reader shows), iTXt (UTF-8) otherwise, e.g. for a prompt with emoji or CJK.
///
/// The file is written to a temporary file in the same folder and renamed over `path` only when complete, so a
/// reader never sees half an image and an existing file at `path` is untouched on any error.
pub fn save_png(path: &Path, img: &RgbImage, text: &[(String, String)]) -> Result<()> {
    for (key, _) in text {
        check_keyword(path, key)?;
    }
    let (tmp, file) = TempFile::create_beside(path)?;
    write_png(file, img, text).map_err(|e| image_error(path, format!("cannot write PNG: {e}")))?;
    tmp.persist(path)
}

fn write_png(
    file: File,
    img: &RgbImage,
    text: &[(String, String)],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let mut out = BufWriter::new(file);
    {
        let mut encoder = png::Encoder::new(&mut out, img.width(), img.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        for (key, value) in text {
            if is_latin1(value) {
                writer.write_text_chunk(&TEXtChunk::new(key.as_str(), value.as_str()))?;
            } else {
                writer.write_text_chunk(&ITXtChunk::new(key.as_str(), value.as_str()))?;
            }
        }
        writer.write_image_data(img.as_raw())?;
        writer.finish()?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    // Data on disk before the rename makes it visible.
    file.sync_all()?;
    Ok(())
}

/// A temporary file beside its destination, deleted on drop unless persisted.
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    /// Creates the temporary file, returning it open for writing.
    fn create_beside(dest: &Path) -> Result<(Self, File)> {
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dest.file_name().ok_or_else(|| image_error(dest, "output path has no file name"))?.to_string_lossy();
        // Unique per process and call, so parallel saves into one folder do not collide.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        // Every subcommand's rule: the output's folders are created.
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let file = OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| Error::io(&path, e))?;
        Ok((Self { path, persisted: false }, file))
    }

    fn persist(mut self, dest: &Path) -> Result<()> {
        std::fs::rename(&self.path, dest).map_err(|e| Error::io(dest, e))?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The text chunks of a PNG file (tEXt, zTXt and iTXt, compressed ones inflated) as (key, value) pairs in file
/// order.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let bad = |e: &dyn std::fmt::Display| image_error(path, format!("not a readable PNG: {e}"));
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_ignore_text_chunk(false);
    let mut reader = decoder.read_info().map_err(|e| bad(&e))?;
    // Text chunks may follow the image data: decode it so the reader gets past it.
    let mut pixels = vec![0u8; reader.output_buffer_size()];
    reader.next_frame(&mut pixels).map_err(|e| bad(&e))?;
    reader.finish().map_err(|e| bad(&e))?;
    let info = reader.info();

    let mut latin1 = info.uncompressed_latin1_text.iter().map(|c| Ok((c.keyword.clone(), c.text.clone())));
    let mut compressed =
        info.compressed_latin1_text.iter().map(|c| Ok((c.keyword.clone(), c.get_text().map_err(|e| bad(&e))?)));
    let mut utf8 = info.utf8_text.iter().map(|c| Ok((c.keyword.clone(), c.get_text().map_err(|e| bad(&e))?)));
    let counts = [info.uncompressed_latin1_text.len(), info.compressed_latin1_text.len(), info.utf8_text.len()];

    // The decoder groups chunks by type; interleave them back in the order the file lists them.
    let order = text_chunk_order(path).unwrap_or_default();
    let order_matches =
        [b"tEXt", b"zTXt", b"iTXt"].iter().zip(counts).all(|(kind, n)| order.iter().filter(|k| k == kind).count() == n);
    let mut entries: Vec<Result<(String, String)>> = Vec::new();
    if order_matches {
        for kind in &order {
            let next = match kind {
                b"tEXt" => latin1.next(),
                b"zTXt" => compressed.next(),
                _ => utf8.next(),
            };
            entries.extend(next);
        }
    } else {
        entries.extend(latin1.chain(compressed).chain(utf8));
    }
    entries.into_iter().collect()
}

/// The types of the text chunks of a PNG in file order, from a walk over the chunk headers.
fn text_chunk_order(path: &Path) -> std::io::Result<Vec<[u8; 4]>> {
    /// PNG signature length; chunks start after it.
    const SIGNATURE: u64 = 8;
    let mut file = BufReader::new(File::open(path)?);
    file.seek(SeekFrom::Start(SIGNATURE))?;
    let mut order = Vec::new();
    let mut header = [0u8; 8];
    loop {
        match file.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes"));
        let kind: [u8; 4] = header[4..].try_into().expect("4 bytes");
        if matches!(&kind, b"tEXt" | b"zTXt" | b"iTXt") {
            order.push(kind);
        }
        if &kind == b"IEND" {
            break;
        }
        // Skip the data and the CRC.
        file.seek_relative(i64::from(len) + 4)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> RgbImage {
        RgbImage::from_fn(4, 3, |x, y| image::Rgb([x as u8 * 60, y as u8 * 80, 9]))
    }

    #[test]
    fn text_round_trip_keeps_order_and_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        let text: Vec<(String, String)> = [
            ("prompt", "\u{732b}\u{306e}\u{7d75}, a cat \u{1f408} on a mat"),
            ("parameters", "Steps: 20, Sampler: PNDM, caf\u{e9}"),
            ("negative_prompt", ""),
            ("seed", "42"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        save_png(&path, &tiny(), &text).unwrap();
        assert_eq!(read_png_text(&path).unwrap(), text);
        assert_eq!(super::super::load_rgb(&path).unwrap(), tiny());
        // Latin-1 values go to tEXt, the others to iTXt.
        assert_eq!(text_chunk_order(&path).unwrap(), vec![*b"iTXt", *b"tEXt", *b"tEXt", *b"tEXt"]);
    }

    #[test]
    fn missing_folders_are_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no_such_dir").join("deeper").join("out.png");
        save_png(&path, &tiny(), &[]).unwrap();
        assert_eq!(super::super::load_rgb(&path).unwrap(), tiny());
        assert_eq!(listing(path.parent().unwrap()), vec!["out.png".to_string()]);
    }

    /// The files in a folder, for checking that no temporary file is left behind.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn failed_save_leaves_existing_file_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        std::fs::write(&path, b"previous contents").unwrap();

        // Rejected before writing: a key that cannot be a PNG keyword.
        let bad_key = [("\u{732b}".to_string(), "v".to_string())];
        let err = save_png(&path, &tiny(), &bad_key).unwrap_err().to_string();
        assert!(err.contains("Latin-1"), "{err}");

        // Failing inside the encoder, after the temporary file exists: a zero-sized image.
        let err = save_png(&path, &RgbImage::new(0, 0), &[]).unwrap_err();
        assert!(err.to_string().contains("out.png"), "{err}");

        assert_eq!(std::fs::read(&path).unwrap(), b"previous contents");
        assert_eq!(listing(dir.path()), vec!["out.png".to_string()]);
    }

    #[test]
    fn save_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        std::fs::write(&path, b"previous contents").unwrap();
        save_png(&path, &tiny(), &[("k".into(), "v".into())]).unwrap();
        assert_eq!(super::super::load_rgb(&path).unwrap(), tiny());
        assert_eq!(listing(dir.path()), vec!["out.png".to_string()]);
    }
}
