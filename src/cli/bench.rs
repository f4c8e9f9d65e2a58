//! `controlnet bench --preset sd15|sd21|sdxl --latent N --batch N [--iters N] [--json] [--skip-vae]`: seconds per
//! guided step, per UNet and ControlNet pass and per VAE decode, GFLOP/s and peak memory of the full-size
//! networks with random weights (see [`crate::bench`]). With `--train`: one ControlNet training update instead
//! ([`crate::bench::train`]). With `--annotators`: seconds per 512-px image of each neural annotator
//! ([`crate::bench::annotators`]; dwpose from `--weights` or the hub cache, [`crate::bench::dwpose`]).
use std::fmt::Write;

use clap::Args;

use crate::bench::train::{run as run_train_bench, TrainBenchOptions, TrainBenchReport};
use crate::bench::{run as run_bench, BenchOptions, BenchReport, Preset, RunInfo};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Architecture: sd15 (SD1.5 + sd-controlnet-canny), sd21 (SD2.1 + controlnet-sd21) or sdxl (SDXL base +
    /// controlnet-canny-sdxl-1.0; --latent 128 for its 1024 px).
    #[arg(long, default_value = "sd15", value_parser = ["sd15", "sd21", "sdxl"])]
    pub preset: String,
    /// Latent height and width (the image is 8x larger): 64 for 512 px.
    #[arg(long, default_value_t = 64)]
    pub latent: usize,
    /// UNet batch: 2 is one image with classifier-free guidance.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Timed repetitions after one warm-up (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Do not build and time the VAE decoder.
    #[arg(long)]
    pub skip_vae: bool,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Time a ControlNet training update (locked UNet, AdamW) instead of inference; --batch is then the
    /// training batch (use e.g. --latent 32 --batch 1 for 256 px).
    #[arg(long)]
    pub train: bool,
    /// Compute dtype: f32, bf16 (bf16 weights, f32 activations: the bf16 kernels), f16 (f16 weights, f32
    /// activations and products), or auto (bf16 where the CPU multiplies bf16 natively). The machine line names
    /// the kernels that ran.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16", "auto"])]
    pub dtype: String,
    /// Print the floor instead: GFLOP/s of the f32 and of each bf16 matrix-product kernel this CPU runs, on
    /// one --floor-size cubed product.
    #[arg(long)]
    pub floor: bool,
    /// Matrix size of --floor.
    #[arg(long, default_value_t = 4096)]
    pub floor_size: usize,
    /// Time the neural annotators instead (full size, random weights, one 512-px image each): all of them, or
    /// a comma-separated list of kinds (e.g. --annotators hed,depth-anything). dwpose reads its two ONNX files
    /// from --weights or the hub cache (all: skipped with a note when there are none).
    #[arg(long, num_args = 0..=1, default_missing_value = "all", value_name = "KINDS")]
    pub annotators: Option<String>,
    /// --annotators dwpose: a folder or hub repo with yolox_l.onnx and dw-ll_ucoco_384.onnx, as `annotate
    /// --weights` [default: yzd-v/DWPose from the Hugging Face cache, never downloaded here];
    /// `tools/bench_dwpose_nets.py DIR` writes full-size random-weight ones.
    #[arg(long, value_name = "DIR_OR_ID", requires = "annotators")]
    pub weights: Option<String>,
    /// Time reading training data instead: --data-samples examples of this --dataset (a folder dataset or
    /// shards, as `train` takes it) decoded, resized and cropped to 8x --latent px as training reads them,
    /// without any model; prints samples/s and the peak resident memory.
    #[arg(long, value_name = "PATH_OR_PATTERN")]
    pub dataset: Option<String>,
    /// Examples --dataset reads (whole batches of --batch).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub data_samples: usize,
    /// Decoding threads of sharded data (0: the cores but one, at most 8).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub data_workers: usize,
}

/// `bench --dataset`: what was read, how fast, with how much memory.
#[derive(Debug, serde::Serialize)]
struct DataBenchReport {
    dataset: String,
    source: String,
    resolution: u32,
    batch: usize,
    /// Decoding threads (0: a folder dataset, read on the calling thread).
    workers: usize,
    samples: usize,
    seconds: f64,
    samples_per_second: f64,
    peak_rss_bytes: u64,
    machine: String,
}

fn run_data_bench(args: &BenchArgs, dataset: &str) -> anyhow::Result<DataBenchReport> {
    use crate::train::feed::{Feed, Source};
    use crate::train::settings::TrainSettings;
    use crate::train::stream::Fields;
    let source = Source::open(dataset, Fields::defaults)?;
    let describe = source.describe();
    let settings = TrainSettings {
        resolution: 8 * args.latent as u32,
        batch_size: args.batch,
        data_workers: args.data_workers,
        ..TrainSettings::default()
    };
    settings.validate()?;
    let mut feed = Feed::new(source, &settings, 3, &candle_core::Device::Cpu);
    let start = std::time::Instant::now();
    let samples = feed.read_without_model(args.data_samples, args.seed)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(DataBenchReport {
        dataset: dataset.to_string(),
        source: describe,
        resolution: settings.resolution,
        batch: settings.batch_size,
        workers: if feed.folder().is_some() { 0 } else { feed.stream_options.workers },
        samples,
        seconds,
        samples_per_second: samples as f64 / seconds.max(1e-9),
        peak_rss_bytes: crate::bench::peak_rss_bytes(),
        machine: format!(
            "{} ({} CPUs)",
            crate::bench::cpu_model(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
    })
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let preset = Preset::parse(&args.preset).ok_or_else(|| anyhow::anyhow!("unknown --preset {}", args.preset))?;
    if args.floor {
        let rows = crate::bench::floor::run(args.floor_size, args.iters)?;
        if args.json {
            println!("{}", serde_json::to_string(&rows)?);
        } else {
            print!("{}", render_floor(&rows));
        }
        return Ok(());
    }
    if let Some(dataset) = &args.dataset {
        let r = run_data_bench(args, dataset)?;
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "read {} examples of {} at {} px (batch {}, {} decoding threads) in {:.2} s: {:.1} samples/s, \
                 peak RSS {}\nmachine: {}",
                r.samples,
                r.source,
                r.resolution,
                r.batch,
                r.workers,
                r.seconds,
                r.samples_per_second,
                gib(r.peak_rss_bytes),
                r.machine
            );
        }
        return Ok(());
    }
    if let Some(list) = &args.annotators {
        use crate::bench::dwpose;
        let weights = args.weights.as_deref();
        let kinds = annotator_kinds(list, || dwpose::available(weights));
        if list == "all" && !kinds.contains(&dwpose::KIND) {
            eprintln!("bench: no dwpose row: {}", super::describe(&anyhow::Error::from(dwpose::missing())));
        }
        let report =
            crate::bench::annotators::run(&kinds, args.iters, args.seed, weights, |msg| eprintln!("bench: {msg}"))
                .map_err(|e| anyhow::Error::new(e).context("--annotators"))?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", render_annotators(&report));
        }
        return Ok(());
    }
    if args.train {
        let opts = TrainBenchOptions {
            preset,
            latent: args.latent,
            batch: args.batch,
            iters: args.iters,
            seed: args.seed,
            dtype: crate::pipeline::request::ComputeDtype::parse(&args.dtype)?,
        };
        let report = run_train_bench(&opts, |msg| eprintln!("bench: {msg}"))?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", render_train(&report));
        }
        return Ok(());
    }
    let opts = BenchOptions {
        preset,
        latent: args.latent,
        batch: args.batch,
        iters: args.iters,
        skip_vae: args.skip_vae,
        seed: args.seed,
        dtype: crate::pipeline::request::ComputeDtype::parse(&args.dtype)?,
        device: super::device()?,
    };
    let report = run_bench(&opts, |msg| eprintln!("bench: {msg}"))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// The kinds `--annotators LIST` times: those listed, or for `all` every torch annotator and dwpose when its
/// files are `available` (only asked then).
fn annotator_kinds(list: &str, available: impl FnOnce() -> bool) -> Vec<&str> {
    if list != "all" {
        return list.split(',').map(str::trim).collect();
    }
    let mut all = crate::bench::annotators::KINDS.to_vec();
    if available() {
        all.push(crate::bench::dwpose::KIND);
    }
    all
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The first two lines of a report: what ran (`what` prefixes the configuration), then the machine.
fn header(r: &RunInfo, what: &str) -> String {
    let px = 8 * r.latent;
    format!(
        "{} {}: {what}latent {}x{} ({px}x{px} px), batch {}, {}, median of {} after 1 warm-up\n\
         machine: {} ({} CPUs), {} threads, kernels: {}; load average {:.1} before, {:.1} after\n",
        r.implementation,
        r.preset.name(),
        r.latent,
        r.latent,
        r.batch,
        r.dtype,
        r.iters,
        r.machine,
        r.cpus,
        r.threads,
        r.kernels,
        r.load_before,
        r.load_after
    )
}

/// The text report: a table of medians, then memory.
pub fn render(r: &BenchReport) -> String {
    let mut s = header(&r.run, "");
    let px = 8 * r.run.latent;
    let _ = writeln!(s, "{:<34}{:>10}{:>10}{:>10}", "", "seconds", "GFLOP", "GFLOP/s");
    let rate = |k: &str| r.gflops_per_s[k].as_f64().unwrap_or(f64::NAN);
    let mut row = |name: &str, secs: f64, gflop: f64, key: &str| {
        let _ = writeln!(s, "{name:<34}{secs:>10.2}{gflop:>10.0}{:>10.1}", rate(key));
    };
    row("UNet + ControlNet step", r.unet_controlnet_step_s, r.gflop.unet_controlnet_step, "unet_controlnet_step");
    row("  UNet (with residuals)", r.unet_step_s, r.gflop.unet, "unet");
    row("  ControlNet", r.controlnet_s, r.gflop.controlnet, "controlnet");
    row("ControlNet hint embedding (once)", r.controlnet_embed_s, r.gflop.controlnet_embed, "controlnet_embed");
    if let Some(v) = r.vae_decode_s {
        row(&format!("VAE decode ({px}x{px}, 1 image)"), v, r.gflop.vae_decode, "vae_decode");
    }
    let _ = write!(s, "CPU seconds (all threads): step {:.2}", r.unet_controlnet_step_cpu_s);
    if let Some(v) = r.vae_decode_cpu_s {
        let _ = write!(s, ", VAE decode {v:.2}");
    }
    let _ = writeln!(s);
    let _ = write!(
        s,
        "peak RSS: {} (UNet + ControlNet phase {}",
        gib(r.peak_rss_bytes),
        gib(r.peak_rss_unet_controlnet_bytes)
    );
    if let Some(v) = r.peak_rss_vae_bytes {
        let _ = write!(s, ", VAE phase {}", gib(v));
    }
    let _ = writeln!(s, "); build {:.1} s", r.build_s);
    if !r.outputs_finite {
        let _ = writeln!(s, "warning: some outputs were not finite");
    }
    s
}

/// The text report of `--floor`.
pub fn render_floor(rows: &[crate::bench::floor::FloorRow]) -> String {
    let mut s = format!(
        "matrix-product floor: {0}x{0} · {0}x{0}, {1} threads\nmachine: {2}\n",
        rows.first().map_or(0, |r| r.size),
        candle_core::utils::get_num_threads(),
        crate::bench::cpu_model()
    );
    let _ = writeln!(s, "{:<24}{:>10}{:>10}", "kernel", "seconds", "GFLOP/s");
    for r in rows {
        let _ = writeln!(s, "{:<24}{:>10.3}{:>10.0}", r.kernel, r.median_s, r.gflops_per_s);
    }
    s
}

/// The text report of `--annotators`.
pub fn render_annotators(r: &crate::bench::annotators::AnnotatorReport) -> String {
    let mut s = format!(
        "{}: neural annotators, {size}x{size} image, detect and image resolution {size}, median of {} after 1 \
         warm-up\nmachine: {}, {} threads, kernels: {}; load average {:.1} before, {:.1} after\n",
        r.implementation,
        r.iters,
        r.machine,
        r.threads,
        r.kernels,
        r.load_before,
        r.load_after,
        size = r.size,
    );
    let _ = writeln!(s, "{:<18}{:>10}{:>12}{:>10}", "kind", "seconds", "CPU seconds", "build s");
    for row in &r.rows {
        let _ = write!(
            s,
            "{:<18}{:>10.3}{:>12.3}{:>10.2}",
            row.kind, row.seconds.median_s, row.cpu_seconds.median_s, row.build_s
        );
        match row.people {
            Some(n) => {
                let _ = writeln!(s, "  ({n} {} found)", if n == 1 { "person" } else { "people" });
            }
            None => s.push('\n'),
        }
    }
    s
}

/// The text report of `--train`.
pub fn render_train(r: &TrainBenchReport) -> String {
    let mut s = header(&r.run, "ControlNet training update, ");
    let _ = writeln!(s, "{:<34}{:>10}", "", "seconds");
    for (name, secs) in [
        ("training update", r.train_step_s),
        ("  forward (ControlNet + UNet, MSE)", r.forward_s),
        ("  backward", r.backward_s),
        ("  clip + AdamW", r.optimizer_s),
    ] {
        let _ = writeln!(s, "{name:<34}{secs:>10.2}");
    }
    let _ = writeln!(
        s,
        "{:.2} samples/s; forward {:.0} GFLOP; CPU seconds (all threads) per update {:.2}",
        r.samples_per_s, r.forward_gflop, r.train_step_cpu_s
    );
    let _ = writeln!(
        s,
        "peak RSS: {}; {:.0} M trainable parameters; build {:.1} s",
        gib(r.peak_rss_bytes),
        r.trainable_parameters as f64 / 1e6,
        r.build_s
    );
    if !r.finite {
        let _ = writeln!(s, "warning: a loss or gradient was not finite, or a trainable tensor had no gradient");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `all` takes dwpose only when its files are there; a list is taken as written (a missing dwpose is then an
    /// error of the run).
    #[test]
    fn all_includes_dwpose_only_with_its_files() {
        let torch = crate::bench::annotators::KINDS.len();
        assert_eq!(annotator_kinds("all", || false).len(), torch);
        let with = annotator_kinds("all", || true);
        assert_eq!((with.len(), with.last()), (torch + 1, Some(&"dwpose")));
        let listed = annotator_kinds("hed, dwpose", || panic!("a list does not look for the files"));
        assert_eq!(listed, ["hed", "dwpose"]);
    }
}
