//! Annotators ("preprocessors"): turn a picture into the control map a ControlNet was trained on.
//!
//! Each detector matches its reference implementation (OpenCV as ControlNet's `annotator/` calls it,
//! controlnet_aux, A1111's sd-webui-controlnet); see `docs/annotators.md` for the table of references.
//!
//! The recipe ([`annotate`]) is A1111's:
//! 1. pick the annotator resolution (default: [`resize::pixel_perfect_resolution`], so the map is made at the
//!    output size and never stretched);
//! 2. bring the image to that resolution as the detector asks ([`Preprocess`]);
//! 3. detect;
//! 4. fit the map to the output size with the [`ResizeMode`];
//! 5. finish at the output size ([`Detector::finish`]: scribble thinning, lineart's inversion).
//!
//! [`annotate_upstream`] is controlnet_aux's recipe instead (its `detect_resolution` and `image_resolution`,
//! sides rounded to multiples of 64), for maps that must equal what the Python preprocessors make.
//!
//! The neural detectors ([`neural`]: HED, PiDiNet, lineart, anime lineart, M-LSD, Depth Anything, MiDaS, OpenPose, DWPose, UperNet segmentation) are loaded once by [`detector`]
//! (their weights found by the `weights` setting) and then run on any number of images.
use image::{DynamicImage, RgbImage};

use crate::{Error, Result};

pub mod binary;
pub mod blur;
pub mod canny;
pub mod color;
pub mod cv;
pub mod draw;
pub mod inpaint;
pub mod invert;
pub mod lineart;
pub mod neural;
pub mod normal;
pub mod pose;
pub mod resize;
pub mod scribble;
pub mod shuffle;
pub mod tile;

pub(crate) use crate::io::images::check_image_size;
pub use resize::ResizeMode;

/// How the input is brought to the annotator resolution before [`Detector::detect`] (A1111's preprocessors
/// differ in this; each detector says which it wants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preprocess {
    /// The image as given (invert, tile).
    AsIs,
    /// Short side to the resolution: cubic when enlarging, area when shrinking (A1111's
    /// `resize_image_with_pad` followed by `remove_pad`).
    Resize,
    /// As [`Preprocess::Resize`], then edge-padded to a multiple of 64 for the detector, the padding cropped
    /// from its output (A1111's `resize_image_with_pad`; what models with 64-pixel strides need).
    ResizePad64,
    /// Short side to the resolution with area interpolation both ways (A1111's colour annotator).
    ResizeArea,
}

/// One way of making a control map from an RGB image.
pub trait Detector: Send + Sync {
    /// The kind name, as given to [`detector`].
    fn name(&self) -> &str;

    /// How the input should be brought to the annotator resolution; see [`Preprocess`].
    fn preprocess(&self) -> Preprocess {
        Preprocess::ResizePad64
    }

    /// The control map of `image`, at the size of `image` unless the detector changes it on purpose
    /// (tile's down-sampling, a model's output stride).
    fn detect(&self, image: &RgbImage) -> Result<RgbImage>;

    /// What the detector does to its map once it is at the output size (controlnet_aux's steps after its final
    /// resize: HED's and PiDiNet's scribble thinning, lineart's inversion); by default nothing.
    fn finish(&self, map: RgbImage) -> Result<RgbImage> {
        Ok(map)
    }

    /// The map with controlnet_aux-style sizes for a detector whose upstream sizes its own input and output
    /// (Depth Anything: `detect_resolution` is the net's input size, `image_resolution` the output's short side,
    /// nothing rounded to 64); `None` (the default): [`annotate_upstream`]'s recipe.
    fn annotate_sized(&self, _image: &RgbImage, _sizes: &UpstreamSizes) -> Option<Result<RgbImage>> {
        None
    }
}

/// Settings of all detectors; each reads the ones it takes (see [`Kind::settings`]) and falls back to its reference
/// default. A setting given to a detector that does not take it is refused by [`detector`], not ignored.
#[derive(Clone, Debug, Default)]
pub struct DetectorOptions {
    /// Canny's low threshold (default 100).
    pub low: Option<f64>,
    /// Canny's high threshold (default 200).
    pub high: Option<f64>,
    /// Seed of the random content shuffle (numpy's `np.random.seed`, so < 2^32; default 0).
    pub seed: Option<u32>,
    /// binary: grey threshold, 0 = Otsu (default 0); scribble: XDoG threshold (default 32).
    pub threshold: Option<f64>,
    /// blur: Gaussian sigma (default 9).
    pub sigma: Option<f64>,
    /// tile: down-sampling rate (default 1 = unchanged).
    pub rate: Option<f64>,
    /// normal, normal-midas: depth (0..1 after min-max normalisation) below which a pixel is flat background
    /// (default 0.4 for normal, A1111's; 0.1 for normal-midas, controlnet_aux's).
    pub bg_threshold: Option<f64>,
    /// Neural kinds: a weights folder (upstream file names), file or hub id (default [`neural::DEFAULT_REPO`]).
    pub weights: Option<String>,
    /// hed, pidinet: quantise the soft edges to a few levels (`safe_step`).
    pub safe: bool,
    /// hed, pidinet: thin the edges to scribble strokes.
    pub scribble: bool,
    /// pidinet: threshold the edges at 0.5.
    pub apply_filter: bool,
    /// lineart: the coarse net (`sk_model2.pth`).
    pub coarse: bool,
    /// mlsd: minimum line-centre score (controlnet_aux's `thr_v`, default 0.1).
    pub score_threshold: Option<f64>,
    /// mlsd: minimum segment length in net pixels (controlnet_aux's `thr_d`, default 0.1).
    pub distance_threshold: Option<f64>,
    // openpose
    /// openpose, dwpose: draw the body (default true; the body is detected either way, hands and face are found
    /// from it).
    pub include_body: Option<bool>,
    /// openpose: detect and draw the hands (the `openpose-hand` and `openpose-full` kinds always do); dwpose:
    /// draw the hands, and the face only if `include_face` too (without either flag dwpose draws both).
    pub include_hand: bool,
    /// openpose: detect and draw the face (the `openpose-face` and `openpose-full` kinds always do); dwpose: as
    /// `include_hand`.
    pub include_face: bool,
}

impl DetectorOptions {
    /// The names of the settings that were given (set to `Some`).
    pub fn given(&self) -> Vec<&'static str> {
        let all = [
            ("low", self.low.is_some()),
            ("high", self.high.is_some()),
            ("seed", self.seed.is_some()),
            ("threshold", self.threshold.is_some()),
            ("sigma", self.sigma.is_some()),
            ("rate", self.rate.is_some()),
            ("bg_threshold", self.bg_threshold.is_some()),
            ("weights", self.weights.is_some()),
            ("safe", self.safe),
            ("scribble", self.scribble),
            ("apply_filter", self.apply_filter),
            ("coarse", self.coarse),
            ("score_threshold", self.score_threshold.is_some()),
            ("distance_threshold", self.distance_threshold.is_some()),
            ("include_body", self.include_body.is_some()),
            ("include_hand", self.include_hand),
            ("include_face", self.include_face),
        ];
        all.into_iter().filter(|(_, given)| *given).map(|(name, _)| name).collect()
    }
}

/// What a kind makes its map from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// A picture: the kinds [`detector`] builds.
    Image,
    /// A picture and a mask of the same size ([`inpaint::condition`]); the result is a float tensor.
    ImageAndMask,
    /// OpenPose JSON keypoints, drawn as a skeleton ([`pose::PoseFile`]).
    PoseJson,
}

impl Input {
    /// The size settings every kind with this input takes, besides its own [`Kind::settings`].
    pub fn common_settings(self) -> &'static [&'static str] {
        match self {
            Input::Image => &["width", "height", "resolution", "resize"],
            Input::ImageAndMask => &["width", "height", "resize"],
            Input::PoseJson => &["width", "height"],
        }
    }

    fn phrase(self) -> &'static str {
        match self {
            Input::Image => "from an image",
            Input::ImageAndMask => "from an image and a mask",
            Input::PoseJson => "from OpenPose JSON keypoints",
        }
    }
}

/// An annotator kind: its name, what it is made from, the settings it takes and what it makes.
pub struct Kind {
    pub name: &'static str,
    pub input: Input,
    /// The settings of this kind, by their library names ([`DetectorOptions`] fields, the mask, the pose edits),
    /// besides [`Input::common_settings`].
    pub settings: &'static [&'static str],
    pub summary: &'static str,
}

impl Kind {
    /// Whether this kind takes the setting `name`.
    pub fn takes(&self, name: &str) -> bool {
        self.settings.contains(&name) || self.input.common_settings().contains(&name)
    }
}

/// The settings every neural kind takes: its weights and controlnet_aux's two resolutions.
macro_rules! neural_settings {
    ($($extra:literal),*) => {
        &["weights", "detect_resolution", "image_resolution" $(, $extra)*]
    };
}

/// The settings of `annotate pose`'s keypoint edits and drawing.
const POSE_SETTINGS: &[&str] =
    &["flip", "scale", "translate_x", "translate_y", "merge", "no_body", "no_hands", "no_face", "save_json"];

/// The settings of the openpose kinds and dwpose.
const OPENPOSE_SETTINGS: &[&str] = neural_settings!("include_body", "include_hand", "include_face", "save_json");

/// Every annotator kind, the one list that help texts and errors are made from.
pub const KINDS: &[Kind] = &[
    Kind {
        name: "canny",
        input: Input::Image,
        settings: &["low", "high"],
        summary: "Canny edges (cv2.Canny on the RGB image)",
    },
    Kind {
        name: "shuffle",
        input: Input::Image,
        settings: &["seed"],
        summary: "content shuffle: the image warped by a seeded random flow",
    },
    Kind {
        name: "lineart-standard",
        input: Input::Image,
        settings: &[],
        summary: "standard lineart: difference of Gaussians (A1111 lineart_standard)",
    },
    Kind {
        name: "color",
        input: Input::Image,
        settings: &[],
        summary: "colour palette: 64x smaller cubic, then nearest up",
    },
    Kind {
        name: "binary",
        input: Input::Image,
        settings: &["threshold"],
        summary: "black/white threshold (Otsu when the threshold is 0)",
    },
    Kind {
        name: "invert",
        input: Input::Image,
        settings: &[],
        summary: "255 - image (white lines on black from black lines on white)",
    },
    Kind {
        name: "scribble",
        input: Input::Image,
        settings: &["threshold"],
        summary: "scribble from XDoG (A1111 scribble_xdog)",
    },
    Kind {
        name: "tile",
        input: Input::Image,
        settings: &["rate"],
        summary: "tile resample: area down-sampling by the rate",
    },
    Kind { name: "blur", input: Input::Image, settings: &["sigma"], summary: "Gaussian blur (A1111 blur_gaussian)" },
    Kind {
        name: "normal",
        input: Input::Image,
        settings: &["bg_threshold"],
        summary: "normal map from a depth image (ControlNet's MiDaS normal)",
    },
    Kind {
        name: "hed",
        input: Input::Image,
        settings: neural_settings!("safe", "scribble"),
        summary: "HED soft edges (ControlNetHED.pth)",
    },
    Kind {
        name: "pidinet",
        input: Input::Image,
        settings: neural_settings!("safe", "scribble", "apply_filter"),
        summary: "PiDiNet soft edges (table5_pidinet.pth)",
    },
    Kind {
        name: "lineart",
        input: Input::Image,
        settings: neural_settings!("coarse"),
        summary: "line art from photos (sk_model.pth; sk_model2.pth when coarse)",
    },
    Kind {
        name: "lineart-anime",
        input: Input::Image,
        settings: neural_settings!(),
        summary: "anime line art (netG.pth)",
    },
    Kind {
        name: "mlsd",
        input: Input::Image,
        settings: neural_settings!("score_threshold", "distance_threshold"),
        summary: "M-LSD straight lines (mlsd_large_512_fp32.pth)",
    },
    Kind {
        name: "depth-anything",
        input: Input::Image,
        settings: neural_settings!("save_raw"),
        summary: "Depth Anything V2 relative depth (transformers layout or depth_anything_v2_vit*.pth)",
    },
    Kind {
        name: "depth-midas",
        input: Input::Image,
        settings: neural_settings!("save_raw"),
        summary: "MiDaS DPT-Hybrid relative depth (dpt_hybrid-midas-501f0c75.pt)",
    },
    Kind {
        name: "normal-midas",
        input: Input::Image,
        settings: neural_settings!("bg_threshold"),
        summary: "normal map from MiDaS depth (dpt_hybrid-midas-501f0c75.pt)",
    },
    Kind {
        name: "normal-bae",
        input: Input::Image,
        settings: neural_settings!(),
        summary: "NormalBAE surface normals (scannet.pt)",
    },
    Kind {
        name: "seg",
        input: Input::Image,
        settings: neural_settings!(),
        summary: "ADE20K segmentation, UperNet + ConvNeXt (openmmlab/upernet-convnext-small), ADE20K palette",
    },
    Kind {
        name: "openpose",
        input: Input::Image,
        settings: OPENPOSE_SETTINGS,
        summary: "OpenPose body (body_pose_model.pth; hands and face with their flags)",
    },
    Kind {
        name: "openpose-hand",
        input: Input::Image,
        settings: OPENPOSE_SETTINGS,
        summary: "OpenPose body and hands (+ hand_pose_model.pth)",
    },
    Kind {
        name: "openpose-face",
        input: Input::Image,
        settings: OPENPOSE_SETTINGS,
        summary: "OpenPose body and face (+ facenet.pth)",
    },
    Kind {
        name: "openpose-full",
        input: Input::Image,
        settings: OPENPOSE_SETTINGS,
        summary: "OpenPose body, hands and face",
    },
    Kind {
        name: "dwpose",
        input: Input::Image,
        settings: OPENPOSE_SETTINGS,
        summary: "DWPose whole-body pose, drawn as OpenPose (yolox_l.onnx + dw-ll_ucoco_384.onnx, hub yzd-v/DWPose)",
    },
    Kind {
        name: "inpaint",
        input: Input::ImageAndMask,
        settings: &["mask"],
        summary: "inpaint condition: the image with masked pixels at -1, a float tensor",
    },
    Kind {
        name: "pose",
        input: Input::PoseJson,
        settings: POSE_SETTINGS,
        summary: "OpenPose skeleton drawn from keypoints (controlnet_aux's drawing)",
    },
];

/// The kind names grouped by what each is made from: "canny, shuffle, … (from an image); inpaint (from an image
/// and a mask); pose (from OpenPose JSON keypoints)", for help and error messages.
pub fn kind_names() -> String {
    [Input::Image, Input::ImageAndMask, Input::PoseJson]
        .iter()
        .map(|&input| {
            let names: Vec<&str> = KINDS.iter().filter(|k| k.input == input).map(|k| k.name).collect();
            format!("{} ({})", names.join(", "), input.phrase())
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The kind called `name`, or an error listing every kind with what it is made from.
pub fn kind(name: &str) -> Result<&'static Kind> {
    KINDS
        .iter()
        .find(|k| k.name == name)
        .ok_or_else(|| Error::Invalid(format!("unknown annotator kind '{name}'; the kinds are {}", kind_names())))
}

/// Refuses a setting that `kind` does not take (`annotate canny` with a blur sigma), naming the kinds that do.
pub fn check_settings(kind: &Kind, given: &[&str]) -> Result<()> {
    for &name in given {
        if !kind.takes(name) {
            let users: Vec<&str> = KINDS.iter().filter(|k| k.takes(name)).map(|k| k.name).collect();
            let used_by = if users.is_empty() { String::new() } else { format!(" (used by {})", users.join(", ")) };
            return Err(Error::setting(name, format!("does not apply to {}{used_by}", kind.name)));
        }
    }
    Ok(())
}

/// Build the detector called `kind` with `options`; the kinds made from an image only (see [`Kind::input`]).
pub fn detector(kind: &str, options: &DetectorOptions) -> Result<Box<dyn Detector>> {
    let k = self::kind(kind)?;
    if k.input != Input::Image {
        return Err(Error::Invalid(format!(
            "{kind} is made {}, not detected in an image; the image kinds are {}",
            k.input.phrase(),
            image_kind_names()
        )));
    }
    check_settings(k, &options.given())?;
    let positive = |name: &str, v: Option<f64>, default: f64| -> Result<f64> {
        let v = v.unwrap_or(default);
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(Error::setting(name, format!("must be a positive number, got {v}")))
        }
    };
    if let Some(neural) = neural::detector(kind, options)? {
        return Ok(neural);
    }
    Ok(match kind {
        "canny" => Box::new(canny::Canny {
            low: options.low.unwrap_or(canny::DEFAULT_LOW),
            high: options.high.unwrap_or(canny::DEFAULT_HIGH),
        }),
        "shuffle" => Box::new(shuffle::Shuffle { seed: options.seed.unwrap_or(0) }),
        "lineart-standard" => Box::new(lineart::LineartStandard),
        "color" => Box::new(color::Color),
        "binary" => Box::new(binary::Binary { threshold: options.threshold.unwrap_or(binary::DEFAULT_THRESHOLD) }),
        "invert" => Box::new(invert::Invert),
        "scribble" => {
            Box::new(scribble::ScribbleXdog { threshold: options.threshold.unwrap_or(scribble::DEFAULT_THRESHOLD) })
        }
        "tile" => Box::new(tile::TileResample { rate: positive("rate", options.rate, tile::DEFAULT_RATE)? }),
        "blur" => Box::new(blur::BlurGaussian { sigma: positive("sigma", options.sigma, blur::DEFAULT_SIGMA)? }),
        "normal" => Box::new(normal::NormalFromDepth {
            bg_threshold: options.bg_threshold.unwrap_or(normal::DEFAULT_BG_THRESHOLD),
            z: normal::DEFAULT_Z,
        }),
        other => return Err(Error::Invalid(format!("annotator kind '{other}' has no detector yet"))),
    })
}

/// The names of the kinds [`detector`] builds.
fn image_kind_names() -> String {
    KINDS.iter().filter(|k| k.input == Input::Image).map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// Output size, annotator resolution and resize mode of one [`annotate`] call.
#[derive(Clone, Copy, Debug, Default)]
pub struct AnnotateSettings {
    /// Output width; default: the input's (or kept to the input's aspect if only `height` is given).
    pub width: Option<u32>,
    /// Output height; default like `width`.
    pub height: Option<u32>,
    /// Annotator resolution (short side the detector sees); default: pixel perfect.
    pub resolution: Option<u32>,
    pub resize: ResizeMode,
}

impl AnnotateSettings {
    /// The output `(width, height)` for an input of `(w, h)`, refused before anything is allocated when a side
    /// is 0 or the image would not fit in memory.
    pub fn output_size(&self, w: u32, h: u32) -> Result<(u32, u32)> {
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if v == Some(0) {
                return Err(Error::setting(name, "must be at least 1, got 0"));
            }
        }
        let keep = |other: u32, num: u32, den: u32| ((other as f64 * num as f64 / den as f64).round() as u32).max(1);
        let size = match (self.width, self.height) {
            (Some(tw), Some(th)) => (tw, th),
            (Some(tw), None) => (tw, keep(tw, h, w)),
            (None, Some(th)) => (keep(th, w, h), th),
            (None, None) => (w, h),
        };
        check_image_size(self.size_setting(), size.0, size.1)?;
        Ok(size)
    }

    /// The setting an output size error is about: the side that was given.
    fn size_setting(&self) -> &'static str {
        if self.width.is_none() && self.height.is_some() {
            "height"
        } else {
            "width"
        }
    }
}

/// Make the control map of `image` with `detector` (the recipe in the module docs).
pub fn annotate(detector: &dyn Detector, image: &RgbImage, settings: &AnnotateSettings) -> Result<RgbImage> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::Invalid(format!("{}: the image is empty ({w}x{h})", detector.name())));
    }
    // 1. annotator resolution
    let (out_w, out_h) = settings.output_size(w, h)?;
    let resolution = match settings.resolution {
        Some(0) => return Err(Error::setting("resolution", "must be at least 1, got 0")),
        Some(r) => r,
        None => resize::pixel_perfect_resolution(w, h, out_w, out_h, settings.resize),
    };
    if detector.preprocess() != Preprocess::AsIs {
        let (dw, dh) = resize::short_side_size(w, h, resolution);
        let setting = if settings.resolution.is_some() { "resolution" } else { settings.size_setting() };
        check_image_size(setting, dw, dh)?;
    }
    // 2. preprocess
    let src = cv::Mat::from_rgb(image);
    let (prepared, crop) = match detector.preprocess() {
        Preprocess::AsIs => (src, None),
        Preprocess::Resize => (resize::resize_short_side(&src, resolution), None),
        Preprocess::ResizePad64 => {
            let resized = resize::resize_short_side(&src, resolution);
            let size = (resized.width as u32, resized.height as u32);
            (resize::pad_to_64(&resized), Some(size))
        }
        Preprocess::ResizeArea => (resize::resize_short_side_area(&src, resolution), None),
    };
    // 3. detect (and drop the padding)
    let mut map = detector.detect(&prepared.to_rgb())?;
    if let Some((cw, ch)) = crop {
        if map.dimensions() != (cw, ch) {
            map = image::imageops::crop_imm(&map, 0, 0, cw.min(map.width()), ch.min(map.height())).to_image();
        }
    }
    // 4. fit to the output, 5. finish there
    detector.finish(resize::fit_to_output(&map, out_w, out_h, settings.resize))
}

/// controlnet_aux's two sizes: the short side the net runs at and the output's short side, each rounded to
/// multiples of 64 on both sides (upstream's default for both is 512).
#[derive(Clone, Copy, Debug, Default)]
pub struct UpstreamSizes {
    pub detect_resolution: Option<u32>,
    pub image_resolution: Option<u32>,
}

/// controlnet_aux's default `detect_resolution` and `image_resolution`.
pub const UPSTREAM_RESOLUTION: u32 = 512;

impl UpstreamSizes {
    /// Whether either size is given (then [`annotate_upstream`] is the recipe).
    pub fn given(&self) -> bool {
        self.detect_resolution.is_some() || self.image_resolution.is_some()
    }
}

/// Make the control map of `image` as controlnet_aux's detectors do: the input to `detect_resolution`
/// (`resize_image`: short side, then both sides to multiples of 64; Lanczos up, area down), the detector, the map
/// resized (linear) to that image brought to `image_resolution` the same way, then [`Detector::finish`].
pub fn annotate_upstream(detector: &dyn Detector, image: &RgbImage, sizes: &UpstreamSizes) -> Result<RgbImage> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::Invalid(format!("{}: the image is empty ({w}x{h})", detector.name())));
    }
    if let Some(map) = detector.annotate_sized(image, sizes) {
        return map;
    }
    // 1. the net's input
    let (input, (ow, oh)) = upstream_input(image, sizes)?;
    // 2. detect
    let map = detector.detect(&input)?;
    // 3. to the output size, 4. finish
    let map = cv::resize_u8(&cv::Mat::from_rgb(&map), ow as usize, oh as usize, cv::Interpolation::Linear);
    detector.finish(map.to_rgb())
}

/// controlnet_aux's net input for `image` (at `detect_resolution`) and the output size (`image_resolution`
/// applied to that input), both checked: steps 1 and 3 of [`annotate_upstream`].
pub fn upstream_input(image: &RgbImage, sizes: &UpstreamSizes) -> Result<(RgbImage, (u32, u32))> {
    let (w, h) = image.dimensions();
    let detect = sizes.detect_resolution.unwrap_or(UPSTREAM_RESOLUTION);
    let output = sizes.image_resolution.unwrap_or(UPSTREAM_RESOLUTION);
    let (dw, dh) = resize::controlnet_aux_size(w, h, detect);
    check_upstream_size("detect_resolution", detect, (w, h), (dw, dh))?;
    let (ow, oh) = resize::controlnet_aux_size(dw, dh, output);
    check_upstream_size("image_resolution", output, (dw, dh), (ow, oh))?;
    let input = resize::controlnet_aux_resize(&cv::Mat::from_rgb(image), detect);
    Ok((input.to_rgb(), (ow, oh)))
}

/// controlnet_aux's sizes replace ours: refuse a run given both (`given`: the setting names given).
pub fn check_sizes_exclusive(given: &[&str]) -> Result<()> {
    let upstream = given.iter().find(|g| ["detect_resolution", "image_resolution"].contains(g));
    let ours = given.iter().find(|g| ["width", "height", "resolution", "resize"].contains(g));
    match (upstream, ours) {
        (Some(u), Some(o)) => Err(Error::setting(
            *u,
            format!("sizes the map as controlnet_aux does, which does not combine with the {o} setting"),
        )),
        _ => Ok(()),
    }
}

/// The map of `image` by controlnet_aux's recipe when `upstream` gives a size, else by ours.
pub fn annotate_with(
    detector: &dyn Detector,
    image: &RgbImage,
    settings: &AnnotateSettings,
    upstream: &UpstreamSizes,
) -> Result<RgbImage> {
    if upstream.given() {
        annotate_upstream(detector, image, upstream)
    } else {
        annotate(detector, image, settings)
    }
}

/// Refuse a resolution that rounds a side to 0 or makes an image too large to allocate.
fn check_upstream_size(setting: &str, resolution: u32, from: (u32, u32), to: (u32, u32)) -> Result<()> {
    if to.0 == 0 || to.1 == 0 {
        // the short side becomes the resolution itself, which rounds to 0 below 33
        return Err(Error::setting(
            setting,
            format!(
                "{resolution} makes a {}x{} image {}x{} (sides round to multiples of 64): use at least 33",
                from.0, from.1, to.0, to.1
            ),
        ));
    }
    check_image_size(setting, to.0, to.1)
}

/// ControlNet's `HWC3`: grey to three equal channels, transparent pixels composited onto white.
pub fn hwc3(image: &DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let alpha = p[3] as f32 / 255.0;
        for c in 0..3 {
            // float32 then truncation, as numpy's astype(uint8)
            let v = p[c] as f32 * alpha + 255.0 * (1.0 - alpha);
            o[c] = v.clamp(0.0, 255.0) as u8;
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Reading the fixtures made by `tools/fixtures/gen_annotators.py`.
    use image::RgbImage;
    use serde::Deserialize;

    pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/annotators");

    #[derive(Deserialize, Debug, Clone)]
    pub struct Case {
        pub kind: String,
        pub input: String,
        pub output: String,
        #[serde(default)]
        pub mask: Option<String>,
        pub params: serde_json::Map<String, serde_json::Value>,
    }

    impl Case {
        pub fn f64(&self, key: &str) -> f64 {
            self.params[key].as_f64().unwrap_or_else(|| panic!("{}: no {key}", self.output))
        }
        pub fn str(&self, key: &str) -> &str {
            self.params[key].as_str().unwrap_or_else(|| panic!("{}: no {key}", self.output))
        }
    }

    #[derive(Deserialize)]
    struct Manifest {
        cases: Vec<Case>,
    }

    pub fn cases(kind: &str) -> Vec<Case> {
        let text = std::fs::read_to_string(format!("{DIR}/manifest.json")).unwrap();
        let m: Manifest = serde_json::from_str(&text).unwrap();
        let cases: Vec<Case> = m.cases.into_iter().filter(|c| c.kind == kind).collect();
        assert!(!cases.is_empty(), "no fixture cases for {kind}");
        cases
    }

    pub fn load(name: &str) -> RgbImage {
        image::open(format!("{DIR}/{name}")).unwrap().to_rgb8()
    }

    /// Per-sample absolute differences of two images of the same size (panics on a size mismatch).
    pub fn abs_diffs(a: &RgbImage, b: &RgbImage, what: &str) -> Vec<u8> {
        assert_eq!(a.dimensions(), b.dimensions(), "{what}: size");
        a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| x.abs_diff(y)).collect()
    }

    /// The "numerically close" metric of most detector tests: mean |diff| ≤ `max_mean` grey levels and at
    /// least `min_within` of the samples within `tol` levels.
    pub fn assert_close(ours: &RgbImage, reference: &RgbImage, max_mean: f64, tol: u8, min_within: f64, what: &str) {
        let d = abs_diffs(ours, reference, what);
        let mean = d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64;
        let within = d.iter().filter(|&&v| v <= tol).count() as f64 / d.len() as f64;
        let max = d.iter().max().copied().unwrap_or(0);
        eprintln!("{what}: mean |diff| {mean:.4}, within {tol}: {:.4}%, max {max}", within * 100.0);
        assert!(
            mean <= max_mean && within >= min_within,
            "{what}: mean |diff| {mean:.4} (limit {max_mean}), within {tol}: {within:.4} (limit {min_within}), max {max}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kind_lists_every_kind_with_its_input() {
        let err = detector("depth", &DetectorOptions::default()).err().unwrap().to_string();
        assert!(err.starts_with("unknown annotator kind 'depth'; the kinds are canny,"), "{err}");
        for k in KINDS {
            assert!(err.contains(k.name), "{} missing from {err}", k.name);
        }
        assert!(err.contains("pose (from OpenPose JSON keypoints)"), "{err}");
        assert!(err.contains("inpaint (from an image and a mask)"), "{err}");
    }

    #[test]
    fn image_kinds_build_and_the_others_say_what_they_need() {
        for k in KINDS {
            // neural kinds read the fixture's weights (tests never download)
            let weights = k.takes("weights").then(|| match k.name {
                "depth-anything" => neural::test_support2::da_weights("hf").display().to_string(),
                "seg" => concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/annotators_seg/upernet").to_string(),
                "depth-midas" | "normal-midas" => {
                    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/annotators_midas").to_string()
                }
                "normal-bae" => concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/annotators_normalbae").to_string(),
                n if n.starts_with("openpose") => {
                    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/openpose/weights").to_string()
                }
                "dwpose" => concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dwpose/weights").to_string(),
                _ => format!("{}/weights", neural::test_support::DIR),
            });
            let d = detector(k.name, &DetectorOptions { weights, ..Default::default() });
            match k.input {
                Input::Image => assert_eq!(d.unwrap().name(), k.name),
                _ => {
                    let err = d.err().unwrap().to_string();
                    assert!(err.contains(k.input.phrase()) && !err.contains("::"), "{err}");
                    let offered: Vec<&str> = err.rsplit("are ").next().unwrap().split(", ").collect();
                    assert!(
                        !offered.contains(&"inpaint") && !offered.contains(&"pose"),
                        "only image kinds offered: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_numbers_name_their_setting() {
        let o = DetectorOptions { sigma: Some(-1.0), ..Default::default() };
        let err = detector("blur", &o).err().unwrap().to_string();
        assert!(err.starts_with("sigma: must be a positive number"), "{err}");
    }

    #[test]
    fn settings_of_other_kinds_are_refused() {
        let o = DetectorOptions { sigma: Some(3.0), ..Default::default() };
        let err = detector("canny", &o).err().unwrap().to_string();
        assert_eq!(err, "sigma: does not apply to canny (used by blur)");
        let err = check_settings(kind("canny").unwrap(), &["flip"]).unwrap_err().to_string();
        assert!(err.starts_with("flip: does not apply to canny (used by pose)"), "{err}");
        assert!(check_settings(kind("pose").unwrap(), &["width", "flip"]).is_ok());
        assert!(check_settings(kind("pose").unwrap(), &["resolution"]).is_err());
        assert!(check_settings(kind("inpaint").unwrap(), &["mask", "resize"]).is_ok());
    }

    #[test]
    fn empty_image_is_an_error() {
        let d = detector("invert", &DetectorOptions::default()).unwrap();
        let err = annotate(d.as_ref(), &RgbImage::new(0, 5), &AnnotateSettings::default());
        assert!(err.is_err());
    }

    #[test]
    fn default_output_keeps_the_input_size() {
        // pixel perfect: canny runs at the input's size, so the map equals the direct call
        let img = test_support::load("input_odd.png");
        let d = detector("canny", &DetectorOptions::default()).unwrap();
        let out = annotate(d.as_ref(), &img, &AnnotateSettings::default()).unwrap();
        assert_eq!(out.dimensions(), img.dimensions());
        let direct = d.detect(&img).unwrap();
        // the pipeline pads to 64 with replicated edges; only the last rows/columns may differ
        let (w, h) = img.dimensions();
        for y in 0..h - 2 {
            for x in 0..w - 2 {
                assert_eq!(out.get_pixel(x, y), direct.get_pixel(x, y), "({x}, {y})");
            }
        }
    }

    #[test]
    fn output_size_keeps_aspect_when_one_side_is_given() {
        let s = AnnotateSettings { width: Some(200), ..Default::default() };
        assert_eq!(s.output_size(100, 50).unwrap(), (200, 100));
    }

    /// A zero side is reported as given ("height: … got 0"), not as the size it led to ("0x1").
    #[test]
    fn zero_sizes_name_the_setting_and_the_value_given() {
        for (s, name) in [
            (AnnotateSettings { width: Some(0), ..Default::default() }, "width"),
            (AnnotateSettings { height: Some(0), ..Default::default() }, "height"),
            (AnnotateSettings { width: Some(64), height: Some(0), ..Default::default() }, "height"),
        ] {
            let err = s.output_size(100, 50).unwrap_err().to_string();
            assert_eq!(err, format!("{name}: must be at least 1, got 0"));
        }
        let d = detector("canny", &DetectorOptions::default()).unwrap();
        let s = AnnotateSettings { resolution: Some(0), ..Default::default() };
        let err = annotate(d.as_ref(), &RgbImage::new(8, 8), &s).unwrap_err().to_string();
        assert_eq!(err, "resolution: must be at least 1, got 0");
    }

    /// Sizes that cannot be allocated are refused with the figure before anything is allocated (they aborted
    /// the process before).
    #[test]
    fn huge_sizes_are_refused_before_allocating() {
        let s = AnnotateSettings { width: Some(100_000), height: Some(100_000), ..Default::default() };
        let err = s.output_size(64, 64).unwrap_err().to_string();
        assert!(err.starts_with("width: a 100000x100000 image needs about"), "{err}");
        let d = detector("canny", &DetectorOptions::default()).unwrap();
        let s = AnnotateSettings { resolution: Some(100_000), ..Default::default() };
        let err = annotate(d.as_ref(), &RgbImage::new(64, 64), &s).unwrap_err().to_string();
        assert!(err.starts_with("resolution: a 100000x100000 image needs about"), "{err}");
    }

    #[test]
    fn hwc3_composites_alpha_onto_white() {
        let mut rgba = image::RgbaImage::new(1, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 100, 200, 128]));
        let out = hwc3(&DynamicImage::ImageRgba8(rgba));
        // numpy: (c * a + 255 * (1 - a)) with a = 128/255, truncated
        let a = 128f32 / 255.0;
        let expect = |c: f32| (c * a + 255.0 * (1.0 - a)) as u8;
        assert_eq!(out.get_pixel(0, 0).0, [expect(0.0), expect(100.0), expect(200.0)]);
    }
}
