//! `controlnet evaluate circles`: scores a base and a circles ControlNet (the bundled demo by default) on the
//! demo's held-out validation or test set (`pipeline::circles_eval`), and draws a grid of the results.
use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::{Args, Subcommand};

use super::progress::Progress;
use crate::io::images::save_png;
use crate::model::controlnet::ControlNetModel;
use crate::pipeline::circles_eval::{chance_iou, evaluate, Evaluation};
use crate::pipeline::{demo, StableDiffusion};
use crate::synthetic::circles::Split;

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    #[command(subcommand)]
    pub kind: EvaluateKind,
}

#[derive(Subcommand, Debug)]
pub enum EvaluateKind {
    /// The demo's circles: where the circle lands (IoU with the outline's disk) and whether both prompted
    /// colours come out, on circles no training set has.
    Circles {
        /// Base pipeline folder (default: the bundled demo base).
        #[arg(long)]
        model: Option<PathBuf>,
        /// ControlNet folder (default: the bundled demo ControlNet).
        #[arg(long)]
        controlnet: Option<PathBuf>,
        /// Which held-out set: validation (for choosing checkpoints) or test (for the reported figure).
        #[arg(long, value_enum, default_value_t = Split::Test)]
        split: Split,
        /// How many of the set's circles (a prefix: the same circles each time).
        #[arg(long, default_value_t = 128)]
        count: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 128)]
        size: u32,
        /// Also score the base alone on the same circles (it should stay near chance).
        #[arg(long)]
        base_alone: bool,
        /// Write a grid of conditions and results here (PNG): the worst images first.
        #[arg(long)]
        grid: Option<PathBuf>,
        /// Write every image's figures here (JSON lines).
        #[arg(long)]
        report: Option<PathBuf>,
        /// No progress display.
        #[arg(long, short)]
        quiet: bool,
    },
}

/// Worst images, then first others, and pairs a row, in `--grid`.
const GRID_WORST: usize = 16;
const GRID_FIRST: usize = 16;
const GRID_COLUMNS: usize = 8;

pub fn run(args: &EvaluateArgs) -> anyhow::Result<()> {
    let EvaluateKind::Circles { model, controlnet, split, count, size, base_alone, grid, report, quiet } = &args.kind;
    if *count == 0 {
        anyhow::bail!("--count must be at least 1");
    }
    let model = match model {
        Some(m) => m.clone(),
        // The demo's errors name the setting (shown as the flag).
        None => demo::base()?,
    };
    let controlnet = match controlnet {
        Some(c) => c.clone(),
        None => demo::controlnet()?,
    };
    // The base's loading errors name `model` already (the CLI shows it as --model).
    let sd = StableDiffusion::load(&model, DType::F32, &Device::Cpu)?;
    let net = ControlNetModel::load(&controlnet, DType::F32, &Device::Cpu)
        .with_context(|| format!("--controlnet {}", controlnet.display()))?;
    let circles = split.circles(*count, *size);
    let run = |net: Option<&ControlNetModel>, what: &str| -> anyhow::Result<Evaluation> {
        // The images finish out of order, on several threads: the bar counts them.
        let progress = std::sync::Mutex::new((Progress::new(*quiet, what, *count as u64), 0u64));
        let eval = evaluate(&sd, net, &circles, *size, &|_| {
            if let Ok(mut p) = progress.lock() {
                p.1 += 1;
                let done = p.1;
                p.0.set(done, *count as u64);
            }
        })?;
        if let Ok((progress, _)) = progress.into_inner() {
            progress.finish();
        }
        Ok(eval)
    };
    let with = run(Some(&net), "image")?;
    println!("with the ControlNet, {split:?} set: {}", with.summary());
    if *base_alone {
        let without = run(None, "image (base alone)")?;
        println!("base alone: {}", without.summary());
        println!("chance IoU (disks of the set against each other): {:.3}", chance_iou(&circles, *size));
    }
    if let Some(path) = report {
        let mut lines = String::new();
        for (i, s) in with.scored.iter().enumerate() {
            let line = serde_json::json!({
                "index": i, "prompt": s.circle.prompt(), "cx": s.circle.cx, "cy": s.circle.cy,
                "radius": s.circle.radius, "ring": s.circle.ring, "iou": s.iou, "area_ratio": s.area_ratio,
                "circle_colour_right": s.circle_colour_right, "background_colour_right": s.background_colour_right,
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        std::fs::write(path, lines).with_context(|| format!("--report {}", path.display()))?;
    }
    if let Some(path) = grid {
        save_png(path, &with.grid(GRID_WORST, GRID_FIRST, GRID_COLUMNS), &[])
            .with_context(|| format!("--grid {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
