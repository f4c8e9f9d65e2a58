//! Training data: (target image, condition image, caption) triples from the two layouts people have.
//!
//! - **fill50k** (the original ControlNet tutorial): a `prompt.json` with one JSON object per line,
//!   `{"source": "source/0.png", "target": "target/0.png", "prompt": "..."}`; `source` is the condition,
//!   paths are relative to the file's folder. `--dataset` names the file or its folder.
//! - **image folder** (what diffusers' `train_controlnet.py` reads through `datasets`): a folder with a
//!   `metadata.jsonl`, one object per line with `image` (or `file_name`, the `datasets` imagefolder name),
//!   `conditioning_image` and `text` (a string, or a list of strings of which training picks one at random).
//!
//! Every example is checked up front (files present, headers readable as images); all problems are reported
//! together, one per line. Images are brought to `resolution` as diffusers' transforms do: torchvision
//! `Resize(resolution, BILINEAR)` (the shorter side to `resolution`, the longer to
//! `int(resolution · long / short)`, with PIL's bilinear filter, reproduced exactly) and `CenterCrop(resolution)`
//! (offsets `round((size − resolution) / 2)`, rounding half to even as Python does). Targets become
//! `(x/255 − 0.5)/0.5` ∈ [−1, 1] (`ToTensor` + `Normalize([0.5], [0.5])`), conditions `x/255` ∈ [0, 1].
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde_json::Value;

use crate::io::images::{load_rgb, resize, ResampleFilter};
use crate::{Error, Result};

/// The file a fill50k-style dataset is described by.
pub const FILL50K_FILE: &str = "prompt.json";
/// The file an image-folder dataset is described by.
pub const METADATA_FILE: &str = "metadata.jsonl";

/// One training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub target: PathBuf,
    pub condition: PathBuf,
    /// One caption, or several (one is picked per use).
    pub captions: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Fill50k,
    ImageFolder,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    /// The description file (`prompt.json` or `metadata.jsonl`).
    pub file: PathBuf,
    pub layout: Layout,
    pub examples: Vec<Example>,
}

/// One example at training resolution.
#[derive(Debug, Clone)]
pub struct Sample {
    /// (3, r, r) in [−1, 1].
    pub pixel_values: Tensor,
    /// (C, r, r) in [0, 1]: RGB (C = 3) or grey (C = 1).
    pub condition: Tensor,
}

impl Dataset {
    /// Reads the description (`prompt.json`, `metadata.jsonl`, or a folder holding one) without opening images.
    pub fn open(path: &Path) -> Result<Self> {
        let (file, layout) = if path.is_dir() {
            if path.join(FILL50K_FILE).is_file() {
                (path.join(FILL50K_FILE), Layout::Fill50k)
            } else if path.join(METADATA_FILE).is_file() {
                (path.join(METADATA_FILE), Layout::ImageFolder)
            } else {
                return Err(Error::setting(
                    "dataset",
                    format!(
                        "{}: no {FILL50K_FILE} (fill50k layout) or {METADATA_FILE} (image folder) in it",
                        path.display()
                    ),
                ));
            }
        } else if path.is_file() {
            let layout = if path.file_name().is_some_and(|n| n == METADATA_FILE) {
                Layout::ImageFolder
            } else {
                Layout::Fill50k
            };
            (path.to_path_buf(), layout)
        } else {
            return Err(Error::setting("dataset", format!("{}: no such file or folder", path.display())));
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let base = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut examples = Vec::new();
        let mut problems = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match parse_line(line, layout, &base) {
                Ok(ex) => examples.push(ex),
                Err(msg) => problems.push(format!("line {}: {msg}", i + 1)),
            }
        }
        if !problems.is_empty() {
            return Err(Error::config(&file, format!("{} bad lines:\n  {}", problems.len(), problems.join("\n  "))));
        }
        if examples.is_empty() {
            return Err(Error::config(&file, "no examples"));
        }
        Ok(Self { file, layout, examples })
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Checks that every image exists and is an image this build reads (from its header); reports all problems
    /// at once, one line each.
    pub fn check(&self) -> Result<()> {
        let mut problems = Vec::new();
        let mut bad_examples = 0;
        for (i, ex) in self.examples.iter().enumerate() {
            let before = problems.len();
            for (what, path) in [("target", &ex.target), ("condition", &ex.condition)] {
                if let Err(msg) = check_image(path) {
                    problems.push(format!("example {} {what} {}: {msg}", i + 1, path.display()));
                }
            }
            bad_examples += usize::from(problems.len() > before);
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "dataset {}: {} of {} examples cannot be used:\n  {}",
            self.file.display(),
            bad_examples,
            self.examples.len(),
            problems.join("\n  ")
        )))
    }

    /// Example `i` at `resolution`, on `device`, its condition with `condition_channels` channels (3: RGB,
    /// 1: grey).
    pub fn load(&self, i: usize, resolution: u32, condition_channels: usize, device: &Device) -> Result<Sample> {
        let ex = &self.examples[i];
        let target = resize_center_crop(&load_rgb(&ex.target)?, resolution);
        let condition = resize_center_crop(&load_rgb(&ex.condition)?, resolution);
        Ok(Sample {
            pixel_values: target_tensor(&target, device)?,
            condition: condition_tensor(&condition, condition_channels, device)?,
        })
    }
}

fn parse_line(line: &str, layout: Layout, base: &Path) -> std::result::Result<Example, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let field = |names: &[&str]| -> std::result::Result<&Value, String> {
        names.iter().find_map(|n| v.get(*n)).ok_or_else(|| format!("no \"{}\" field", names[0]))
    };
    let path = |names: &[&str]| -> std::result::Result<PathBuf, String> {
        let s = field(names)?.as_str().ok_or_else(|| format!("\"{}\" is not a string", names[0]))?;
        Ok(base.join(s))
    };
    let (target, condition, caption) = match layout {
        Layout::Fill50k => (path(&["target"])?, path(&["source"])?, field(&["prompt"])?),
        Layout::ImageFolder => (path(&["image", "file_name"])?, path(&["conditioning_image"])?, field(&["text"])?),
    };
    let captions = match caption {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|c| c.as_str().map(str::to_string).ok_or("a caption list must hold strings only".to_string()))
            .collect::<std::result::Result<_, _>>()?,
        _ => return Err("the caption must be a string or a non-empty list of strings".into()),
    };
    Ok(Example { target, condition, captions })
}

/// The file exists and its header is that of an image format this build decodes.
fn check_image(path: &Path) -> std::result::Result<(), String> {
    if !path.is_file() {
        return Err("missing".into());
    }
    let reader =
        image::ImageReader::open(path).and_then(|r| r.with_guessed_format()).map_err(|e| format!("unreadable: {e}"))?;
    if reader.format().is_none() {
        return Err("not an image".into());
    }
    reader.into_dimensions().map(|_| ()).map_err(|e| format!("not a readable image: {e}"))
}

/// torchvision `Resize(size, BILINEAR)` + `CenterCrop(size)` on a PIL image, byte for byte.
pub fn resize_center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    // The shorter side becomes `size`; the longer is truncated as Python's int() truncates.
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (size as f64 * long as f64 / short as f64) as u32;
    let (new_w, new_h) = if w <= h { (size, new_long) } else { (new_long, size) };
    let resized = resize(img, new_w, new_h, ResampleFilter::Bilinear);
    let top = ((new_h as f64 - size as f64) / 2.0).round_ties_even() as u32;
    let left = ((new_w as f64 - size as f64) / 2.0).round_ties_even() as u32;
    image::imageops::crop_imm(&resized, left, top, size, size).to_image()
}

/// Planar (3, H, W) f32 values of an RGB image through `f`.
fn planar(img: &RgbImage, device: &Device, f: impl Fn(u8) -> f32) -> candle_core::Result<Tensor> {
    let (w, h) = img.dimensions();
    let raw = img.as_raw();
    let mut data = Vec::with_capacity(raw.len());
    for c in 0..3 {
        data.extend(raw.iter().skip(c).step_by(3).map(|&v| f(v)));
    }
    Tensor::from_vec(data, (3, h as usize, w as usize), device)
}

/// A target image as the VAE reads it: `ToTensor` (x/255) then `Normalize(0.5, 0.5)`, in f32 as torch does.
pub fn target_tensor(img: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    planar(img, device, |v| (f32::from(v) / 255.0 - 0.5) / 0.5)
}

/// A condition image as the ControlNet reads it: x/255, RGB for `channels` = 3, grey for 1 (PIL's `convert("L")`:
/// ITU-R 601-2 luma, L = (19595 R + 38470 G + 7471 B + 2¹⁵) >> 16, as a 1-channel diffusers pipeline gets it).
/// Other channel counts are refused.
pub fn condition_tensor(img: &RgbImage, channels: usize, device: &Device) -> candle_core::Result<Tensor> {
    match channels {
        3 => planar(img, device, |v| f32::from(v) / 255.0),
        1 => {
            let (w, h) = img.dimensions();
            let grey: Vec<f32> = img.pixels().map(|p| f32::from(luma(p.0)) / 255.0).collect();
            Tensor::from_vec(grey, (1, h as usize, w as usize), device)
        }
        n => candle_core::bail!("conditions are made with 1 (grey) or 3 (RGB) channels, not {n}"),
    }
}

/// PIL's `L` of an RGB pixel.
fn luma([r, g, b]: [u8; 3]) -> u8 {
    ((19595 * u32::from(r) + 38470 * u32::from(g) + 7471 * u32::from(b) + 0x8000) >> 16) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        crate::test_support::fixture_path("train").join(rel)
    }

    /// The fill50k fixture through our transforms gives exactly the tensors the reference transforms gave
    /// (tools/fixtures/gen_train.py: PIL bilinear resize + torchvision's crop and normalisation).
    #[test]
    fn fill50k_samples_equal_torchvision_transforms() {
        let ds = Dataset::open(&fixture("fill50k")).unwrap();
        assert_eq!((ds.layout, ds.len()), (Layout::Fill50k, 2));
        assert_eq!(ds.examples[0].captions, ["a red circle on a blue square"]);
        ds.check().unwrap();
        let fx = candle_core::safetensors::load(fixture("step.safetensors"), &Device::Cpu).unwrap();
        for i in 0..2 {
            let s = ds.load(i, 64, 3, &Device::Cpu).unwrap();
            for (ours, key) in [(&s.pixel_values, "pixel_values"), (&s.condition, "cond")] {
                let reference = fx[key].get(i).unwrap();
                let d: f32 = (ours - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert_eq!(d, 0.0, "{key}[{i}]");
            }
        }
    }

    #[test]
    fn metadata_jsonl_and_all_problems_listed() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_pixel(10, 12, image::Rgb([1, 2, 3]));
        img.save(dir.path().join("a.png")).unwrap();
        std::fs::write(dir.path().join("junk.png"), b"not an image").unwrap();
        std::fs::write(
            dir.path().join(METADATA_FILE),
            concat!(
                r#"{"image": "a.png", "conditioning_image": "a.png", "text": ["one", "two"]}"#,
                "\n",
                r#"{"file_name": "gone.png", "conditioning_image": "junk.png", "text": "x"}"#,
                "\n"
            ),
        )
        .unwrap();
        let ds = Dataset::open(dir.path()).unwrap();
        assert_eq!(ds.layout, Layout::ImageFolder);
        assert_eq!(ds.examples[0].captions, ["one", "two"]);
        let err = ds.check().unwrap_err().to_string();
        assert!(err.contains("1 of 2 examples"), "{err}");
        assert!(
            err.contains("gone.png: missing") && err.contains("condition") && err.contains("junk.png: not"),
            "{err}"
        );

        std::fs::write(dir.path().join(METADATA_FILE), "{\"image\": 3}\nnot json\n").unwrap();
        let err = Dataset::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("line 2: not JSON"), "{err}");
    }

    #[test]
    fn centre_crop_offsets_round_half_to_even() {
        // 9 wide after resizing to height 4 → (9 - 4) / 2 = 2.5 → 2 (Python's round).
        let img = RgbImage::from_fn(9, 4, |x, _| image::Rgb([x as u8 * 10, 0, 0]));
        let out = resize_center_crop(&img, 4);
        assert_eq!(out.dimensions(), (4, 4));
        assert_eq!(out.get_pixel(0, 0).0[0], 20);
    }

    /// A 1-channel net gets grey conditions, as PIL's convert("L") makes them (values from PIL 10).
    #[test]
    fn grey_conditions_are_pils_luma() {
        let img = RgbImage::from_fn(3, 1, |x, _| image::Rgb([[255, 0, 0], [0, 255, 0], [10, 200, 30]][x as usize]));
        let grey = condition_tensor(&img, 1, &Device::Cpu).unwrap();
        assert_eq!(grey.dims(), [1, 1, 3]);
        let v: Vec<f32> = grey.flatten_all().unwrap().to_vec1().unwrap();
        let want = [76.0f32, 150.0, 124.0].map(|x| x / 255.0);
        assert_eq!(v, want);
        assert!(condition_tensor(&img, 2, &Device::Cpu).is_err());
    }
}
