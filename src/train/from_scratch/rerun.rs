//! Running `train-base` again on a run folder: what the earlier run did, and whether the new settings can apply.
//!
//! A stage that was stopped continues; a finished stage asked for more steps continues to them. What cannot
//! apply is refused before anything is written, so `base_config.json` only ever records settings the model got:
//! fewer steps than a stage has taken, a setting that shapes every step (resolution, seed, batch size, a streamed
//! stage's shuffle buffer, ...) changed after that stage has started, or more VAE steps once the decoder or the
//! UNet has learned its latents.
use std::path::Path;

use super::settings::Settings;
use super::stage::latest_state;
use super::{is_complete, SETTINGS_FILE, UNET_STAGE, VAE_DECODER_STAGE, VAE_STAGE};
use crate::io::weights::DIFFUSERS_STEM;
use crate::{Error, Result};

/// Steps each stage of an earlier run has taken (its newest valid checkpoint; 0: not started).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Done {
    pub vae: u64,
    pub vae_decoder: u64,
    pub unet: u64,
}

impl Done {
    /// The VAE stage has steps to take, or has not written `model/vae/` yet.
    pub(super) fn vae_pending(&self, settings: &Settings, model_dir: &Path) -> bool {
        !is_complete(&model_dir.join("vae"), &weights()) || self.vae < settings.vae.steps
    }

    /// The UNet stage has steps to take, or has not written `model/unet/` yet.
    pub(super) fn unet_pending(&self, settings: &Settings, model_dir: &Path) -> bool {
        !is_complete(&model_dir.join("unet"), &weights()) || self.unet < settings.unet.steps
    }
}

fn weights() -> String {
    format!("{DIFFUSERS_STEM}.safetensors")
}

/// What the earlier run in `run_dir` did, after checking that `settings` can continue it.
pub fn check(run_dir: &Path, settings: &Settings) -> Result<Done> {
    let mut done = Done::default();
    let mut trained_with = Vec::new();
    for (name, stage, steps) in [
        (VAE_STAGE, &settings.vae, &mut done.vae),
        (VAE_DECODER_STAGE, &settings.vae_decoder, &mut done.vae_decoder),
        (UNET_STAGE, &settings.unet, &mut done.unet),
    ] {
        if let Some(state) = latest_state(&run_dir.join(name))? {
            // Streamed data: the shuffle buffer shapes the order the stage is partway through.
            if let Some(kept) = state.stream.as_ref().map(|s| s.shuffle_buffer) {
                if kept != settings.shuffle_buffer {
                    let (now, then) = (settings.shuffle_buffer.to_string(), kept.to_string());
                    return Err(changed("shuffle_buffer", &now, &then, name, run_dir));
                }
            }
            *steps = state.step;
            trained_with.push((name, stage, state.step, state.settings));
        }
    }
    let prefix = |stage: &str| stage.replace('-', "_");
    let folder = run_dir.display();

    // 1. No stage takes back steps, nor takes new ones under other step settings.
    for &(name, now, done_steps, ref then) in &trained_with {
        if now.steps < done_steps {
            return Err(Error::setting(
                format!("{}_steps", prefix(name)),
                format!(
                    "{} is fewer than the {done_steps} steps the {name} stage of {folder} has taken; steps cannot be \
                     undone: ask for at least {done_steps}, or train into a new output folder",
                    now.steps
                ),
            ));
        }
        for (field, a, b) in [
            ("batch_size", now.batch_size.to_string(), then.batch_size.to_string()),
            ("learning_rate", now.learning_rate.to_string(), then.learning_rate.to_string()),
            ("warmup_steps", now.warmup_steps.to_string(), then.warmup_steps.to_string()),
        ] {
            if a != b {
                return Err(changed(&format!("{}_{field}", prefix(name)), &a, &b, name, run_dir));
            }
        }
        if now.ema_decay != then.ema_decay && now.steps <= done_steps {
            return Err(Error::setting(
                format!("{}_ema_decay", prefix(name)),
                format!(
                    "the {name} stage of {folder} has taken all its {done_steps} steps with a weight average of \
                     {:?}; a new one needs more steps to start on",
                    then.ema_decay
                ),
            ));
        }
    }

    // 2. The VAE's latents stay what the later stages learned.
    if settings.vae.steps > done.vae && done.vae > 0 && (done.vae_decoder > 0 || done.unet > 0) {
        return Err(Error::setting(
            "vae_steps",
            format!(
                "the VAE of {folder} stopped at step {}, and the decoder or the UNet has learned its latents since; \
                 more VAE steps would change them: keep {}, or train into a new output folder",
                done.vae, done.vae
            ),
        ));
    }

    // 3. The settings outside the stages that shape a started stage's steps.
    let saved = run_dir.join(SETTINGS_FILE);
    if !trained_with.is_empty() && saved.is_file() {
        let text = std::fs::read_to_string(&saved).map_err(|e| Error::io(&saved, e))?;
        let then: Settings = serde_json::from_str(&text).map_err(|e| Error::config(&saved, e))?;
        let started = |stage: &str| trained_with.iter().any(|(name, ..)| *name == stage);
        let all = [VAE_STAGE, VAE_DECODER_STAGE, UNET_STAGE];
        let vae_parts = [VAE_STAGE, VAE_DECODER_STAGE];
        let fields: [(&str, String, String, &[&str]); 8] = [
            ("resolution", settings.resolution.to_string(), then.resolution.to_string(), &all),
            ("seed", settings.seed.to_string(), then.seed.to_string(), &all),
            ("vae_crop", settings.vae_crop.to_string(), then.vae_crop.to_string(), &vae_parts),
            ("kl_weight", settings.kl_weight.to_string(), then.kl_weight.to_string(), &[VAE_STAGE]),
            (
                "proportion_empty_prompts",
                settings.proportion_empty_prompts.to_string(),
                then.proportion_empty_prompts.to_string(),
                &[UNET_STAGE],
            ),
            (
                "train_text_encoder",
                settings.train_text_encoder.to_string(),
                then.train_text_encoder.to_string(),
                &[UNET_STAGE],
            ),
            ("snr_gamma", format!("{:?}", settings.snr_gamma), format!("{:?}", then.snr_gamma), &[UNET_STAGE]),
            ("noise_offset", settings.noise_offset.to_string(), then.noise_offset.to_string(), &[UNET_STAGE]),
        ];
        for (setting, now, before, stages) in fields {
            if let Some(stage) = stages.iter().find(|s| started(s)).filter(|_| now != before) {
                return Err(changed(setting, &now, &before, stage, run_dir));
            }
        }
    }
    Ok(done)
}

fn changed(setting: &str, now: &str, then: &str, stage: &str, run_dir: &Path) -> Error {
    Error::setting(
        setting,
        format!(
            "{now} differs from the {then} the {stage} stage of {} was trained with; keep {then} to continue that run, \
             or train into a new output folder",
            run_dir.display()
        ),
    )
}
