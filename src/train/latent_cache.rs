//! `cache-latents`: the VAE posteriors, conditions and caption embeddings of a dataset, computed once and written
//! as WebDataset shards that `train` streams instead of images, so a long run neither decodes JPEGs nor runs the
//! VAE encoder and the text encoders again.
//!
//! The folder holds `latents-NNNNN.tar` shards and [`LATENTS_INFO`] (what made them). Each sample is
//! `<key>.latents.safetensors` (`mean` and `logvar` of the posterior (1, 4, h, w) — the posterior, not a sample
//! of it, so each epoch still draws new noise as training from images does —, `condition` as the (r, r, 3) u8
//! RGB image at training resolution, `text.<i>.embeds` (1, 77, D) and, for SDXL, `text.<i>.pooled` for its
//! `i`-th caption) and `<key>.json` (`{"text": [captions]}`); the empty caption's embeddings are stored once in
//! [`EMPTY_CAPTION_FILE`]. Everything is f32 (u8 for the condition, exactly the image path's bytes).
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::dataset::resize_center_crop;
use super::feed::Source;
use super::objective::{encode_captions, encode_targets, CaptionEmbeddings};
pub use super::stream::cached::{CAPTIONS_EXT, EMPTY_CAPTION_FILE, LATENTS_INFO, TENSORS_EXT};
use super::stream::{Decoded, StreamOptions};
use crate::pipeline::StableDiffusion;
use crate::{Error, Result};

/// Samples per shard by default.
pub const DEFAULT_SHARD_SIZE: usize = 1000;

/// `latents.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentsInfo {
    /// The `--model` the latents and embeddings were made with.
    pub model: String,
    /// Training resolution the images were resized and cropped to.
    pub resolution: u32,
    /// Width of the caption embeddings, and whether they carry SDXL's pooled text.
    pub text_width: usize,
    pub sdxl: bool,
    pub samples: u64,
    pub shards: usize,
    /// Bad samples of the source that were left out.
    pub skipped: u64,
}

impl LatentsInfo {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(LATENTS_INFO);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::config(&path, e))
    }

    /// A run with this base model and resolution can train on the cache (else an error naming what differs).
    pub fn check_fits(&self, sd: &StableDiffusion, resolution: u32) -> Result<()> {
        if resolution != self.resolution {
            return Err(Error::setting(
                "resolution",
                format!(
                    "{resolution}, but the latent cache was made at {} (cache-latents --resolution)",
                    self.resolution
                ),
            ));
        }
        let width = sd.unet.config().encoder.cross_attention_dim;
        if sd.sdxl.is_some() != self.sdxl || width != self.text_width {
            return Err(Error::setting(
                "dataset",
                format!(
                    "the latent cache was made with {} (text width {}{}), not a model like this one (text width \
                     {width}{}): make it again with this --model",
                    self.model,
                    self.text_width,
                    if self.sdxl { ", SDXL" } else { "" },
                    if sd.sdxl.is_some() { ", SDXL" } else { "" }
                ),
            ));
        }
        Ok(())
    }
}

/// safetensors bytes of `tensors`, through a scratch file in `dir` (candle writes files only).
fn serialize(tensors: Vec<(String, Tensor)>, dir: &Path) -> Result<Vec<u8>> {
    let scratch = dir.join(".scratch.safetensors");
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, &scratch)?;
    let bytes = std::fs::read(&scratch).map_err(|e| Error::io(&scratch, e))?;
    std::fs::remove_file(&scratch).map_err(|e| Error::io(&scratch, e))?;
    Ok(bytes)
}

fn text_tensors(prefix: &str, t: &CaptionEmbeddings) -> Result<Vec<(String, Tensor)>> {
    let mut out = vec![(format!("{prefix}embeds"), t.embeds.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)];
    if let Some(p) = &t.pooled {
        out.push((format!("{prefix}pooled"), p.to_device(&Device::Cpu)?.to_dtype(DType::F32)?));
    }
    Ok(out)
}

/// Writes the latent cache of `source` into `output` (which must not hold one yet): every example once, bad
/// ones of a sharded source left out and counted. `on_progress(done)` after each example.
pub fn write_cache(
    sd: &StableDiffusion,
    model: &str,
    source: &Source,
    resolution: u32,
    output: &Path,
    shard_size: usize,
    on_progress: &mut dyn FnMut(u64),
) -> Result<LatentsInfo> {
    if output.join(LATENTS_INFO).exists() {
        return Err(Error::setting("output", format!("{} already holds a latent cache", output.display())));
    }
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    let device = sd.unet.device().clone();
    let shard_size = shard_size.max(1);
    let mut writer = ShardWriter { dir: output.to_path_buf(), shard_size, count: 0, builder: None, shards: 0 };
    let mut text_width = 0;
    let mut encode = |key: String, target: &image::RgbImage, condition: &image::RgbImage, captions: &[String]| {
        // 1. The posterior of the target, as `train` computes it per batch.
        let pixels = super::dataset::target_tensor(target, &device)?.unsqueeze(0)?;
        let posterior = encode_targets(&sd.vae, &pixels)?;
        let (h, w) = (condition.height() as usize, condition.width() as usize);
        let condition = Tensor::from_vec(condition.as_raw().clone(), (h, w, 3), &Device::Cpu)?;
        let mut tensors = vec![
            ("mean".to_string(), posterior.mean.to_device(&Device::Cpu)?.to_dtype(DType::F32)?),
            ("logvar".to_string(), posterior.logvar.to_device(&Device::Cpu)?.to_dtype(DType::F32)?),
            ("condition".to_string(), condition),
        ];
        // 2. Each caption's embeddings.
        for (i, c) in captions.iter().enumerate() {
            let t = encode_captions(sd, std::slice::from_ref(c), &device)?;
            text_width = t.embeds.dim(2)?;
            tensors.extend(text_tensors(&format!("text.{i}."), &t)?);
        }
        let json =
            serde_json::to_vec(&serde_json::json!({ "text": captions })).map_err(|e| Error::Invalid(e.to_string()))?;
        writer.add(&key, &serialize(tensors, output)?, &json)
    };
    let mut skipped = 0u64;
    match source {
        Source::Folder(d) => {
            for (i, ex) in d.examples.iter().enumerate() {
                let target = resize_center_crop(&crate::io::images::load_rgb(&ex.target)?, resolution);
                let condition = resize_center_crop(&crate::io::images::load_rgb(&ex.condition)?, resolution);
                encode(format!("{i:08}"), &target, &condition, &ex.captions)?;
                on_progress(i as u64 + 1);
            }
        }
        Source::Stream(s) => {
            let options = StreamOptions { shuffle_buffer: 1, workers: super::stream::default_workers(), resolution };
            let mut epoch = s.epoch(0, 0, &options);
            let mut done = 0;
            while let Some(o) = epoch.recv()? {
                match o.sample {
                    Ok(Decoded::Images { target, condition, captions }) => {
                        encode(
                            format!("{:05}-{:08}", o.position.shard, o.position.index),
                            &target,
                            &condition,
                            &captions,
                        )?;
                        done += 1;
                        on_progress(done);
                    }
                    Ok(Decoded::Latents { .. }) => {
                        return Err(Error::setting("dataset", "is a latent cache already"));
                    }
                    Err(why) => {
                        s.note_skipped(&o.position, &why);
                        skipped += 1;
                    }
                }
            }
        }
    }
    let samples = writer.count;
    let shards = writer.finish()?;
    if samples == 0 {
        return Err(Error::setting("dataset", "no usable example to cache"));
    }
    let empty = encode_captions(sd, &[String::new()], &device)?;
    let empty_path = output.join(EMPTY_CAPTION_FILE);
    let bytes = serialize(text_tensors("", &empty)?, output)?;
    std::fs::write(&empty_path, bytes).map_err(|e| Error::io(&empty_path, e))?;
    let info = LatentsInfo {
        model: model.to_string(),
        resolution,
        text_width,
        sdxl: sd.sdxl.is_some(),
        samples,
        shards,
        skipped,
    };
    let path = output.join(LATENTS_INFO);
    let text = serde_json::to_string_pretty(&info).map_err(|e| Error::Invalid(e.to_string()))? + "\n";
    // Written last: a cache without it is incomplete and is not taken for one.
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    Ok(info)
}

/// Writes samples into `latents-NNNNN.tar` shards of `shard_size`.
struct ShardWriter {
    dir: PathBuf,
    shard_size: usize,
    count: u64,
    builder: Option<tar::Builder<std::fs::File>>,
    shards: usize,
}

impl ShardWriter {
    fn add(&mut self, key: &str, tensors: &[u8], captions: &[u8]) -> Result<()> {
        if self.count.is_multiple_of(self.shard_size as u64) {
            self.close()?;
            let path = self.dir.join(format!("latents-{:05}.tar", self.shards));
            let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
            self.builder = Some(tar::Builder::new(file));
            self.shards += 1;
        }
        let builder = self.builder.as_mut().expect("opened above");
        for (ext, bytes) in [(TENSORS_EXT, tensors), (CAPTIONS_EXT, captions)] {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            let name = format!("{key}.{ext}");
            builder.append_data(&mut header, &name, bytes).map_err(|e| Error::io(self.dir.join(&name), e))?;
        }
        self.count += 1;
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some(b) = self.builder.take() {
            b.into_inner().and_then(|f| f.sync_all()).map_err(|e| Error::io(&self.dir, e))?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<usize> {
        self.close()?;
        Ok(self.shards)
    }
}
