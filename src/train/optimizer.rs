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

    /// Adds a gradient, as a copy: [`Grads::clip_norm`] scales the gradients it holds in place.
    pub fn insert(&mut self, name: &str, grad: &Tensor) -> Result<()> {
        self.grads.insert(name.to_string(), grad.copy()?);
        Ok(())
    }

    /// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: the 2-norm of all gradients together (the norm of
    /// the per-tensor norms); every gradient is multiplied by `min(1, max_norm / (norm + 1e-6))` (in f32, also
    /// when that is 1, as torch does). Returns the norm before clipping.
    ///
    /// On the CPU both passes run over the gradients where they lie (no squared or scaled copies of all the
    /// trainable parameters' gradients: 2 x 1.4 GB for SD1.5's ControlNet); the gradients a [`Grads`] holds are
    /// its own (the backward's results, or [`Grads::insert`]'s copies).
    pub fn clip_norm(&mut self, max_norm: f64) -> Result<f64> {
        let in_place = |g: &Tensor| g.device().is_cpu() && g.dtype() == DType::F32 && g.is_contiguous();
        let mut sum_sq = 0f64;
        for g in self.grads.values() {
            let n = if in_place(g) {
                inplace::sum_of_squares(g)?.sqrt() as f32
            } else {
                g.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt()?.to_scalar()?
            };
            sum_sq += f64::from(n) * f64::from(n);
        }
        let total = sum_sq.sqrt() as f32;
        let coef = (max_norm as f32 / (total + CLIP_NORM_EPS)).min(1.0);
        for g in self.grads.values_mut() {
            if in_place(g) {
                g.inplace_op1(&inplace::Scale { coef })?;
            } else {
                *g = g.affine(f64::from(coef), 0.0)?;
            }
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
        self.step_with(params, grads, lr, true)
    }

    /// [`AdamW::step`]; `in_place` allows the in-place passes where the tensors are on the CPU.
    fn step_with(&mut self, params: &Params, grads: &Grads, lr: f64, in_place: bool) -> Result<()> {
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
            let scalars = Scalars::new(&c, lr, step);
            let (exp_avg, exp_avg_sq) = if in_place && p.device().is_cpu() && p.is_contiguous() {
                // Three passes over memory, in place, no temporaries (the same f32 operations in the same order).
                let g = g.contiguous()?;
                st.exp_avg.inplace_op2(&g, &inplace::Lerp { weight: scalars.one_minus_beta1 })?;
                st.exp_avg_sq
                    .inplace_op2(&g, &inplace::AddSquare { beta2: scalars.beta2, weight: scalars.one_minus_beta2 })?;
                p.inplace_op3(&st.exp_avg, &st.exp_avg_sq, &inplace::Apply(scalars))?;
                (st.exp_avg, st.exp_avg_sq)
            } else {
                let decayed = p.detach().affine(f64::from(scalars.decay), 0.0)?;
                let exp_avg = ((&g - &st.exp_avg)?.affine(f64::from(scalars.one_minus_beta1), 0.0)? + &st.exp_avg)?;
                let exp_avg_sq = (st.exp_avg_sq.affine(f64::from(scalars.beta2), 0.0)?
                    + g.affine(f64::from(scalars.one_minus_beta2), 0.0)?.mul(&g)?)?;
                let bc2 = Tensor::new(scalars.bias_correction2_sqrt, p.device())?;
                let denom = exp_avg_sq.sqrt()?.broadcast_div(&bc2)?.affine(1.0, f64::from(scalars.eps))?;
                let update = exp_avg.affine(f64::from(scalars.neg_step_size), 0.0)?.div(&denom)?;
                var.set(&(decayed + update)?)?;
                (exp_avg, exp_avg_sq)
            };
            self.state.insert(name.clone(), Moments { step, exp_avg, exp_avg_sq });
        }
        Ok(())
    }

    /// The moments as tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`) and the per-tensor step counts. The
    /// tensors are the live moments, which the next [`AdamW::step`] updates in place: write them out first.
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
            // Copies: the moments are updated in place, and must not change the caller's tensors.
            let exp_avg = get(format!("exp_avg.{name}"))?.copy()?;
            let exp_avg_sq = get(format!("exp_avg_sq.{name}"))?.copy()?;
            state.insert(name.clone(), Moments { step, exp_avg, exp_avg_sq });
        }
        Ok(Self { config: steps.config, state })
    }
}

/// The scalar factors of one update, computed in f64 and rounded to f32 as torch applies Python floats.
#[derive(Debug, Clone, Copy)]
struct Scalars {
    /// 1 − lr·wd (decoupled weight decay).
    decay: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// √(1 − β2^step).
    bias_correction2_sqrt: f32,
    eps: f32,
    /// −lr / (1 − β1^step).
    neg_step_size: f32,
}

impl Scalars {
    fn new(c: &AdamWConfig, lr: f64, step: u64) -> Self {
        let bias_correction1 = 1.0 - c.beta1.powf(step as f64);
        Self {
            decay: (1.0 - lr * c.weight_decay) as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            bias_correction2_sqrt: (1.0 - c.beta2.powf(step as f64)).sqrt() as f32,
            eps: c.eps as f32,
            neg_step_size: (-lr / bias_correction1) as f32,
        }
    }
}

/// The update as in-place passes over contiguous f32 CPU tensors, element by element in the order the tensor
/// formulas above evaluate (so both paths give the same bits). Each pass splits its slice across rayon's threads.
mod inplace {
    use candle_core::{bail, CpuStorage, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
    use rayon::prelude::*;

    use super::Scalars;

    /// Elements per parallel work item.
    const CHUNK: usize = 1 << 16;

    fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
            _ => bail!("{op}: needs contiguous f32 tensors"),
        }
    }

    fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
            _ => bail!("{op}: needs contiguous f32 tensors"),
        }
    }

    fn same_len(op: &str, a: usize, b: usize) -> Result<()> {
        if a != b {
            bail!("{op}: {a} elements against {b}");
        }
        Ok(())
    }

    /// Σ g² of a contiguous f32 tensor on the CPU, per chunk in f32 lanes, the chunks summed in f64.
    pub fn sum_of_squares(g: &Tensor) -> Result<f64> {
        let (storage, layout) = g.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { bail!("clip: a CPU tensor expected") };
        let v = slice(cpu, layout, "clip")?;
        Ok(v.par_chunks(CHUNK)
            .map(|c| {
                const LANES: usize = 16;
                let mut acc = [0f32; LANES];
                let mut it = c.chunks_exact(LANES);
                for x in &mut it {
                    for (a, &x) in acc.iter_mut().zip(x) {
                        *a += x * x;
                    }
                }
                let tail: f64 = it.remainder().iter().map(|&x| f64::from(x * x)).sum();
                tail + acc.iter().map(|&a| f64::from(a)).sum::<f64>()
            })
            .sum())
    }

    /// g ← g·coef (torch's in-place `mul_` of `clip_grad_norm_`).
    pub struct Scale {
        pub coef: f32,
    }

    impl InplaceOp1 for Scale {
        fn name(&self) -> &'static str {
            "clip-scale"
        }

        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let coef = self.coef;
            slice_mut(s, l, self.name())?.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|g| *g *= coef));
            Ok(())
        }
    }

    /// m ← (g − m)·(1 − β1) + m.
    pub struct Lerp {
        pub weight: f32,
    }

    impl InplaceOp2 for Lerp {
        fn name(&self) -> &'static str {
            "adamw-lerp"
        }

        fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
            let (m, g) = (slice_mut(s1, l1, self.name())?, slice(s2, l2, self.name())?);
            same_len(self.name(), m.len(), g.len())?;
            let w = self.weight;
            m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    *m += (g - *m) * w;
                }
            });
            Ok(())
        }
    }

    /// v ← v·β2 + (g·(1 − β2))·g.
    pub struct AddSquare {
        pub beta2: f32,
        pub weight: f32,
    }

    impl InplaceOp2 for AddSquare {
        fn name(&self) -> &'static str {
            "adamw-add-square"
        }

        fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
            let (v, g) = (slice_mut(s1, l1, self.name())?, slice(s2, l2, self.name())?);
            same_len(self.name(), v.len(), g.len())?;
            let (beta2, w) = (self.beta2, self.weight);
            v.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(v, g)| {
                for (v, &g) in v.iter_mut().zip(g) {
                    *v = *v * beta2 + g * w * g;
                }
            });
            Ok(())
        }
    }

    /// p ← p·(1 − lr·wd) + (m·(−step size)) / (√v / √(1 − β2^step) + ε).
    pub struct Apply(pub Scalars);

    impl InplaceOp3 for Apply {
        fn name(&self) -> &'static str {
            "adamw-apply"
        }

        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<()> {
            let p = slice_mut(s1, l1, self.name())?;
            let (m, v) = (slice(s2, l2, self.name())?, slice(s3, l3, self.name())?);
            same_len(self.name(), p.len(), m.len())?;
            same_len(self.name(), p.len(), v.len())?;
            let c = self.0;
            p.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK)).for_each(|((p, m), v)| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let denom = v.sqrt() / c.bias_correction2_sqrt + c.eps;
                    *p = *p * c.decay + m * c.neg_step_size / denom;
                }
            });
            Ok(())
        }
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
        crate::test_support::fixture_tensors("train/adamw.safetensors")
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
                    grads.insert(&format!("p{i}"), g).unwrap();
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

    /// The in-place CPU passes and the tensor formulas (other devices) give the same bits, over several steps
    /// with decay, warm-up and a tensor that skips a step.
    #[test]
    fn in_place_update_equals_the_tensor_formulas() {
        let dev = Device::Cpu;
        let values = |seed: u64, n: usize| crate::train::random_weights::uniform(seed, n, 1.5);
        let init = || -> TensorMap {
            (0..2)
                .map(|i| {
                    (
                        format!("w{i}"),
                        Tensor::from_vec(values(i, 1000 + 37 * i as usize), 1000 + 37 * i as usize, &dev).unwrap(),
                    )
                })
                .collect()
        };
        let (_, a) = Params::split(init(), |_| true).unwrap();
        let (_, b) = Params::split(init(), |_| true).unwrap();
        let config = AdamWConfig { lr: 3e-3, weight_decay: 0.1, ..Default::default() };
        let (mut fast, mut slow) = (AdamW::new(config), AdamW::new(config));
        for k in 0..5u64 {
            let mut grads = Grads::default();
            for i in 0..2u64 {
                if k == 2 && i == 1 {
                    continue;
                }
                let n = 1000 + 37 * i as usize;
                grads
                    .insert(&format!("w{i}"), &Tensor::from_vec(values(100 + 10 * k + i, n), n, &dev).unwrap())
                    .unwrap();
            }
            let lr = warmup_lr(config.lr, 2, k as usize);
            fast.step_with(&a, &grads, lr, true).unwrap();
            slow.step_with(&b, &grads, lr, false).unwrap();
            for i in 0..2 {
                let name = format!("w{i}");
                let (x, y) =
                    (a.get(&name).unwrap().to_vec1::<f32>().unwrap(), b.get(&name).unwrap().to_vec1::<f32>().unwrap());
                assert!(x.iter().zip(&y).all(|(x, y)| x.to_bits() == y.to_bits()), "step {k} {name}");
            }
        }
        let (ma, sa) = fast.state();
        let (mb, sb) = slow.state();
        assert_eq!(sa, sb);
        for (k, t) in &ma {
            assert_eq!(t.to_vec1::<f32>().unwrap(), mb[k].to_vec1::<f32>().unwrap(), "{k}");
        }
    }

    #[test]
    fn state_round_trips() {
        let t = Tensor::new(&[1f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let (_, params) = Params::split(TensorMap::from([("w".to_string(), t.clone())]), |_| true).unwrap();
        let mut grads = Grads::default();
        grads.insert("w", &Tensor::new(&[0.5f32, 0.1, -0.2], &Device::Cpu).unwrap()).unwrap();
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
