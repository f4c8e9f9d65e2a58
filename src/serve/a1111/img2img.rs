//! What `/sdapi/v1/img2img` adds to txt2img's fields (the init picture, the strength, the inpainting mask), and
//! txt2img's hires-fix fields; both map onto the pipeline's own `init_image`/`mask`/`strength` and `hires`.
use std::path::PathBuf;

use axum::http::StatusCode;
use image::RgbImage;
use serde_json::Value;

use super::fields::{is_empty, is_num, Fields};
use crate::pipeline::hires::{HiresFix, Upscaler, DEFAULT_HIRES_STRENGTH};
use crate::pipeline::inpaint::MaskedContent;
use crate::pipeline::GenerateRequest;
use crate::serve::error::ApiError;
use crate::serve::files::{decode_base64, decode_image};
use crate::serve::App;

/// A1111's img2img `denoising_strength` when none is sent.
pub const DEFAULT_DENOISING_STRENGTH: f64 = 0.75;
/// A1111's `mask_blur` when none is sent.
pub const DEFAULT_MASK_BLUR: u32 = 4;
/// A1111's `hr_scale` when none is sent.
pub const DEFAULT_HR_SCALE: f64 = 2.0;
/// A1111's `inpainting_fill` values in order: 0 "fill", 1 "original", 2 "latent noise", 3 "latent nothing".
const FILL_NAMES: [&str; 4] = ["fill", "original", "latent noise", "latent nothing"];

/// The img2img fields [`init_inputs`] reads.
pub const IMG2IMG_FIELDS: &[&str] = &[
    "init_images",
    "denoising_strength",
    "mask",
    "mask_blur",
    "mask_blur_x",
    "mask_blur_y",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "inpainting_mask_invert",
    "resize_mode",
    "image_cfg_scale",
    "initial_noise_multiplier",
    "include_init_images",
    "latent_mask",
    "mask_round",
];

/// The txt2img hires-fix fields [`hires`] reads.
pub const HIRES_FIELDS: &[&str] = &[
    "enable_hr",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "denoising_strength",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
];

fn internal(e: crate::Error) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// img2img: the init picture (and mask) saved as inputs and set on `r`; returns the init picture's file, which
/// a ControlNet unit without an image uses (as the extension does).
pub fn init_inputs(app: &App, f: &Fields, r: &mut GenerateRequest) -> Result<PathBuf, ApiError> {
    // 1. The picture: one base64 string (a data URL is fine).
    let pictures = match f.get("init_images") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::malformed("init_images", "expected a list of base64 pictures")),
        None => return Err(ApiError::field("init_images", "img2img needs a picture to start from")),
    };
    let text = match pictures.as_slice() {
        [Value::String(s)] => s.as_str(),
        [_] => return Err(ApiError::malformed("init_images[0]", "expected base64")),
        [] => return Err(ApiError::field("init_images", "img2img needs a picture to start from")),
        more => {
            return Err(ApiError::field(
                "init_images",
                format!("{} pictures: this server takes one init image per request", more.len()),
            ))
        }
    };
    let bytes = decode_base64("init_images[0]", text)?;
    let init = decode_image("init_images[0]", &bytes)?;
    let init_file = app.work.save_input(&bytes).map_err(internal)?;
    r.init_image = Some(init_file.clone());
    r.strength = Some(f.f64("denoising_strength")?.unwrap_or(DEFAULT_DENOISING_STRENGTH));

    // 2. Fields with one supported value.
    f.only_default("initial_noise_multiplier", is_num(1.0), "only 1 (the noise as drawn)")?;
    f.only_default("latent_mask", is_empty, "a separate latent mask")?;
    check_resize_mode(f, &init, r)?;

    // 3. The mask, and the inpainting settings that only act with one.
    match f.str("mask")?.filter(|m| !m.is_empty()) {
        Some(text) => {
            let bytes = decode_base64("mask", text)?;
            let mask = decode_image("mask", &bytes)?;
            if mask.dimensions() != init.dimensions() {
                return Err(ApiError::field(
                    "mask",
                    format!(
                        "is {}x{} but init_images[0] is {}x{}: the mask must cover the picture pixel for pixel",
                        mask.width(),
                        mask.height(),
                        init.width(),
                        init.height()
                    ),
                ));
            }
            // `inpainting_mask_invert` 1: black is repainted (A1111 inverts the mask before blurring it); the
            // inverted mask is kept as the input the recipe names.
            r.mask = Some(match mask_inverted(f)? {
                false => app.work.save_input(&bytes).map_err(internal)?,
                true => {
                    let mut inverted = mask;
                    image::imageops::invert(&mut inverted);
                    app.work.save_picture(&inverted).map_err(internal)?
                }
            });
            r.mask_blur = mask_blur(f)?;
            r.masked_content = check_inpaint_settings(f)?;
            // "Inpaint area: Only masked": A1111 crops as diffusers does (same region, "resize and fill", paste
            // back through the blurred mask). Absent: the whole picture.
            if f.bool("inpaint_full_res")? == Some(true) {
                let pad = f.usize("inpaint_full_res_padding")?.unwrap_or(0);
                let pad = u32::try_from(pad)
                    .map_err(|_| ApiError::field("inpaint_full_res_padding", format!("{pad} is too large")))?;
                r.padding_mask_crop = Some(pad);
            }
        }
        None => r.mask_blur = 0,
    }
    Ok(init_file)
}

/// `resize_mode` 0 ("Just resize") is how the pipeline fits the picture; the others only when there is nothing
/// to fit (the picture already has the output size).
fn check_resize_mode(f: &Fields, init: &RgbImage, r: &GenerateRequest) -> Result<(), ApiError> {
    let Some(mode) = f.get("resize_mode") else { return Ok(()) };
    let just_resize = mode.as_u64() == Some(0) || mode.as_str().is_some_and(|s| s.eq_ignore_ascii_case("just resize"));
    let same_size = r.width.unwrap_or(init.width() as usize) == init.width() as usize
        && r.height.unwrap_or(init.height() as usize) == init.height() as usize;
    if just_resize || same_size {
        return Ok(());
    }
    Err(ApiError::field(
        "resize_mode",
        format!("{mode} is not supported: the init image is stretched to the output size (0, \"Just resize\")"),
    ))
}

/// `inpainting_mask_invert`: 0 (white is repainted) or 1 (black is).
fn mask_inverted(f: &Fields) -> Result<bool, ApiError> {
    match f.i64("inpainting_mask_invert")? {
        None | Some(0) => Ok(false),
        Some(1) => Ok(true),
        Some(v) => Err(ApiError::field(
            "inpainting_mask_invert",
            format!("{v}: expected 0 (white is repainted) or 1 (black is repainted)"),
        )),
    }
}

/// `mask_blur` (A1111 sets both `mask_blur_x` and `_y` from it); different x and y blurs are refused.
fn mask_blur(f: &Fields) -> Result<u32, ApiError> {
    let read = |key: &str| -> Result<Option<u32>, ApiError> {
        f.usize(key)?
            .map(|v| u32::try_from(v).map_err(|_| ApiError::field(key, format!("{v} is too large"))))
            .transpose()
    };
    let blur = read("mask_blur")?;
    let (x, y) = (read("mask_blur_x")?, read("mask_blur_y")?);
    let blur = blur.or(x).or(y).unwrap_or(DEFAULT_MASK_BLUR);
    for (key, v) in [("mask_blur_x", x), ("mask_blur_y", y)] {
        if v.is_some_and(|v| v != blur) {
            return Err(ApiError::field(
                key,
                format!("{} differs from mask_blur {blur}: only a round blur", v.unwrap_or(0)),
            ));
        }
    }
    Ok(blur)
}

/// The inpainting settings: `inpainting_fill` as the pipeline's masked content (none sent: "original"), and
/// the fields with one supported value.
fn check_inpaint_settings(f: &Fields) -> Result<MaskedContent, ApiError> {
    let content = match f.i64("inpainting_fill")? {
        None | Some(1) => MaskedContent::Original,
        Some(2) => MaskedContent::LatentNoise,
        Some(3) => MaskedContent::LatentNothing,
        Some(fill) => {
            let name = usize::try_from(fill).ok().and_then(|i| FILL_NAMES.get(i)).copied().unwrap_or("unknown");
            return Err(ApiError::field(
                "inpainting_fill",
                format!(
                    "{fill} ({name}) is not supported: 1 (\"original\"), 2 (\"latent noise\") or 3 (\"latent nothing\")"
                ),
            ));
        }
    };
    f.only_default("mask_round", |v| v.as_bool() == Some(true), "the mask is always binarised")?;
    Ok(content)
}

/// txt2img's hires fix: `None` unless `enable_hr`; its fields are ignored while it is off (they change nothing).
pub fn hires(f: &Fields, r: &GenerateRequest) -> Result<Option<HiresFix>, ApiError> {
    if f.bool("enable_hr")? != Some(true) {
        return Ok(None);
    }
    let mut hires = HiresFix::new(f.f64("hr_scale")?.unwrap_or(DEFAULT_HR_SCALE));
    hires.steps = f.usize("hr_second_pass_steps")?.filter(|s| *s > 0);
    hires.strength = f.f64("denoising_strength")?.unwrap_or(DEFAULT_HIRES_STRENGTH);
    hires.upscaler = match f.str("hr_upscaler")? {
        None | Some("Latent") => Upscaler::Latent,
        // "None": A1111 resizes the decoded picture with Lanczos.
        Some("Lanczos" | "None") => Upscaler::Lanczos,
        Some(other) => {
            return Err(ApiError::field(
                "hr_upscaler",
                format!("{other:?} is not an upscaler this server has: \"Latent\", \"Lanczos\" or \"None\""),
            ))
        }
    };
    let resize = (f.usize("hr_resize_x")?.unwrap_or(0), f.usize("hr_resize_y")?.unwrap_or(0));
    if resize != (0, 0) {
        hires.scale = resize_scale(r, resize)?;
    }
    // The second pass's own model, sampler and prompts: only "the same".
    let same = |key: &str, same_as: &str| {
        f.only_default(
            key,
            |v| v.as_str().is_some_and(|s| s.is_empty() || s.starts_with("Use same") || s == same_as),
            "the second pass uses the first pass's",
        )
    };
    same("hr_checkpoint_name", "")?;
    same("hr_sampler_name", f.str("sampler_name")?.unwrap_or(""))?;
    same("hr_scheduler", "Automatic")?;
    same("hr_prompt", &r.prompt)?;
    same("hr_negative_prompt", &r.negative_prompt)?;
    Ok(Some(hires))
}

/// The scale that `hr_resize_x`/`_y` ask for (one of them 0: the aspect ratio is kept, as A1111); a size that
/// is not the first pass's times one scale (A1111 would crop) is refused.
fn resize_scale(r: &GenerateRequest, (x, y): (usize, usize)) -> Result<f64, ApiError> {
    let (Some(w), Some(h)) = (r.width, r.height) else {
        return Err(ApiError::field("hr_resize_x", "needs width and height (the first pass's size)"));
    };
    let scale = if x > 0 { x as f64 / w as f64 } else { y as f64 / h as f64 };
    let (want_x, want_y) = (if x > 0 { x } else { y * w / h }, if y > 0 { y } else { x * h / w });
    let got = HiresFix { scale, ..HiresFix::new(scale) }.size((w, h), 8);
    if got != (want_x, want_y) {
        return Err(ApiError::field(
            "hr_resize_x",
            format!(
                "{want_x}x{want_y} is not {w}x{h} times one scale in multiples of 8 (the second pass here is {}x{})",
                got.0, got.1
            ),
        ));
    }
    Ok(scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: &Value) -> Fields<'_> {
        Fields { path: String::new(), obj: v.as_object().unwrap() }
    }

    #[test]
    fn hires_fields_map_to_the_pipelines() {
        let r = GenerateRequest { width: Some(64), height: Some(48), ..Default::default() };
        assert_eq!(hires(&fields(&json!({ "hr_scale": 3 })), &r).unwrap(), None, "off without enable_hr");
        let body = json!({ "enable_hr": true, "hr_scale": 1.5, "hr_second_pass_steps": 0, "denoising_strength": 0.4,
            "hr_upscaler": "None", "hr_prompt": "", "hr_sampler_name": "Use same sampler" });
        let h = hires(&fields(&body), &r).unwrap().unwrap();
        assert_eq!((h.scale, h.steps, h.strength, h.upscaler), (1.5, None, 0.4, Upscaler::Lanczos));
        let h = hires(&fields(&json!({ "enable_hr": true, "hr_resize_x": 128 })), &r).unwrap().unwrap();
        assert_eq!(h.size((64, 48), 8), (128, 96));
        let err = |body: Value| hires(&fields(&body), &r).unwrap_err().detail();
        assert!(err(json!({ "enable_hr": true, "hr_upscaler": "ESRGAN_4x" })).starts_with("hr_upscaler: \"ESRGAN_4x\""));
        assert!(err(json!({ "enable_hr": true, "hr_resize_x": 128, "hr_resize_y": 128 }))
            .starts_with("hr_resize_x: 128x128"));
        assert!(err(json!({ "enable_hr": true, "hr_prompt": "a dog" })).starts_with("hr_prompt: "));
    }

    #[test]
    fn mask_blur_and_inpaint_settings() {
        assert_eq!(mask_blur(&fields(&json!({}))).unwrap(), DEFAULT_MASK_BLUR);
        assert_eq!(mask_blur(&fields(&json!({ "mask_blur": 2, "mask_blur_x": 2 }))).unwrap(), 2);
        assert!(mask_blur(&fields(&json!({ "mask_blur_x": 2, "mask_blur_y": 3 }))).is_err());
        let fill =
            |v: Value| check_inpaint_settings(&fields(&json!({ "inpainting_fill": v, "inpaint_full_res": false })));
        assert_eq!(fill(json!(1)).unwrap(), MaskedContent::Original);
        assert_eq!(fill(json!(2)).unwrap(), MaskedContent::LatentNoise);
        assert_eq!(fill(json!(3)).unwrap(), MaskedContent::LatentNothing);
        assert_eq!(check_inpaint_settings(&fields(&json!({}))).unwrap(), MaskedContent::Original);
        let e = fill(json!(0)).unwrap_err().detail();
        assert!(e.starts_with("inpainting_fill: 0 (fill) is not supported"), "{e}");
        assert!(fill(json!(4)).unwrap_err().detail().starts_with("inpainting_fill: 4 (unknown)"));
        assert!(fill(json!(-1)).unwrap_err().detail().starts_with("inpainting_fill: -1 (unknown)"));
    }
}
