//! A loaded Stable Diffusion 1.x/2.x pipeline folder (diffusers layout):
//! `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Deserialize;

use crate::io::weights::read_json;
use crate::model::clip::ClipTextModel;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// The part of `model_index.json` we read: which pipeline the folder is.
#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: String,
}

pub struct StableDiffusion {
    pub dir: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub scheduler_config_path: PathBuf,
}

impl StableDiffusion {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Invalid(format!("--model {}: not a folder", dir.display())));
        }
        let index_path = dir.join("model_index.json");
        let index: ModelIndex = read_json(&index_path)?;
        if index.class_name.contains("XL") {
            return Err(Error::config(
                &index_path,
                format!("{} is an SDXL pipeline; SDXL is not supported yet (SD 1.x and 2.x are)", index.class_name),
            ));
        }
        if !index.class_name.starts_with("StableDiffusion") {
            return Err(Error::config(&index_path, format!("{} is not a Stable Diffusion pipeline", index.class_name)));
        }
        let scheduler_config_path = dir.join("scheduler").join("scheduler_config.json");
        Ok(Self {
            dir: dir.to_path_buf(),
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder: ClipTextModel::load(&dir.join("text_encoder"), dtype, device)?,
            unet: UNet2DConditionModel::load(&dir.join("unet"), dtype, device)?,
            vae: AutoencoderKL::load(&dir.join("vae"), dtype, device)?,
            scheduler_config: SchedulerConfig::from_file(&scheduler_config_path)?,
            scheduler_config_path,
        })
    }

    /// How much the VAE shrinks an image per side: 2^(number of VAE levels - 1), 8 for SD.
    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.vae.config().block_out_channels.len().saturating_sub(1))
    }

    /// The size diffusers uses when none is given and no condition image sets it: the UNet's sample size × 8.
    pub fn default_size(&self) -> usize {
        self.unet.config().sample_size.unwrap_or(64) * self.vae_scale_factor()
    }
}
