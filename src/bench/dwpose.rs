//! The DWPose row of `controlnet bench --annotators`: its nets are ONNX graphs, which cannot be rebuilt from
//! tensor shapes as the torch annotators' random full-size weights are, so the row reads the two files:
//! `--weights DIR_OR_ID` (a folder or hub repo, as `annotate dwpose --weights`), else the shared Hugging Face
//! cache of `yzd-v/DWPose` (never downloaded by the bench). `tools/bench_dwpose_nets.py DIR` writes full-size
//! random-weight files with the published architectures and signatures, calibrated so that the detector finds
//! one person in [`person_image`], the picture this row is timed on.
use std::path::PathBuf;

use image::{Rgb, RgbImage};

use crate::annotate::neural::dwpose::{self, Dwpose, DwposeNets, DETECTOR_FILE, POSE_FILE};
use crate::annotate::{upstream_input, UpstreamSizes};
use crate::io::hub::{self, HubOptions, HubSpec};
use crate::{Error, Result};

/// The kind's name in `--annotators`.
pub const KIND: &str = "dwpose";
/// The script that writes full-size random-weight nets.
pub const SCRIPT: &str = "tools/bench_dwpose_nets.py";

/// Where the nets come from when `--weights` is not given: the two files in the Hugging Face cache of
/// [`dwpose::DEFAULT_REPO`] (offline: a bench does not download 350 MB), or None.
pub fn cached_files() -> Option<(PathBuf, PathBuf)> {
    let opts = HubOptions { offline: true, progress: false, ..HubOptions::from_env() };
    let cached = |file: &str| {
        let mut spec: HubSpec = dwpose::DEFAULT_REPO.parse().ok()?;
        spec.file = Some(file.to_string());
        hub::fetch(&spec, &opts).ok()
    };
    Some((cached(DETECTOR_FILE)?, cached(POSE_FILE)?))
}

/// Whether the row can run: weights were given (then loading them reports what is wrong), or the cache holds
/// both files.
pub fn available(weights: Option<&str>) -> bool {
    weights.is_some() || cached_files().is_some()
}

/// What to tell a user who asked for the row without files.
pub fn missing() -> Error {
    Error::setting(
        "weights",
        format!(
            "the dwpose row needs {DETECTOR_FILE} and {POSE_FILE}: none were given and the Hugging Face cache has no \
             {}; give a folder holding both (`python {SCRIPT} DIR` writes full-size random-weight ones) or a hub \
             repo",
            dwpose::DEFAULT_REPO
        ),
    )
}

/// The detector as `annotate dwpose` runs it (everything drawn), from `weights` or the cache.
pub fn load(weights: Option<&str>) -> Result<Dwpose> {
    let nets = match weights {
        Some(spec) => DwposeNets::load(Some(spec))?,
        None => {
            let (detector, pose) = cached_files().ok_or_else(missing)?;
            DwposeNets::from_files(&detector, &pose)?
        }
    };
    Ok(Dwpose { nets, include: dwpose::include(None, false, false) })
}

/// How many people the detector finds in `image` at these sizes (the pose net runs once per person).
pub fn people(detector: &Dwpose, image: &RgbImage, sizes: &UpstreamSizes) -> Result<usize> {
    let (input, _) = upstream_input(image, sizes)?;
    Ok(detector.estimate(&dwpose::bgr(&input))?.people.len())
}

/// The picture the row is timed on (`tools/bench_dwpose_nets.py` draws the same, in integers on both sides): a
/// gradient and a standing figure in the middle, head, torso, arms and legs.
pub fn person_image(size: u32) -> RgbImage {
    let s = i64::from(size);
    let (skin, shirt, trousers) = (Rgb([230, 190, 160]), Rgb([40, 90, 200]), Rgb([30, 30, 70]));
    let inside =
        |x: i64, y: i64, (x0, x1, y0, y1): (i64, i64, i64, i64)| (x0..x1).contains(&x) && (y0..y1).contains(&y);
    RgbImage::from_fn(size, size, |x, y| {
        let (x, y) = (i64::from(x), i64::from(y));
        let (hx, hy, r) = (x - s / 2, y - 3 * s / 16, s / 16);
        if hx * hx + hy * hy < r * r {
            return skin;
        }
        if inside(x, y, (3 * s / 8, 15 * s / 32, 9 * s / 16, 15 * s / 16))
            || inside(x, y, (17 * s / 32, 5 * s / 8, 9 * s / 16, 15 * s / 16))
        {
            return trousers;
        }
        if inside(x, y, (s / 4, 3 * s / 8, s / 4, s / 2)) || inside(x, y, (5 * s / 8, 3 * s / 4, s / 4, s / 2)) {
            return skin;
        }
        if inside(x, y, (3 * s / 8, 5 * s / 8, s / 4, 9 * s / 16)) {
            return shirt;
        }
        let level = |v: i64| (v * 255 / (s - 1)) as u8;
        Rgb([level(x), level(y), 128])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples of `bench_dwpose_nets.person_image(512)` (the Python drawing).
    #[test]
    fn person_image_matches_the_python_drawing() {
        let img = person_image(512);
        for (x, y, rgb) in [
            (0, 0, [0, 0, 128]),
            (511, 511, [255, 255, 128]),
            (256, 96, [230, 190, 160]),
            (256, 65, [230, 190, 160]),
            (256, 64, [127, 31, 128]),
            (200, 200, [40, 90, 200]),
            (150, 200, [230, 190, 160]),
            (150, 256, [74, 127, 128]),
            (200, 400, [30, 30, 70]),
            (256, 400, [127, 199, 128]),
            (300, 479, [30, 30, 70]),
            (300, 480, [149, 239, 128]),
        ] {
            assert_eq!(img.get_pixel(x, y).0, rgb, "({x}, {y})");
        }
        // and every sample: the SHA-256 of the Python array's bytes (rows of RGB)
        use sha2::Digest;
        let digest = sha2::Sha256::digest(img.as_raw());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "1a3222c9a25c42aa6fb4216707fe13926e48c8e260f30d886f2af26c0f003dad");
    }

    #[test]
    fn the_missing_files_message_names_the_script_and_the_files() {
        let msg = missing().to_string();
        for part in [SCRIPT, DETECTOR_FILE, POSE_FILE, dwpose::DEFAULT_REPO, "weights"] {
            assert!(msg.contains(part), "{msg}");
        }
    }
}
