//! torch's `AdamW` and `clip_grad_norm_`, with a state that checkpoints save and restore exactly.
//!
//! candle_nn's `AdamW` computes the same update but keeps its moments private (a resumed run could not
//! continue them) and counts one global step, where torch counts steps per tensor (a tensor left without a
//! gradient is skipped entirely: no decay, no step). So this is torch's single-tensor AdamW (what
//! `torch.optim.AdamW` runs on CPU tensors), written with the same operations in the same order, in f32:
//!
//! ```text
//! step += 1
//! p      = p · (1 − lr·wd)                         decoupled weight decay
//! m      = m + (1 − β1)·(g − m)                    exp_avg.lerp_(g, 1 − β1)
//! v      = v·β2 + (1 − β2)·g·g                     exp_avg_sq.mul_(β2).addcmul_(g, g, 1 − β2)
//! denom  = √v / √(1 − β2^step) + ε
//! p      = p + (−lr / (1 − β1^step))·m / denom
//! ```
//! The scalar factors are computed in f64 and applied as f32, as torch does with Python floats. torch's
//! vectorised `lerp` fuses its multiply-add; ours does not, a difference of one rounding in `m`.
use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::params::{Params, TensorMap};
use crate::{Error, Result};

/// `clip_grad_norm_` adds this to the norm before dividing (torch's constant).
const CLIP_NORM_EPS: f32 = 1e-6;

/// AdamW's settings; the defaults are diffusers' `train_controlnet.py` defaults, except the learning rate,
/// which is the original ControlNet's 1e-5 (diffusers' script uses 5e-6).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// Gradients by trainable tensor name, summed over the micro-batches of one update.
#[derive(Debug, Clone, Default)]
pub struct Grads {
    grads: BTreeMap<String, Tensor>,
}

impl Grads {
    /// Adds `scale` × the gradients `store` holds for `params` (tensors without a gradient are left out, as
    /// torch leaves `.grad` at None).
    pub fn accumulate(&mut self, params: &Params, store: &candle_core::backprop::GradStore, scale: f64) -> Result<()> {
        for (name, var) in params.iter() {
            let Some(g) = store.get(var.as_tensor()) else { continue };
            // A leaf's gradient can still carry the op that made it, and through it the whole forward graph of
            // the step: kept in the moments, every step's graph would stay alive (measured: ~190 MB a step on
            // the demo UNet at batch 8). Only the values are needed.
            let g = g.detach();
            let g = if scale == 1.0 { g } else { (g * scale)? };
            let sum = match self.grads.remove(name) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            self.grads.insert(name.clone(), sum);
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.grads.get(name)
    }

    pub fn len(&self) -> usize {
        self.grads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    pub fn insert(&mut self, name: &str, grad: Tensor) {
        self.grads.insert(name.to_string(), grad);
    }

    /// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: the 2-norm of all gradients together (the norm of
    /// the per-tensor norms); every gradient is multiplied by `min(1, max_norm / (norm + 1e-6))` (in f32, also
    /// when that is 1, as torch does). Returns the norm before clipping.
    pub fn clip_norm(&mut self, max_norm: f64) -> Result<f64> {
        let mut sum_sq = 0f64;
        for g in self.grads.values() {
            let n: f32 = g.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt()?.to_scalar()?;
            sum_sq += f64::from(n) * f64::from(n);
        }
        let total = sum_sq.sqrt() as f32;
        let coef = (max_norm as f32 / (total + CLIP_NORM_EPS)).min(1.0);
        for g in self.grads.values_mut() {
            *g = g.affine(f64::from(coef), 0.0)?;
        }
        Ok(f64::from(total))
    }
}

/// The moments of one tensor and how many updates it has had.
#[derive(Debug, Clone)]
struct Moments {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    state: BTreeMap<String, Moments>,
}

/// The scalar part of the optimizer state as checkpoints store it (the moments go into a tensor file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWSteps {
    pub config: AdamWConfig,
    /// Updates each tensor has had.
    pub steps: BTreeMap<String, u64>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self { config, state: BTreeMap::new() }
    }

    /// One update of every tensor in `params` that has a gradient, at learning rate `lr`.
    pub fn step(&mut self, params: &Params, grads: &Grads, lr: f64) -> Result<()> {
        let c = self.config;
        for (name, var) in params.iter() {
            let Some(g) = grads.get(name) else { continue };
            let g = g.to_dtype(DType::F32)?;
            let p = var.as_tensor();
            let st = match self.state.remove(name) {
                Some(st) => st,
                None => Moments { step: 0, exp_avg: p.zeros_like()?, exp_avg_sq: p.zeros_like()? },
            };
            let step = st.step + 1;
            // Decoupled weight decay.
            let decayed = p.detach().affine(1.0 - lr * c.weight_decay, 0.0)?;
            let exp_avg = ((&g - &st.exp_avg)?.affine(1.0 - c.beta1, 0.0)? + &st.exp_avg)?;
            let exp_avg_sq = (st.exp_avg_sq.affine(c.beta2, 0.0)? + g.affine(1.0 - c.beta2, 0.0)?.mul(&g)?)?;
            let bias_correction1 = 1.0 - c.beta1.powf(step as f64);
            let bias_correction2_sqrt = (1.0 - c.beta2.powf(step as f64)).sqrt();
            let step_size = lr / bias_correction1;
            let scalar = |v: f64| Tensor::new(v as f32, p.device());
            let denom = exp_avg_sq.sqrt()?.broadcast_div(&scalar(bias_correction2_sqrt)?)?.affine(1.0, c.eps)?;
            let update = exp_avg.affine(-step_size, 0.0)?.div(&denom)?;
            var.set(&(decayed + update)?)?;
            self.state.insert(name.clone(), Moments { step, exp_avg, exp_avg_sq });
        }
        Ok(())
    }

    /// The moments as tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`) and the per-tensor step counts.
    pub fn state(&self) -> (TensorMap, AdamWSteps) {
        let mut tensors = TensorMap::new();
        let mut steps = BTreeMap::new();
        for (name, m) in &self.state {
            tensors.insert(format!("exp_avg.{name}"), m.exp_avg.clone());
            tensors.insert(format!("exp_avg_sq.{name}"), m.exp_avg_sq.clone());
            steps.insert(name.clone(), m.step);
        }
        (tensors, AdamWSteps { config: self.config, steps })
    }

    /// Rebuilds the optimizer from [`AdamW::state`]'s output; `origin` is named in errors.
    pub fn from_state(tensors: &TensorMap, steps: &AdamWSteps, origin: &std::path::Path) -> Result<Self> {
        let mut state = BTreeMap::new();
        for (name, &step) in &steps.steps {
            let get = |key: String| {
                tensors
                    .get(&key)
                    .cloned()
                    .ok_or_else(|| Error::weights(origin, format!("optimizer tensor {key} is missing")))
            };
            let exp_avg = get(format!("exp_avg.{name}"))?;
            let exp_avg_sq = get(format!("exp_avg_sq.{name}"))?;
            state.insert(name.clone(), Moments { step, exp_avg, exp_avg_sq });
        }
        Ok(Self { config: steps.config, state })
    }
}

/// diffusers' `constant_with_warmup` (and `constant` when `warmup` is 0): the learning rate of update `k`
/// (0-based) is `lr · k / warmup` during the warm-up, then `lr`.
pub fn warmup_lr(lr: f64, warmup: usize, k: usize) -> f64 {
    if k < warmup {
        lr * k as f64 / warmup.max(1) as f64
    } else {
        lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn fixture() -> TensorMap {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/train/adamw.safetensors");
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    /// torch.optim.AdamW over 4 steps (tools/fixtures/gen_train.py): LRs 0 (warm-up start), 5e-4, 1e-3, 1e-3;
    /// clip_grad_norm_(1.0) before each step (step 2's gradients are huge, so clipping acts); at step 1 tensor
    /// p1 has no gradient (no decay, its step count stays behind). Metric: max |ours − torch| ≤ 1e-6 · max(1, |torch|).
    #[test]
    fn matches_torch_adamw_with_clipping() {
        let fx = fixture();
        let init: TensorMap = (0..3).map(|i| (format!("p{i}"), fx[&format!("p{i}.init")].clone())).collect();
        let (_, params) = Params::split(init, |_| true).unwrap();
        let mut opt = AdamW::new(AdamWConfig { lr: 1e-3, ..Default::default() });
        for k in 0..4 {
            let mut grads = Grads::default();
            for i in 0..3 {
                if let Some(g) = fx.get(&format!("step{k}.grad.p{i}")) {
                    grads.insert(&format!("p{i}"), g.clone());
                }
            }
            assert_eq!(grads.len(), if k == 1 { 2 } else { 3 });
            let norm = grads.clip_norm(1.0).unwrap();
            assert!(k != 2 || norm > 100.0, "step 2 must clip ({norm})");
            let lr: Vec<f32> = fx[&format!("step{k}.lr")].to_vec1().unwrap();
            opt.step(&params, &grads, f64::from(lr[0])).unwrap();
            for i in 0..3 {
                let ours = params.get(&format!("p{i}")).unwrap().as_tensor();
                let theirs = &fx[&format!("step{k}.p{i}")];
                let scale: f32 = theirs.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let d: f32 = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(d <= 1e-6 * scale.max(1.0), "step {k} p{i}: {d}");
            }
        }
        let (_, steps) = opt.state();
        assert_eq!(steps.steps["p1"], 3);
        assert_eq!(steps.steps["p0"], 4);
    }

    /// The kept gradients hold values only: no op linking them (and the moments made from them) to the step's
    /// forward graph, which would otherwise stay in memory for the rest of the run.
    #[test]
    fn gradients_are_detached_from_the_graph() {
        let dev = Device::Cpu;
        let (_, params) =
            Params::split(TensorMap::from([("a".into(), Tensor::new(&[0.5f32, 2.0], &dev).unwrap())]), |_| true)
                .unwrap();
        let a = params.get("a").unwrap().as_tensor();
        // d/da (a · exp(a)) = exp(a) + a·exp(a): candle builds it from the tracked exp(a).
        let loss = (a * a.exp().unwrap()).unwrap().sum_all().unwrap();
        let store = loss.backward().unwrap();
        let mut grads = Grads::default();
        grads.accumulate(&params, &store, 1.0).unwrap();
        assert!(!grads.get("a").unwrap().track_op());
        let mut adamw = AdamW::new(AdamWConfig::default());
        adamw.step(&params, &grads, 1e-3).unwrap();
        let (moments, _) = adamw.state();
        assert!(moments.values().all(|m| !m.track_op()));
    }

    #[test]
    fn state_round_trips() {
        let t = Tensor::new(&[1f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let (_, params) = Params::split(TensorMap::from([("w".to_string(), t.clone())]), |_| true).unwrap();
        let mut grads = Grads::default();
        grads.insert("w", Tensor::new(&[0.5f32, 0.1, -0.2], &Device::Cpu).unwrap());
        let mut a = AdamW::new(AdamWConfig::default());
        a.step(&params, &grads, 1e-2).unwrap();
        let (tensors, steps) = a.state();
        let mut b = AdamW::from_state(&tensors, &steps, std::path::Path::new("x")).unwrap();
        let (_, p2) =
            Params::split(TensorMap::from([("w".to_string(), params.snapshot().unwrap()["w"].clone())]), |_| true)
                .unwrap();
        a.step(&params, &grads, 1e-2).unwrap();
        b.step(&p2, &grads, 1e-2).unwrap();
        let (x, y) =
            (params.get("w").unwrap().to_vec1::<f32>().unwrap(), p2.get("w").unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(x, y);
    }

    #[test]
    fn warmup_is_linear_from_zero() {
        assert_eq!(warmup_lr(1e-4, 4, 0), 0.0);
        assert_eq!(warmup_lr(1e-4, 4, 2), 5e-5);
        assert_eq!(warmup_lr(1e-4, 4, 4), 1e-4);
        assert_eq!(warmup_lr(1e-4, 0, 0), 1e-4);
    }
}
