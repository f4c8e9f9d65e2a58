//! The data side of a ControlNet run: which examples and captions each micro-batch takes (a seeded shuffled
//! order per epoch, captions dropped at the run's rate) and their VAE posteriors, text embeddings and conditions,
//! from memory (`--cache`) or computed per batch.
//!
//! The examples come from a folder dataset ([`Dataset`], read by index in a shuffled order) or from shards
//! streamed by worker threads ([`StreamSource`]: WebDataset tar files or Hugging Face parquet files), chosen from
//! what `--dataset` names ([`Source::open`]).
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::dataset::{condition_tensor, target_tensor, Dataset, FILL50K_FILE, METADATA_FILE};
use super::objective::{encode_captions, encode_targets, CaptionEmbeddings};
use super::stream::batches::Batcher;
pub use super::stream::batches::StreamState;
use super::stream::{
    default_workers, kind_of, pattern, remote, Decoded, Fields, SkipReport, StreamKind, StreamOptions, StreamSource,
};
use super::trainer::TrainState;
use crate::model::vae::DiagonalGaussian;
use crate::pipeline::StableDiffusion;
use crate::rng::{randperm, TorchGenerator};
use crate::{Error, Result};

/// Where a run's examples come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A fill50k `prompt.json` or a `metadata.jsonl` folder: examples by index.
    Folder(Dataset),
    /// WebDataset or parquet shards, streamed.
    Stream(StreamSource),
}

impl Source {
    /// What `dataset` names: a folder dataset (a folder with `prompt.json` or `metadata.jsonl`, or that file),
    /// else shards: a `.tar`/`.parquet` file, a pattern of them (`shards/{00000..00127}.tar`, globs, `::`), or a
    /// folder holding them. `fields` gives the sample parts to read per kind of shard.
    pub fn open(dataset: &str, fields: impl Fn(StreamKind) -> Fields) -> Result<Self> {
        let path = Path::new(dataset);
        let folder_layout = if path.is_dir() {
            path.join(FILL50K_FILE).is_file() || path.join(METADATA_FILE).is_file()
        } else {
            path.is_file() && kind_of(path).is_none()
        };
        let named_shards = pattern::is_pattern(dataset) || remote::is_remote(dataset);
        if folder_layout || (!path.exists() && !named_shards) {
            return Ok(Self::Folder(Dataset::open(path)?));
        }
        Ok(Self::Stream(StreamSource::open(dataset, fields)?))
    }

    /// Folder datasets: every example's files are checked up front (shards are checked when opened, and bad
    /// samples in them are skipped while training).
    pub fn check(&self) -> Result<()> {
        match self {
            Self::Folder(d) => d.check(),
            Self::Stream(_) => Ok(()),
        }
    }

    /// Examples of a folder dataset, shards of a streamed one (what a resumed run must find again).
    pub fn len(&self) -> usize {
        match self {
            Self::Folder(d) => d.len(),
            Self::Stream(s) => s.shards.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A line for the log: "12 examples (fill50k)" or "128 WebDataset shards".
    pub fn describe(&self) -> String {
        match self {
            Self::Folder(d) => format!("{} examples ({})", d.len(), d.file.display()),
            Self::Stream(s) => {
                let kind = match s.kind {
                    StreamKind::WebDataset => "WebDataset",
                    StreamKind::Parquet => "parquet",
                    StreamKind::Latents => "latent-cache",
                };
                format!("{} {kind} shards ({})", s.shards.len(), s.pattern)
            }
        }
    }
}

/// A micro-batch's examples: folder indices, or streamed samples.
pub enum Batch {
    Indices(Vec<usize>),
    Samples(Vec<Decoded>),
}

impl Batch {
    pub fn len(&self) -> usize {
        match self {
            Self::Indices(i) => i.len(),
            Self::Samples(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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
    pub source: Source,
    pub resolution: u32,
    pub batch_size: usize,
    pub proportion_empty_prompts: f64,
    /// Channels of the conditions the ControlNet reads (1: grey, 3: RGB).
    pub condition_channels: usize,
    pub device: Device,
    cache: Option<Cache>,
    /// How shards are read (streamed sources).
    pub stream_options: StreamOptions,
    /// The epoch being streamed.
    batcher: Batcher,
}

impl Feed {
    pub fn new(
        source: Source,
        settings: &super::settings::TrainSettings,
        condition_channels: usize,
        device: &Device,
    ) -> Self {
        let workers = if settings.data_workers == 0 { default_workers() } else { settings.data_workers };
        Self {
            source,
            resolution: settings.resolution,
            batch_size: settings.batch_size,
            proportion_empty_prompts: settings.proportion_empty_prompts,
            condition_channels,
            device: device.clone(),
            cache: None,
            stream_options: StreamOptions {
                shuffle_buffer: settings.shuffle_buffer,
                workers,
                resolution: settings.resolution,
            },
            batcher: Batcher::default(),
        }
    }

    /// The folder dataset (`None` for a streamed one).
    pub fn folder(&self) -> Option<&Dataset> {
        match &self.source {
            Source::Folder(d) => Some(d),
            Source::Stream(_) => None,
        }
    }

    /// The bad samples a streamed source skipped so far.
    pub fn skipped(&self) -> Option<SkipReport> {
        match &self.source {
            Source::Stream(s) => Some(s.skipped()),
            Source::Folder(_) => None,
        }
    }

    /// Encodes every example's target and condition, and every caption, once (`--cache`).
    pub fn fill_cache(&mut self, sd: &StableDiffusion, on_progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
        let Source::Folder(dataset) = &self.source else {
            return Err(Error::setting(
                "cache",
                "keeps every example in memory, which a folder dataset allows; sharded data is streamed instead",
            ));
        };
        let mut cache = Cache::default();
        let n = dataset.len();
        for i in 0..n {
            let s = dataset.load(i, self.resolution, self.condition_channels, &self.device)?;
            let p = encode_targets(&sd.vae, &s.pixel_values.unsqueeze(0)?)?;
            cache.examples.push((p.mean, p.logvar, s.condition));
            on_progress(i + 1, n);
        }
        let mut captions: Vec<String> = vec![String::new()];
        captions.extend(dataset.examples.iter().flat_map(|e| e.captions.iter().cloned()));
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

    /// The next micro-batch: a folder's next indices (a new shuffled epoch when one is used up), or the next
    /// streamed samples (bad ones skipped and counted). The last batch of an epoch may be short.
    pub fn next_batch(&mut self, state: &mut TrainState, data_rng: &mut TorchGenerator) -> Result<Batch> {
        match &self.source {
            Source::Folder(d) => Ok(Batch::Indices(self.next_indices(d.len(), state, data_rng))),
            Source::Stream(_) => Ok(Batch::Samples(self.next_samples(state, data_rng)?)),
        }
    }

    fn next_indices(&self, len: usize, state: &mut TrainState, data_rng: &mut TorchGenerator) -> Vec<usize> {
        if state.cursor >= state.order.len() {
            state.epoch += 1;
            state.order = randperm(len, data_rng);
            state.cursor = 0;
        }
        let end = (state.cursor + self.batch_size).min(state.order.len());
        let idx = state.order[state.cursor..end].to_vec();
        state.cursor = end;
        idx
    }

    /// The first stream state of a run: epoch 0's seed, drawn from the data generator.
    pub fn first_stream_state(&self, data_rng: &mut TorchGenerator) -> Option<StreamState> {
        matches!(self.source, Source::Stream(_)).then(|| StreamState::new_epoch(data_rng))
    }

    fn next_samples(&mut self, state: &mut TrainState, data_rng: &mut TorchGenerator) -> Result<Vec<Decoded>> {
        let Source::Stream(source) = &self.source else { unreachable!("called for streamed sources only") };
        let position = state
            .stream
            .as_mut()
            .ok_or_else(|| Error::Invalid("a streamed dataset, but the run has no stream position".into()))?;
        self.batcher.next(source, &self.stream_options, self.batch_size, position, &mut state.epoch, data_rng)
    }

    /// Reads `samples` examples as training reads them (decoded, resized, cropped, made tensors; captions
    /// picked), without any model: what `bench --dataset` times. Returns the examples read (at least `samples`,
    /// whole batches).
    pub fn read_without_model(&mut self, samples: usize, seed: u64) -> Result<usize> {
        let mut state = TrainState::new(self, seed);
        let mut data_rng = TorchGenerator::from_state(&state.data_rng)?;
        let mut read = 0;
        while read < samples {
            let batch = self.next_batch(&mut state, &mut data_rng)?;
            let _captions = self.captions(&batch, &mut data_rng);
            let tensors: Vec<Tensor> = match (&batch, &self.source) {
                (Batch::Indices(indices), Source::Folder(d)) => indices
                    .iter()
                    .map(|&i| Ok(d.load(i, self.resolution, self.condition_channels, &self.device)?.pixel_values))
                    .collect::<Result<_>>()?,
                (Batch::Samples(decoded), _) => decoded
                    .iter()
                    .map(|s| match s {
                        Decoded::Images { target, condition, .. } => {
                            condition_tensor(condition, self.condition_channels, &self.device)?;
                            Ok(target_tensor(target, &self.device)?)
                        }
                        Decoded::Latents { sample, .. } => {
                            condition_tensor(&sample.condition, self.condition_channels, &self.device)?;
                            Ok(sample.mean.to_device(&self.device)?)
                        }
                    })
                    .collect::<Result<_>>()?,
                (Batch::Indices(_), Source::Stream(_)) => unreachable!("index batches come from folders"),
            };
            read += tensors.len();
        }
        Ok(read)
    }

    /// Captions for a micro-batch: "" with probability `proportion_empty_prompts`, else one of the example's.
    pub fn captions(&self, batch: &Batch, data_rng: &mut TorchGenerator) -> Vec<String> {
        let lists: Vec<&[String]> = match (batch, &self.source) {
            (Batch::Indices(indices), Source::Folder(d)) => {
                indices.iter().map(|&i| d.examples[i].captions.as_slice()).collect()
            }
            (Batch::Samples(samples), _) => samples.iter().map(|s| s.captions()).collect(),
            (Batch::Indices(_), Source::Stream(_)) => unreachable!("index batches come from folders"),
        };
        let p = self.proportion_empty_prompts;
        lists
            .into_iter()
            .map(|caps| {
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
        batch: &Batch,
        captions: &[String],
    ) -> Result<(DiagonalGaussian, CaptionEmbeddings, Tensor)> {
        if let (Some(cache), Batch::Indices(indices)) = (&self.cache, batch) {
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
        if let Batch::Samples(samples) = batch {
            if let [Decoded::Latents { .. }, ..] = samples.as_slice() {
                return self.cached_inputs(samples, captions);
            }
        }
        let (pixels, conds): (Vec<Tensor>, Vec<Tensor>) = match (batch, &self.source) {
            (Batch::Indices(indices), Source::Folder(d)) => indices
                .iter()
                .map(|&i| {
                    let s = d.load(i, self.resolution, self.condition_channels, &self.device)?;
                    Ok((s.pixel_values, s.condition))
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .unzip(),
            (Batch::Samples(samples), _) => samples
                .iter()
                .map(|s| match s {
                    Decoded::Images { target, condition, .. } => Ok((
                        target_tensor(target, &self.device)?,
                        condition_tensor(condition, self.condition_channels, &self.device)?,
                    )),
                    Decoded::Latents { .. } => Err(Error::Invalid("a latent-cache sample among images".into())),
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .unzip(),
            (Batch::Indices(_), Source::Stream(_)) => unreachable!("index batches come from folders"),
        };
        let pixels = Tensor::stack(&pixels, 0)?;
        let conds = Tensor::stack(&conds, 0)?;
        let posterior = encode_targets(&sd.vae, &pixels)?;
        let text = encode_captions(sd, captions, &self.device)?;
        Ok((posterior, text, conds))
    }

    /// A latent cache's batch: the stored posteriors, the chosen captions' stored embeddings (the empty
    /// caption's from the cache folder) and the conditions made from the stored images.
    fn cached_inputs(
        &self,
        samples: &[Decoded],
        captions: &[String],
    ) -> Result<(DiagonalGaussian, CaptionEmbeddings, Tensor)> {
        let empty = match &self.source {
            Source::Stream(s) => s.empty_caption.as_ref(),
            Source::Folder(_) => None,
        };
        let (mut means, mut logvars, mut conds, mut texts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (s, caption) in samples.iter().zip(captions) {
            let Decoded::Latents { sample, captions: own } = s else {
                return Err(Error::Invalid("an image sample among latent-cache ones".into()));
            };
            means.push(sample.mean.to_device(&self.device)?);
            logvars.push(sample.logvar.to_device(&self.device)?);
            conds.push(condition_tensor(&sample.condition, self.condition_channels, &self.device)?);
            let text = match own.iter().position(|c| c == caption) {
                Some(i) => &sample.texts[i],
                None if caption.is_empty() => {
                    empty.ok_or_else(|| Error::Invalid("the latent cache has no empty-caption embeddings".into()))?
                }
                None => return Err(Error::Invalid(format!("no cached embeddings for the caption {caption:?}"))),
            };
            texts.push(CaptionEmbeddings {
                embeds: text.embeds.to_device(&self.device)?,
                pooled: text.pooled.as_ref().map(|p| p.to_device(&self.device)).transpose()?,
            });
        }
        let posterior = DiagonalGaussian { mean: Tensor::cat(&means, 0)?, logvar: Tensor::cat(&logvars, 0)? };
        let texts: Vec<&CaptionEmbeddings> = texts.iter().collect();
        Ok((posterior, CaptionEmbeddings::cat(&texts)?, Tensor::stack(&conds, 0)?))
    }
}
