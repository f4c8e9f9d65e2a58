//! Which tensors train. A model is built from a map of named tensors; the trainable ones are candle `Var`s
//! (their tensors are tracked, so `backward` gives them gradients), the others plain tensors that no optimizer
//! ever sees. Computations that depend on no Var record no graph at all (the VAE, the text encoder, the UNet's
//! encoder half); where a frozen layer processes a tracked activation (the UNet's decoder under the ControlNet's
//! residuals), candle 0.11's backward also forms that layer's weight gradient as a by-product (it has no
//! `requires_grad` for plain tensors) and drops it.
use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use crate::model::controlnet::{ControlNetConfig, ControlNetModel};
use crate::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::{Error, Result};

/// The UNet's decoder: what `--unlock-decoder` (the original `sd_locked = False`) trains along with the
/// ControlNet (the original's `output_blocks` and `out`).
pub const DECODER_PREFIXES: [&str; 3] = ["up_blocks.", "conv_norm_out.", "conv_out."];

/// Named tensors, as models are built from and safetensors files store them.
pub type TensorMap = HashMap<String, Tensor>;

/// The trainable tensors of a run by name, sorted (so files, logs and the optimizer walk them in one order).
#[derive(Clone, Debug, Default)]
pub struct Params {
    vars: BTreeMap<String, Var>,
}

impl Params {
    /// Splits `tensors`: those `trainable` picks become f32 `Var`s. Returns the map to build the model from
    /// (every tensor; the trainable ones as their Var's tensor) and the trainable set.
    pub fn split(tensors: TensorMap, trainable: impl Fn(&str) -> bool) -> Result<(TensorMap, Params)> {
        let mut vars = BTreeMap::new();
        let mut all = TensorMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            if trainable(&name) {
                let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
                all.insert(name.clone(), var.as_tensor().clone());
                vars.insert(name, var);
            } else {
                all.insert(name, t);
            }
        }
        Ok((all, Params { vars }))
    }

    /// Both sets, the second's names prefixed with `prefix` (`unet.` for an unlocked decoder).
    pub fn merged(mut self, other: Params, prefix: &str) -> Params {
        for (name, var) in other.vars {
            self.vars.insert(format!("{prefix}{name}"), var);
        }
        self
    }

    /// The tensors whose names start with `prefix`, the prefix removed.
    pub fn with_prefix(&self, prefix: &str) -> Params {
        let vars =
            self.vars.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone()))).collect();
        Params { vars }
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.vars.keys()
    }

    /// Number of trainable scalars.
    pub fn num_elements(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// A copy of the current values, detached from the graph and from the Vars' storage (which the optimizer
    /// overwrites in place).
    pub fn snapshot(&self) -> Result<TensorMap> {
        self.vars.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?.detach()))).collect()
    }

    /// Overwrites the values from `tensors` (a checkpoint); every tensor must be present with its shape.
    pub fn load(&self, tensors: &TensorMap, origin: &std::path::Path) -> Result<()> {
        for (name, var) in &self.vars {
            let t =
                tensors.get(name).ok_or_else(|| crate::Error::weights(origin, format!("tensor {name} is missing")))?;
            if t.dims() != var.dims() {
                return Err(crate::Error::weights(
                    origin,
                    format!("tensor {name} has shape {:?}, expected {:?}", t.dims(), var.dims()),
                ));
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }
}

/// A ControlNet whose every tensor trains.
pub fn trainable_controlnet(
    config: &ControlNetConfig,
    tensors: TensorMap,
    device: &Device,
) -> Result<(ControlNetModel, Params)> {
    let tensors = on_device(tensors, device)?;
    let (all, params) = Params::split(tensors, |_| true)?;
    let model = ControlNetModel::new(config, VarBuilder::from_tensors(all, DType::F32, device))
        .map_err(|e| Error::Invalid(format!("ControlNet weights: {e}")))?;
    Ok((model, params))
}

/// The UNet, locked except (when `unlock_decoder`) its decoder. The returned set is empty when locked.
pub fn unet_with_decoder(
    config: &UNet2DConditionConfig,
    tensors: TensorMap,
    unlock_decoder: bool,
    device: &Device,
) -> Result<(UNet2DConditionModel, Params)> {
    let tensors = on_device(tensors, device)?;
    let (all, params) =
        Params::split(tensors, |name| unlock_decoder && DECODER_PREFIXES.iter().any(|p| name.starts_with(p)))?;
    let model = UNet2DConditionModel::new(config, VarBuilder::from_tensors(all, DType::F32, device))
        .map_err(|e| Error::Invalid(format!("UNet weights: {e}")))?;
    Ok((model, params))
}

/// Every tensor as f32 on `device`.
pub(crate) fn on_device(tensors: TensorMap, device: &Device) -> Result<TensorMap> {
    tensors.into_iter().map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.to_device(device)?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn only_trainable_tensors_get_gradients() {
        let dev = Device::Cpu;
        let t = |v: f32| Tensor::new(&[v, 2.0 * v], &dev).unwrap();
        let map = TensorMap::from([("a.w".to_string(), t(1.0)), ("b.w".to_string(), t(3.0))]);
        let (all, params) = Params::split(map, |n| n.starts_with("a.")).unwrap();
        assert_eq!(params.names().collect::<Vec<_>>(), ["a.w"]);
        let loss = (&all["a.w"] * &all["b.w"]).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<f32> = grads.get(params.get("a.w").unwrap().as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(g, [3.0, 6.0]);
        // candle's backward also works out the frozen operand's gradient (it has no `requires_grad` for plain
        // tensors) but nothing stores or applies it: the frozen tensor is not a variable.
        assert!(!all["b.w"].is_variable() && all["a.w"].is_variable());
        // A snapshot does not follow later in-place updates.
        let snap = params.snapshot().unwrap();
        params.get("a.w").unwrap().set(&t(5.0)).unwrap();
        assert_eq!(snap["a.w"].to_vec1::<f32>().unwrap(), [1.0, 2.0]);
    }
}
