//! Diffusion schedulers, built from `scheduler_config.json` as diffusers' `from_config` does.
