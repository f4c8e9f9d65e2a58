//! Finite-difference checks of the backward pass of the blocks training goes through: attention, layer norm,
//! group norm, the resnet block, a transformer block (GEGLU, norms, self- and cross-attention) and the hint
//! encoder (strided convolutions). In f64: for a loss `L = Σ out ⊙ R` (R fixed random), the analytic gradient
//! of sampled elements of every weight and of the inputs must equal the central difference
//! `(L(θ + h) − L(θ − h)) / 2h`, h = 1e-6, within 1e-6 · max(1, |gradient|).
//!
//! Exception: the repo's `LayerNorm` computes its statistics in f32 whatever the input type (so also for f64),
//! which makes an f64 difference quotient with a tiny h meaningless; blocks containing it are checked with
//! h = 1e-3 and a 2e-3 tolerance (a wrong backward formula is off by O(1), not O(1e-3)).
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::model::attention::{Attention, AttentionConfig};
use crate::model::controlnet::ControlNetConditioningEmbedding;
use crate::model::layers::{group_norm, LayerNorm};
use crate::model::resnet::{ResnetBlock2D, ResnetConfig};
use crate::model::transformer_2d::{BasicTransformerBlock, Transformer2DConfig};

/// Step and tolerance of the f64 check, and of the check of blocks that compute in f32 inside.
const F64_CHECK: (f64, f64) = (1e-6, 1e-6);
const F32_INSIDE_CHECK: (f64, f64) = (1e-3, 2e-3);
/// Elements checked per tensor.
const SAMPLES: usize = 5;

/// A deterministic pseudo-random sequence (a 64-bit LCG) for weights and sample positions.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    fn uniform(&mut self) -> f64 {
        self.next() as f64 / (1u64 << 53) as f64
    }
    fn values(&mut self, n: usize, centre: f64, spread: f64) -> Vec<f64> {
        (0..n).map(|_| centre + spread * (2.0 * self.uniform() - 1.0)).collect()
    }
}

fn var(rng: &mut Lcg, shape: &[usize]) -> Var {
    let n = shape.iter().product();
    Var::from_tensor(&Tensor::from_vec(rng.values(n, 0.0, 1.0), shape, &Device::Cpu).unwrap()).unwrap()
}

/// Gives every weight of `map` random values (norm scales around 1, so the normalisations stay well posed).
fn randomise(map: &VarMap, rng: &mut Lcg) {
    let data = map.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let v = &data[name];
        let centre = if name.contains("norm") && name.ends_with("weight") { 1.0 } else { 0.0 };
        let t = Tensor::from_vec(rng.values(v.elem_count(), centre, 0.5), v.dims(), &Device::Cpu).unwrap();
        v.set(&t).unwrap();
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Checks d(Σ forward() ⊙ R)/dθ for sampled elements of every weight in `map` and of every input.
fn check(what: &str, (h, tolerance): (f64, f64), map: &VarMap, inputs: &[(&str, &Var)], forward: impl Fn() -> Tensor) {
    let mut rng = Lcg(17);
    let out = forward();
    let r = Tensor::from_vec(rng.values(out.elem_count(), 0.0, 1.0), out.dims(), &Device::Cpu).unwrap();
    let loss = |out: &Tensor| -> f64 { (out * &r).unwrap().sum_all().unwrap().to_scalar().unwrap() };
    let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut tensors: Vec<(String, Var)> =
        map.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors.extend(inputs.iter().map(|(n, v)| (format!("input {n}"), (*v).clone())));
    assert!(!tensors.is_empty());
    for (name, v) in &tensors {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
        let g = values(g);
        let original = values(v.as_tensor());
        for _ in 0..SAMPLES.min(original.len()) {
            let i = (rng.next() % original.len() as u64) as usize;
            let at = |delta: f64| -> f64 {
                let mut p = original.clone();
                p[i] += delta;
                v.set(&Tensor::from_vec(p, v.dims(), &Device::Cpu).unwrap()).unwrap();
                loss(&forward())
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            v.set(&Tensor::from_vec(original.clone(), v.dims(), &Device::Cpu).unwrap()).unwrap();
            let err = (numeric - g[i]).abs();
            assert!(
                err <= tolerance * g[i].abs().max(1.0),
                "{what}: {name}[{i}]: backward {} vs finite difference {numeric}",
                g[i]
            );
        }
    }
}

fn builder(map: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(map, DType::F64, &Device::Cpu)
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut rng = Lcg(1);
    let map = VarMap::new();
    let cfg = AttentionConfig {
        query_dim: 8,
        cross_attention_dim: Some(6),
        heads: 2,
        dim_head: 4,
        qkv_bias: false,
        upcast_attention: false,
    };
    let attn = Attention::new(cfg, builder(&map)).unwrap();
    randomise(&map, &mut rng);
    let (x, ctx) = (var(&mut rng, &[2, 5, 8]), var(&mut rng, &[2, 3, 6]));
    check("attention", F64_CHECK, &map, &[("x", &x), ("context", &ctx)], || {
        attn.forward(x.as_tensor(), Some(ctx.as_tensor())).unwrap()
    });
}

#[test]
fn norms_backward_match_finite_differences() {
    let mut rng = Lcg(2);
    let map = VarMap::new();
    let ln = LayerNorm::new(7, 1e-5, builder(&map).pp("layer_norm")).unwrap();
    randomise(&map, &mut rng);
    let x = var(&mut rng, &[3, 7]);
    check("layer norm", F32_INSIDE_CHECK, &map, &[("x", &x)], || ln.forward(x.as_tensor()).unwrap());

    let map = VarMap::new();
    let gn = group_norm(2, 6, 1e-5, builder(&map).pp("group_norm")).unwrap();
    randomise(&map, &mut rng);
    let x = var(&mut rng, &[2, 6, 3, 3]);
    check("group norm", F64_CHECK, &map, &[("x", &x)], || gn.forward(x.as_tensor()).unwrap());
}

#[test]
fn resnet_backward_matches_finite_differences() {
    let mut rng = Lcg(3);
    let map = VarMap::new();
    let cfg = ResnetConfig {
        in_channels: 4,
        out_channels: 6,
        temb_channels: Some(5),
        groups: 2,
        eps: 1e-5,
        output_scale_factor: 1.0,
    };
    let block = ResnetBlock2D::new(cfg, builder(&map)).unwrap();
    randomise(&map, &mut rng);
    let (x, temb) = (var(&mut rng, &[2, 4, 5, 5]), var(&mut rng, &[2, 5]));
    check("resnet", F64_CHECK, &map, &[("x", &x), ("temb", &temb)], || {
        block.forward(x.as_tensor(), Some(temb.as_tensor())).unwrap()
    });
}

#[test]
fn transformer_block_backward_matches_finite_differences() {
    let mut rng = Lcg(4);
    let map = VarMap::new();
    let cfg = Transformer2DConfig {
        in_channels: 8,
        heads: 2,
        dim_head: 4,
        num_layers: 1,
        cross_attention_dim: 6,
        norm_num_groups: 2,
        use_linear_projection: false,
        upcast_attention: false,
    };
    let block = BasicTransformerBlock::new(8, &cfg, builder(&map)).unwrap();
    randomise(&map, &mut rng);
    let (x, ctx) = (var(&mut rng, &[1, 4, 8]), var(&mut rng, &[1, 3, 6]));
    check("transformer block", F32_INSIDE_CHECK, &map, &[("x", &x), ("context", &ctx)], || {
        block.forward(x.as_tensor(), ctx.as_tensor()).unwrap()
    });
}

#[test]
fn hint_encoder_backward_matches_finite_differences() {
    let mut rng = Lcg(5);
    let map = VarMap::new();
    let hint = ControlNetConditioningEmbedding::new(3, &[4, 8], 6, builder(&map)).unwrap();
    randomise(&map, &mut rng);
    let cond = var(&mut rng, &[1, 3, 8, 8]);
    check("hint encoder", F64_CHECK, &map, &[("condition", &cond)], || hint.forward(cond.as_tensor()).unwrap());
}
