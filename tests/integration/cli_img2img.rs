//! End to end: `controlnet generate --init-image` (img2img, later inpainting) against diffusers' own runs of the
//! same cases (tools/fixtures/gen_img2img.py → tests/fixtures/img2img/cases.json; gen_mask_crop.py → mask_crop/ for
//! --padding-mask-crop), ≥ 40 dB PSNR; and the errors
//! a bad img2img request gets.
use crate::common;

use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    args: Vec<String>,
    images: Vec<String>,
}

/// A case of `folder`'s cases.json (img2img/ from gen_img2img.py, mask_crop/ from gen_mask_crop.py).
fn case_in(folder: &str, name: &str) -> Case {
    let text = std::fs::read_to_string(fixture(&format!("{folder}/cases.json"))).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    cases.into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no case {name}"))
}

fn case(name: &str) -> Case {
    case_in("img2img", name)
}

/// Minimum PSNR (dB) against diffusers' image for the same settings and seed.
const MIN_PSNR_DB: f64 = 40.0;

fn run_case(name: &str) {
    run_case_in("img2img", name);
}

fn run_case_in(folder: &str, name: &str) {
    let c = case_in(folder, name);
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let mut args: Vec<&str> = vec!["generate"];
    args.extend(c.args.iter().map(String::as_str));
    args.extend(["--output", out.to_str().unwrap(), "--quiet"]);
    let res = controlnet(&args);
    assert!(res.status.success(), "{name}: {}", stderr(&res));
    for (i, reference) in c.images.iter().enumerate() {
        let ours = if c.images.len() == 1 { out.clone() } else { dir.path().join(format!("out-{}.png", i + 1)) };
        let ours = image::open(&ours).unwrap().to_rgb8();
        let theirs = image::open(fixture(&format!("{folder}/{reference}"))).unwrap().to_rgb8();
        let db = psnr(&ours, &theirs);
        eprintln!("{name} image {}: {db:.1} dB", i + 1);
        assert!(db >= MIN_PSNR_DB, "{name} image {}: PSNR {db:.1} dB < {MIN_PSNR_DB} dB", i + 1);
    }
}

macro_rules! cases {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(#[test] fn $test() { run_case($name); })*
    };
}

cases! {
    img2img_ddim_half => "i2i_ddim_50",
    img2img_ddim_most => "i2i_ddim_80",
    img2img_euler_half => "i2i_euler_50",
    img2img_euler_most => "i2i_euler_80",
    img2img_model_scheduler => "i2i_default_scheduler",
    img2img_ancestral_two_images => "i2i_euler-a_two_images",
    img2img_init_resized_to_the_output => "i2i_resized",
    img2img_full_strength => "i2i_full_strength",
    inpaint_full_strength => "inp_full_strength",
    inpaint_euler_three_quarters => "inp_euler_75",
    inpaint_ancestral_two_images => "inp_euler-a_two_images",
    inpaint_nine_channel_unet => "inp_nine_channels",
    inpaint_nine_channel_unet_ancestral_partial => "inp_nine_channels_euler-a_60",
    inpaint_controlnet_condition => "inp_inpaint_condition",
    inpaint_blurred_mask => "inp_mask_blur",
}

// Only the masked area (--padding-mask-crop), against diffusers' padding_mask_crop: the pasted-back result.
#[test]
fn inpaint_only_the_masked_area() {
    run_case_in("mask_crop", "crop_ddim");
}

#[test]
fn inpaint_only_the_masked_area_blurred_mask() {
    run_case_in("mask_crop", "crop_euler_blur");
}

#[test]
fn inpaint_only_the_masked_area_at_another_output_size() {
    run_case_in("mask_crop", "crop_wide_output");
}

/// The arguments of a case with `--init-image`/`--strength` and friends replaced or added.
fn args_with(name: &str, replace: &[(&str, &str)]) -> Vec<String> {
    let mut args = case(name).args;
    for (flag, value) in replace {
        match args.iter().position(|a| a == flag) {
            Some(i) => args[i + 1] = value.to_string(),
            None => args.extend([flag.to_string(), value.to_string()]),
        }
    }
    args
}

fn generate(args: &[String], out: &std::path::Path) -> std::process::Output {
    let mut all = vec!["generate".to_string()];
    all.extend(args.iter().cloned());
    all.extend(["--output".into(), out.display().to_string(), "--quiet".into()]);
    controlnet(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn strength_outside_its_range_is_refused_naming_the_flag() {
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    for strength in ["0", "1.5", "-0.2"] {
        let res = generate(&args_with("i2i_ddim_50", &[("--strength", strength)]), &out);
        assert!(!res.status.success());
        let err = stderr(&res);
        assert!(err.contains(&format!("--strength: {strength} must lie in (0, 1]")), "{err}");
    }
    // Fewer than one step: 0.1 of 6 steps.
    let res = generate(&args_with("i2i_ddim_50", &[("--strength", "0.1")]), &out);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--strength: 0.1 of 6 steps is less than one step"), "{}", stderr(&res));
    assert!(!out.exists());
}

#[test]
fn a_missing_init_image_is_named() {
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let res = generate(&args_with("i2i_ddim_50", &[("--init-image", "no/such.png")]), &out);
    assert!(!res.status.success());
    let err = stderr(&res);
    assert!(err.contains("--init-image") && err.contains("no/such.png"), "{err}");
}

/// The recipe records the init picture and strength, and `reproduce` makes the same image from it.
#[test]
fn img2img_is_recorded_and_reproduced() {
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let res = generate(&case("i2i_euler_50").args, &out);
    assert!(res.status.success(), "{}", stderr(&res));
    let chunks = controlnet::io::images::read_png_text(&out).unwrap();
    let meta = controlnet::pipeline::ImageMetadata::from_text_chunks(&chunks).unwrap();
    assert_eq!(meta.strength, Some(0.5));
    let init = meta.init_image.as_ref().unwrap();
    assert!(init.path.ends_with("tests/fixtures/img2img/init.png"), "{}", init.path);
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("Denoising strength: 0.5"), "{params}");
    let again = dir.path().join("again.png");
    let res = controlnet(&["reproduce", out.to_str().unwrap(), "--output", again.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    let (a, b) = (image::open(&out).unwrap().to_rgb8(), image::open(&again).unwrap().to_rgb8());
    assert_eq!(a, b);
}

/// A txt2img recipe carries no img2img keys (its metadata stays what it was).
#[test]
fn txt2img_metadata_has_no_img2img_keys() {
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let mut args = case("i2i_ddim_50").args;
    let i = args.iter().position(|a| a == "--init-image").unwrap();
    args.drain(i..i + 4);
    let res = generate(&args, &out);
    assert!(res.status.success(), "{}", stderr(&res));
    let chunks = controlnet::io::images::read_png_text(&out).unwrap();
    for (_, text) in &chunks {
        assert!(!text.contains("strength") && !text.contains("init_image"), "{text}");
    }
}

#[test]
fn a_mask_of_another_size_is_refused() {
    let dir = temp_dir();
    let small = dir.path().join("small_mask.png");
    image::RgbImage::from_pixel(64, 64, image::Rgb([255; 3])).save(&small).unwrap();
    let out = dir.path().join("out.png");
    let res = generate(&args_with("inp_full_strength", &[("--mask", small.to_str().unwrap())]), &out);
    assert!(!res.status.success());
    let err = stderr(&res);
    assert!(err.contains("--mask: is 64x64 but init_image is 128x128"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_picture_given_as_the_mask_is_refused() {
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let init = fixture("img2img/init.png");
    let res = generate(&args_with("inp_full_strength", &[("--mask", init.to_str().unwrap())]), &out);
    assert!(!res.status.success());
    let err = stderr(&res);
    assert!(err.contains("--mask: ") && err.contains("of its pixels are mid grey"), "{err}");
}

#[test]
fn a_mask_needs_an_init_image_and_an_inpainting_unet_a_mask() {
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let mut args = case("inp_full_strength").args;
    let i = args.iter().position(|a| a == "--init-image").unwrap();
    args.drain(i..i + 2);
    let res = generate(&args, &out);
    assert!(!res.status.success());
    assert!(
        stderr(&res).contains("--mask: inpainting needs the picture to paint in: set init_image"),
        "{}",
        stderr(&res)
    );
    // A 9-channel UNet without a mask.
    let mut args = case("inp_nine_channels").args;
    let i = args.iter().position(|a| a == "--mask").unwrap();
    args.drain(i..i + 2);
    let res = generate(&args, &out);
    assert!(!res.status.success());
    let err = stderr(&res);
    assert!(
        err.contains("--mask: the UNet takes 9 input channels") && err.contains("needs init_image and mask"),
        "{err}"
    );
    // The inpaint condition without a mask.
    let mut args = case("inp_inpaint_condition").args;
    let i = args.iter().position(|a| a == "--mask").unwrap();
    args.drain(i..i + 2);
    let res = generate(&args, &out);
    assert!(!res.status.success());
    assert!(
        stderr(&res)
            .contains("--preprocess (ControlNet 1): inpaint is made from an image and a mask, and no mask is given"),
        "{}",
        stderr(&res)
    );
}

#[test]
fn inpainting_is_recorded_and_reproduced() {
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let res = generate(&case("inp_euler_75").args, &out);
    assert!(res.status.success(), "{}", stderr(&res));
    let chunks = controlnet::io::images::read_png_text(&out).unwrap();
    let meta = controlnet::pipeline::ImageMetadata::from_text_chunks(&chunks).unwrap();
    assert_eq!(meta.strength, Some(0.75));
    assert!(meta.mask.as_ref().unwrap().path.ends_with("tests/fixtures/img2img/mask.png"));
    let again = dir.path().join("again.png");
    let res = controlnet(&["reproduce", out.to_str().unwrap(), "--output", again.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(image::open(&out).unwrap().to_rgb8(), image::open(&again).unwrap().to_rgb8());
}

#[test]
fn padding_mask_crop_needs_a_mask_with_a_masked_area() {
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    // Without --mask.
    let mut args = case_in("mask_crop", "crop_ddim").args;
    let i = args.iter().position(|a| a == "--mask").unwrap();
    args.drain(i..i + 2);
    let res = generate(&args, &out);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--padding-mask-crop: crops around the inpainting mask"), "{}", stderr(&res));
    // An all-black mask: nothing to crop to.
    let black = dir.path().join("black.png");
    image::RgbImage::new(128, 128).save(&black).unwrap();
    let mut args = case_in("mask_crop", "crop_ddim").args;
    let i = args.iter().position(|a| a == "--mask").unwrap();
    args[i + 1] = black.to_str().unwrap().to_string();
    let res = generate(&args, &out);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--padding-mask-crop: the mask is all black"), "{}", stderr(&res));
    assert!(!out.exists());
}
