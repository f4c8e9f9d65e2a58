//! `controlnet reproduce IMAGE.png --output OUT.png`: make an image again from the recipe it carries.
//!
//! The recipe's `controlnet-rs` JSON chunk holds every setting and the paths and SHA-256s of the model,
//! ControlNets and control images. The batch is generated again with the same seed, the image at the recorded
//! position is kept, and any input whose hash no longer matches is reported (the result would then differ).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, FromArgMatches};

use crate::io::images;
use crate::pipeline::recipe::Recipe;

#[derive(Args, Debug)]
pub struct ReproduceArgs {
    /// A PNG written by `controlnet generate`.
    pub image: PathBuf,
    /// Where to write the regenerated image.
    #[arg(long, short, value_name = "PATH")]
    pub output: PathBuf,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: &ReproduceArgs) -> anyhow::Result<()> {
    let chunks = images::read_png_text(&args.image)?;
    let Some(recipe) = Recipe::from_text_chunks(&chunks) else {
        bail!("{}: carries no controlnet-rs recipe (was it written by `controlnet generate`?)", args.image.display());
    };
    for c in &recipe.controls {
        let path = Path::new(&c.control_image.path);
        if let Ok(hash) = images::sha256_file(path) {
            if hash != c.control_image.sha256 {
                eprintln!("warning: {} changed since the image was made (SHA-256 differs)", path.display());
            }
        }
    }
    // Regenerate the whole batch next to the output (the noise of image k depends on the batch), keep image k.
    let parent = args.output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let work = tempfile_dir(parent)?;
    let batch_out = work.join("batch.png");
    let mut argv: Vec<String> = vec!["controlnet".into(), "generate".into()];
    argv.extend(recipe.generate_args());
    argv.extend(["--output".into(), batch_out.display().to_string()]);
    if args.quiet {
        argv.push("--quiet".into());
    }
    let result = (|| {
        let matches = super::Cli::command().try_get_matches_from(&argv)?;
        let sub = matches.subcommand_matches("generate").context("the recipe did not parse as generate")?;
        let gen = super::generate::GenerateArgs::from_arg_matches(sub)?;
        super::generate::run(&gen, sub)?;
        let made = if recipe.num_images > 1 {
            work.join(format!("batch-{}.png", recipe.image_index))
        } else {
            batch_out.clone()
        };
        std::fs::rename(&made, &args.output).with_context(|| format!("--output {}", args.output.display()))?;
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// A fresh hidden folder inside `parent` (same filesystem as the output, so the final rename is atomic).
fn tempfile_dir(parent: &Path) -> anyhow::Result<PathBuf> {
    let dir = parent.join(format!(".controlnet-reproduce-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("--output folder {}", parent.display()))?;
    Ok(dir)
}
