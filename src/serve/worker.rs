//! The worker thread: loads the models once, then runs the queue's jobs one after the other through
//! `pipeline::Generator`, reporting each step to the job's watchers.
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::Device;

use super::error::ApiError;
use super::files::{png_bytes, WorkDir};
use super::models::{Catalog, Generators, ModelSpecs, Models};
use super::queue::{Job, JobSpec, Output, OutputImage, Queue, Run};
use crate::annotate::{self, AnnotateSettings, ResizeMode};
use crate::io::images;
use crate::pipeline::extra_networks::resolve_lora_tags;
use crate::pipeline::request::control_setting;
use crate::pipeline::{GenerateRequest, Progress, StableDiffusion};
use crate::{Error, Result};

/// Starts the worker thread; returns once the models are loaded (or failed to load).
pub fn start(
    specs: ModelSpecs,
    device: Device,
    queue: Arc<Queue>,
    rx: tokio::sync::mpsc::Receiver<Arc<Job>>,
    work: Arc<WorkDir>,
) -> Result<(Catalog, JoinHandle<()>)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("controlnet-worker".into())
        .spawn(move || {
            let models = match Models::load(&specs, &device) {
                Ok(m) => m,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(models.catalog.clone()));
            let mut generators = Generators::new(&models);
            let mut lora_model = None;
            queue.work(rx, |job, spec| run_job(&mut generators, &mut lora_model, &models, &work, job, spec));
        })
        .map_err(|e| Error::Invalid(format!("cannot start the worker thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(catalog)) => Ok((catalog, handle)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(Error::Invalid("the worker thread stopped while loading the models".into()))
        }
    }
}

fn run_job(
    generators: &mut Generators<'_>,
    lora_model: &mut Option<StableDiffusion>,
    models: &Models,
    work: &WorkDir,
    job: &Job,
    spec: JobSpec,
) -> std::result::Result<Output, ApiError> {
    let name_of = spec.name_of.clone();
    let api_error = |e: Error| ApiError::from_library(e, &*name_of);
    let mut output = Output::default();
    let mut steps_before = 0;
    for run in &spec.runs {
        let request = prepare(models, work, run).map_err(api_error)?;
        let before = steps_before;
        let progress = |p: Progress| match p {
            Progress::Warning(w) => job.update(|s| s.warnings.push(w)),
            Progress::Started { seed } => job.update(|s| s.seeds.push(seed)),
            Progress::Step { done, .. } => job.update(|s| s.step = before + done),
        };
        // LoRAs (prompt tags or files) are merged into the weights: such a run gets the model with exactly its
        // LoRAs merged, never the plain one nor another merge.
        let loras = resolve_lora_tags(&request).map_err(api_error)?.loras;
        let generated = if loras.is_empty() {
            generators.get(&run.nets).run(&request, &progress, &job.cancel)
        } else {
            let sd = models.with_loras(lora_model, &loras, &progress).map_err(api_error)?;
            models.generator(sd, &run.nets).run(&request, &progress, &job.cancel)
        }
        .map_err(api_error)?;
        if output.maps.is_empty() {
            output.maps = generated
                .conditions
                .iter()
                .map(|c| c.as_ref().map(|map| png_bytes(work, map, &[])).transpose())
                .collect::<Result<_>>()
                .map_err(api_error)?;
        }
        for img in generated.images {
            let png = png_bytes(work, &img.image, &img.metadata.text_chunks()).map_err(api_error)?;
            output.images.push(OutputImage { png, metadata: img.metadata });
        }
        steps_before += request.steps;
    }
    Ok(output)
}

/// The request a run hands the pipeline: as it is, or (for annotator settings the pipeline does not take) with
/// every picture condition made at the output size here and given as it is.
fn prepare(models: &Models, work: &WorkDir, run: &Run) -> Result<GenerateRequest> {
    let Some(annotations) = &run.annotations else {
        return Ok(run.request.clone());
    };
    let mut request = run.request.clone();
    let pictures = request
        .controls
        .iter()
        .enumerate()
        .map(|(i, c)| images::load_rgb(&c.control).map_err(|e| Error::setting(control_setting(i, "control"), e)))
        .collect::<Result<Vec<_>>>()?;
    // The pipeline's default size: the first condition's, rounded down to the VAE's factor.
    let factor = models.catalog.vae_factor;
    let first = pictures.first().map(|p| p.dimensions()).unwrap_or((0, 0));
    let width = request.width.unwrap_or((first.0 as usize / factor) * factor);
    let height = request.height.unwrap_or((first.1 as usize / factor) * factor);
    if width == 0 || height == 0 {
        return Err(Error::setting("width", format!("the output size {width}x{height} is empty")));
    }
    let (w, h) = (size_u32("width", width)?, size_u32("height", height)?);
    images::check_image_size("width", w, h)?;
    for (i, (control, picture)) in request.controls.iter_mut().zip(&pictures).enumerate() {
        let map = match annotations.get(i).cloned().flatten() {
            Some(a) => {
                let named = |e: Error| Error::setting(control_setting(i, "preprocess"), e);
                let detector = annotate::detector(&a.kind, &a.options).map_err(named)?;
                let settings = AnnotateSettings {
                    width: Some(w),
                    height: Some(h),
                    resolution: a.resolution,
                    resize: request.resize,
                };
                annotate::annotate(detector.as_ref(), picture, &settings).map_err(named)?
            }
            None if request.resize == ResizeMode::JustResize => continue,
            None => annotate::resize::fit_to_output(picture, w, h, request.resize),
        };
        control.control = work.save_picture(&map)?;
        control.preprocess = None;
    }
    request.width = Some(width);
    request.height = Some(height);
    request.resize = ResizeMode::JustResize;
    Ok(request)
}

fn size_u32(setting: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::setting(setting, format!("{v} is larger than any image can be")))
}
