//! Batches from a stream, epoch after epoch: what `train` ([`crate::train::feed`]) and `train-base`
//! ([`crate::train::from_scratch`]) both read sharded data through.
//!
//! The position is (epoch seed, samples of the epoch taken) ([`StreamState`]); each new epoch takes its seed from
//! the run's generator, bad samples are counted and skipped, the last batch of an epoch may be short, and an epoch
//! without a single usable sample is an error.
use serde::{Deserialize, Serialize};

use super::{Decoded, EpochStream, SamplePosition, StreamOptions, StreamSource};
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// Where a streamed run is in its epoch: the epoch's seed (shard order and shuffle buffer) and how many samples
/// of it were taken (skipped ones included); the last one's shard and index, for people reading the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamState {
    pub epoch_seed: u64,
    pub taken: u64,
    pub last: Option<SamplePosition>,
}

impl StreamState {
    /// The start of an epoch whose seed is drawn from `rng`.
    pub fn new_epoch(rng: &mut TorchGenerator) -> Self {
        Self { epoch_seed: u64::from(rng.random()), taken: 0, last: None }
    }
}

/// The epoch being read, and whether it was opened at its start and has given a usable sample yet.
#[derive(Default)]
pub struct Batcher {
    open: Option<(EpochStream, bool, bool)>,
}

impl Batcher {
    /// The next `n` samples from `position` on (fewer at the end of an epoch; bad ones skipped and counted in
    /// `source`). At the end of an epoch, `epoch` is counted up and the next epoch's seed drawn from `rng`.
    pub fn next(
        &mut self,
        source: &StreamSource,
        options: &StreamOptions,
        n: usize,
        position: &mut StreamState,
        epoch: &mut u64,
        rng: &mut TorchGenerator,
    ) -> Result<Vec<Decoded>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            // 1. The epoch's stream, opened where the run is in it.
            let (stream, from_start, any_good) = self.open.get_or_insert_with(|| {
                (source.epoch(position.epoch_seed, position.taken, options), position.taken == 0, false)
            });
            match stream.recv()? {
                // 2. A sample, or a bad one that is counted and skipped.
                Some(outcome) => {
                    position.taken += 1;
                    position.last = Some(outcome.position.clone());
                    match outcome.sample {
                        Ok(sample) => {
                            *any_good = true;
                            out.push(sample);
                        }
                        Err(why) => source.note_skipped(&outcome.position, &why),
                    }
                }
                // 3. The end of the epoch: a short batch, else the next epoch with a new seed.
                None if !out.is_empty() => break,
                None => {
                    if *from_start && !*any_good {
                        let report = source.skipped();
                        return Err(Error::setting(
                            "dataset",
                            format!(
                                "{}: a whole epoch without one usable sample ({} bad samples, {} bad shards); \
                                 first problems:\n  {}",
                                source.pattern,
                                report.samples,
                                report.shards,
                                report.lines.join("\n  ")
                            ),
                        ));
                    }
                    *epoch += 1;
                    *position = StreamState::new_epoch(rng);
                    self.open = None;
                }
            }
        }
        Ok(out)
    }
}
