//! Speed and memory of the full-size networks on this machine, with random weights (nothing to download):
//! seconds per guided UNet + ControlNet step, per UNet and ControlNet pass and per VAE decode, achieved
//! GFLOP/s and peak resident memory. `controlnet bench` prints it; `tools/bench_torch.py` measures diffusers on
//! the same configs with the same JSON keys, and `tools/bench_compare.py` puts the two side by side.
//!
//! A step here is what the pipeline runs per denoising step: the ControlNet on the whole batch, then the UNet
//! with its residuals (the hint embedding is computed once per image, so it is timed apart). The VAE decodes
//! one image. [`train`] times a training update instead (`controlnet bench --train`).
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::model::controlnet::{AddedConditions, ControlNetConfig, ControlNetModel};
use crate::model::ops::bf16::Kernel;
use crate::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::model::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::pipeline::request::ComputeDtype;
use crate::{Error, Result};

pub mod annotators;
pub mod dwpose;
pub mod floor;
pub mod flops;
pub mod random;
pub mod train;

use random::RandomWeights;

/// Prompt length of CLIP's text encoder: the context every cross-attention sees.
pub const TEXT_TOKENS: usize = 77;
/// VAE config of SD1.x and SD2.x (`vae/config.json` of both; only `sample_size` differs, which is unused).
const SD_VAE_CONFIG: &str = r#"{
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32
}"#;
/// The hub configs, stored with the layout fixtures that check our models request exactly these checkpoints'
/// tensors (runwayml/stable-diffusion-v1-5, lllyasviel/sd-controlnet-canny, stabilityai/stable-diffusion-2-1,
/// thibaud/controlnet-sd21).
const SD15_UNET: &str = include_str!("../../tests/fixtures/unet/layout_sd15_unet.json");
const SD15_CONTROLNET: &str = include_str!("../../tests/fixtures/unet/layout_sd15_controlnet.json");
const SD21_UNET: &str = include_str!("../../tests/fixtures/unet/layout_sd21_unet.json");
const SD21_CONTROLNET: &str = include_str!("../../tests/fixtures/unet/layout_sd21_controlnet.json");
const SDXL_UNET: &str = include_str!("../../tests/fixtures/unet/layout_sdxl_unet.json");
const SDXL_CONTROLNET: &str = include_str!("../../tests/fixtures/unet/layout_sdxl_controlnet.json");
/// SDXL's size/crop conditioning for the measured passes: original 1024², crop (0, 0), target 1024² (the values
/// do not change the cost).
const SDXL_TIME_IDS: [f32; 6] = [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0];
/// The timestep every measured pass uses (mid-schedule; the cost does not depend on it).
const TIMESTEP: f64 = 500.0;
/// Inputs are seeded apart from the weights so the two never share a stream.
const INPUT_SEED_OFFSET: u64 = 0x5EED;

/// Which real model's architecture to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// runwayml/stable-diffusion-v1-5 + lllyasviel/sd-controlnet-canny.
    Sd15,
    /// stabilityai/stable-diffusion-2-1 + thibaud/controlnet-sd21.
    Sd21,
    /// stabilityai/stable-diffusion-xl-base-1.0 + diffusers/controlnet-canny-sdxl-1.0.
    Sdxl,
}

fn layout_config<T: serde::de::DeserializeOwned>(layout: &str) -> T {
    let mut v: serde_json::Value = serde_json::from_str(layout).expect("layout fixtures are valid JSON");
    serde_json::from_value(v["config"].take()).expect("layout fixtures hold valid diffusers configs")
}

impl Preset {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sd15" => Some(Preset::Sd15),
            "sd21" => Some(Preset::Sd21),
            "sdxl" => Some(Preset::Sdxl),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::Sd15 => "sd15",
            Preset::Sd21 => "sd21",
            Preset::Sdxl => "sdxl",
        }
    }

    pub fn unet_config(self) -> UNet2DConditionConfig {
        layout_config(match self {
            Preset::Sd15 => SD15_UNET,
            Preset::Sd21 => SD21_UNET,
            Preset::Sdxl => SDXL_UNET,
        })
    }

    pub fn controlnet_config(self) -> ControlNetConfig {
        layout_config(match self {
            Preset::Sd15 => SD15_CONTROLNET,
            Preset::Sd21 => SD21_CONTROLNET,
            Preset::Sdxl => SDXL_CONTROLNET,
        })
    }

    pub fn vae_config(self) -> AutoencoderKLConfig {
        serde_json::from_str(SD_VAE_CONFIG).expect("the built-in VAE config is valid")
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub preset: Preset,
    /// Latent height and width (pixels / 8).
    pub latent: usize,
    /// UNet batch: 2 is one image with classifier-free guidance.
    pub batch: usize,
    /// Timed repetitions after one warm-up; the report gives medians.
    pub iters: usize,
    pub skip_vae: bool,
    pub seed: u64,
    /// The dtype the models compute in.
    pub dtype: ComputeDtype,
    /// Where the models run: the CPU, or a CUDA GPU in a `--features cuda` build (the command line's device).
    pub device: Device,
}

/// Seconds of each timed repetition and their median.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Timing {
    pub median_s: f64,
    pub samples_s: Vec<f64>,
}

impl Timing {
    fn new(mut samples_s: Vec<f64>) -> Self {
        let mut sorted = samples_s.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median_s = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            sorted[n / 2]
        } else {
            0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
        };
        samples_s.shrink_to_fit();
        Self { median_s, samples_s }
    }
}

/// FLOPs of one measured call (the whole batch), in units of 1e9.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GigaFlops {
    pub unet_controlnet_step: f64,
    pub unet: f64,
    pub controlnet: f64,
    pub controlnet_embed: f64,
    pub vae_decode: f64,
}

/// What every bench report starts with: the implementation, the configuration and the machine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunInfo {
    pub implementation: String,
    pub preset: Preset,
    pub latent: usize,
    pub batch: usize,
    pub iters: usize,
    pub dtype: String,
    /// The matrix-product kernels that ran (`f32 gemm AVX-512`, `bf16 amx`, ...).
    pub kernels: String,
    pub machine: String,
    /// `cpu`, or `cuda` when the models ran on a GPU (then `machine` is still the host CPU).
    pub device: String,
    pub cpus: usize,
    pub threads: usize,
    /// /proc/loadavg's 1-minute load before and after the run: above the thread count, other processes
    /// competed for the cores and the times are inflated.
    pub load_before: f64,
    pub load_after: f64,
}

impl RunInfo {
    /// This machine and build, for a run of `preset` at `latent`/`batch`; `load_before` is read now, and
    /// `load_after` is set by [`RunInfo::finish`].
    pub fn start(preset: Preset, latent: usize, batch: usize, iters: usize) -> Self {
        Self {
            implementation: "controlnet-rs (candle 0.11.1)".into(),
            preset,
            latent,
            batch,
            iters,
            dtype: "f32".into(),
            kernels: kernels_used(DType::F32),
            machine: cpu_model(),
            device: "cpu".into(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads: candle_core::utils::get_num_threads(),
            load_before: load_average(),
            load_after: f64::NAN,
        }
    }

    /// The same run computing in `dtype` (as loaded).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype.as_str().into();
        self.kernels = kernels_used(dtype);
        self
    }

    /// The same run on `device`: on a GPU the kernels are candle's CUDA kernels and cuBLAS.
    pub fn on_device(mut self, device: &Device) -> Self {
        if device.is_cuda() {
            self.device = "cuda".into();
            self.kernels = format!("CUDA {} (candle kernels, cuBLAS)", self.dtype);
        }
        self
    }

    pub fn finish(mut self) -> Self {
        self.load_after = load_average();
        self
    }
}

/// Everything `controlnet bench --json` prints (the [`RunInfo`] fields at the top level). The top-level `*_s`
/// fields are medians.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    #[serde(flatten)]
    pub run: RunInfo,
    /// Seconds to build the UNet and the ControlNet with random weights.
    pub build_s: f64,
    pub unet_controlnet_step_s: f64,
    pub unet_step_s: f64,
    pub controlnet_s: f64,
    /// The hint embedding (once per condition image in the pipeline; diffusers recomputes it every step).
    pub controlnet_embed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vae_decode_s: Option<f64>,
    /// CPU seconds (all threads) of the median step and decode: less sensitive to other jobs than wall time.
    pub unet_controlnet_step_cpu_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vae_decode_cpu_s: Option<f64>,
    /// Peak resident memory of the whole run (VmHWM).
    pub peak_rss_bytes: u64,
    /// Peak while the UNet and ControlNet were loaded and running (weights included).
    pub peak_rss_unet_controlnet_bytes: u64,
    /// Peak of the VAE phase alone (UNet and ControlNet dropped first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_vae_bytes: Option<u64>,
    pub gflop: GigaFlops,
    /// Achieved GFLOP/s per measurement (FLOPs / median seconds).
    pub gflops_per_s: serde_json::Value,
    /// Whether every output was finite (random weights should not overflow; NaNs would make timings moot).
    pub outputs_finite: bool,
    pub timings: serde_json::Value,
}

/// The CPU as /proc/cpuinfo names it, with its family and model numbers (virtual machines often show only
/// "AMD EPYC"; family 26 is Zen 5) and the widest vector unit the kernels use ("unknown" elsewhere).
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let name = field("model name").unwrap_or_else(|| "unknown".into());
    let ids = match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!(", family {f} model {m}"),
        _ => String::new(),
    };
    format!("{name}{ids}, {}", vector_unit())
}

/// Which matrix-product kernels models loaded in `dtype` run on this CPU: gemm's f32 kernels, the bf16
/// kernel [`Kernel::detect`] picked (bf16 weights, f32 activations), or f32 products on widened f16 weights.
pub fn kernels_used(dtype: DType) -> String {
    match dtype {
        DType::BF16 => {
            let attention = if crate::model::ops::bf16::attention::available() {
                "attention on avx512bf16"
            } else {
                "attention on f32 gemm"
            };
            // Without a bf16 unit, convolutions on bf16 weights take Winograd's f32 products.
            let winograd = if Kernel::detect().native() { "" } else { winograd() };
            format!("bf16 {} (f32 sums; {attention}; f32 ops {}{winograd})", Kernel::detect().name(), vector_unit())
        }
        // f16 weights widened to f32 as read: gemm's f32 products, Winograd's on 3x3 convolutions.
        DType::F16 => format!("f16 weights widened (f32 products: f32 gemm {}{})", vector_unit(), winograd()),
        _ => format!("f32 gemm {}{}", vector_unit(), winograd()),
    }
}

/// What the machine line adds where 3x3 convolutions run on Winograd's products.
fn winograd() -> &'static str {
    if crate::model::ops::winograd::enabled() {
        "; 3x3 convolutions Winograd F(2x2,3x3)"
    } else {
        ""
    }
}

/// The widest SIMD extension this CPU offers of those gemm and the fused kernels dispatch to.
pub fn vector_unit() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "AVX-512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return "AVX2+FMA";
        }
        "SSE2"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH
    }
}

/// The 1-minute load average (0 where there is no procfs).
pub fn load_average() -> f64 {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// A `Vm*:` field of /proc/self/status in bytes (0 where there is no procfs).
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Peak resident set size so far (VmHWM).
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// CPU seconds (user + system, all threads) this process has used, from /proc/self/stat (0 elsewhere). On a
/// shared machine this moves less than wall time when other jobs compete for the cores.
pub fn process_cpu_seconds() -> f64 {
    /// The kernel reports times in USER_HZ ticks, 100 per second on every Linux ABI.
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name start at field 3 (state); utime and stime are fields 14, 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / USER_HZ
}

/// Restarts the peak-RSS counter at the current RSS (Linux: `5` into /proc/self/clear_refs). Returns false where
/// that is not possible; peaks are then cumulative.
pub(crate) fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Runs `f` `1 + iters` times on the CPU and times all but the first: (wall, CPU, last result).
fn timed<T>(iters: usize, f: impl FnMut() -> Result<T>) -> Result<(Timing, Timing, T)> {
    timed_on(&Device::Cpu, iters, f)
}

/// [`timed`] for work on `dev`: a GPU's queued work is waited for inside each timed run.
fn timed_on<T>(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<T>) -> Result<(Timing, Timing, T)> {
    let mut last = f()?;
    let mut samples = Vec::with_capacity(iters);
    let mut cpu = Vec::with_capacity(iters);
    for _ in 0..iters {
        let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
        last = f()?;
        dev.synchronize()?;
        samples.push(start.elapsed().as_secs_f64());
        cpu.push(process_cpu_seconds() - cpu_start);
    }
    Ok((Timing::new(samples), Timing::new(cpu), last))
}

fn all_finite(t: &Tensor) -> Result<bool> {
    let sum: f32 = t.to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar()?;
    Ok(sum.is_finite())
}

/// Seeded uniform [-1, 1) input of a shape (inputs need no particular distribution either).
pub(crate) fn random_input(seed: u64, shape: &[usize], name: &str) -> Result<Tensor> {
    let shape = candle_core::Shape::from(shape);
    let values = crate::train::random_weights::uniform(
        seed ^ INPUT_SEED_OFFSET ^ crate::train::random_weights::hash_name(name),
        shape.elem_count(),
        1.0,
    );
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// Builds the preset's models with random weights and measures them. `progress` hears one line per phase.
pub fn run(opts: &BenchOptions, mut progress: impl FnMut(&str)) -> Result<BenchReport> {
    let zero =
        [("latent", opts.latent), ("batch", opts.batch), ("iters", opts.iters)].into_iter().find(|(_, v)| *v == 0);
    if let Some((setting, _)) = zero {
        return Err(Error::setting(setting, "must be at least 1"));
    }
    let dev = opts.device.clone();
    let dtype = opts.dtype.resolve(&dev);
    let run = RunInfo::start(opts.preset, opts.latent, opts.batch, opts.iters).with_dtype(dtype).on_device(&dev);
    let (s, b) = (opts.latent, opts.batch);
    let (unet_cfg, cn_cfg, vae_cfg) =
        (opts.preset.unet_config(), opts.preset.controlnet_config(), opts.preset.vae_config());
    let per_image = |f: std::result::Result<f64, String>| f.map_err(|m| Error::Invalid(format!("FLOP count: {m}")));
    let unet_flops = b as f64 * per_image(flops::unet(&unet_cfg, (s, s), TEXT_TOKENS))? / 1e9;
    let cn_flops = b as f64 * per_image(flops::controlnet(&cn_cfg, (s, s), TEXT_TOKENS))? / 1e9;
    let embed_flops = flops::controlnet_embedding(&cn_cfg, (8 * s, 8 * s)) / 1e9;
    let vae_flops = flops::vae_decode(&vae_cfg, (s, s)) / 1e9;

    // 1. models
    progress("building the UNet and the ControlNet with random weights");
    reset_peak_rss();
    let start = Instant::now();
    let weights = RandomWeights::new(opts.seed);
    let unet = UNet2DConditionModel::new(&unet_cfg, weights.var_builder(dtype, &dev))?;
    let controlnet = ControlNetModel::new(&cn_cfg, weights.var_builder(dtype, &dev))?;
    let build_s = start.elapsed().as_secs_f64();

    // 2. inputs: a latent batch, one timestep for all, text embeddings, one condition image for the batch
    let width = unet_cfg.encoder.cross_attention_dim;
    let act = unet.dtype();
    let input =
        |shape: &[usize], name: &str| -> Result<Tensor> { Ok(random_input(opts.seed, shape, name)?.to_device(&dev)?) };
    let sample = input(&[b, unet_cfg.encoder.in_channels, s, s], "sample")?.to_dtype(act)?;
    let timestep = Tensor::new(&[TIMESTEP as f32], &dev)?;
    let text = input(&[b, TEXT_TOKENS, width], "text")?.to_dtype(act)?;
    let cond = ((input(&[1, cn_cfg.conditioning_channels, 8 * s, 8 * s], "cond")? + 1.0)? * 0.5)?;
    // SDXL's pooled text embedding and size/crop numbers (None for SD1.x/2.x)
    let added = match unet_cfg.encoder.pooled_text_dim() {
        Some(pooled) => Some(AddedConditions {
            text_embeds: input(&[b, pooled], "text_embeds")?.to_dtype(act)?,
            time_ids: Tensor::new(&SDXL_TIME_IDS, &dev)?.unsqueeze(0)?.repeat((b, 1))?.to_dtype(act)?,
        }),
        None => None,
    };

    // 3. hint embedding, ControlNet and UNet, and both as one step
    progress("hint embedding");
    let (embed_t, _, hint) = timed_on(&dev, opts.iters, || Ok(controlnet.embed_condition(&cond)?))?;
    let mut cn_samples = Vec::new();
    let mut unet_samples = Vec::new();
    let mut step_samples = Vec::new();
    let mut step_cpu = Vec::new();
    let mut finite = true;
    for i in 0..=opts.iters {
        progress(&if i == 0 {
            "UNet + ControlNet step (warm-up)".to_string()
        } else {
            format!("UNet + ControlNet step {i}/{}", opts.iters)
        });
        let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
        let residuals = controlnet.forward_with(&sample, &timestep, &text, added.as_ref(), &hint, 1.0, false)?;
        dev.synchronize()?;
        let cn_done = Instant::now();
        let out = unet.forward_with(&sample, &timestep, &text, added.as_ref(), Some(&residuals))?;
        dev.synchronize()?;
        let done = Instant::now();
        if i > 0 {
            cn_samples.push((cn_done - start).as_secs_f64());
            unet_samples.push((done - cn_done).as_secs_f64());
            step_samples.push((done - start).as_secs_f64());
            step_cpu.push(process_cpu_seconds() - cpu_start);
        }
        finite &= all_finite(&out)?;
    }
    let (cn_t, unet_t, step_t) = (Timing::new(cn_samples), Timing::new(unet_samples), Timing::new(step_samples));
    let peak_unet_cn = peak_rss_bytes();
    drop((unet, controlnet, hint, sample, text, cond, added));
    // The command line keeps freed memory for reuse (crate::memory); return it so the VAE's peak is its own.
    crate::memory::release_free_memory();

    // 4. VAE decode of one image
    let (vae_t, vae_cpu, peak_vae) = if opts.skip_vae {
        (None, None, None)
    } else {
        progress("building the VAE and decoding");
        let reset = reset_peak_rss();
        let vae = AutoencoderKL::new(vae_cfg.clone(), RandomWeights::new(opts.seed).var_builder(dtype, &dev))?;
        let latents = input(&[1, vae_cfg.latent_channels, s, s], "latents")?.to_dtype(act)?;
        let (t, cpu, image) = timed_on(&dev, opts.iters, || Ok(vae.decode(&latents)?))?;
        finite &= all_finite(&image)?;
        (Some(t), Some(cpu), reset.then(peak_rss_bytes))
    };

    let per_s = |gflop: f64, t: &Timing| gflop / t.median_s;
    let mut gflops_per_s = serde_json::json!({
        "unet_controlnet_step": per_s(unet_flops + cn_flops, &step_t),
        "unet": per_s(unet_flops, &unet_t),
        "controlnet": per_s(cn_flops, &cn_t),
        "controlnet_embed": per_s(embed_flops, &embed_t),
    });
    let mut timings = serde_json::json!({
        "unet_controlnet_step": step_t, "unet": unet_t, "controlnet": cn_t, "controlnet_embed": embed_t,
    });
    if let Some(t) = &vae_t {
        gflops_per_s["vae_decode"] = per_s(vae_flops, t).into();
        timings["vae_decode"] = serde_json::to_value(t).map_err(|e| Error::Invalid(e.to_string()))?;
    }
    Ok(BenchReport {
        run: run.finish(),
        build_s,
        unet_controlnet_step_s: step_t.median_s,
        unet_step_s: unet_t.median_s,
        controlnet_s: cn_t.median_s,
        controlnet_embed_s: embed_t.median_s,
        vae_decode_s: vae_t.as_ref().map(|t| t.median_s),
        unet_controlnet_step_cpu_s: Timing::new(step_cpu).median_s,
        vae_decode_cpu_s: vae_cpu.map(|t| t.median_s),
        peak_rss_bytes: peak_rss_bytes().max(peak_unet_cn),
        peak_rss_unet_controlnet_bytes: peak_unet_cn,
        peak_rss_vae_bytes: peak_vae,
        gflop: GigaFlops {
            unet_controlnet_step: unet_flops + cn_flops,
            unet: unet_flops,
            controlnet: cn_flops,
            controlnet_embed: embed_flops,
            vae_decode: vae_flops,
        },
        gflops_per_s,
        outputs_finite: finite,
        timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_their_hub_configs() {
        for p in [Preset::Sd15, Preset::Sd21] {
            let u = p.unet_config();
            let c = p.controlnet_config();
            assert_eq!(u.encoder.block_out_channels, vec![320, 640, 1280, 1280]);
            assert_eq!(u.encoder.cross_attention_dim, c.encoder.cross_attention_dim);
            assert_eq!(Preset::parse(p.name()), Some(p));
        }
        assert_eq!(Preset::Sd21.unet_config().encoder.cross_attention_dim, 1024);
        assert!(Preset::Sd21.unet_config().encoder.use_linear_projection);
        assert_eq!(Preset::Sd15.vae_config().block_out_channels, vec![128, 256, 512, 512]);
        let (u, c) = (Preset::Sdxl.unet_config(), Preset::Sdxl.controlnet_config());
        assert_eq!((u.encoder.cross_attention_dim, c.encoder.cross_attention_dim), (2048, 2048));
        assert_eq!((u.encoder.pooled_text_dim(), c.encoder.pooled_text_dim()), (Some(1280), Some(1280)));
        assert_eq!(Preset::parse("sdxl"), Some(Preset::Sdxl));
    }

    /// The machine line names the kernels a dtype runs on.
    #[test]
    fn kernels_follow_the_dtype() {
        assert!(kernels_used(DType::F32).starts_with("f32 gemm"));
        let winograd = crate::model::ops::winograd::enabled();
        assert_eq!(kernels_used(DType::F32).contains("Winograd"), winograd);
        let bf16 = kernels_used(DType::BF16);
        assert!(bf16.starts_with(&format!("bf16 {}", Kernel::detect().name())), "{bf16}");
        assert!(bf16.contains("attention on"), "{bf16}");
        let run = RunInfo::start(Preset::Sd15, 4, 2, 1).with_dtype(DType::BF16);
        assert_eq!((run.dtype.as_str(), run.kernels.as_str()), ("bf16", bf16.as_str()));
        let f16 = kernels_used(DType::F16);
        assert!(f16.starts_with("f16 weights widened") && f16.contains("Winograd") == winograd, "{f16}");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(Timing::new(vec![3.0, 1.0, 2.0]).median_s, 2.0);
        assert_eq!(Timing::new(vec![4.0, 1.0, 2.0, 3.0]).median_s, 2.5);
    }

    #[test]
    fn peak_rss_is_read() {
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(peak_rss_bytes() > 0);
        }
    }
}
