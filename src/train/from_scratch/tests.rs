//! A from-scratch run end to end on a tiny layout: it trains, loads, resumes exactly, continues when asked for
//! more steps, and refuses what it cannot apply.
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::decoder::is_decoder;
use super::stage::{StageState, CK_EMA, CK_PARAMS, CK_STATE};
use super::text_encoder::TEXT_WEIGHTS;
use super::*;
use crate::io::weights::DIFFUSERS_STEM;
use crate::synthetic::circles;
use crate::test_support::max_abs_diff as max_diff;
use crate::train::dataset::Dataset;
use crate::train::files::{read_json, read_tensors};
use crate::train::resume::checkpoint_dir;
use crate::train::trainer::LOSS_LOG;
use crate::train::validation;

/// A base small enough to train in a test: the demo's layout with fewer channels.
fn tiny() -> (Architecture, Settings) {
    let mut arch = Architecture::demo();
    arch.vae["block_out_channels"] = json!([8, 8, 16, 16]);
    arch.vae["norm_num_groups"] = json!(4);
    arch.unet["block_out_channels"] = json!([16, 16, 32]);
    arch.unet["norm_num_groups"] = json!(8);
    let stage =
        |steps, ema_decay| StageSettings { steps, batch_size: 2, learning_rate: 1e-3, warmup_steps: 0, ema_decay };
    let settings = Settings {
        resolution: 32,
        vae: stage(3, None),
        vae_decoder: stage(2, None),
        vae_crop: 16,
        unet: stage(4, Some(0.9)),
        checkpointing_steps: 2,
        ..Settings::default()
    };
    (arch, settings)
}

/// A temporary folder with a 3-sample, 32-px circles dataset in it.
fn three_circles() -> (tempfile::TempDir, Source) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    circles::write_dataset(&data, 3, 32, 0, circles::Variety::Fill50k, &mut || {}).unwrap();
    let dataset = Source::Folder(Dataset::open(&data).unwrap());
    (tmp, dataset)
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for part in ["vae", "unet", "text_encoder"] {
        for entry in std::fs::read_dir(dir.join(part)).unwrap() {
            let p = entry.unwrap().path();
            out.push((format!("{part}/{}", p.file_name().unwrap().to_string_lossy()), std::fs::read(p).unwrap()));
        }
    }
    out.sort();
    out
}

/// The model folder loads as a pipeline; a run stopped midway and resumed gives the same bytes as one
/// uninterrupted run.
#[test]
fn trains_loads_and_resumes_exactly() {
    let (tmp, dataset) = three_circles();
    let (arch, settings) = tiny();
    let dev = Device::Cpu;

    let a = tmp.path().join("a");
    let never = AtomicBool::new(false);
    let end = train(&dataset, &a, &arch, &settings, &dev, &never, &mut |_| {}).unwrap();
    assert!(matches!(end, End::Finished { .. }), "{end:?}");
    let sd = crate::pipeline::StableDiffusion::load(&a.join(MODEL_DIR), DType::F32, &dev).unwrap();
    assert_eq!(sd.vae_scale_factor(), 8);
    let sf = sd.vae.config().scaling_factor;
    assert!(sf.is_finite() && sf > 0.0 && sf != 1.0, "scaling factor {sf}");
    let log = validation::read_loss_log(&a.join(UNET_STAGE).join(LOSS_LOG)).unwrap();
    assert_eq!(log.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2, 3, 4]);

    // Stopped at the UNet's step 3 (the flag is raised from the progress callback), then resumed.
    let b = tmp.path().join("b");
    let stop = AtomicBool::new(false);
    let end = train(&dataset, &b, &arch, &settings, &dev, &stop, &mut |r| {
        if r.stage == UNET_STAGE && r.step == 3 {
            stop.store(true, Ordering::SeqCst);
        }
    })
    .unwrap();
    assert_eq!(end, End::Interrupted { stage: UNET_STAGE, step: 3 });
    assert!(!b.join(MODEL_DIR).join("unet").exists());
    let end = train(&dataset, &b, &arch, &settings, &dev, &never, &mut |_| {}).unwrap();
    assert!(matches!(end, End::Finished { .. }), "{end:?}");
    assert!(files(&a.join(MODEL_DIR)) == files(&b.join(MODEL_DIR)), "resumed run differs");
}

/// The decoder stage trains the decoder alone: the encoder (so the latents the UNet learned) and the
/// scaling factor are the VAE stage's; running the finished command again writes the same decoder.
#[test]
fn the_decoder_stage_keeps_the_encoder() {
    let (tmp, dataset) = three_circles();
    let (arch, settings) = tiny();
    let (dev, never) = (Device::Cpu, AtomicBool::new(false));
    let run = tmp.path().join("run");
    train(&dataset, &run, &arch, &settings, &dev, &never, &mut |_| {}).unwrap();
    let weights = format!("{DIFFUSERS_STEM}.safetensors");
    let vae_dir = run.join(MODEL_DIR).join("vae");
    let written = read_tensors(&vae_dir, &weights).unwrap();
    let vae_stage = checkpoint_dir(&run.join(VAE_STAGE), settings.vae.steps);
    let before = read_tensors(&vae_stage, CK_PARAMS).unwrap();
    let decoder_stage = checkpoint_dir(&run.join(VAE_DECODER_STAGE), settings.vae_decoder.steps);
    let after = read_tensors(&decoder_stage, CK_PARAMS).unwrap();
    assert!(!after.is_empty() && after.keys().all(|k| is_decoder(k)), "{:?}", after.keys());
    let same = |a: &Tensor, b: &Tensor| max_diff(a, b) == 0.0;
    let mut moved = 0;
    for (name, w) in &written {
        if is_decoder(name) {
            assert!(same(w, &after[name]), "{name} is not the decoder stage's");
            moved += usize::from(!same(w, &before[name]));
        } else {
            assert!(same(w, &before[name]), "{name} changed");
        }
    }
    assert!(moved > after.len() / 2, "only {moved} of {} decoder tensors trained", after.len());
    let log = validation::read_loss_log(&run.join(VAE_DECODER_STAGE).join(LOSS_LOG)).unwrap();
    assert_eq!(log.len(), settings.vae_decoder.steps as usize);

    let config = std::fs::read(vae_dir.join("config.json")).unwrap();
    let bytes = std::fs::read(vae_dir.join(&weights)).unwrap();
    train(&dataset, &run, &arch, &settings, &dev, &never, &mut |_| {}).unwrap();
    assert!(std::fs::read(vae_dir.join(&weights)).unwrap() == bytes);
    assert!(std::fs::read(vae_dir.join("config.json")).unwrap() == config);
}

/// With an average kept, the model folder holds the average (as the last checkpoint has it), not the last
/// step's weights; without one, the last step's weights.
#[test]
fn the_weight_average_is_what_is_written() {
    let (tmp, dataset) = three_circles();
    let (arch, settings) = tiny();
    let (dev, never) = (Device::Cpu, AtomicBool::new(false));
    let run = tmp.path().join("run");
    train(&dataset, &run, &arch, &settings, &dev, &never, &mut |_| {}).unwrap();
    let last = checkpoint_dir(&run.join(UNET_STAGE), settings.unet.steps);
    let state: StageState = serde_json::from_value(read_json(&last, CK_STATE).unwrap()).unwrap();
    assert_eq!(state.ema_updates, Some(settings.unet.steps));
    let (average, raw) = (read_tensors(&last, CK_EMA).unwrap(), read_tensors(&last, CK_PARAMS).unwrap());
    let written = read_tensors(&run.join(MODEL_DIR).join("unet"), &format!("{DIFFUSERS_STEM}.safetensors")).unwrap();
    let mut moved = 0;
    for (name, w) in &written {
        assert_eq!(max_diff(w, &average[name]), 0.0, "{name} is not the average");
        if max_diff(w, &raw[name]) > 0.0 {
            moved += 1;
        }
    }
    assert!(moved > written.len() / 2, "only {moved} of {} tensors differ from the raw weights", written.len());

    let plain = tmp.path().join("plain");
    let no_average = Settings { unet: StageSettings { ema_decay: None, ..settings.unet.clone() }, ..settings };
    train(&dataset, &plain, &arch, &no_average, &dev, &never, &mut |_| {}).unwrap();
    let last = checkpoint_dir(&plain.join(UNET_STAGE), no_average.unet.steps);
    assert!(!last.join(CK_EMA).exists());
    let raw = read_tensors(&last, CK_PARAMS).unwrap();
    let written = read_tensors(&plain.join(MODEL_DIR).join("unet"), &format!("{DIFFUSERS_STEM}.safetensors")).unwrap();
    for (name, w) in &written {
        assert_eq!(max_diff(w, &raw[name]), 0.0, "{name}");
    }

    // A finished run without an average, extended with one: the average starts where it resumes.
    std::fs::remove_dir_all(plain.join(MODEL_DIR).join("unet")).unwrap();
    let longer = Settings { unet: StageSettings { steps: 6, ..settings.unet.clone() }, ..no_average };
    train(&dataset, &plain, &arch, &longer, &dev, &never, &mut |_| {}).unwrap();
    let last = checkpoint_dir(&plain.join(UNET_STAGE), 6);
    let state: StageState = serde_json::from_value(read_json(&last, CK_STATE).unwrap()).unwrap();
    assert_eq!(state.ema_updates, Some(2));
}

/// By default the text encoder trains with the UNet and is written back in f32; frozen, it stays the seeded
/// f16 initialisation.
#[test]
fn the_text_encoder_trains_unless_frozen() {
    let (tmp, dataset) = three_circles();
    let (arch, settings) = tiny();
    let (dev, never) = (Device::Cpu, AtomicBool::new(false));
    let text = |run: &Path| read_tensors(&run.join(MODEL_DIR).join("text_encoder"), TEXT_WEIGHTS).unwrap();
    let frozen = tmp.path().join("frozen");
    let settings_frozen = Settings { train_text_encoder: false, ..settings.clone() };
    train(&dataset, &frozen, &arch, &settings_frozen, &dev, &never, &mut |_| {}).unwrap();
    let trained = tmp.path().join("trained");
    train(&dataset, &trained, &arch, &settings, &dev, &never, &mut |_| {}).unwrap();
    let (before, after) = (text(&frozen), text(&trained));
    assert_eq!(before.len(), after.len());
    let mut unchanged = Vec::new();
    for (name, init) in &before {
        assert_eq!(init.dtype(), DType::F16, "{name}");
        assert_eq!(after[name].dtype(), DType::F32, "{name}");
        if max_diff(&init.to_dtype(DType::F32).unwrap(), &after[name]) == 0.0 {
            unchanged.push(name.clone());
        }
    }
    // Every tensor got a gradient and moved (a silently untrained tensor is the known trap).
    assert!(unchanged.is_empty(), "not trained: {unchanged:?}");
    // The trained pipeline loads.
    crate::pipeline::StableDiffusion::load(&trained.join(MODEL_DIR), DType::F32, &dev).unwrap();
}

/// The setting a bad value is in, by its library name (the CLI shows it as its flag).
fn setting_of(e: crate::Error) -> String {
    match e {
        crate::Error::Setting { setting, .. } => setting,
        other => panic!("not a setting error: {other}"),
    }
}

#[test]
fn bad_settings_name_the_setting() {
    let (_, settings) = tiny();
    let err = |s: Settings| setting_of(s.validate().unwrap_err());
    assert_eq!(err(Settings { vae_crop: 12, ..settings.clone() }), "vae_crop");
    assert_eq!(err(Settings { proportion_empty_prompts: 2.0, ..settings.clone() }), "proportion_empty_prompts");
    assert_eq!(err(Settings { snr_gamma: Some(-1.0), ..settings.clone() }), "snr_gamma");
    let unet = StageSettings { ema_decay: Some(1.0), ..settings.unet.clone() };
    assert_eq!(err(Settings { unet, ..settings.clone() }), "unet_ema_decay");
    let vae = StageSettings { batch_size: 0, ..settings.vae.clone() };
    assert_eq!(err(Settings { vae, ..settings.clone() }), "vae_batch_size");
    assert_eq!(err(Settings { noise_offset: f64::NAN, ..settings }), "noise_offset");
}

/// A finished run asked for more UNet steps trains them (from its last checkpoint, so exactly as one longer
/// run) and records them; asked for what cannot apply, it refuses and leaves the folder as it was.
#[test]
fn a_finished_run_continues_to_more_steps_and_refuses_what_cannot_apply() {
    let (tmp, dataset) = three_circles();
    let (arch, settings) = tiny();
    let (dev, never) = (Device::Cpu, AtomicBool::new(false));
    let longer = Settings { unet: StageSettings { steps: 6, ..settings.unet.clone() }, ..settings.clone() };
    let straight = tmp.path().join("straight");
    train(&dataset, &straight, &arch, &longer, &dev, &never, &mut |_| {}).unwrap();

    let run = tmp.path().join("run");
    train(&dataset, &run, &arch, &settings, &dev, &never, &mut |_| {}).unwrap();
    let recorded = std::fs::read(run.join(SETTINGS_FILE)).unwrap();
    let model = files(&run.join(MODEL_DIR));

    // Refused: steps taken back, a new resolution, a new batch size, more VAE steps under a trained UNet.
    let refuse = |s: Settings, setting: &str| {
        let err = train(&dataset, &run, &arch, &s, &dev, &never, &mut |_| {}).unwrap_err();
        let text = err.to_string();
        assert_eq!(setting_of(err), setting, "{text}");
        assert!(std::fs::read(run.join(SETTINGS_FILE)).unwrap() == recorded, "{setting}: settings recorded");
        assert!(files(&run.join(MODEL_DIR)) == model, "{setting}: the model changed");
    };
    refuse(Settings { unet: StageSettings { steps: 3, ..settings.unet.clone() }, ..settings.clone() }, "unet_steps");
    refuse(Settings { resolution: 24, vae_crop: 8, ..longer.clone() }, "resolution");
    refuse(
        Settings { unet: StageSettings { batch_size: 3, ..longer.unet.clone() }, ..longer.clone() },
        "unet_batch_size",
    );
    refuse(Settings { vae: StageSettings { steps: 5, ..settings.vae.clone() }, ..longer.clone() }, "vae_steps");
    refuse(Settings { noise_offset: 0.5, ..longer.clone() }, "noise_offset");

    // More UNet steps: trained, recorded, and the same model as one run of 6.
    let end = train(&dataset, &run, &arch, &longer, &dev, &never, &mut |_| {}).unwrap();
    assert_eq!(end, End::Finished { steps: 2 });
    let log = validation::read_loss_log(&run.join(UNET_STAGE).join(LOSS_LOG)).unwrap();
    assert_eq!(log.len(), 6);
    let recorded: Settings = serde_json::from_slice(&std::fs::read(run.join(SETTINGS_FILE)).unwrap()).unwrap();
    assert_eq!(recorded, longer);
    assert!(files(&run.join(MODEL_DIR)) == files(&straight.join(MODEL_DIR)), "continued run differs");
    // The same settings again: nothing left to train.
    let end = train(&dataset, &run, &arch, &longer, &dev, &never, &mut |_| {}).unwrap();
    assert_eq!(end, End::Finished { steps: 0 });
}

/// Shards with bad samples and a damaged shard (`trainer::tests::shards_with_bad_samples`), read as train-base
/// reads them (the image stands in for the condition).
fn bad_shards(dir: &Path) -> Source {
    let pattern = crate::train::trainer::tests::shards_with_bad_samples(dir);
    let fields = |k| {
        let f = crate::train::stream::Fields::defaults(k);
        crate::train::stream::Fields { conditioning_image: f.image.clone(), ..f }
    };
    Source::open(&pattern, fields).unwrap()
}

/// From shards: a run stopped mid-epoch in the VAE stage and again in the UNet stage, then resumed, writes the
/// same model as one uninterrupted run, and each stage reports the same bad samples; the checkpoints hold the
/// stream position. A checkpoint does not continue on other data.
#[test]
fn trains_on_shards_and_resumes_mid_epoch_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (arch, settings) = tiny();
    let settings = Settings { shuffle_buffer: 2, data_workers: 2, ..settings };
    let dev = Device::Cpu;
    let never = AtomicBool::new(false);
    let shards = tmp.path().join("shards");
    bad_shards(&shards);
    let last_skips = |map: &mut std::collections::BTreeMap<&'static str, String>, r: &StageReport| {
        map.insert(r.stage, format!("{:?}", r.skipped.as_ref().unwrap()));
    };

    let a = tmp.path().join("a");
    let mut want = std::collections::BTreeMap::new();
    let end =
        train(&bad_shards(&shards), &a, &arch, &settings, &dev, &never, &mut |r| last_skips(&mut want, r)).unwrap();
    assert!(matches!(end, End::Finished { .. }), "{end:?}");
    assert_eq!(want.len(), 3, "{want:?}");
    assert!(want[VAE_STAGE].contains("samples: 2") || want[VAE_STAGE].contains("samples: 3"), "{want:?}");

    let b = tmp.path().join("b");
    let mut got = std::collections::BTreeMap::new();
    for (stage, at) in [(VAE_STAGE, 2), (UNET_STAGE, 3)] {
        let stop = AtomicBool::new(false);
        let end = train(&bad_shards(&shards), &b, &arch, &settings, &dev, &stop, &mut |r| {
            last_skips(&mut got, r);
            if r.stage == stage && r.step == at {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .unwrap();
        assert_eq!(end, End::Interrupted { stage, step: at });
        let state = read_json(&checkpoint_dir(&b.join(stage), at), CK_STATE).unwrap();
        let taken = state["stream"]["position"]["taken"].as_u64().unwrap();
        assert!(taken >= 2 * at, "{stage}: {state}");
        assert!(state["stream"]["shards"][0][0] == "part-0.tar", "{state}");
    }
    let end =
        train(&bad_shards(&shards), &b, &arch, &settings, &dev, &never, &mut |r| last_skips(&mut got, r)).unwrap();
    assert!(matches!(end, End::Finished { .. }), "{end:?}");
    assert!(files(&a.join(MODEL_DIR)) == files(&b.join(MODEL_DIR)), "resumed run differs");
    assert_eq!(got, want, "skipped samples per stage");

    // A stopped streamed stage keeps its shuffle buffer: another is refused before anything is written.
    let config = std::fs::read(b.join(SETTINGS_FILE)).unwrap();
    let wider =
        Settings { shuffle_buffer: 3, unet: StageSettings { steps: 5, ..settings.unet.clone() }, ..settings.clone() };
    let err = train(&bad_shards(&shards), &b, &arch, &wider, &dev, &never, &mut |_| {}).unwrap_err().to_string();
    assert!(err.starts_with("shuffle_buffer: 3 differs from the 2"), "{err}");
    assert_eq!(std::fs::read(b.join(SETTINGS_FILE)).unwrap(), config);

    // The same run folder on other shards: refused by name.
    let c = tmp.path().join("c");
    let stop = AtomicBool::new(false);
    train(&bad_shards(&shards), &c, &arch, &settings, &dev, &stop, &mut |r| {
        if r.stage == VAE_STAGE && r.step == 1 {
            stop.store(true, Ordering::SeqCst);
        }
    })
    .unwrap();
    let other = tmp.path().join("other");
    let other = Source::open(&crate::train::stream::tests::write_shards(&other, 1, 3), |k| {
        let f = crate::train::stream::Fields::defaults(k);
        crate::train::stream::Fields { conditioning_image: f.image.clone(), ..f }
    })
    .unwrap();
    let err = train(&other, &c, &arch, &settings, &dev, &never, &mut |_| {}).unwrap_err().to_string();
    assert!(err.starts_with("dataset") && err.contains("train-00000.tar"), "{err}");
}
