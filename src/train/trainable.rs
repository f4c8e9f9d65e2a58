//! What a ControlNet run trains: the ControlNet, and with `unlock_decoder` the UNet's decoder too (the original's
//! `sd_locked = False`). One set of trainable tensors ([`Params`]: the ControlNet's by name, the decoder's as
//! `unet.<name>`), and what is needed to write each network out whole or rebuild it for inference.
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::Value;

use super::params::{trainable_controlnet, unet_with_decoder, Params, TensorMap, DECODER_PREFIXES};
use crate::model::controlnet::{ControlNetConfig, ControlNetModel};
use crate::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::pipeline::StableDiffusion;
use crate::{Error, Result};

/// Prefix of the UNet's trainable tensors among the run's parameters.
pub const UNET_PREFIX: &str = "unet.";

pub struct Trainable {
    /// The ControlNet being trained (its tensors are `params`' Vars).
    pub controlnet: ControlNetModel,
    pub controlnet_config: Value,
    /// The base UNet's `config.json` (Null unless given).
    pub unet_config: Value,
    /// The UNet's locked tensors (only with an unlocked decoder: to rebuild inference copies and the result).
    pub unet_locked: Option<TensorMap>,
    /// ControlNet tensors by name, the UNet's decoder as `unet.<name>`.
    pub params: Params,
}

impl Trainable {
    /// The ControlNet of `controlnet_config` / `controlnet` as trainable Vars; with `unlock_decoder` also the
    /// decoder of the base UNet (`unet`: its config and tensors), which then replaces `sd.unet`.
    pub fn new(
        controlnet_config: Value,
        controlnet: TensorMap,
        unet: Option<(Value, TensorMap)>,
        unlock_decoder: bool,
        sd: &mut StableDiffusion,
    ) -> Result<Self> {
        let device = sd.unet.device().clone();
        let cn_config = parse_controlnet_config(&controlnet_config)?;
        let (controlnet, mut params) = trainable_controlnet(&cn_config, controlnet, &device)?;
        controlnet.check_compatible(sd.unet.config())?;
        let mut unet_locked = None;
        let unet_config = match unet {
            Some((config_json, tensors)) => {
                if unlock_decoder {
                    let config = parse_unet_config(&config_json)?;
                    let locked: TensorMap = tensors
                        .iter()
                        .filter(|(k, _)| !DECODER_PREFIXES.iter().any(|p| k.starts_with(p)))
                        .map(|(k, t)| (k.clone(), t.clone()))
                        .collect();
                    let (unet, decoder) = unet_with_decoder(&config, tensors, true, &device)?;
                    sd.unet = unet;
                    params = params.merged(decoder, UNET_PREFIX);
                    unet_locked = Some(locked);
                }
                config_json
            }
            None if unlock_decoder => {
                return Err(Error::setting("unlock_decoder", "needs the base UNet's tensors (RunInputs::unet)"))
            }
            None => Value::Null,
        };
        Ok(Self { controlnet, controlnet_config, unet_config, unet_locked, params })
    }

    /// The ControlNet's tensors now.
    pub fn controlnet_tensors(&self) -> Result<TensorMap> {
        Ok(self.params.snapshot()?.into_iter().filter(|(k, _)| !k.starts_with(UNET_PREFIX)).collect())
    }

    /// The UNet decoder's tensors now, by their UNet names (empty with a locked decoder).
    pub fn decoder_tensors(&self) -> Result<TensorMap> {
        Ok(self
            .params
            .snapshot()?
            .into_iter()
            .filter_map(|(k, t)| k.strip_prefix(UNET_PREFIX).map(|k| (k.to_string(), t)))
            .collect())
    }

    /// The whole trained UNet's tensors (locked ones + the decoder now), with an unlocked decoder.
    pub fn unet_tensors(&self) -> Result<Option<TensorMap>> {
        let Some(locked) = &self.unet_locked else { return Ok(None) };
        let mut all = locked.clone();
        all.extend(self.decoder_tensors()?);
        Ok(Some(all))
    }

    /// Inference copies of the ControlNet and (with an unlocked decoder) the UNet, detached from the graph
    /// (generation must not record its steps' activations).
    pub fn inference_copies(&self, device: &Device) -> Result<(ControlNetModel, Option<UNet2DConditionModel>)> {
        let cn_config = parse_controlnet_config(&self.controlnet_config)?;
        let tensors = self.controlnet_tensors()?;
        let net = ControlNetModel::new(&cn_config, VarBuilder::from_tensors(tensors, DType::F32, device))?;
        let unet = match self.unet_tensors()? {
            Some(all) => {
                let config = parse_unet_config(&self.unet_config)?;
                Some(UNet2DConditionModel::new(&config, VarBuilder::from_tensors(all, DType::F32, device))?)
            }
            None => None,
        };
        Ok((net, unet))
    }
}

fn parse_controlnet_config(value: &Value) -> Result<ControlNetConfig> {
    serde_json::from_value(value.clone()).map_err(|e| Error::Invalid(format!("ControlNet config: {e}")))
}

fn parse_unet_config(value: &Value) -> Result<UNet2DConditionConfig> {
    serde_json::from_value(value.clone()).map_err(|e| Error::Invalid(format!("UNet config: {e}")))
}
