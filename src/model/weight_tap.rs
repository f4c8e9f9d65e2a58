//! A [`VarBuilder`] in front of another that keeps the tensors a model asks for under some prefixes. The kept
//! tensors share storage with the model's (a `Tensor` clone), so keeping them costs no memory. A control-LoRA
//! is built on the base UNet's encoder as it was loaded (LoRAs merged, `--unet` replaced), which this records.
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::io::checkpoint::TensorMap;

pub struct WeightTap {
    prefixes: &'static [&'static str],
    seen: Mutex<TensorMap>,
}

impl WeightTap {
    /// Keeps the tensors whose names start with one of `prefixes`.
    pub fn new(prefixes: &'static [&'static str]) -> Arc<Self> {
        Arc::new(Self { prefixes, seen: Mutex::new(TensorMap::new()) })
    }

    pub fn wrap(self: &Arc<Self>, vb: VarBuilder<'static>) -> VarBuilder<'static> {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        VarBuilder::from_backend(Box::new(Tapped { base: vb, tap: self.clone() }), dtype, device)
    }

    /// The tensors kept so far, by name.
    pub fn tensors(&self) -> TensorMap {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn keep(&self, name: &str, t: &Tensor) {
        if self.prefixes.iter().any(|p| name.starts_with(p)) {
            if let Ok(mut seen) = self.seen.lock() {
                seen.insert(name.to_string(), t.clone());
            }
        }
    }
}

struct Tapped {
    base: VarBuilder<'static>,
    tap: Arc<WeightTap>,
}

impl SimpleBackend for Tapped {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.base.get_with_hints_dtype(s, name, h, dtype)?.to_device(dev)?;
        self.tap.keep(name, &t);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.base.get_unchecked_dtype(name, dtype)?.to_device(dev)?;
        self.tap.keep(name, &t);
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_the_model_asked_for_under_the_prefixes() {
        let dev = Device::Cpu;
        let map = TensorMap::from([
            ("conv_in.weight".to_string(), Tensor::ones(3, DType::F32, &dev).unwrap()),
            ("up_blocks.0.weight".to_string(), Tensor::ones(2, DType::F32, &dev).unwrap()),
        ]);
        let tap = WeightTap::new(&["conv_in."]);
        let vb = tap.wrap(VarBuilder::from_tensors(map, DType::F32, &dev));
        vb.get(3, "conv_in.weight").unwrap();
        vb.get(2, "up_blocks.0.weight").unwrap();
        let kept = tap.tensors();
        assert_eq!(kept.keys().collect::<Vec<_>>(), vec!["conv_in.weight"]);
        assert!(vb.get(4, "conv_in.weight").is_err(), "shape checks still apply");
    }
}
