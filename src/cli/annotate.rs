//! `controlnet annotate KIND INPUT --output OUT`: make control maps from an image or a folder of images.
//!
//! - INPUT a file: the map is written to OUT (format from its extension: png, jpg, webp, bmp; OUT may also be
//!   an existing folder, then `<stem>.png` inside it).
//! - INPUT a folder: every file in it (not recursing, hidden files left out) becomes `OUT/<stem>.png`, with a
//!   progress bar on stderr. Files that cannot be read as images are skipped and listed at the end; the
//!   exit status is then 1, after all other maps are written.
//! - `inpaint` takes `--mask` and writes the float condition tensor (`control`, shape (1, 3, H, W)) to a
//!   `.safetensors` OUT.
//! - `pose` reads OpenPose JSON; a JSON list of poses (frames) makes one image per element,
//!   `OUT/<stem>_<i>.png` (OUT is then a folder).
//!
//! Flags that the kind does not take are refused (`canny --sigma`), not ignored. Outputs follow every
//! subcommand's rule: folders are created, every output is written to a temporary file in the same folder and
//! renamed into place (an existing file is replaced only by a complete new one), and an output that is one of
//! the inputs is refused before anything runs.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use image::{ImageFormat, RgbImage};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::annotate::neural::depth_anything::{Depth, DepthAnything};
use crate::annotate::neural::dwpose::{self, Dwpose};
use crate::annotate::neural::midas::{Midas, MidasNet, WEIGHTS_FILE};
use crate::annotate::neural::openpose::{Include, Openpose};
use crate::annotate::neural::{annotate_with_pose, PoseDetector};
use crate::annotate::neural::{locate, StateDict};
use crate::annotate::pose::{DrawOptions, PoseEdits, PoseFile};
use crate::annotate::{self, AnnotateSettings, DetectorOptions, Input, ResizeMode, UpstreamSizes};
use crate::io::atomic::{check_output_is_not_input, write_atomic};
use crate::{Error, Result};

#[derive(Args, Debug, Clone)]
#[command(after_help = after_help())]
pub struct AnnotateArgs {
    /// Annotator kind: canny, shuffle, lineart-standard, color, binary, invert, scribble, tile, blur, normal,
    /// hed, pidinet, lineart, lineart-anime, mlsd, depth-anything, depth-midas, normal-midas, normal-bae, seg, openpose, openpose-hand, openpose-face, openpose-full, dwpose (from an image); inpaint (from an image and a mask); pose (from
    /// OpenPose JSON keypoints).
    pub kind: String,
    /// Image file, or a folder of images (pose: an OpenPose JSON file).
    pub input: PathBuf,
    /// Output file (a folder when INPUT is a folder or a pose list; created if missing).
    #[arg(short, long)]
    pub output: PathBuf,
    /// canny: low threshold [default: 100].
    #[arg(long, allow_negative_numbers = true)]
    pub low: Option<f64>,
    /// canny: high threshold [default: 200].
    #[arg(long, allow_negative_numbers = true)]
    pub high: Option<f64>,
    /// shuffle: random seed (numpy's np.random.seed) [default: 0].
    #[arg(long)]
    pub seed: Option<u32>,
    /// binary: grey threshold, 0 = Otsu [default: 0]; scribble: XDoG threshold [default: 32].
    #[arg(long, allow_negative_numbers = true)]
    pub threshold: Option<f64>,
    /// blur: Gaussian sigma [default: 9].
    #[arg(long, allow_negative_numbers = true)]
    pub sigma: Option<f64>,
    /// tile: down-sampling rate [default: 1, unchanged].
    #[arg(long, allow_negative_numbers = true)]
    pub rate: Option<f64>,
    /// normal, normal-midas: normalised depth below which pixels are flat background [default: 0.4; normal-midas
    /// 0.1].
    #[arg(long, allow_negative_numbers = true)]
    pub bg_threshold: Option<f64>,
    /// Neural kinds: weights folder (upstream file names), file, or hub id [default: lllyasviel/Annotators;
    /// depth-anything: depth-anything/Depth-Anything-V2-Small-hf; seg: openmmlab/upernet-convnext-small; dwpose:
    /// yzd-v/DWPose (a folder or repo with yolox_l.onnx and dw-ll_ucoco_384.onnx)].
    #[arg(long, value_name = "DIR_FILE_OR_ID")]
    pub weights: Option<String>,
    /// hed, pidinet: quantise the soft edges to a few levels.
    #[arg(long)]
    pub safe: bool,
    /// hed, pidinet: thin the edges to scribble strokes.
    #[arg(long)]
    pub scribble: bool,
    /// pidinet: threshold the edges at 0.5.
    #[arg(long)]
    pub apply_filter: bool,
    /// lineart: the coarse net (sk_model2.pth).
    #[arg(long)]
    pub coarse: bool,
    /// mlsd: minimum line-centre score (controlnet_aux's thr_v) [default: 0.1].
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub score_threshold: Option<f64>,
    /// mlsd: minimum segment length in net pixels, half the input's (controlnet_aux's thr_d) [default: 0.1].
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub distance_threshold: Option<f64>,
    /// depth-anything, depth-midas: also write the depth (float32, before normalisation, at the map's size) as a
    /// .npy file.
    #[arg(long, value_name = "FILE.npy")]
    pub save_raw: Option<PathBuf>,
    /// Neural kinds: size as controlnet_aux does, the net at this short side (sides rounded to multiples of
    /// 64) [default: 512 when --image-resolution is given, else our pixel-perfect sizing].
    #[arg(long, value_name = "N")]
    pub detect_resolution: Option<u32>,
    /// Neural kinds: size as controlnet_aux does, the output at this short side (sides rounded to multiples of
    /// 64) [default: 512 when --detect-resolution is given, else the input's size].
    #[arg(long, value_name = "N")]
    pub image_resolution: Option<u32>,
    /// Image kinds: annotator resolution (short side the detector sees) [default: pixel perfect for the output
    /// size].
    #[arg(long)]
    pub resolution: Option<u32>,
    /// Image kinds and inpaint: how the map is fitted to --width/--height [default: crop-and-resize].
    #[arg(long, value_enum)]
    pub resize: Option<ResizeMode>,
    /// Output width [default: the input's; the input's aspect if only --height is given].
    #[arg(long)]
    pub width: Option<u32>,
    /// Output height [default: the input's; the input's aspect if only --width is given].
    #[arg(long)]
    pub height: Option<u32>,
    /// inpaint: mask image (white = to be inpainted), the size of the input.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// pose: mirror the keypoints left-right (left and right limbs swap, as a detector would see it).
    #[arg(long)]
    pub flip: bool,
    /// pose: scale the keypoints by F about the canvas origin.
    #[arg(long, value_name = "F")]
    pub scale: Option<f64>,
    /// pose: move the keypoints right by F pixels [default: 0].
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub translate_x: Option<f64>,
    /// pose: move the keypoints down by F pixels [default: 0].
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub translate_y: Option<f64>,
    /// pose: add the people of another OpenPose JSON file (same canvas). Repeatable.
    #[arg(long, value_name = "JSON")]
    pub merge: Vec<PathBuf>,
    /// pose: do not draw the body.
    #[arg(long)]
    pub no_body: bool,
    /// pose: do not draw the hands.
    #[arg(long)]
    pub no_hands: bool,
    /// pose: do not draw the face.
    #[arg(long)]
    pub no_face: bool,
    /// pose: also write the edited keypoints as OpenPose JSON; openpose*, dwpose: the detected keypoints (A1111's
    /// JSON, normalised to the detect image).
    #[arg(long, value_name = "JSON")]
    pub save_json: Option<PathBuf>,
    // openpose
    /// openpose*, dwpose: draw the body (`--include-body false`: hands/face only) [default: true].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub include_body: Option<bool>,
    /// openpose: also detect and draw the hands (hand_pose_model.pth); the openpose-hand kind. dwpose (which draws
    /// hands and face by default): draw the hands, and the face only with --include-face.
    #[arg(long)]
    pub include_hand: bool,
    /// openpose: also detect and draw the face (facenet.pth); the openpose-face kind. dwpose: the face, and the
    /// hands only with --include-hand.
    #[arg(long)]
    pub include_face: bool,
}

/// The help's epilogue, made from the library's one list of kinds.
fn after_help() -> String {
    format!(
        "Kinds: {} (see docs/annotators.md, docs/pose.md).\nFlags that the kind does not take are refused.\n\
         Exit status: 0 when every input was annotated, 1 on an error or when a folder had unreadable files \
         (listed on stderr).",
        annotate::kind_names()
    )
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
            weights: self.weights.clone(),
            safe: self.safe,
            scribble: self.scribble,
            apply_filter: self.apply_filter,
            coarse: self.coarse,
            score_threshold: self.score_threshold,
            distance_threshold: self.distance_threshold,
            include_body: self.include_body,
            include_hand: self.include_hand,
            include_face: self.include_face,
        }
    }

    fn upstream_sizes(&self) -> UpstreamSizes {
        UpstreamSizes { detect_resolution: self.detect_resolution, image_resolution: self.image_resolution }
    }

    fn settings(&self) -> AnnotateSettings {
        AnnotateSettings {
            width: self.width,
            height: self.height,
            resolution: self.resolution,
            resize: self.resize.unwrap_or_default(),
        }
    }

    /// The settings given on the command line, by their library names.
    fn given(&self) -> Vec<&'static str> {
        let mut given = self.detector_options().given();
        let others = [
            ("width", self.width.is_some()),
            ("height", self.height.is_some()),
            ("resolution", self.resolution.is_some()),
            ("detect_resolution", self.detect_resolution.is_some()),
            ("image_resolution", self.image_resolution.is_some()),
            ("resize", self.resize.is_some()),
            ("mask", self.mask.is_some()),
            ("flip", self.flip),
            ("scale", self.scale.is_some()),
            ("translate_x", self.translate_x.is_some()),
            ("translate_y", self.translate_y.is_some()),
            ("merge", !self.merge.is_empty()),
            ("no_body", self.no_body),
            ("no_hands", self.no_hands),
            ("no_face", self.no_face),
            ("save_json", self.save_json.is_some()),
            ("save_raw", self.save_raw.is_some()),
        ];
        given.extend(others.into_iter().filter(|(_, on)| *on).map(|(name, _)| name));
        given
    }

    /// Every input file of the run (the output may be none of them).
    fn inputs(&self) -> Vec<&Path> {
        let mut inputs = vec![self.input.as_path()];
        inputs.extend(self.mask.as_deref());
        inputs.extend(self.merge.iter().map(PathBuf::as_path));
        inputs
    }
}

/// Run `controlnet annotate`.
pub fn run(args: &AnnotateArgs) -> Result<ExitCode> {
    let kind = annotate::kind(&args.kind)?;
    annotate::check_settings(kind, &args.given())?;
    annotate::check_sizes_exclusive(&args.given())?;
    let inputs = args.inputs();
    check_output_is_not_input("output", &args.output, &inputs)?;
    if let Some(json) = &args.save_json {
        check_output_is_not_input("save_json", json, &inputs)?;
    }
    if let Some(raw) = &args.save_raw {
        check_output_is_not_input("save_raw", raw, &inputs)?;
    }
    match kind.input {
        Input::ImageAndMask => return run_inpaint(args),
        Input::PoseJson => return run_pose(args),
        Input::Image => {}
    }
    // the input is checked before a detector's weights are loaded (or downloaded)
    let meta = std::fs::metadata(&args.input).map_err(|e| Error::io(&args.input, e))?;
    if let Some(raw) = &args.save_raw {
        return run_depth_raw(args, raw, meta.is_dir());
    }
    if let Some(json) = &args.save_json {
        return run_pose_json(args, json, meta.is_dir());
    }
    let detector = annotate::detector(&args.kind, &args.detector_options())?;
    let settings = args.settings();
    if meta.is_dir() {
        let (d, upstream) = (detector.as_ref(), args.upstream_sizes());
        return run_folder(args, |file, out| {
            let map = annotate::annotate_with(d, &read_image(file)?, &settings, &upstream)?;
            write_image(&map, out)
        });
    }
    let image = read_image(&args.input)?;
    let map = annotate::annotate_with(detector.as_ref(), &image, &settings, &args.upstream_sizes())?;
    let out = if args.output.is_dir() { args.output.join(png_name(&args.input)) } else { args.output.clone() };
    check_output_is_not_input("output", &out, &inputs)?;
    write_image(&map, &out)?;
    Ok(ExitCode::SUCCESS)
}

/// Annotate every file of the input folder into the output folder, all with the one loaded detector: `each`
/// reads one input and writes its map (and whatever else goes with it) to the given PNG path; a file it fails
/// on is skipped and reported.
fn run_folder(args: &AnnotateArgs, mut each: impl FnMut(&Path, &Path) -> Result<()>) -> Result<ExitCode> {
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
            if let Err(e) = each(file, &out) {
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

/// How a depth detector makes its map and the float depth behind it.
type MapAndDepth<'a> = dyn Fn(&RgbImage) -> Result<(RgbImage, Depth)> + 'a;

/// `depth-anything --save-raw`, `depth-midas --save-raw`: the map and the float depth it was made from, both at
/// the map's size (depth-anything: the input's or with the short side at --image-resolution; depth-midas: the
/// input's, or controlnet_aux's sizes with --detect-resolution/--image-resolution). One image: the .npy holds one
/// array; a folder: `--save-raw` is a folder of `<stem>.npy`, one per image.
fn run_depth_raw(args: &AnnotateArgs, raw: &Path, input_is_dir: bool) -> Result<ExitCode> {
    if let Some(size) = args.given().into_iter().find(|g| ["width", "height", "resolution", "resize"].contains(g)) {
        return Err(Error::setting(
            "save_raw",
            format!("writes the depth at the input's size or --image-resolution, so it does not combine with the {size} setting"),
        ));
    }
    if input_is_dir {
        side_folder("save_raw", raw)?;
    }
    let upstream = args.upstream_sizes();
    // the one loaded net, and how it makes a map with its depth
    let depth_anything;
    let midas;
    let map_and_depth: Box<MapAndDepth> = if args.kind == "depth-midas" {
        midas = Midas {
            net: MidasNet::load(&StateDict::open(&locate(args.weights.as_deref(), WEIGHTS_FILE)?)?)?,
            normal: None,
        };
        Box::new(|image| midas.map_and_depth(image, &upstream))
    } else {
        depth_anything = DepthAnything::load(args.weights.as_deref())?;
        Box::new(|image| depth_anything.sized_depth(image, &upstream).map(|d| (d.to_map(), d)))
    };
    if input_is_dir {
        return run_folder(args, |file, out| {
            let (map, depth) = map_and_depth(&read_image(file)?)?;
            let path = side_file(raw, file, "npy");
            write_atomic(&path, |tmp| std::fs::write(tmp, depth.to_npy()).map_err(|e| Error::io(tmp, e)))?;
            write_image(&map, out)
        });
    }
    let image = read_image(&args.input)?;
    let (map, depth) = map_and_depth(&image)?;
    let out = if args.output.is_dir() { args.output.join(png_name(&args.input)) } else { args.output.clone() };
    check_output_is_not_input("output", &out, &args.inputs())?;
    // the map's format is checked before anything is written
    if ImageFormat::from_path(&out).is_err() {
        write_image(&map, &out)?;
    }
    write_atomic(raw, |tmp| std::fs::write(tmp, depth.to_npy()).map_err(|e| Error::io(raw, e)))?;
    write_image(&map, &out)?;
    Ok(ExitCode::SUCCESS)
}

/// A side output's folder for a folder INPUT (`--save-json`, `--save-raw`): created, and refused when it is a file.
fn side_folder(setting: &str, dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::setting(
            setting,
            format!(
                "{}: INPUT is a folder, so this must be a folder (one file per image), but it is a file",
                dir.display()
            ),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// `DIR/<stem of input>.<ext>`: a folder run's side output for `input`.
fn side_file(dir: &Path, input: &Path, ext: &str) -> PathBuf {
    let stem = input.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!("{stem}.{ext}"))
}

/// `openpose* --save-json`, `dwpose --save-json`: the map and the keypoints it was drawn from (one image: the
/// JSON holds one pose; a folder: `--save-json` is a folder of `<stem>.json`, one per image).
fn run_pose_json(args: &AnnotateArgs, json: &Path, input_is_dir: bool) -> Result<ExitCode> {
    let options = args.detector_options();
    if input_is_dir {
        side_folder("save_json", json)?;
    }
    let detector: Box<dyn PoseDetector> = if args.kind == "dwpose" {
        let include = dwpose::include(options.include_body, options.include_hand, options.include_face);
        Box::new(Dwpose::load(args.weights.as_deref(), include)?)
    } else {
        let include = Include::for_kind(&args.kind, options.include_body, options.include_hand, options.include_face);
        Box::new(Openpose::load(args.weights.as_deref(), include)?)
    };
    let detector = detector.as_ref();
    let (settings, upstream) = (args.settings(), args.upstream_sizes());
    if input_is_dir {
        return run_folder(args, |file, out| {
            let image = read_image(file)?;
            let (map, pose) =
                annotate_with_pose(detector, |d| annotate::annotate_with(d, &image, &settings, &upstream))?;
            let path = side_file(json, file, "json");
            write_atomic(&path, |tmp| std::fs::write(tmp, pose.to_json_string()).map_err(|e| Error::io(tmp, e)))?;
            write_image(&map, out)
        });
    }
    let image = read_image(&args.input)?;
    let (map, pose) = annotate_with_pose(detector, |d| annotate::annotate_with(d, &image, &settings, &upstream))?;
    let out = if args.output.is_dir() { args.output.join(png_name(&args.input)) } else { args.output.clone() };
    check_output_is_not_input("output", &out, &args.inputs())?;
    // the map's format is checked before anything is written
    if ImageFormat::from_path(&out).is_err() {
        write_image(&map, &out)?;
    }
    write_atomic(json, |tmp| std::fs::write(tmp, pose.to_json_string()).map_err(|e| Error::io(tmp, e)))?;
    write_image(&map, &out)?;
    Ok(ExitCode::SUCCESS)
}

/// The keypoint edits of `annotate pose`, the merged files read.
fn pose_edits(args: &AnnotateArgs) -> Result<PoseEdits> {
    let merge = args.merge.iter().map(|p| PoseFile::from_json_file(p)).collect::<Result<Vec<_>>>()?;
    let translate = (args.translate_x.is_some() || args.translate_y.is_some())
        .then(|| (args.translate_x.unwrap_or(0.0), args.translate_y.unwrap_or(0.0)));
    Ok(PoseEdits { merge, flip: args.flip, scale: args.scale, translate })
}

/// `pose`: OpenPose JSON (keypoints) → the skeleton image ControlNet's openpose models were trained on.
/// `--width/--height` rescale the canvas (and the keypoints with it). A JSON list of poses (frames, as A1111
/// writes for several images) makes one image per element, `OUT/<stem>_<i>.png`.
fn run_pose(args: &AnnotateArgs) -> Result<ExitCode> {
    let frames = PoseFile::list_from_json_file(&args.input)?;
    if frames.is_empty() {
        return Err(Error::Invalid(format!("{}: the list holds no poses", args.input.display())));
    }
    let list = frames.len() > 1;
    if list && args.output.exists() && !args.output.is_dir() {
        return Err(Error::setting(
            "output",
            format!(
                "{}: {} holds a list of {} poses, so the output must be a folder, but this is a file",
                args.output.display(),
                args.input.display(),
                frames.len()
            ),
        ));
    }
    let edits = pose_edits(args)?;
    let edited = frames.into_iter().map(|p| edits.apply(p)).collect::<Result<Vec<_>>>()?;
    let opts = DrawOptions { body: !args.no_body, hands: !args.no_hands, face: !args.no_face };
    let images = edited
        .iter()
        .map(|p| {
            p.render_at(args.width, args.height, opts).map_err(|e| match e {
                Error::Invalid(msg) => Error::Invalid(format!("{}: {msg}", args.input.display())),
                e => e,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(json) = &args.save_json {
        let text = if list { PoseFile::list_to_json_string(&edited) } else { edited[0].to_json_string() };
        write_atomic(json, |tmp| std::fs::write(tmp, text).map_err(|e| Error::io(tmp, e)))?;
    }
    if !list {
        let out = if args.output.is_dir() { args.output.join(png_name(&args.input)) } else { args.output.clone() };
        write_image(&images[0], &out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let stem = args.input.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pose".into());
    let digits = (images.len() - 1).to_string().len();
    for (i, image) in images.iter().enumerate() {
        write_image(image, &args.output.join(format!("{stem}_{i:0digits$}.png")))?;
    }
    eprintln!("wrote {} poses into {}", images.len(), args.output.display());
    Ok(ExitCode::SUCCESS)
}

/// `inpaint`: image + mask → the float condition tensor in a safetensors file.
fn run_inpaint(args: &AnnotateArgs) -> Result<ExitCode> {
    let mask_path = args
        .mask
        .as_ref()
        .ok_or_else(|| Error::setting("mask", "inpaint needs a mask image (white where to inpaint)"))?;
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
    let control = annotate::inpaint::condition_at_size(&image, &mask, &args.settings())?;
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
