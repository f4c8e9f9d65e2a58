//! Merging LoRAs into the weights as they load: `W += Σ weight · (alpha / rank) · up @ down`.
//!
//! [`LoraMerge::wrap`] puts a [`VarBuilder`] in front of the checkpoint's: every weight the model asks for
//! comes from the checkpoint, plus the LoRA deltas of its module. Merged weights run as fast as plain ones and
//! give the same result as diffusers' unmerged `base(x) + scale · B(A(x))` up to rounding. Which LoRA modules
//! found a weight is recorded: the caller refuses modules that matched nothing ([`LoraMerge::unused`]).
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::io::keymap::{unet_to_original, UnetLayout};
use crate::io::lora::{LoraFile, Part};

/// One LoRA module with the factor it is applied with (`weight · alpha / rank`).
struct Scaled {
    down: Tensor,
    up: Tensor,
    factor: f64,
}

/// The LoRA modules of one model part, from every LoRA of a set, by flat module name (see [`crate::io::lora`]).
pub struct LoraMerge {
    part: Part,
    modules: HashMap<String, Vec<Scaled>>,
    /// The UNet's LDM layout: SDXL kohya files name the UNet as the original checkpoints do (`input_blocks_4_1_…`).
    layout: Option<UnetLayout>,
    used: Mutex<BTreeSet<String>>,
}

impl LoraMerge {
    /// The modules of `part` in `loras` (each with its user weight). `layout`: the UNet's, for LDM names.
    pub fn new(part: Part, loras: &[(&LoraFile, f64)], layout: Option<UnetLayout>) -> Arc<Self> {
        let mut modules: HashMap<String, Vec<Scaled>> = HashMap::new();
        for (file, weight) in loras {
            for ((p, name), m) in &file.modules {
                if *p == part {
                    let scaled = Scaled { down: m.down.clone(), up: m.up.clone(), factor: weight * m.scale() };
                    modules.entry(name.clone()).or_default().push(scaled);
                }
            }
        }
        Arc::new(Self { part, modules, layout, used: Mutex::new(BTreeSet::new()) })
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// `vb` with the deltas added to the weights they change (unchanged when there are none).
    pub fn wrap(self: &Arc<Self>, vb: VarBuilder<'static>) -> VarBuilder<'static> {
        if self.is_empty() {
            return vb;
        }
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        VarBuilder::from_backend(Box::new(Merged { base: vb, merge: self.clone() }), dtype, device)
    }

    /// The modules no weight asked for (sorted), after the model was built.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        let mut left: Vec<String> = self.modules.keys().filter(|k| !used.contains(*k)).cloned().collect();
        left.sort();
        left
    }

    pub fn part(&self) -> Part {
        self.part
    }

    /// The flat module name of a weight path that has LoRA modules, trying diffusers then LDM names.
    fn module_for(&self, name: &str) -> Option<String> {
        let module = name.strip_suffix(".weight")?;
        let module = match self.part {
            Part::Unet => module,
            _ => module.strip_prefix("text_model.").unwrap_or(module),
        };
        let flat = module.replace('.', "_");
        if self.modules.contains_key(&flat) {
            return Some(flat);
        }
        let original = unet_to_original(name, self.layout.as_ref()?)?;
        let flat = original.strip_suffix(".weight")?.replace('.', "_");
        self.modules.contains_key(&flat).then_some(flat)
    }

    /// `Σ factor · up @ down`, shaped as `base` (conv: [out, in, kh, kw]).
    fn delta(&self, module: &str, base: &Tensor) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for m in &self.modules[module] {
            let up = m.up.flatten_from(1)?;
            let down = m.down.flatten_from(1)?;
            let d = (up.to_device(base.device())?.matmul(&down.to_device(base.device())?)? * m.factor)?;
            sum = Some(match sum {
                Some(s) => (s + d)?,
                None => d,
            });
        }
        let Some(delta) = sum else { return base.zeros_like() };
        if delta.elem_count() != base.elem_count() {
            candle_core::bail!(
                "LoRA module {module} makes a {:?} change for the {} weight of shape {:?}: the LoRA was made for \
                 another model",
                delta.dims(),
                self.part.name(),
                base.dims()
            );
        }
        delta.reshape(base.shape())?.to_dtype(base.dtype())
    }

    fn apply(&self, name: &str, base: Tensor) -> Result<Tensor> {
        let Some(module) = self.module_for(name) else { return Ok(base) };
        let delta = self.delta(&module, &base)?;
        if let Ok(mut used) = self.used.lock() {
            used.insert(module);
        }
        // Sum in f32 at least, then back to the weight's dtype.
        let dtype = base.dtype();
        let merged = (base.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?;
        merged.to_dtype(dtype)
    }
}

/// The checkpoint's [`VarBuilder`] with the deltas added.
struct Merged {
    base: VarBuilder<'static>,
    merge: Arc<LoraMerge>,
}

impl SimpleBackend for Merged {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.base.get_with_hints_dtype(s, name, h, dtype)?.to_device(dev)?;
        self.merge.apply(name, t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.base.get_unchecked_dtype(name, dtype)?.to_device(dev)?;
        self.merge.apply(name, t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::lora::LoraModule;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    /// A 3x3 "LoCon" (down 3x3, up 1x1) adds weight · alpha/rank · up @ down, reshaped to the conv weight.
    #[test]
    fn conv_delta_is_scaled_low_rank_product() {
        let dev = Device::Cpu;
        let down = Tensor::arange(0f32, 2. * 3. * 9., &dev).unwrap().reshape((2, 3, 3, 3)).unwrap();
        let up =
            Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.], [2., -1.]], &dev).unwrap().reshape((4, 2, 1, 1)).unwrap();
        let module = LoraModule { down: down.clone(), up, alpha: Some(1.0) };
        let file = LoraFile {
            path: PathBuf::from("x"),
            format: crate::io::lora::LoraFormat::Kohya,
            modules: BTreeMap::from([((Part::Unet, "conv_in".to_string()), module)]),
            ignored: Vec::new(),
        };
        let merge = LoraMerge::new(Part::Unet, &[(&file, 0.5)], None);
        let base = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev).unwrap();
        let out = merge.apply("conv_in.weight", base).unwrap();
        // factor = 0.5 · 1/2; output channel 2 = down[0] + down[1].
        let expected = ((down.get(0).unwrap() + down.get(1).unwrap()).unwrap() * 0.25).unwrap();
        let diff: f32 =
            (out.get(2).unwrap() - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff < 1e-6, "{diff}");
        assert!(merge.unused().is_empty());
        let untouched = merge.apply("conv_out.weight", Tensor::ones(2, DType::F32, &dev).unwrap()).unwrap();
        assert_eq!(untouched.to_vec1::<f32>().unwrap(), vec![1.0, 1.0]);
    }
}
