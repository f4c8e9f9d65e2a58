//! Exponential moving average of the trainable weights (diffusers' `EMAModel`, the text-to-image scripts'
//! `--use_ema`). A diffusion model's raw weights at a constant learning rate jitter from step to step, and
//! samples drawn with them show it as texture and colour casts; the average over the last few hundred steps
//! samples cleaner images. The training itself still steps the raw weights; the average is what a run
//! writes out at its end.

use super::params::{Params, TensorMap};
use crate::{Error, Result};

/// Warm-up of the decay: after `n` updates the average uses min(decay, (1 + n) / (10 + n)), so the first
/// updates follow the weights closely instead of keeping the random start for a thousand steps (diffusers'
/// default, `use_ema_warmup = False`).
const WARMUP_OFFSET: f64 = 10.0;

/// The averaged copy of a [`Params`] set.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    updates: u64,
    shadow: TensorMap,
}

impl Ema {
    /// Starts the average at the current weights.
    pub fn new(params: &Params, decay: f64) -> Result<Self> {
        Ok(Self { decay, updates: 0, shadow: params.snapshot()? })
    }

    /// Continues an average saved by [`Ema::shadow`] after `updates` updates; every weight of `params` must be
    /// there with its shape (`origin` names the file in errors).
    pub fn from_state(
        params: &Params,
        decay: f64,
        updates: u64,
        shadow: TensorMap,
        origin: &std::path::Path,
    ) -> Result<Self> {
        for (name, var) in params.iter() {
            match shadow.get(name) {
                Some(t) if t.dims() == var.dims() => {}
                Some(t) => {
                    return Err(Error::weights(
                        origin,
                        format!("average of {name} has shape {:?}, expected {:?}", t.dims(), var.dims()),
                    ))
                }
                None => return Err(Error::weights(origin, format!("average of {name} is missing"))),
            }
        }
        let device = params.iter().next().map(|(_, v)| v.device().clone());
        let shadow = match device {
            Some(d) => shadow.into_iter().map(|(k, t)| Ok((k, t.to_device(&d)?))).collect::<Result<TensorMap>>()?,
            None => shadow,
        };
        Ok(Self { decay, updates, shadow })
    }

    /// The decay the next update uses.
    pub fn current_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (WARMUP_OFFSET + n))
    }

    /// average ← d · average + (1 − d) · weights, after an optimizer step.
    pub fn update(&mut self, params: &Params) -> Result<()> {
        let d = self.current_decay();
        for (name, var) in params.iter() {
            let average = self.shadow.get_mut(name).ok_or_else(|| Error::Invalid(format!("no average for {name}")))?;
            *average = ((&*average * d)? + (var.as_tensor().detach() * (1.0 - d))?)?;
        }
        self.updates += 1;
        Ok(())
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The averaged weights, by the names of the `Params` they follow.
    pub fn shadow(&self) -> &TensorMap {
        &self.shadow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn params(v: &[f32]) -> Params {
        let t = Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap();
        Params::split([("w".to_string(), t)].into(), |_| true).unwrap().1
    }

    #[test]
    fn decay_warms_up_to_its_cap() {
        let p = params(&[0.0]);
        let mut ema = Ema::new(&p, 0.999).unwrap();
        assert!((ema.current_decay() - 0.1).abs() < 1e-12);
        ema.update(&p).unwrap();
        assert!((ema.current_decay() - 2.0 / 11.0).abs() < 1e-12);
        ema.updates = 1_000_000;
        assert_eq!(ema.current_decay(), 0.999);
    }

    /// Two updates by hand: a = d0 a + (1 − d0) w1, then with d1 and w2.
    #[test]
    fn averages_with_the_decay_of_each_update() {
        let p = params(&[1.0, -2.0]);
        let mut ema = Ema::new(&p, 0.5).unwrap();
        let w = p.get("w").unwrap();
        w.set(&Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap()).unwrap();
        ema.update(&p).unwrap(); // d = 0.1
        w.set(&Tensor::new(&[5.0f32, 4.0], &Device::Cpu).unwrap()).unwrap();
        ema.update(&p).unwrap(); // d = 2/11
        let (d0, d1) = (0.1f64, 2.0 / 11.0);
        let want = |start: f64, w1: f64, w2: f64| d1 * (d0 * start + (1.0 - d0) * w1) + (1.0 - d1) * w2;
        let got: Vec<f32> = ema.shadow()["w"].to_vec1().unwrap();
        assert!((f64::from(got[0]) - want(1.0, 3.0, 5.0)).abs() < 1e-6, "{got:?}");
        assert!((f64::from(got[1]) - want(-2.0, 0.0, 4.0)).abs() < 1e-6, "{got:?}");
        // The raw weights are untouched.
        assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), [5.0, 4.0]);
        assert_eq!(ema.updates(), 2);
    }

    #[test]
    fn a_saved_average_must_match_the_weights() {
        let p = params(&[1.0, 2.0]);
        let here = std::path::Path::new("ema.safetensors");
        let short = [("w".to_string(), Tensor::new(&[1.0f32], &Device::Cpu).unwrap())].into();
        let err = Ema::from_state(&p, 0.9, 3, short, here).unwrap_err().to_string();
        assert!(err.contains("ema.safetensors") && err.contains("shape"), "{err}");
        let err = Ema::from_state(&p, 0.9, 3, TensorMap::new(), here).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
        let ok = Ema::from_state(&p, 0.9, 3, p.snapshot().unwrap(), here).unwrap();
        assert_eq!(ok.updates(), 3);
    }
}
