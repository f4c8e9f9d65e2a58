//! Conditions as a request gives them (an image, OpenPose keypoints, a float tensor) → the tensor a ControlNet
//! takes at the output size: annotated when asked, fitted by the resize mode, converted to the net's channels.
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::request::{control_setting, ControlRequest};
use crate::annotate::pose::{DrawOptions, PoseFile};
use crate::annotate::{self, AnnotateSettings, DetectorOptions, ResizeMode};
use crate::io::images::{self, ResampleFilter};
use crate::{Error, Result};

/// Whether `control` names a float condition tensor (used as it is: never resized, annotated or saved).
pub fn is_condition_tensor(control: &Path) -> bool {
    control.extension().is_some_and(|e| e == "safetensors")
}

/// A condition as the request gave it.
pub enum ControlSource {
    Image(RgbImage),
    /// OpenPose keypoints, for `preprocess` = `pose`.
    Pose(PoseFile),
    /// A float condition `control` of shape (1, channels, height, width) (e.g. `annotate inpaint`'s, with -1 at
    /// masked pixels).
    Tensor(Tensor),
}

/// A condition at the output size: the tensor the net takes, and the picture of it when it is one.
pub struct FittedCondition {
    /// (1, channels, height, width) in [0, 1] (a tensor condition: as given), on the model's device.
    pub tensor: Tensor,
    /// The condition as an 8-bit image (a grey condition is shown as grey RGB); `None` for a tensor condition.
    pub image: Option<RgbImage>,
}

impl ControlSource {
    /// Reads condition `index` of a request; errors name `controls[index].control` and the file.
    pub fn load(index: usize, c: &ControlRequest) -> Result<Self> {
        let setting = || control_setting(index, "control");
        let named = |e: Error| Error::setting(setting(), e);
        if c.preprocess.as_deref() == Some("pose") {
            let pose = PoseFile::from_json_file(&c.control).map_err(named)?;
            if pose.canvas_size().is_none() {
                return Err(Error::setting(
                    setting(),
                    format!("{}: the pose has no canvas_width/canvas_height", c.control.display()),
                ));
            }
            return Ok(Self::Pose(pose));
        }
        if is_condition_tensor(&c.control) {
            let file = c.control.display();
            let mut tensors = candle_core::safetensors::load(&c.control, &Device::Cpu)
                .map_err(|e| Error::setting(setting(), format!("{file}: {e}")))?;
            let t = tensors
                .remove("control")
                .ok_or_else(|| Error::setting(setting(), format!("{file}: has no tensor named control")))?;
            if t.rank() != 4 || t.dim(0)? != 1 {
                return Err(Error::setting(
                    setting(),
                    format!("{file}: control must have shape (1, channels, height, width), found {:?}", t.dims()),
                ));
            }
            return Ok(Self::Tensor(t.to_dtype(DType::F32)?));
        }
        Ok(Self::Image(images::load_rgb(&c.control).map_err(named)?))
    }

    /// Width and height as given (a pose's canvas).
    pub fn size(&self) -> (u32, u32) {
        match self {
            Self::Image(img) => img.dimensions(),
            Self::Pose(p) => p.canvas_size().unwrap_or((0, 0)),
            Self::Tensor(t) => {
                let d = t.dims();
                (d[3] as u32, d[2] as u32)
            }
        }
    }

    /// The condition at `width`×`height` for a net taking `channels` conditioning channels. `mask` is the
    /// request's inpainting mask, which `preprocess` = `inpaint` combines with the picture.
    #[allow(clippy::too_many_arguments)]
    pub fn fit(
        &self,
        index: usize,
        c: &ControlRequest,
        (width, height): (usize, usize),
        mode: ResizeMode,
        channels: usize,
        mask: Option<&RgbImage>,
        device: &Device,
    ) -> Result<FittedCondition> {
        let setting = |field: &str| control_setting(index, field);
        if let (Self::Image(img), Some("inpaint")) = (self, c.preprocess.as_deref()) {
            return inpaint_condition(index, c, img, mask, (width as u32, height as u32), mode, channels, device);
        }
        if let Self::Tensor(t) = self {
            let (_, ch, h, w) = t.dims4()?;
            if (w, h) != (width, height) || ch != channels {
                return Err(Error::setting(
                    setting("control"),
                    format!(
                        "{}: the condition tensor is {ch}×{h}×{w} (channels×height×width) but the ControlNet needs \
                         {channels}×{height}×{width}; a tensor is used as it is, not resized",
                        c.control.display()
                    ),
                ));
            }
            return Ok(FittedCondition { tensor: t.to_device(device)?, image: None });
        }
        let rgb = self.picture(index, c, width as u32, height as u32, mode)?;
        match channels {
            3 => Ok(FittedCondition { tensor: images::to_tensor01(&rgb, device)?, image: Some(rgb) }),
            // A single-channel net (depth, a mask) gets the picture's luma, as PIL's convert("L").
            1 => {
                let grey = grey_rgb(&rgb);
                let (w, h) = grey.dimensions();
                let data: Vec<f32> = grey.as_raw().iter().step_by(3).map(|&v| f32::from(v) / 255.0).collect();
                let tensor = Tensor::from_vec(data, (1, 1, h as usize, w as usize), device)?;
                Ok(FittedCondition { tensor, image: Some(grey) })
            }
            n => Err(Error::setting(
                setting("control"),
                format!(
                    "{}: the ControlNet takes {n} conditioning channels; a picture gives 3 (RGB) or 1 (grey): give a \
                     .safetensors file with a float tensor `control` of shape (1, {n}, {height}, {width})",
                    c.control.display()
                ),
            )),
        }
    }

    /// The picture at the output size: annotated with `preprocess`, fitted with `mode`, then resized as
    /// diffusers does (Lanczos; a plain copy when the size already matches).
    fn picture(&self, index: usize, c: &ControlRequest, width: u32, height: u32, mode: ResizeMode) -> Result<RgbImage> {
        let map = match (self, c.preprocess.as_deref()) {
            (Self::Pose(pose), _) => {
                let (cw, ch) = pose.canvas_size().unwrap_or((width, height));
                // Fit the canvas as `mode` says: keypoints scale with it (just-resize stretches them).
                let fitted = match mode {
                    ResizeMode::JustResize => pose.resize_canvas(width, height)?,
                    _ => {
                        let s = match mode {
                            ResizeMode::CropAndResize => (width as f64 / cw as f64).max(height as f64 / ch as f64),
                            _ => (width as f64 / cw as f64).min(height as f64 / ch as f64),
                        };
                        let (dx, dy) = ((width as f64 - cw as f64 * s) / 2.0, (height as f64 - ch as f64 * s) / 2.0);
                        pose.to_pixels()?.scale(s, s)?.translate(dx, dy)?.with_canvas(width, height)?
                    }
                };
                fitted.render_canvas(DrawOptions::default())?
            }
            (Self::Image(img), Some(kind)) => {
                let options = DetectorOptions { weights: c.annotator_weights.clone(), ..DetectorOptions::default() };
                let detector = annotate::detector(kind, &options).map_err(|e| match e {
                    // where the weights are is its own setting
                    Error::Setting { setting, msg } if setting == "weights" => {
                        Error::setting(control_setting(index, "annotator_weights"), msg)
                    }
                    e => Error::setting(control_setting(index, "preprocess"), e),
                })?;
                let settings =
                    AnnotateSettings { width: Some(width), height: Some(height), resolution: None, resize: mode };
                annotate::annotate(detector.as_ref(), img, &settings)?
            }
            (Self::Image(img), None) => match mode {
                ResizeMode::JustResize => img.clone(),
                _ => annotate::resize::fit_to_output(img, width, height, mode),
            },
            (Self::Tensor(_), _) => {
                return Err(Error::setting(
                    control_setting(index, "control"),
                    format!("{}: a condition tensor is used as it is", c.control.display()),
                ))
            }
        };
        Ok(images::resize(&map, width, height, ResampleFilter::Lanczos))
    }
}

/// The inpaint ControlNet's condition from the picture and the request's mask, both fitted to the output size
/// the same way (the resize mode, then Lanczos), masked pixels at -1 ([`super::inpaint::condition`]).
#[allow(clippy::too_many_arguments)]
fn inpaint_condition(
    index: usize,
    c: &ControlRequest,
    picture: &RgbImage,
    mask: Option<&RgbImage>,
    (width, height): (u32, u32),
    mode: ResizeMode,
    channels: usize,
    device: &Device,
) -> Result<FittedCondition> {
    let Some(mask) = mask else {
        return Err(Error::setting(
            control_setting(index, "preprocess"),
            "inpaint is made from an image and a mask, and no mask is given (the inpainting mask)",
        ));
    };
    if channels != 3 {
        return Err(Error::setting(
            control_setting(index, "preprocess"),
            format!("inpaint makes a 3-channel condition but {} takes {channels}", c.control.display()),
        ));
    }
    let fit = |img: &RgbImage| {
        let fitted = match mode {
            ResizeMode::JustResize => img.clone(),
            _ => annotate::resize::fit_to_output(img, width, height, mode),
        };
        images::resize(&fitted, width, height, ResampleFilter::Lanczos)
    };
    let (tensor, image) = super::inpaint::condition(&fit(picture), &fit(mask), device)?;
    Ok(FittedCondition { tensor, image: Some(image) })
}

/// PIL's `convert("L")` (ITU-R 601-2 luma, `(19595 R + 38470 G + 7471 B + 2^15) >> 16`), as grey RGB.
fn grey_rgb(img: &RgbImage) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let [r, g, b] = img.get_pixel(x, y).0;
        let l = ((19595 * u32::from(r) + 38470 * u32::from(g) + 7471 * u32::from(b) + 0x8000) >> 16) as u8;
        image::Rgb([l; 3])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picture_becomes_grey_for_a_one_channel_net() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let img =
            RgbImage::from_fn(16, 8, |x, _| if x < 8 { image::Rgb([255, 0, 0]) } else { image::Rgb([0, 0, 255]) });
        images::save_png(&path, &img, &[]).unwrap();
        let c = ControlRequest::new(None, &path);
        let src = ControlSource::load(0, &c).unwrap();
        let fitted = src.fit(0, &c, (16, 8), ResizeMode::JustResize, 1, None, &Device::Cpu).unwrap();
        assert_eq!(fitted.tensor.dims(), &[1, 1, 8, 16]);
        let v: Vec<f32> = fitted.tensor.flatten_all().unwrap().to_vec1().unwrap();
        // PIL: L of pure red is 76, of pure blue 29.
        assert_eq!(v[0], 76.0 / 255.0);
        assert_eq!(v[15], 29.0 / 255.0);
        assert_eq!(fitted.image.unwrap().get_pixel(0, 0).0, [76; 3]);
        let three = src.fit(0, &c, (16, 8), ResizeMode::JustResize, 3, None, &Device::Cpu).unwrap();
        assert_eq!(three.tensor.dims(), &[1, 3, 8, 16]);
        let err = src.fit(0, &c, (16, 8), ResizeMode::JustResize, 4, None, &Device::Cpu).err().unwrap().to_string();
        assert!(err.starts_with("controls[0].control: ") && err.contains("takes 4 conditioning channels"), "{err}");
    }
}
