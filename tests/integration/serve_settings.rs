//! `controlnet serve`'s A1111 prompt features and settings over real HTTP with the tiny fixture models: LoRA
//! tags from `--lora-dir`, A1111 prompt syntax, clip skip (`override_settings` and `/sdapi/v1/options`), the
//! ControlNet maps appended to the answer, `/sdapi/v1/scripts`; each equals `generate`'s image, bad values are
//! refused naming the field and the server keeps serving.
use crate::common;
use crate::common::server;

use common::{controlnet, stderr, temp_dir};
use serde_json::{json, Value};
use server::*;

const LORA_DIR: &str = "tests/fixtures/lora";

fn body(prompt: &str, extra: Value) -> Value {
    let mut body = json!({ "prompt": prompt, "steps": 2, "seed": 5, "sampler_name": "Euler a", "width": 64,
        "height": 64 });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// `generate` with the tiny model, seed 5, 2 Euler a steps, 64×64, A1111 prompt syntax and `extra` flags.
fn cli_image(prompt: &str, extra: &[&str]) -> image::RgbImage {
    let dir = temp_dir();
    let out = dir.path().join("cli.png");
    let mut args = vec!["generate", "--model", SD15, "--prompt", prompt, "--steps", "2", "--seed", "5"];
    args.extend(["--scheduler", "euler-a", "--width", "64", "--height", "64", "--prompt-syntax", "a1111", "--quiet"]);
    args.extend_from_slice(extra);
    args.extend(["--output", out.to_str().unwrap()]);
    let res = controlnet(&args);
    assert!(res.status.success(), "{}", stderr(&res));
    image::open(&out).unwrap().to_rgb8()
}

fn images(reply: &Reply) -> Vec<image::RgbImage> {
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["images"].as_array().unwrap().iter().map(|i| pixels(&unbase64(i.as_str().unwrap()))).collect()
}

fn refused(reply: &Reply, field: &str, detail: &str) {
    assert_eq!(reply.status, 422, "{}", reply.text());
    let v = reply.json();
    assert_eq!(v["field"], json!(field), "{v}");
    assert!(v["detail"].as_str().unwrap().contains(detail), "{v}");
}

#[test]
fn lora_tags_syntax_and_clip_skip_make_the_cli_images() {
    let server = Server::tiny(&["--lora-dir", LORA_DIR]);
    let txt2img = |b: &Value| server.post_json("/sdapi/v1/txt2img", b);

    // 1. A LoRA tag merges the LoRA; the next request without one runs the plain model again (no stale merge),
    //    and a weighted A1111 prompt is read as A1111 reads it.
    let tagged = "a (cat:1.3) <lora:tiny-kohya:0.8>";
    let with_lora = images(&txt2img(&body(tagged, json!({}))));
    assert_eq!(with_lora[0], cli_image(tagged, &["--lora-dir", LORA_DIR]));
    let plain = images(&txt2img(&body("a (cat:1.3)", json!({}))));
    assert_eq!(plain[0], cli_image("a (cat:1.3)", &[]));
    assert_ne!(plain[0], with_lora[0], "the LoRA changed nothing");
    let again = images(&txt2img(&body(tagged, json!({}))));
    assert_eq!(again[0], with_lora[0]);

    // 2. Clip skip for one request (override_settings), then for all (options).
    let skip = json!({ "override_settings": { "CLIP_stop_at_last_layers": 2 } });
    let skipped = images(&txt2img(&body("a cat", skip)));
    assert_eq!(skipped[0], cli_image("a cat", &["--clip-skip", "2"]));
    assert_eq!(server.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"], json!(1));
    let set = server.post_json("/sdapi/v1/options", &json!({ "CLIP_stop_at_last_layers": 2 }));
    assert_eq!(set.status, 200, "{}", set.text());
    assert_eq!(server.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"], json!(2));
    assert_eq!(images(&txt2img(&body("a cat", json!({}))))[0], skipped[0]);

    // 3. The job API takes prompt_syntax and clip_skip too.
    let job = json!({ "prompt": "a (cat:1.3)", "steps": 2, "seed": 5, "scheduler": "euler-a", "width": 64,
        "height": 64, "prompt_syntax": "a1111", "clip_skip": 1 });
    let submitted = server.post_json("/jobs", &job);
    assert_eq!(submitted.status, 202, "{}", submitted.text());
    let id = submitted.json()["id"].as_str().unwrap().to_string();
    assert!(
        wait_until(std::time::Duration::from_secs(60), || server.get(&format!("/jobs/{id}")).json()["state"] == "done")
    );
    let result = server.get(&format!("/jobs/{id}/result")).json();
    assert_eq!(pixels(&unbase64(result["images"][0]["png"].as_str().unwrap())), plain[0]);

    // 4. Refused, naming the field; the server goes on serving.
    refused(&txt2img(&body("a <lora:missing:1>", json!({}))), "prompt", "<lora:missing:1>");
    let zero = json!({ "override_settings": { "CLIP_stop_at_last_layers": 0 } });
    refused(&txt2img(&body("a cat", zero)), "override_settings.CLIP_stop_at_last_layers", "from 1 to 12");
    let deep = json!({ "override_settings": { "CLIP_stop_at_last_layers": 3 } });
    refused(&txt2img(&body("a cat", deep)), "override_settings.CLIP_stop_at_last_layers", "");
    refused(
        &server.post_json("/sdapi/v1/options", &json!({ "eta_noise_seed_delta": 31337 })),
        "eta_noise_seed_delta",
        "",
    );
    assert_eq!(
        server.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"],
        json!(2),
        "a refused set changed it"
    );
    assert_eq!(images(&txt2img(&body("a cat", json!({}))))[0], skipped[0]);
}

#[test]
fn control_maps_are_appended_unless_switched_off() {
    let server = Server::tiny(&[]);
    let unit = |extra: Value| {
        let mut u = json!({ "image": picture_base64(CONTROL), "model": "tiny-controlnet-a", "module": "canny",
            "pixel_perfect": true, "resize_mode": "Just Resize" });
        for (k, v) in extra.as_object().unwrap() {
            u[k] = v.clone();
        }
        json!({ "ControlNet": { "args": [u] } })
    };
    let run = |unit_extra: Value, extra: Value| {
        let mut b = body("a cat", json!({ "alwayson_scripts": unit(unit_extra) }));
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        images(&server.post_json("/sdapi/v1/txt2img", &b))
    };
    // The map: canny of the picture at the output size, as `annotate` makes it.
    let dir = temp_dir();
    let map = dir.path().join("map.png");
    let args = ["annotate", "canny", CONTROL, "--width", "64", "--height", "64", "--resize", "just-resize"];
    let res = controlnet(&[&args[..], &["--output", map.to_str().unwrap()]].concat());
    assert!(res.status.success(), "{}", stderr(&res));
    let got = run(json!({}), json!({}));
    assert_eq!(got.len(), 2);
    assert_eq!(got[1], image::open(&map).unwrap().to_rgb8());
    assert_eq!(run(json!({ "save_detected_map": false }), json!({})).len(), 1);
    let off = json!({ "override_settings": { "control_net_no_detectmap": true } });
    assert_eq!(run(json!({}), off), got[..1]);
    // ControlNet is listed as A1111 lists scripts.
    let scripts = server.get("/sdapi/v1/scripts").json();
    assert_eq!(scripts["txt2img"], json!(["controlnet"]));
    assert_eq!(server.get("/sdapi/v1/script-info").json()[0]["is_alwayson"], json!(true));
}

/// `inpainting_mask_invert` 1 repaints the black part: `generate` with the inverted mask file; other values are
/// refused.
#[test]
fn an_inverted_mask_repaints_the_black_part() {
    let server = Server::tiny(&[]);
    let (init, mask) = ("tests/fixtures/img2img/init.png", "tests/fixtures/img2img/mask.png");
    let request = |invert: Value| {
        body(
            "a cat",
            json!({ "init_images": [picture_base64(init)], "mask": picture_base64(mask), "denoising_strength": 0.5,
                "inpainting_fill": 1, "inpaint_full_res": false, "inpainting_mask_invert": invert, "width": null,
                "height": null }),
        )
    };
    let dir = temp_dir();
    let inverted = dir.path().join("inverted.png");
    let mut m = image::open(mask).unwrap().to_rgb8();
    image::imageops::invert(&mut m);
    m.save(&inverted).unwrap();
    let served = images(&server.post_json("/sdapi/v1/img2img", &request(json!(1))));
    let out = dir.path().join("cli.png");
    let args = ["generate", "--model", SD15, "--prompt", "a cat", "--steps", "2", "--seed", "5", "--scheduler"];
    let more = ["euler-a", "--prompt-syntax", "a1111", "--init-image", init, "--strength", "0.5", "--mask-blur", "4"];
    let res = controlnet(
        &[&args[..], &more[..], &["--mask", inverted.to_str().unwrap(), "--quiet", "--output", out.to_str().unwrap()]]
            .concat(),
    );
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(served[0], image::open(&out).unwrap().to_rgb8());
    assert_ne!(served[0], images(&server.post_json("/sdapi/v1/img2img", &request(json!(0))))[0]);
    refused(&server.post_json("/sdapi/v1/img2img", &request(json!(2))), "inpainting_mask_invert", "expected 0");
}

/// `inpainting_fill` 2 ("latent noise") and 3 ("latent nothing") are `generate --masked-content latent-noise`
/// and `latent-nothing` (and differ from 1, "original"); 0 ("fill") and unknown values are refused.
#[test]
fn inpainting_fills_are_generates_masked_content() {
    let server = Server::tiny(&[]);
    let (init, mask) = ("tests/fixtures/img2img/init.png", "tests/fixtures/img2img/mask.png");
    let request = |fill: Value| {
        body(
            "a cat",
            json!({ "init_images": [picture_base64(init)], "mask": picture_base64(mask), "denoising_strength": 0.6,
                "inpainting_fill": fill, "inpaint_full_res": false, "width": null, "height": null }),
        )
    };
    let dir = temp_dir();
    let cli = |content: &str| {
        let out = dir.path().join(format!("{content}.png"));
        let args = ["generate", "--model", SD15, "--prompt", "a cat", "--steps", "2", "--seed", "5", "--scheduler"];
        let more = ["euler-a", "--prompt-syntax", "a1111", "--init-image", init, "--strength", "0.6", "--mask", mask];
        let tail = ["--mask-blur", "4", "--masked-content", content, "--quiet", "--output", out.to_str().unwrap()];
        let res = controlnet(&[&args[..], &more[..], &tail[..]].concat());
        assert!(res.status.success(), "{}", stderr(&res));
        image::open(&out).unwrap().to_rgb8()
    };
    let original = images(&server.post_json("/sdapi/v1/img2img", &request(json!(1))))[0].clone();
    for (fill, content) in [(2, "latent-noise"), (3, "latent-nothing")] {
        let served = images(&server.post_json("/sdapi/v1/img2img", &request(json!(fill))))[0].clone();
        assert_eq!(served, cli(content), "inpainting_fill {fill}");
        assert_ne!(served, original, "inpainting_fill {fill} changed nothing");
    }
    refused(&server.post_json("/sdapi/v1/img2img", &request(json!(0))), "inpainting_fill", "0 (fill) is not");
    refused(&server.post_json("/sdapi/v1/img2img", &request(json!(4))), "inpainting_fill", "4 (unknown)");
}
