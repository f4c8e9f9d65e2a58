//! Parity with PIL/diffusers on the fixtures of `tools/fixtures/gen_images.py` (see its header), plus error cases.
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::Deserialize;

use super::*;
use crate::test_support::max_pixel_diff as max_abs_diff;

#[derive(Deserialize)]
struct Manifest {
    resize: Vec<ResizeCase>,
    pass_order: Vec<(usize, usize, usize, usize, bool)>,
    convert: Vec<ConvertCase>,
    text: TextCase,
    preprocess: PreprocessCase,
}

#[derive(Deserialize)]
struct ResizeCase {
    input: String,
    expected: String,
    filter: String,
    width: u32,
    height: u32,
}

#[derive(Deserialize)]
struct ConvertCase {
    input: String,
    expected: String,
    pil_mode: String,
    lossy_codec: bool,
}

#[derive(Deserialize)]
struct TextCase {
    input: String,
    expected: Vec<(String, String)>,
}

#[derive(Deserialize)]
struct PreprocessCase {
    input: String,
    width: u32,
    height: u32,
    tensor: String,
}

fn manifest() -> Manifest {
    crate::io::weights::read_json(&fixture("manifest.json")).unwrap()
}

fn fixture(rel: &str) -> PathBuf {
    crate::test_support::fixture_path("images").join(rel)
}

/// The expected images are plain 8-bit RGB PNGs written by PIL; decode them without our conversion logic.
fn read_expected(rel: &str) -> RgbImage {
    let img = image::open(fixture(rel)).unwrap();
    assert!(matches!(img, image::DynamicImage::ImageRgb8(_)), "{rel}");
    img.into_rgb8()
}

#[test]
fn resize_is_byte_exact_with_pil() {
    let cases = manifest().resize;
    assert!(cases.len() >= 30, "manifest lists {} resize cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let src = read_expected(&case.input);
        let filter = ResampleFilter::from_diffusers_name(&case.filter).unwrap();
        let ours = resize(&src, case.width, case.height, filter);
        let pil = read_expected(&case.expected);
        let diff = max_abs_diff(&ours, &pil);
        if diff != 0 {
            failures.push(format!("{}: max |diff| = {diff}", case.expected));
        }
    }
    assert!(failures.is_empty(), "differs from PIL:\n{}", failures.join("\n"));
}

#[test]
fn pass_order_matches_pillow() {
    let cases = manifest().pass_order;
    assert!(cases.len() > 300);
    let wrong: Vec<_> = cases
        .iter()
        .filter(|&&(w, h, ow, oh, vertical)| super::resample::vertical_first((w, h), (ow, oh)) != vertical)
        .collect();
    assert!(wrong.is_empty(), "pass order differs from Pillow for {wrong:?}");
}

#[test]
fn load_rgb_matches_diffusers_load_image() {
    let cases = manifest().convert;
    let mut failures = Vec::new();
    for case in &cases {
        let ours = load_rgb(&fixture(&case.input)).unwrap();
        // The in-memory decoder (tar members, parquet cells) gives the file decoder's pixels.
        let bytes = std::fs::read(fixture(&case.input)).unwrap();
        if decode_rgb(&bytes, Path::new(&case.input)).unwrap() != ours {
            failures.push(format!("{}: decode_rgb differs from load_rgb", case.input));
        }
        let pil = read_expected(&case.expected);
        if ours.dimensions() != pil.dimensions() {
            failures.push(format!("{}: size {:?} vs PIL {:?}", case.input, ours.dimensions(), pil.dimensions()));
            continue;
        }
        let diff = max_abs_diff(&ours, &pil);
        // Lossless inputs must match exactly. JPEG and lossy WebP go through different decoders
        // (zune-jpeg / image-webp vs libjpeg-turbo / libwebp); their measured gap is pinned here.
        let allowed = if case.lossy_codec { LOSSY_DECODER_TOLERANCE } else { 0 };
        if diff > allowed {
            failures.push(format!("{} (PIL mode {}): max |diff| = {diff}", case.input, case.pil_mode));
        }
    }
    assert!(failures.is_empty(), "differs from PIL:\n{}", failures.join("\n"));
}

/// Largest per-channel difference allowed between our JPEG/lossy-WebP decoding and PIL's, in pixel levels.
/// Measured on the fixtures: colour JPEG (4:2:0) 4 (about a quarter of the values off by 1-2), grey JPEG 1,
/// lossy WebP 0. zune-jpeg's IDCT and YCbCr conversion round differently from libjpeg-turbo's.
const LOSSY_DECODER_TOLERANCE: u8 = 4;

#[test]
fn control_image_preprocess_matches_diffusers_bitwise() {
    let case = manifest().preprocess;
    let img = load_rgb(&fixture(&case.input)).unwrap();
    let ours = to_tensor01(&resize(&img, case.width, case.height, ResampleFilter::Lanczos), &Device::Cpu).unwrap();
    let reference = candle_core::safetensors::load(fixture(&case.tensor), &Device::Cpu).unwrap();
    let reference = &reference["control"];
    assert_eq!(ours.dims(), reference.dims());
    // Same pixels and the same f32 division: every value bit-identical (max |a - b| == 0).
    let diff = (&ours - reference).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn reads_pil_text_chunks() {
    let case = manifest().text;
    assert_eq!(read_png_text(&fixture(&case.input)).unwrap(), case.expected);
}

#[test]
fn text_file_renamed_png_is_not_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.png");
    std::fs::write(&path, "just some text\n").unwrap();
    let err = load_rgb(&path).unwrap_err().to_string();
    assert!(err.contains("notes.png") && err.contains("not an image"), "{err}");

    let unknown = dir.path().join("notes.xyz");
    std::fs::write(&unknown, "just some text\n").unwrap();
    let err = load_rgb(&unknown).unwrap_err().to_string();
    assert!(err.contains("notes.xyz") && err.contains("not an image"), "{err}");

    let missing = dir.path().join("missing.png");
    let err = load_rgb(&missing).unwrap_err().to_string();
    assert!(err.contains("missing.png"), "{err}");
}

#[test]
fn unsupported_format_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("anim.gif");
    // A GIF header: recognised by its magic bytes, but this build has no GIF decoder.
    std::fs::write(&path, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    let err = load_rgb(&path).unwrap_err().to_string();
    assert!(err.contains("anim.gif") && err.contains("unsupported image format"), "{err}");
}

#[test]
fn tensor_round_trip() {
    let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 50, y as u8 * 100, 255]));
    let t = to_tensor01(&img, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[1, 3, 3, 5]);
    // Channel-major: element (0, 1, y, x) is the green of pixel (x, y).
    let v: f32 = t.get(0).unwrap().get(1).unwrap().get(2).unwrap().get(4).unwrap().to_scalar().unwrap();
    assert_eq!(v, 200.0 / 255.0);

    let u8s = (t * 255.0).unwrap().round().unwrap().to_dtype(candle_core::DType::U8).unwrap();
    let batch = Tensor::cat(&[&u8s, &u8s], 0).unwrap();
    let images = tensor_to_images(&batch).unwrap();
    assert_eq!(images, vec![img.clone(), img]);

    let wrong = Tensor::zeros((1, 4, 2, 2), candle_core::DType::U8, &Device::Cpu).unwrap();
    assert!(tensor_to_images(&wrong).is_err());
}

#[test]
fn sha256_of_known_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("abc.bin");
    std::fs::write(&path, b"abc").unwrap();
    assert_eq!(sha256_file(&path).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    // Larger than one read block, so the streaming loop runs more than once.
    let big = vec![0u8; (1 << 20) + 3];
    std::fs::write(&path, &big).unwrap();
    // Reference: Python's hashlib.sha256(bytes(2**20 + 3)).hexdigest().
    assert_eq!(sha256_file(&path).unwrap(), "e0694d51e30f3b163519b8ba9d4ab2ca18b2f8b4d98bcc09f9052af3dbf960ca");
    assert!(sha256_file(&dir.path().join("missing")).unwrap_err().to_string().contains("missing"));
}

#[test]
fn image_sizes_that_cannot_fit_are_refused_before_allocating() {
    let err = check_image_size_with("width", 100_000, 100_000, Some(16 << 30)).unwrap_err().to_string();
    assert!(err.starts_with("width: a 100000x100000 image needs about 223.5 GiB"), "{err}");
    assert!(err.contains("16.0 GiB available"), "{err}");
    // Without a figure for the free memory the fixed limit still refuses it.
    assert!(check_image_size_with("width", 100_000, 100_000, None).is_err());
    let err = check_image_size_with("width", 0, 1, Some(16 << 30)).unwrap_err().to_string();
    assert!(err.contains("0x1 is empty"), "{err}");
    assert!(check_image_size_with("resolution", 4096, 4096, Some(16 << 30)).is_ok());
    assert_eq!(rgb_bytes(100_000, 100_000), 30_000_000_000);
}
