//! Where a from-scratch stage's examples come from, and where it is in them.
//!
//! - A folder dataset is held in memory: each batch is indices drawn with replacement by the stage's generator
//!   (the demo's recipe).
//! - Shards (WebDataset tar files, local or at URLs, or parquet files) are streamed in epochs as `train` streams
//!   them ([`crate::train::stream::batches`]): each stage walks its own epochs, the first epoch's seed drawn from
//!   the stage's generator at its first batch; bad samples are skipped and counted. The stage's checkpoints keep
//!   the position, the count of skipped samples and the shards' names and sizes ([`StreamCheckpoint`]), so a
//!   stopped stage continues the same sequence and reports the same count as one that was not stopped.
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::settings::Settings;
use crate::rng::TorchGenerator;
use crate::train::dataset::target_tensor;
use crate::train::feed::{Batch, Source};
use crate::train::stream::batches::{Batcher, StreamState};
use crate::train::stream::{default_workers, Decoded, SkipReport, StreamOptions, StreamSource};
use crate::{Error, Result};

/// What a from-scratch stage reads from a [`Batch`] (`train`'s micro-batch: folder indices, or streamed samples,
/// possibly fewer than asked at an epoch's end).
impl Batch {
    /// The target images as (3, r, r) tensors in [-1, 1]; `images` holds a folder's (in memory).
    pub(super) fn targets(&self, images: Option<&[Tensor]>, device: &Device) -> Result<Vec<Tensor>> {
        match self {
            Self::Indices(indices) => {
                let images = images.ok_or_else(|| Error::Invalid("folder images not loaded".into()))?;
                Ok(indices.iter().map(|&i| images[i].clone()).collect())
            }
            Self::Samples(samples) => samples
                .iter()
                .map(|s| match s {
                    Decoded::Images { target, .. } => Ok(target_tensor(target, device)?),
                    Decoded::Latents { .. } => Err(Error::Invalid("a latent-cache sample in train-base".into())),
                })
                .collect(),
        }
    }

    /// Each example's first caption; `folder` gives a folder's by index.
    pub(super) fn captions<'a>(&'a self, folder: impl Fn(usize) -> &'a str) -> Vec<&'a str> {
        match self {
            Self::Indices(indices) => indices.iter().map(|&i| folder(i)).collect(),
            Self::Samples(samples) => samples.iter().map(|s| s.captions()[0].as_str()).collect(),
        }
    }
}

/// A streamed stage's place in its data, saved in its checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct StreamCheckpoint {
    /// `None`: the stage has not taken a batch yet (its first epoch's seed is drawn at the first).
    pub position: Option<StreamState>,
    pub epoch: u64,
    pub shuffle_buffer: usize,
    /// The shards' names and sizes: a resumed stage reads the same ones.
    pub shards: Vec<(String, u64)>,
    pub skipped: SkipReport,
}

/// A stage's data.
pub(super) enum Batches {
    Folder { len: usize },
    Stream(Box<Streamed>),
}

pub(super) struct Streamed {
    source: StreamSource,
    options: StreamOptions,
    position: Option<StreamState>,
    epoch: u64,
    batcher: Batcher,
}

impl Batches {
    /// A new stage's data, at its start (a streamed stage counts its own bad samples).
    pub fn new(source: &Source, settings: &Settings) -> Self {
        match source {
            Source::Folder(d) => Self::Folder { len: d.len() },
            Source::Stream(s) => Self::Stream(Box::new(Streamed {
                source: s.with_own_count(),
                options: stream_options(settings),
                position: None,
                epoch: 0,
                batcher: Batcher::default(),
            })),
        }
    }

    /// The next batch of `n`: indices drawn from `rng`, or the stream's next samples.
    pub fn next(&mut self, n: usize, rng: &mut TorchGenerator) -> Result<Batch> {
        match self {
            Self::Folder { len } => {
                Ok(Batch::Indices(rng.randint(0, *len as i64, n).into_iter().map(|i| i as usize).collect()))
            }
            Self::Stream(s) => {
                let position = s.position.get_or_insert_with(|| StreamState::new_epoch(rng));
                let samples = s.batcher.next(&s.source, &s.options, n, position, &mut s.epoch, rng)?;
                Ok(Batch::Samples(samples))
            }
        }
    }

    /// What a checkpoint keeps (`None` for a folder).
    pub fn checkpoint(&self) -> Option<StreamCheckpoint> {
        match self {
            Self::Folder { .. } => None,
            Self::Stream(s) => Some(StreamCheckpoint {
                position: s.position.clone(),
                epoch: s.epoch,
                shuffle_buffer: s.options.shuffle_buffer,
                shards: s.source.fingerprint(),
                skipped: s.source.skipped(),
            }),
        }
    }

    /// Continues from a checkpoint of the stage `stage` in `dir`: the same kind of data, the same shards.
    pub fn restore(&mut self, saved: Option<StreamCheckpoint>, stage: &str, dir: &std::path::Path) -> Result<()> {
        let differs = |what: String| {
            Err(Error::setting(
                "dataset",
                format!(
                    "{what} when the {stage} stage saved {}: a stopped stage continues on the same data",
                    dir.display()
                ),
            ))
        };
        match (self, saved) {
            (Self::Folder { .. }, None) => Ok(()),
            (Self::Folder { .. }, Some(_)) => differs("a folder dataset now, sharded data".into()),
            (Self::Stream(_), None) => differs("sharded data now, a folder dataset".into()),
            (Self::Stream(s), Some(saved)) => {
                let now = s.source.fingerprint();
                if now != saved.shards {
                    let first = now.iter().zip(&saved.shards).find(|(a, b)| a != b);
                    return differs(match first {
                        Some(((n, sz), (n0, sz0))) => format!("{n} ({sz} bytes) now, {n0} ({sz0} bytes)"),
                        None => format!("{} shards now, {}", now.len(), saved.shards.len()),
                    });
                }
                if saved.shuffle_buffer != s.options.shuffle_buffer {
                    return Err(Error::setting(
                        "shuffle_buffer",
                        format!(
                            "{} differs from the {} the {stage} stage of {} was trained with; it shapes the order, \
                             so keep {}",
                            s.options.shuffle_buffer,
                            saved.shuffle_buffer,
                            dir.display(),
                            saved.shuffle_buffer
                        ),
                    ));
                }
                s.position = saved.position;
                s.epoch = saved.epoch;
                s.source.restore_skipped(saved.skipped);
                s.batcher = Batcher::default();
                Ok(())
            }
        }
    }

    /// The bad samples a streamed stage skipped so far (with those before a resume).
    pub fn skipped(&self) -> Option<SkipReport> {
        match self {
            Self::Folder { .. } => None,
            Self::Stream(s) => Some(s.source.skipped()),
        }
    }
}

/// How a run's shards are read: its shuffle buffer and decoding threads, at its resolution.
pub(super) fn stream_options(settings: &Settings) -> StreamOptions {
    StreamOptions {
        shuffle_buffer: settings.shuffle_buffer,
        workers: if settings.data_workers == 0 { default_workers() } else { settings.data_workers },
        resolution: settings.resolution,
    }
}
