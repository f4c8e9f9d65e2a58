//! The reading side of a latent cache (`cache-latents`, [`crate::train::latent_cache`]): its file names, and one
//! sample's tensors as the training loop uses them.
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::train::objective::CaptionEmbeddings;
use crate::{Error, Result};

/// What made a latent cache (in its folder); its presence marks the folder's shards as latent shards.
pub const LATENTS_INFO: &str = "latents.json";
/// The empty caption's embeddings (caption dropout at training time).
pub const EMPTY_CAPTION_FILE: &str = "empty_caption.safetensors";
/// The sample member holding the tensors, and the one holding the captions.
pub const TENSORS_EXT: &str = "latents.safetensors";
pub const CAPTIONS_EXT: &str = "json";

/// One example of a latent cache, as the training loop uses it (CPU tensors).
#[derive(Debug, Clone)]
pub struct CachedSample {
    /// (1, 4, h, w) each.
    pub mean: Tensor,
    pub logvar: Tensor,
    /// The condition image at training resolution.
    pub condition: image::RgbImage,
    /// One per caption, in the captions' order.
    pub texts: Vec<CaptionEmbeddings>,
}

impl CachedSample {
    /// Reads `<key>.latents.safetensors`.
    pub fn from_bytes(bytes: &[u8], captions: usize) -> std::result::Result<Self, String> {
        let mut t = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| e.to_string())?;
        let mut take = |name: &str| t.remove(name).ok_or_else(|| format!("no {name} tensor"));
        let (mean, logvar, condition) = (take("mean")?, take("logvar")?, take("condition")?);
        let (h, w, c) = condition.dims3().map_err(|e| e.to_string())?;
        let raw: Vec<u8> = condition.flatten_all().and_then(|t| t.to_vec1()).map_err(|e| e.to_string())?;
        let condition = image::RgbImage::from_raw(w as u32, h as u32, raw)
            .filter(|_| c == 3)
            .ok_or("the condition is not an (r, r, 3) image")?;
        let texts = (0..captions)
            .map(|i| {
                Ok(CaptionEmbeddings {
                    embeds: take(&format!("text.{i}.embeds"))?,
                    pooled: take(&format!("text.{i}.pooled")).ok(),
                })
            })
            .collect::<std::result::Result<_, String>>()?;
        Ok(Self { mean, logvar, condition, texts })
    }
}

/// The empty caption's embeddings of a cache folder.
pub fn read_empty_caption(dir: &Path) -> Result<CaptionEmbeddings> {
    let path = dir.join(EMPTY_CAPTION_FILE);
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| Error::weights(&path, e))?;
    let embeds = t.remove("embeds").ok_or_else(|| Error::weights(&path, "no embeds tensor"))?;
    Ok(CaptionEmbeddings { embeds, pooled: t.remove("pooled") })
}

/// Whether `dir` holds a latent cache.
pub fn is_cache_dir(dir: &Path) -> bool {
    dir.join(LATENTS_INFO).is_file()
}
