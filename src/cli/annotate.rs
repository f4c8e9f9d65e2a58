//! `controlnet annotate KIND INPUT --output OUT`: make control maps from an image or a folder of images.
//!
//! - INPUT a file: the map is written to OUT (format from its extension: png, jpg, webp, bmp; OUT may also be
//!   an existing folder, then `<stem>.png` inside it).
//! - INPUT a folder: every file in it (not recursing, hidden files left out) becomes `OUT/<stem>.png`, with a
//!   progress bar on stderr. Files that cannot be read as images are skipped and listed at the end; the
//!   exit status is then 1, after all other maps are written.
//! - `inpaint` takes `--mask` and writes the float condition tensor (`control`, shape (1, 3, H, W)) to a
//!   `.safetensors` OUT.
//!
//! Every output is written to a temporary file in the same folder and renamed into place, so an existing
//! file is never left half-written.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use image::{ImageFormat, RgbImage};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::annotate::pose::{DrawOptions, PoseFile};
use crate::annotate::{self, AnnotateSettings, Detector, DetectorOptions, ResizeMode};
use crate::io::atomic::write_atomic;
use crate::{Error, Result};

#[derive(Args, Debug, Clone)]
#[command(after_help = "Kinds: canny, shuffle, lineart, color, binary, invert, scribble, tile, blur, normal, \
                        inpaint, pose (INPUT = OpenPose JSON; see docs/annotators.md, docs/pose.md).\nExit status: 0 when every input was annotated, 1 on \
                        an error or when a folder had unreadable files (listed on stderr).")]
pub struct AnnotateArgs {
    /// Annotator kind (canny, shuffle, lineart, color, binary, invert, scribble, tile, blur, normal, inpaint, pose).
    pub kind: String,
    /// Image file, or a folder of images.
    pub input: PathBuf,
    /// Output file (or folder when INPUT is a folder; created if missing).
    #[arg(short, long)]
    pub output: PathBuf,
    /// canny: low threshold [default: 100].
    #[arg(long, allow_negative_numbers = true)]
    pub low: Option<f64>,
    /// canny: high threshold [default: 200].
    #[arg(long, allow_negative_numbers = true)]
    pub high: Option<f64>,
    /// shuffle: random seed (numpy's np.random.seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u32,
    /// binary: grey threshold, 0 = Otsu [default: 0]; scribble: XDoG threshold [default: 32].
    #[arg(long, allow_negative_numbers = true)]
    pub threshold: Option<f64>,
    /// blur: Gaussian sigma [default: 9].
    #[arg(long, allow_negative_numbers = true)]
    pub sigma: Option<f64>,
    /// tile: down-sampling rate [default: 1, unchanged].
    #[arg(long, allow_negative_numbers = true)]
    pub rate: Option<f64>,
    /// normal: normalised depth below which pixels are flat background [default: 0.4].
    #[arg(long, allow_negative_numbers = true)]
    pub bg_threshold: Option<f64>,
    /// Annotator resolution (short side the detector sees) [default: pixel perfect for the output size].
    #[arg(long)]
    pub resolution: Option<u32>,
    /// How the map is fitted to --width/--height.
    #[arg(long, value_enum, default_value_t = ResizeMode::CropAndResize)]
    pub resize: ResizeMode,
    /// Output width [default: the input's; the input's aspect if only --height is given].
    #[arg(long)]
    pub width: Option<u32>,
    /// Output height [default: the input's; the input's aspect if only --width is given].
    #[arg(long)]
    pub height: Option<u32>,
    /// inpaint: mask image (white = to be inpainted), the size of the input.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Weights of a model-based annotator (not used by the classical kinds).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// pose: mirror the keypoints left-right (left and right limbs swap, as a detector would see it).
    #[arg(long)]
    pub flip: bool,
    /// pose: scale the keypoints by F about the canvas origin.
    #[arg(long, value_name = "F")]
    pub scale: Option<f64>,
    /// pose: move the keypoints right by F pixels.
    #[arg(long, value_name = "F", allow_negative_numbers = true, default_value_t = 0.0)]
    pub translate_x: f64,
    /// pose: move the keypoints down by F pixels.
    #[arg(long, value_name = "F", allow_negative_numbers = true, default_value_t = 0.0)]
    pub translate_y: f64,
    /// pose: add the people of another OpenPose JSON file (same canvas). Repeatable.
    #[arg(long, value_name = "JSON")]
    pub merge: Vec<PathBuf>,
    /// pose: do not draw the body / the hands / the face.
    #[arg(long)]
    pub no_body: bool,
    #[arg(long)]
    pub no_hands: bool,
    #[arg(long)]
    pub no_face: bool,
    /// pose: also write the edited keypoints as OpenPose JSON.
    #[arg(long, value_name = "JSON")]
    pub save_json: Option<PathBuf>,
}

impl AnnotateArgs {
    fn detector_options(&self) -> DetectorOptions {
        DetectorOptions {
            low: self.low,
            high: self.high,
            seed: self.seed,
            threshold: self.threshold,
            sigma: self.sigma,
            rate: self.rate,
            bg_threshold: self.bg_threshold,
            model: self.model.clone(),
        }
    }

    fn settings(&self) -> AnnotateSettings {
        AnnotateSettings { width: self.width, height: self.height, resolution: self.resolution, resize: self.resize }
    }
}

/// Run `controlnet annotate`.
pub fn run(args: &AnnotateArgs) -> Result<ExitCode> {
    if args.kind == "inpaint" {
        return run_inpaint(args);
    }
    if args.kind == "pose" {
        return run_pose(args);
    }
    if args.mask.is_some() {
        return Err(Error::Invalid(format!("--mask is only used by the inpaint kind, not {}", args.kind)));
    }
    let detector = annotate::detector(&args.kind, &args.detector_options())?;
    let settings = args.settings();
    let meta = std::fs::metadata(&args.input).map_err(|e| Error::io(&args.input, e))?;
    if meta.is_dir() {
        return run_folder(detector.as_ref(), args, &settings);
    }
    let image = read_image(&args.input)?;
    let map = annotate::annotate(detector.as_ref(), &image, &settings)?;
    let out = if args.output.is_dir() { args.output.join(png_name(&args.input)) } else { args.output.clone() };
    write_image(&map, &out)?;
    Ok(ExitCode::SUCCESS)
}

/// Annotate every file of the input folder into the output folder.
fn run_folder(detector: &dyn Detector, args: &AnnotateArgs, settings: &AnnotateSettings) -> Result<ExitCode> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.input)
        .map_err(|e| Error::io(&args.input, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Invalid(format!("{}: the folder has no files to annotate", args.input.display())));
    }
    if args.output.exists() && !args.output.is_dir() {
        return Err(Error::Invalid(format!(
            "--output {}: INPUT is a folder, so the output must be a folder, but this is a file",
            args.output.display()
        )));
    }
    std::fs::create_dir_all(&args.output).map_err(|e| Error::io(&args.output, e))?;

    let bar = ProgressBar::with_draw_target(Some(files.len() as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} {wide_msg}") {
        bar.set_style(style);
    }
    let mut skipped: Vec<(PathBuf, String)> = Vec::new();
    // two inputs with the same stem (a.jpg, a.png) would write the same a.png: the second is skipped
    let mut taken: HashMap<PathBuf, PathBuf> = HashMap::new();
    for file in &files {
        bar.set_message(file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let out = args.output.join(png_name(file));
        if let Some(first) = taken.get(&out) {
            skipped
                .push((file.clone(), format!("its output {} is already taken by {}", out.display(), first.display())));
        } else {
            taken.insert(out.clone(), file.clone());
            let result = read_image(file)
                .and_then(|img| annotate::annotate(detector, &img, settings))
                .and_then(|map| write_image(&map, &out));
            if let Err(e) = result {
                skipped.push((file.clone(), e.to_string()));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    let done = files.len() - skipped.len();
    eprintln!("annotated {done} of {} files into {}", files.len(), args.output.display());
    if skipped.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("skipped {} file(s):", skipped.len());
    for (file, why) in &skipped {
        eprintln!("  {}: {why}", file.display());
    }
    Ok(ExitCode::FAILURE)
}

/// The keypoint edits of `annotate pose`, in the order they apply: merge, flip, scale, translate.
pub fn edit_pose(pose: PoseFile, args: &AnnotateArgs) -> Result<PoseFile> {
    let mut pose = pose;
    for other in &args.merge {
        pose = pose.merge(&PoseFile::from_json_file(other)?)?;
    }
    if args.flip {
        pose = pose.flip_horizontal()?;
    }
    if let Some(f) = args.scale {
        pose = pose.scale(f, f)?;
    }
    if args.translate_x != 0.0 || args.translate_y != 0.0 {
        pose = pose.translate(args.translate_x, args.translate_y)?;
    }
    Ok(pose)
}

/// `pose`: OpenPose JSON (keypoints) → the skeleton image ControlNet's openpose models were trained on.
/// `--width/--height` rescale the canvas (and the keypoints with it).
fn run_pose(args: &AnnotateArgs) -> Result<ExitCode> {
    let pose = edit_pose(PoseFile::from_json_file(&args.input)?, args)?;
    let pose = match (args.width, args.height, pose.canvas_size()) {
        (None, None, _) => pose,
        (w, h, Some((cw, ch))) => pose.resize_canvas(w.unwrap_or(cw), h.unwrap_or(ch))?,
        (Some(w), Some(h), None) => pose.with_canvas(w, h)?,
        _ => {
            return Err(Error::Invalid(format!(
                "{}: the file has no canvas size; give both --width and --height",
                args.input.display()
            )))
        }
    };
    let opts = DrawOptions { body: !args.no_body, hands: !args.no_hands, face: !args.no_face };
    let image = match pose.canvas_size() {
        Some(_) => pose.render_canvas(opts)?,
        None => {
            return Err(Error::Invalid(format!(
                "{}: the file has no canvas_width/canvas_height; give --width and --height",
                args.input.display()
            )))
        }
    };
    if let Some(json) = &args.save_json {
        write_atomic(json, |tmp| std::fs::write(tmp, pose.to_json_string()).map_err(|e| Error::io(tmp, e)))?;
    }
    let out = if args.output.is_dir() { args.output.join(png_name(&args.input)) } else { args.output.clone() };
    write_image(&image, &out)?;
    Ok(ExitCode::SUCCESS)
}

/// `inpaint`: image + mask → the float condition tensor in a safetensors file.
fn run_inpaint(args: &AnnotateArgs) -> Result<ExitCode> {
    let mask_path = args
        .mask
        .as_ref()
        .ok_or_else(|| Error::Invalid("inpaint needs --mask IMAGE (white where to inpaint)".into()))?;
    if args.input.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: inpaint takes one image and its --mask, not a folder",
            args.input.display()
        )));
    }
    if args.output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(Error::Invalid(format!(
            "--output {}: inpaint makes a float map, write it to a .safetensors file",
            args.output.display()
        )));
    }
    let image = read_image(&args.input)?;
    let mask = read_image(mask_path)?;
    if image.dimensions() != mask.dimensions() {
        return Err(Error::Invalid(format!(
            "--mask {} is {}x{} but {} is {}x{}: they must have the same size",
            mask_path.display(),
            mask.width(),
            mask.height(),
            args.input.display(),
            image.width(),
            image.height()
        )));
    }
    // bring both to the output size the same way (A1111's resize modes)
    let (w, h) = args.settings().output_size(image.width(), image.height())?;
    let image = annotate::resize::fit_to_output(&image, w, h, args.resize);
    let mask = annotate::resize::fit_to_output(&mask, w, h, args.resize);
    let control = annotate::inpaint::condition(&image, &mask)?;
    let tensors = HashMap::from([("control".to_string(), control)]);
    write_atomic(&args.output, |tmp| {
        candle_core::safetensors::save(&tensors, tmp)
            .map_err(|e| Error::Image { path: args.output.clone(), msg: format!("cannot write safetensors: {e}") })
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Decode an image file (content sniffed, not trusted from the extension), flattening alpha onto white.
fn read_image(path: &Path) -> Result<RgbImage> {
    let not_image = |e: &dyn std::fmt::Display| Error::Image {
        path: path.to_path_buf(),
        msg: format!("not a readable image: {e}"),
    };
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let decoded = reader.decode().map_err(|e| not_image(&e))?;
    if decoded.width() == 0 || decoded.height() == 0 {
        return Err(Error::Image {
            path: path.to_path_buf(),
            msg: format!("the image is empty ({}x{})", decoded.width(), decoded.height()),
        });
    }
    Ok(annotate::hwc3(&decoded))
}

/// `<stem>.png`: the output name of an input in folder mode.
fn png_name(input: &Path) -> PathBuf {
    // append rather than `set_extension`, which would eat a dot inside the stem ("photo.final")
    let mut name = input.file_stem().map(|s| s.to_os_string()).unwrap_or_else(|| "map".into());
    name.push(".png");
    PathBuf::from(name)
}

/// Write a control map in the format of `path`'s extension, atomically.
fn write_image(map: &RgbImage, path: &Path) -> Result<()> {
    let format = ImageFormat::from_path(path).map_err(|_| {
        Error::Invalid(format!("--output {}: unknown image extension (use .png, .jpg, .webp or .bmp)", path.display()))
    })?;
    write_atomic(path, |tmp| {
        map.save_with_format(tmp, format)
            .map_err(|e| Error::Image { path: path.to_path_buf(), msg: format!("cannot write: {e}") })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_outputs_are_png_named_after_the_stem() {
        assert_eq!(png_name(Path::new("a/b/photo.final.jpg")), PathBuf::from("photo.final.png"));
    }
}
