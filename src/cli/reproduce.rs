//! `controlnet reproduce IMAGE --output OUT` (each a .png, .jpg or .webp): make an image again from the metadata it carries.
//!
//! The image's `controlnet-rs` JSON (a PNG text chunk, or in a JPEG's or WebP's EXIF) holds every setting and the paths and SHA-256s of the model,
//! ControlNets and control images; it becomes a [`crate::pipeline::GenerateRequest`] (a recorded path that is
//! gone is looked up beside the PNG). The batch is generated again with the same seed, the image at the recorded
//! position is kept, and any input whose hash no longer matches is reported (the result would then differ).
use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Args;

use crate::io::images;
use crate::pipeline::ImageMetadata;

#[derive(Args, Debug)]
pub struct ReproduceArgs {
    /// A PNG, JPEG or WebP written by `controlnet generate`.
    pub image: PathBuf,
    /// Where to write the regenerated image (folders are created; an existing file is only replaced on success).
    #[arg(long, short, value_name = "PATH")]
    pub output: PathBuf,
    /// JPEG quality, 1 to 100 (only for a .jpg/.jpeg --output) [default: 80].
    #[arg(long, value_name = "Q")]
    pub quality: Option<u8>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: &ReproduceArgs) -> anyhow::Result<()> {
    images::OutputFormat::from_path("output", &args.output)?;
    super::generate::check_quality(&args.output, args.quality)?;
    let chunks = images::read_image_text(&args.image)?;
    let Some(metadata) = ImageMetadata::from_text_chunks(&chunks) else {
        bail!("{}: carries no controlnet-rs recipe (was it written by `controlnet generate`?)", args.image.display());
    };
    let png_dir = args.image.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let request = metadata.to_request(png_dir)?;
    let recorded_inputs = request.controls.iter().zip(&metadata.controls).map(|(c, m)| (&c.control, &m.control_image));
    let init = request.init_image.as_ref().zip(metadata.init_image.as_ref());
    let mask = request.mask.as_ref().zip(metadata.mask.as_ref());
    for (path, recorded) in recorded_inputs.chain(init).chain(mask) {
        if let Ok(hash) = images::sha256_file(path) {
            if hash != recorded.sha256 {
                eprintln!("warning: {} changed since the image was made (SHA-256 differs)", path.display());
            }
        }
    }
    super::generate::check_outputs(&request, [args.output.as_path()])?;
    crate::io::atomic::check_output_is_not_input("output", &args.output, &[&args.image])?;

    // The noise of image k depends on the whole batch: make the batch, keep image k.
    let generated = super::generate::generate(&request, args.quiet)?;
    let Some(kept) = generated.images.get(metadata.image_index.saturating_sub(1)) else {
        bail!(
            "{}: image_index {} is outside the batch of {}",
            args.image.display(),
            metadata.image_index,
            metadata.num_images
        );
    };
    images::save_image(&args.output, &kept.image, &kept.metadata.text_chunks(), args.quality)?;
    println!("wrote {}", args.output.display());
    Ok(())
}
