//! The recipe an image carries in its PNG: a `parameters` text chunk as AUTOMATIC1111 writes it (so A1111,
//! ComfyUI and image viewers show it) and a `controlnet-rs` JSON chunk with everything needed to reproduce
//! the image exactly (file hashes, seed, every setting).
use serde::{Deserialize, Serialize};

/// PNG text key of the JSON recipe.
pub const RECIPE_KEY: &str = "controlnet-rs";
/// PNG text key A1111 uses for its human-readable generation parameters.
pub const A1111_KEY: &str = "parameters";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileRef {
    pub path: String,
    /// SHA-256 of the weights (for a folder: of the concatenated SHA-256s of its weight files, in path order).
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ControlRecipe {
    pub controlnet: FileRef,
    /// The annotator that made the condition from the control file (`--preprocess`), if any.
    #[serde(default)]
    pub preprocess: Option<String>,
    /// `--controlnet-config`, when one described a single file.
    #[serde(default)]
    pub config: Option<String>,
    pub control_image: FileRef,
    pub conditioning_scale: f64,
    pub control_start: f64,
    pub control_end: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Recipe {
    /// "controlnet-rs <version>"
    pub software: String,
    pub model: FileRef,
    pub controls: Vec<ControlRecipe>,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    /// The scheduler that ran (CLI name), also when it was the model's own.
    pub scheduler: String,
    /// How conditions were fitted to the output (`--resize`).
    #[serde(default = "default_resize")]
    pub resize: String,
    /// `--config` and `--prediction-type`, when given for a single-file model.
    #[serde(default)]
    pub model_config: Option<String>,
    #[serde(default)]
    pub prediction_type: Option<String>,
    pub seed: u64,
    pub guess_mode: bool,
    /// Tiled VAE decoding (recorded only when on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vae_tiling: bool,
    /// How many images the run made and which one this is (1-based): images of one run share a noise batch.
    pub num_images: usize,
    pub image_index: usize,
}

fn default_resize() -> String {
    "just-resize".into()
}

/// A1111's sampler names for our schedulers.
fn a1111_sampler(name: &str) -> &str {
    match name {
        "ddim" => "DDIM",
        "pndm" => "PLMS",
        "euler" => "Euler",
        "euler-a" => "Euler a",
        "dpm++2m" => "DPM++ 2M",
        "unipc" => "UniPC",
        other => other,
    }
}

/// A short hash as A1111 shows it (first 10 hex digits of the SHA-256).
fn short(hash: &str) -> &str {
    &hash[..hash.len().min(10)]
}

fn stem(path: &str) -> &str {
    let p = std::path::Path::new(path.trim_end_matches('/'));
    p.file_stem().and_then(|s| s.to_str()).unwrap_or(path)
}

impl Recipe {
    /// The `parameters` text: prompt, negative prompt, then one line of `Key: value` pairs.
    pub fn a1111_parameters(&self) -> String {
        let mut s = self.prompt.clone();
        s.push_str(&format!("\nNegative prompt: {}", self.negative_prompt));
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}",
            self.steps,
            a1111_sampler(&self.scheduler),
            self.guidance,
            self.seed,
            self.width,
            self.height,
            short(&self.model.sha256),
            stem(&self.model.path)
        ));
        for (i, c) in self.controls.iter().enumerate() {
            s.push_str(&format!(
                ", ControlNet {i}: \"Module: {}, Model: {} [{}], Weight: {}, Resize Mode: Just Resize, Guidance Start: {}, Guidance End: {}, Control Mode: {}\"",
                c.preprocess.as_deref().unwrap_or("none"),
                stem(&c.controlnet.path),
                &c.controlnet.sha256[..c.controlnet.sha256.len().min(8)],
                c.conditioning_scale,
                c.control_start,
                c.control_end,
                if self.guess_mode { "ControlNet is more important" } else { "Balanced" }
            ));
        }
        if self.num_images > 1 {
            s.push_str(&format!(", Batch size: {}, Batch pos: {}", self.num_images, self.image_index - 1));
        }
        s.push_str(&format!(", Version: {}", self.software));
        s
    }

    /// Both text chunks for the PNG.
    pub fn text_chunks(&self) -> Vec<(String, String)> {
        let json = serde_json::to_string(self).unwrap_or_default();
        vec![(A1111_KEY.to_string(), self.a1111_parameters()), (RECIPE_KEY.to_string(), json)]
    }

    /// The `controlnet generate` arguments that make this recipe's batch again (without `--output`).
    pub fn generate_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["--model".into(), self.model.path.clone()];
        let push = |a: &mut Vec<String>, k: &str, v: String| {
            a.push(k.into());
            a.push(v);
        };
        if let Some(c) = &self.model_config {
            push(&mut a, "--config", c.clone());
        }
        if let Some(p) = &self.prediction_type {
            push(&mut a, "--prediction-type", p.clone());
        }
        for c in &self.controls {
            push(&mut a, "--controlnet", c.controlnet.path.clone());
            push(&mut a, "--control", c.control_image.path.clone());
            push(&mut a, "--conditioning-scale", c.conditioning_scale.to_string());
            push(&mut a, "--control-start", c.control_start.to_string());
            push(&mut a, "--control-end", c.control_end.to_string());
            if let Some(p) = &c.preprocess {
                push(&mut a, "--preprocess", p.clone());
            }
            if let Some(cfg) = &c.config {
                push(&mut a, "--controlnet-config", cfg.clone());
            }
        }
        push(&mut a, "--prompt", self.prompt.clone());
        push(&mut a, "--negative-prompt", self.negative_prompt.clone());
        push(&mut a, "--width", self.width.to_string());
        push(&mut a, "--height", self.height.to_string());
        push(&mut a, "--steps", self.steps.to_string());
        push(&mut a, "--guidance", self.guidance.to_string());
        push(&mut a, "--scheduler", self.scheduler.clone());
        push(&mut a, "--seed", self.seed.to_string());
        push(&mut a, "--num-images", self.num_images.to_string());
        push(&mut a, "--resize", self.resize.clone());
        if self.guess_mode {
            a.push("--guess-mode".into());
        }
        if self.vae_tiling {
            a.push("--vae-tiling".into());
        }
        a
    }

    /// Reads a recipe back from a PNG's text chunks.
    pub fn from_text_chunks(chunks: &[(String, String)]) -> Option<Recipe> {
        chunks.iter().find(|(k, _)| k == RECIPE_KEY).and_then(|(_, v)| serde_json::from_str(v).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Recipe {
        Recipe {
            software: "controlnet-rs 0.1.0".into(),
            model: FileRef { path: "models/sd15".into(), sha256: "0123456789abcdef".into() },
            controls: vec![ControlRecipe {
                controlnet: FileRef { path: "cn/canny".into(), sha256: "fedcba9876543210".into() },
                preprocess: None,
                config: None,
                control_image: FileRef { path: "edges.png".into(), sha256: "aa".into() },
                conditioning_scale: 0.8,
                control_start: 0.0,
                control_end: 0.5,
            }],
            prompt: "a cat".into(),
            negative_prompt: "".into(),
            width: 512,
            height: 512,
            steps: 20,
            guidance: 7.5,
            scheduler: "euler-a".into(),
            resize: "just-resize".into(),
            model_config: None,
            prediction_type: None,
            seed: 42,
            guess_mode: false,
            vae_tiling: false,
            num_images: 1,
            image_index: 1,
        }
    }

    #[test]
    fn a1111_parameters_layout() {
        let p = sample().a1111_parameters();
        let lines: Vec<&str> = p.lines().collect();
        assert_eq!(lines[0], "a cat");
        assert_eq!(lines[1], "Negative prompt: ");
        assert!(lines[2].starts_with("Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 0123456789, Model: sd15"), "{}", lines[2]);
        assert!(
            lines[2].contains("ControlNet 0: \"Module: none, Model: canny [fedcba98], Weight: 0.8"),
            "{}",
            lines[2]
        );
        assert!(lines[2].contains("Guidance End: 0.5"));
    }

    #[test]
    fn json_round_trip() {
        let r = sample();
        let back = Recipe::from_text_chunks(&r.text_chunks()).unwrap();
        assert_eq!(back, r);
    }
}
