//! `generate --embedding FILE`, `--embeddings-dir DIR`, `--vae`: diffusers' images, the metadata (`TI hashes`,
//! `VAE hash`), `reproduce`, and refusals naming the flag. The numbers are checked against diffusers in
//! `pipeline::textual_inversion_parity` and `pipeline::vae_override`.
use crate::common;

use common::{controlnet, controlnet_owned, fixture, psnr, stderr, temp_dir, tiny_generate_args};

fn tiny_args(out: &std::path::Path, seed: &str, extra: &[&str]) -> Vec<String> {
    let mut args = tiny_generate_args(out, seed, &["--width", "128", "--height", "128"]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn reference(rel: &str) -> image::RgbImage {
    image::open(fixture(rel)).unwrap().to_rgb8()
}

/// The embeddings folder gives diffusers' image (the three SD1 layouts found by name, the diffusers file by its
/// token); the metadata names them with their hashes and `reproduce` makes the same image from the files.
#[test]
fn embeddings_dir_matches_diffusers_and_reproduces() {
    let dir = temp_dir();
    let out = dir.path().join("ti.png");
    let emb_dir = fixture("textual_inversion");
    let extra = [
        "--prompt",
        "a photo of inkstyle cat, neonfox",
        "--negative-prompt",
        "<cat-toy>",
        "--embeddings-dir",
        emb_dir.to_str().unwrap(),
    ];
    let res = controlnet_owned(&tiny_args(&out, "11", &extra));
    assert!(res.status.success(), "{}", stderr(&res));
    let img = image::open(&out).unwrap().to_rgb8();
    assert!(psnr(&img, &reference("textual_inversion/image.png")) >= 40.0);

    let chunks = controlnet::io::images::read_png_text(&out).unwrap();
    let meta = controlnet::pipeline::ImageMetadata::from_text_chunks(&chunks).unwrap();
    let names: Vec<&str> = meta.embeddings.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["<cat-toy>", "inkstyle", "neonfox"]);
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    let ink = &meta.embeddings[1].sha256[..10];
    assert!(params.contains("TI hashes: \"<cat-toy>: ") && params.contains(&format!("inkstyle: {ink}")), "{params}");

    let again = dir.path().join("again.png");
    let res = controlnet(&["reproduce", out.to_str().unwrap(), "--output", again.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(image::open(&again).unwrap().to_rgb8(), img);
}

/// `--vae FILE` (original layout) gives diffusers' image with that VAE; recorded and reproduced.
#[test]
fn vae_file_matches_diffusers_and_reproduces() {
    let dir = temp_dir();
    let out = dir.path().join("vae.png");
    let vae = fixture("vae_override/tiny-vae-ldm.safetensors");
    let extra = ["--prompt", "a red circle on a light blue background", "--vae", vae.to_str().unwrap()];
    let res = controlnet_owned(&tiny_args(&out, "17", &extra));
    assert!(res.status.success(), "{}", stderr(&res));
    let img = image::open(&out).unwrap().to_rgb8();
    assert!(psnr(&img, &reference("vae_override/image.png")) >= 40.0);
    let chunks = controlnet::io::images::read_png_text(&out).unwrap();
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("VAE hash: ") && params.contains("VAE: tiny-vae-ldm.safetensors"), "{params}");
    let again = dir.path().join("again.png");
    let res = controlnet(&["reproduce", out.to_str().unwrap(), "--output", again.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(image::open(&again).unwrap().to_rgb8(), img);
}

/// An SDXL embedding on SD1.5, a LoRA given as an embedding, a UNet given as the VAE: refused naming the flag
/// and the file, non-zero exit, no output written.
#[test]
fn wrong_files_are_refused_by_flag() {
    let dir = temp_dir();
    let out = dir.path().join("out.png");
    let cases: [(&str, std::path::PathBuf, &str); 3] = [
        ("--embedding", fixture("textual_inversion/xlstyle.safetensors"), "made for another model"),
        ("--embedding", fixture("lora/tiny-kohya.safetensors"), "not a textual-inversion embedding"),
        ("--vae", fixture("models/tiny-sd15/unet/diffusion_pytorch_model.safetensors"), "a VAE"),
    ];
    for (flag, file, says) in cases {
        let res = controlnet_owned(&tiny_args(&out, "1", &["--prompt", "xlstyle", flag, file.to_str().unwrap()]));
        assert!(!res.status.success());
        let err = stderr(&res);
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(err.contains(&format!("{flag}: ")) && err.contains(name) && err.contains(says), "{err}");
        assert!(!out.exists());
    }
}

/// A batch job with `vae` and `embedding` makes the same images as `generate` (diffusers' references).
#[test]
fn batch_jobs_take_embeddings_and_vae() {
    let dir = temp_dir();
    let model = fixture("models/tiny-sd15");
    let common = format!(
        r#""model": {:?}, "steps": 4, "scheduler": "ddim", "guidance": 7.5, "width": 128, "height": 128"#,
        model.to_str().unwrap()
    );
    let ti = fixture("textual_inversion");
    let embeddings: Vec<String> = ["inkstyle.pt", "neonfox.safetensors", "cat-toy/learned_embeds.bin"]
        .iter()
        .map(|f| format!("{:?}", ti.join(f).to_str().unwrap()))
        .collect();
    let lines = [
        format!(
            r#"{{{common}, "output": "ti.png", "seed": 11, "prompt": "a photo of inkstyle cat, neonfox", "negative_prompt": "<cat-toy>", "embedding": [{}]}}"#,
            embeddings.join(", ")
        ),
        format!(
            r#"{{{common}, "output": "vae.png", "seed": 17, "prompt": "a red circle on a light blue background", "vae": {:?}}}"#,
            fixture("vae_override/tiny-vae").to_str().unwrap()
        ),
    ];
    let jobs = dir.path().join("jobs.jsonl");
    std::fs::write(&jobs, lines.join("\n")).unwrap();
    let out = dir.path().join("out");
    let res = controlnet(&["batch", jobs.to_str().unwrap(), "--output", out.to_str().unwrap(), "--quiet"]);
    assert!(res.status.success(), "{}", stderr(&res));
    let ti_img = image::open(out.join("ti.png")).unwrap().to_rgb8();
    assert!(psnr(&ti_img, &reference("textual_inversion/image.png")) >= 40.0);
    let vae_img = image::open(out.join("vae.png")).unwrap().to_rgb8();
    assert!(psnr(&vae_img, &reference("vae_override/image.png")) >= 40.0);
}
