//! The data side of a ControlNet run: which examples and captions each micro-batch takes (a seeded shuffled
//! order per epoch, captions dropped at the run's rate) and their VAE posteriors, text embeddings and conditions,
//! from memory (`--cache`) or computed per batch.
use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::dataset::Dataset;
use super::objective::{encode_captions, encode_targets, CaptionEmbeddings};
use super::trainer::TrainState;
use crate::model::vae::DiagonalGaussian;
use crate::pipeline::StableDiffusion;
use crate::rng::TorchGenerator;
use crate::Result;

/// In-memory copies for `--cache`.
#[derive(Default)]
struct Cache {
    /// Per example: VAE posterior mean and log-variance (1, 4, h, w), condition (3, r, r).
    examples: Vec<(Tensor, Tensor, Tensor)>,
    /// Text embeddings (1, 77, D) (and SDXL's pooled text) by caption.
    text: HashMap<String, CaptionEmbeddings>,
}

/// The dataset as a run reads it.
pub struct Feed {
    pub dataset: Dataset,
    pub resolution: u32,
    pub batch_size: usize,
    pub proportion_empty_prompts: f64,
    /// Channels of the conditions the ControlNet reads (1: grey, 3: RGB).
    pub condition_channels: usize,
    pub device: Device,
    cache: Option<Cache>,
}

/// torch's CPU `randperm(n, generator)`: from the identity, swap element i with one drawn from [i, n).
pub fn randperm(n: usize, rng: &mut TorchGenerator) -> Vec<usize> {
    let mut r: Vec<usize> = (0..n).collect();
    for i in 0..n.saturating_sub(1) {
        let z = rng.random() as usize % (n - i);
        r.swap(i, z + i);
    }
    r
}

impl Feed {
    pub fn new(
        dataset: Dataset,
        settings: &super::settings::TrainSettings,
        condition_channels: usize,
        device: &Device,
    ) -> Self {
        Self {
            dataset,
            resolution: settings.resolution,
            batch_size: settings.batch_size,
            proportion_empty_prompts: settings.proportion_empty_prompts,
            condition_channels,
            device: device.clone(),
            cache: None,
        }
    }

    /// Encodes every example's target and condition, and every caption, once (`--cache`).
    pub fn fill_cache(&mut self, sd: &StableDiffusion, on_progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
        let mut cache = Cache::default();
        let n = self.dataset.len();
        for i in 0..n {
            let s = self.dataset.load(i, self.resolution, self.condition_channels, &self.device)?;
            let p = encode_targets(&sd.vae, &s.pixel_values.unsqueeze(0)?)?;
            cache.examples.push((p.mean, p.logvar, s.condition));
            on_progress(i + 1, n);
        }
        let mut captions: Vec<String> = vec![String::new()];
        captions.extend(self.dataset.examples.iter().flat_map(|e| e.captions.iter().cloned()));
        for c in captions {
            if let std::collections::hash_map::Entry::Vacant(slot) = cache.text.entry(c) {
                let prompt = [slot.key().clone()];
                let t = encode_captions(sd, &prompt, &self.device)?;
                slot.insert(t);
            }
        }
        self.cache = Some(cache);
        Ok(())
    }

    /// The next micro-batch's example indices, starting a new shuffled epoch when one is used up.
    pub fn next_indices(&self, state: &mut TrainState, data_rng: &mut TorchGenerator) -> Vec<usize> {
        if state.cursor >= state.order.len() {
            state.epoch += 1;
            state.order = randperm(self.dataset.len(), data_rng);
            state.cursor = 0;
        }
        let end = (state.cursor + self.batch_size).min(state.order.len());
        let idx = state.order[state.cursor..end].to_vec();
        state.cursor = end;
        idx
    }

    /// Captions for a micro-batch: "" with probability `proportion_empty_prompts`, else one of the example's.
    pub fn captions(&self, indices: &[usize], data_rng: &mut TorchGenerator) -> Vec<String> {
        let p = self.proportion_empty_prompts;
        indices
            .iter()
            .map(|&i| {
                let caps = &self.dataset.examples[i].captions;
                if f64::from(data_rng.rand(1)[0]) < p {
                    String::new()
                } else if caps.len() == 1 {
                    caps[0].clone()
                } else {
                    caps[data_rng.randint(0, caps.len() as i64, 1)[0] as usize].clone()
                }
            })
            .collect()
    }

    /// Posterior, text embeddings and conditions of a micro-batch (from the cache, or computed now).
    pub fn inputs(
        &self,
        sd: &StableDiffusion,
        indices: &[usize],
        captions: &[String],
    ) -> Result<(DiagonalGaussian, CaptionEmbeddings, Tensor)> {
        if let Some(cache) = &self.cache {
            let pick = |f: fn(&(Tensor, Tensor, Tensor)) -> &Tensor| -> Result<Tensor> {
                let parts: Vec<&Tensor> = indices.iter().map(|&i| f(&cache.examples[i])).collect();
                Ok(Tensor::cat(&parts, 0)?)
            };
            let posterior = DiagonalGaussian { mean: pick(|e| &e.0)?, logvar: pick(|e| &e.1)? };
            let conds: Vec<Tensor> =
                indices.iter().map(|&i| cache.examples[i].2.unsqueeze(0)).collect::<candle_core::Result<_>>()?;
            let texts: Vec<&CaptionEmbeddings> = captions.iter().map(|c| &cache.text[c]).collect();
            return Ok((posterior, CaptionEmbeddings::cat(&texts)?, Tensor::cat(&conds, 0)?));
        }
        let samples = indices
            .iter()
            .map(|&i| self.dataset.load(i, self.resolution, self.condition_channels, &self.device))
            .collect::<Result<Vec<_>>>()?;
        let pixels = Tensor::stack(&samples.iter().map(|s| &s.pixel_values).collect::<Vec<_>>(), 0)?;
        let conds = Tensor::stack(&samples.iter().map(|s| &s.condition).collect::<Vec<_>>(), 0)?;
        let posterior = encode_targets(&sd.vae, &pixels)?;
        let text = encode_captions(sd, captions, &self.device)?;
        Ok((posterior, text, conds))
    }
}
