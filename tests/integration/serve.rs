//! `controlnet serve` over real HTTP on 127.0.0.1 with the tiny fixture pipeline: the A1111 routes give what
//! `generate` and `annotate` give, bad input is refused with the field named, the queue, interrupt, cancel and
//! shutdown behave.
use crate::common;
use crate::common::server;

use std::time::Duration;

use common::{controlnet, stderr, temp_dir};
use serde_json::json;
use server::*;

fn unit(image: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut u = json!({ "image": image, "model": "tiny-controlnet-a", "resize_mode": "Just Resize" });
    for (k, v) in extra.as_object().unwrap() {
        u[k] = v.clone();
    }
    u
}

fn txt2img(units: Vec<serde_json::Value>, extra: serde_json::Value) -> serde_json::Value {
    let mut body = json!({
        "prompt": "a cat", "steps": 2, "seed": 5, "sampler_name": "Euler a", "cfg_scale": 7.5,
        "alwayson_scripts": { "ControlNet": { "args": units } },
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// `controlnet generate` with the tiny models, seed 5, 2 Euler a steps and `extra` flags: its image.
fn cli_image(extra: &[&str]) -> image::RgbImage {
    let dir = temp_dir();
    let out = dir.path().join("cli.png");
    let mut args = vec![
        "generate",
        "--model",
        SD15,
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--seed",
        "5",
        "--scheduler",
        "euler-a",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    args.extend(["--output", out.to_str().unwrap()]);
    let res = controlnet(&args);
    assert!(res.status.success(), "{}", stderr(&res));
    image::open(&out).unwrap().to_rgb8()
}

fn first_image(reply: &Reply) -> Vec<u8> {
    assert_eq!(reply.status, 200, "{}", reply.text());
    unbase64(reply.json()["images"][0].as_str().unwrap())
}

#[test]
fn txt2img_with_a_unit_makes_the_cli_image() {
    let server = Server::tiny(&[]);
    let image = picture_base64(CONTROL);

    // 1. The picture as the condition (webuiapi's spelling of the script name).
    let reply = server.post_json("/sdapi/v1/txt2img", &txt2img(vec![unit(&image, json!({}))], json!({})));
    let png = first_image(&reply);
    assert_eq!(pixels(&png), cli_image(&["--controlnet", CN_A, "--control", CONTROL]));
    let info: serde_json::Value = serde_json::from_str(reply.json()["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([5]));
    assert!(info["infotexts"][0].as_str().unwrap().contains("Sampler: Euler a"), "{info}");
    // The PNG carries our recipe and A1111's parameters.
    let dir = temp_dir();
    let path = dir.path().join("served.png");
    std::fs::write(&path, &png).unwrap();
    let chunks = controlnet::io::images::read_png_text(&path).unwrap();
    let recipe = controlnet::pipeline::ImageMetadata::from_text_chunks(&chunks).expect("recipe chunk");
    assert_eq!((recipe.seed, recipe.steps, recipe.scheduler.as_str()), (5, 2, "euler-a"));
    assert!(chunks.iter().any(|(k, v)| k == "parameters" && v.starts_with("a cat\n")));

    // 2. A pixel-perfect canny unit with default thresholds: the pipeline's own preprocess.
    let canny = unit(&image, json!({ "module": "canny", "pixel_perfect": true, "threshold_a": -1, "threshold_b": -1 }));
    // Script names match case-insensitively (A1111's own spelling here, webuiapi's above).
    let body = txt2img(vec![], json!({"alwayson_scripts": {"controlnet": {"args": [canny]}}}));
    let png = first_image(&server.post_json("/sdapi/v1/txt2img", &body));
    assert_eq!(pixels(&png), cli_image(&["--controlnet", CN_A, "--control", CONTROL, "--preprocess", "canny"]));

    // 3. Thresholds and a processor resolution (webuiapi's defaults): annotated by the server, the same map
    //    `annotate` makes.
    let dir = temp_dir();
    let map = dir.path().join("map.png");
    let res = controlnet(&[
        "annotate",
        "canny",
        CONTROL,
        "--low",
        "64",
        "--high",
        "64",
        "--resolution",
        "512",
        "--width",
        "128",
        "--height",
        "128",
        "--resize",
        "just-resize",
        "--output",
        map.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let canny = unit(&image, json!({ "module": "canny", "processor_res": 512, "threshold_a": 64, "threshold_b": 64 }));
    let png = first_image(
        &server.post_json("/sdapi/v1/txt2img", &txt2img(vec![canny], json!({"width": 128, "height": 128}))),
    );
    assert_eq!(pixels(&png), cli_image(&["--controlnet", CN_A, "--control", map.to_str().unwrap()]));

    // 4. batch_size and n_iter: A1111's seeds (seed + i * batch_size per iteration).
    let reply =
        server.post_json("/sdapi/v1/txt2img", &txt2img(vec![], json!({"batch_size": 2, "n_iter": 2, "steps": 1})));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["images"].as_array().unwrap().len(), 4);
    let info: serde_json::Value = serde_json::from_str(reply.json()["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([5, 5, 7, 7]));
}

#[test]
fn detect_equals_annotate_with_either_field_name() {
    let server = Server::tiny(&[]);
    let dir = temp_dir();
    let out = dir.path().join("map.png");
    let res = controlnet(&[
        "annotate",
        "canny",
        CONTROL,
        "--low",
        "50",
        "--high",
        "150",
        "--resolution",
        "64",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let want = image::open(&out).unwrap().to_rgb8();
    let image = picture_base64(CONTROL);
    for (field, picture) in
        [("controlnet_input_images", image.clone()), ("controlnet_images", format!("data:image/png;base64,{image}"))]
    {
        let body = json!({
            "controlnet_module": "canny", field: [picture], "controlnet_processor_res": 64,
            "controlnet_threshold_a": 50, "controlnet_threshold_b": 150,
        });
        let reply = server.post_json("/controlnet/detect", &body);
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(pixels(&unbase64(reply.json()["images"][0].as_str().unwrap())), want, "{field}");
    }
    let lists = (server.get("/controlnet/model_list").json(), server.get("/controlnet/module_list").json());
    assert!(lists.0["model_list"][0].as_str().unwrap().starts_with("tiny-controlnet-a ["), "{}", lists.0);
    assert!(lists.1["module_list"].as_array().unwrap().contains(&json!("canny")));
    assert_eq!(server.get("/controlnet/version").json()["version"], json!(2));
    assert!(server.get("/sdapi/v1/samplers").json().as_array().unwrap().iter().any(|s| s["name"] == "Euler a"));
    assert_eq!(server.get("/sdapi/v1/sd-models").json()[0]["model_name"], "tiny-sd15");
}

#[test]
fn bad_input_is_refused_naming_the_field() {
    let server = Server::tiny(&["--max-body-mb", "1"]);
    let image = picture_base64(CONTROL);
    let expect = |body: &str, status: u16, detail: &str| {
        let reply = server.post("/sdapi/v1/txt2img", body);
        assert_eq!(reply.status, status, "{body}: {}", reply.text());
        let got = reply.json()["detail"].as_str().unwrap().to_string();
        assert!(got.starts_with(detail), "{body}: {got}");
    };
    expect("{\"prompt\": ", 400, "the body is not JSON");
    expect(r#"{"prompt": 3}"#, 400, "prompt: expected a string");
    expect(r#"{"enable_hr": true, "hr_upscaler": "ESRGAN_4x"}"#, 422, "hr_upscaler: \"ESRGAN_4x\"");
    expect(r#"{"restore_faces": true}"#, 422, "restore_faces:");
    expect(r#"{"sampler_name": "Euler a", "eta": 0.5}"#, 422, "eta: 0.5 is not supported");
    expect(r#"{"sampler_name": "DPM fast"}"#, 422, "sampler_name: \"DPM fast\"");
    expect(r#"{"sampler_name": "DPM++ SDE Karras", "eta": 0.5}"#, 422, "eta: 0.5 is not supported");
    expect(r#"{"sampler_name": "DDIM", "eta": 2}"#, 422, "eta: 2 must lie in [0, 1]");
    expect(r#"{"prompt": "x", "hires_magic": 1}"#, 422, "hires_magic: not a field");
    expect(r#"{"steps": 0}"#, 422, "steps: must be at least 1");
    expect(r#"{"cfg_scale": -1}"#, 422, "cfg_scale:");
    expect(r#"{"alwayson_scripts": {"ADetailer": {"args": [true, {}]}}}"#, 422, "alwayson_scripts.ADetailer:");
    let with_unit = |u: serde_json::Value| txt2img(vec![u], json!({})).to_string();
    expect(&with_unit(unit("not base64!", json!({}))), 400, "alwayson_scripts.controlnet.args[0].image: not base64");
    expect(
        &with_unit(unit(&base64(b"hello"), json!({}))),
        422,
        "alwayson_scripts.controlnet.args[0].image: not a picture",
    );
    expect(
        &with_unit(unit(&image, json!({"model": "depth"}))),
        422,
        "alwayson_scripts.controlnet.args[0].model: \"depth\"",
    );
    expect(
        &with_unit(unit(&image, json!({"module": "depth_midas"}))),
        422,
        "alwayson_scripts.controlnet.args[0].module:",
    );
    expect(
        &with_unit(unit(&image, json!({"control_mode": 5}))),
        422,
        "alwayson_scripts.controlnet.args[0].control_mode:",
    );
    expect(&with_unit(unit(&image, json!({"weight": "x"}))), 400, "alwayson_scripts.controlnet.args[0].weight:");
    expect(
        &with_unit(unit(&image, json!({"guidance_end": 1.5}))),
        422,
        "alwayson_scripts.controlnet.args[0].guidance_end:",
    );
    // A size the model cannot make fails the job with the field named.
    expect(&txt2img(vec![], json!({"width": 100})).to_string(), 422, "width:");
    // Past the body limit: 413.
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(1_200_000));
    // (The server answers before reading the whole body and closes; a client still writing may see a broken
    // pipe instead of the answer, about one time in ten here: try again until the answer is read.)
    let reply = (0..5)
        .find_map(|_| server.post_may_close("/sdapi/v1/txt2img", &big))
        .expect("the 413 answer was never read in 5 tries");
    assert_eq!(reply.status, 413, "{}", reply.text());
    // A picture too large a side: 413 naming it.
    let huge = {
        let img = image::RgbImage::new(9000, 1);
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        base64(&png)
    };
    expect(&with_unit(unit(&huge, json!({}))), 413, "alwayson_scripts.controlnet.args[0].image: the picture is 9000x1");
    // The job API: unknown fields and missing nets.
    let reply = server.post_json("/jobs", &json!({"prompt": "x", "stepz": 3}));
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert!(reply.json()["detail"].as_str().unwrap().starts_with("stepz:"), "{}", reply.text());
    let reply = server.post_json("/jobs", &json!({"controls": [{"image": image, "controlnet": "nope"}]}));
    assert_eq!(reply.json()["field"], "controls[0].controlnet");
    assert_eq!(server.get("/jobs/nope").status, 404);
    assert_eq!(server.get("/no/such/route").status, 404);
}

const INIT: &str = "tests/fixtures/img2img/init.png";
const MASK: &str = "tests/fixtures/img2img/mask.png";

#[test]
fn img2img_inpaint_and_hires_make_the_cli_images() {
    let server = Server::tiny(&[]);
    let init = format!("data:image/png;base64,{}", picture_base64(INIT));
    let body = |extra: serde_json::Value| {
        let mut b = txt2img(vec![], json!({ "init_images": [init], "denoising_strength": 0.5 }));
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // 1. img2img with a unit without a picture: the init image is its condition, as in the extension.
    let unit = json!({ "model": "tiny-controlnet-a", "resize_mode": "Just Resize" });
    let with_unit = body(json!({ "alwayson_scripts": { "ControlNet": { "args": [unit] } } }));
    let png = first_image(&server.post_json("/sdapi/v1/img2img", &with_unit));
    let want = ["--init-image", INIT, "--strength", "0.5", "--controlnet", CN_A, "--control", INIT];
    assert_eq!(pixels(&png), cli_image(&want));

    // 2. Inpainting with a mask ("original" fill, A1111's default blur of 4).
    let inpaint = body(json!({ "mask": picture_base64(MASK), "inpainting_fill": 1, "inpaint_full_res": false }));
    let png = first_image(&server.post_json("/sdapi/v1/img2img", &inpaint));
    let want = ["--init-image", INIT, "--strength", "0.5", "--mask", MASK, "--mask-blur", "4"];
    assert_eq!(pixels(&png), cli_image(&want));

    // 2b. "Inpaint area: Only masked": the CLI's --padding-mask-crop with A1111's padding.
    let only_masked = body(json!({ "mask": picture_base64(MASK), "inpainting_fill": 1, "inpaint_full_res": true,
                                   "inpaint_full_res_padding": 12 }));
    let png = first_image(&server.post_json("/sdapi/v1/img2img", &only_masked));
    let want =
        ["--init-image", INIT, "--strength", "0.5", "--mask", MASK, "--mask-blur", "4", "--padding-mask-crop", "12"];
    let cropped = pixels(&png);
    assert_eq!(cropped, cli_image(&want));
    // Outside the grown mask box the picture is the init image's, unlike the whole-picture inpaint.
    let init_px = image::open(INIT).unwrap().to_rgb8();
    assert_eq!(cropped.get_pixel(2, 2), init_px.get_pixel(2, 2));

    // 3. txt2img's hires fix.
    let hires = txt2img(
        vec![],
        json!({ "width": 64, "height": 64, "enable_hr": true, "hr_scale": 1.5, "hr_second_pass_steps": 3,
                "denoising_strength": 0.7, "hr_upscaler": "Lanczos" }),
    );
    let png = first_image(&server.post_json("/sdapi/v1/txt2img", &hires));
    let want = [
        "--width",
        "64",
        "--height",
        "64",
        "--hires-scale",
        "1.5",
        "--hires-steps",
        "3",
        "--hires-upscaler",
        "lanczos",
    ];
    assert_eq!(pixels(&png), cli_image(&want));

    // 4. Bad pictures are refused naming the field, and the server goes on serving.
    let expect = |b: serde_json::Value, status: u16, detail: &str| {
        let reply = server.post_json("/sdapi/v1/img2img", &b);
        assert_eq!(reply.status, status, "{}", reply.text());
        let got = reply.json()["detail"].as_str().unwrap().to_string();
        assert!(got.starts_with(detail), "{got}");
    };
    expect(body(json!({ "init_images": ["not base64!"] })), 400, "init_images[0]: not base64");
    expect(body(json!({ "init_images": [] })), 422, "init_images: img2img needs a picture");
    expect(body(json!({ "mask": "not base64!" })), 400, "mask: not base64");
    expect(body(json!({ "mask": picture_base64("tests/fixtures/img2img/init_odd.png") })), 422, "mask: is ");
    expect(body(json!({ "mask": picture_base64(MASK), "inpainting_fill": 0 })), 422, "inpainting_fill: 0 (fill)");
    expect(
        body(json!({ "mask": picture_base64(MASK), "inpaint_full_res": true, "inpaint_full_res_padding": -1 })),
        422,
        "inpaint_full_res_padding: ",
    );
    expect(body(json!({ "denoising_strength": 0 })), 422, "denoising_strength: 0 must lie in (0, 1]");
    expect(body(json!({ "enable_hr": true })), 422, "enable_hr: not a field");
    let png = first_image(&server.post_json("/sdapi/v1/img2img", &inpaint));
    assert_eq!(pixels(&png).dimensions(), (128, 128));
}

/// Submits a job of `steps` steps through the job API; its id.
fn submit(server: &Server, steps: usize) -> Result<String, Reply> {
    let reply = server.post_json(
        "/jobs",
        &json!({"prompt": "x", "steps": steps, "seed": 1, "width": 128, "height": 128, "scheduler": "euler"}),
    );
    match reply.status {
        202 => Ok(reply.json()["id"].as_str().unwrap().to_string()),
        _ => Err(reply),
    }
}

fn state(server: &Server, id: &str) -> String {
    server.get(&format!("/jobs/{id}")).json()["state"].as_str().unwrap().to_string()
}

#[test]
fn a_full_queue_answers_503_and_jobs_can_be_cancelled() {
    let server = Server::tiny(&["--max-queue", "1"]);
    let running = submit(&server, 900).unwrap();
    assert!(wait_until(Duration::from_secs(30), || state(&server, &running) == "running"));
    let queued = submit(&server, 900).unwrap();
    let refused = submit(&server, 2).unwrap_err();
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.retry_after.as_deref().is_some_and(|s| s.parse::<u64>().unwrap() >= 1), "{refused:?}");
    // HTTP stays responsive while the worker computes.
    let t0 = std::time::Instant::now();
    assert_eq!(server.get("/sdapi/v1/progress").status, 200);
    assert!(t0.elapsed() < Duration::from_secs(2));
    let progress = server.get("/sdapi/v1/progress").json();
    assert_eq!(progress["state"]["job"], json!(running));
    assert_eq!(progress["state"]["sampling_steps"], json!(900));

    assert_eq!(server.delete(&format!("/jobs/{queued}")).status, 200);
    assert_eq!(server.post(&format!("/jobs/{running}/cancel"), "").status, 200);
    assert!(wait_until(Duration::from_secs(30), || state(&server, &running) == "cancelled"));
    assert!(wait_until(Duration::from_secs(30), || state(&server, &queued) == "cancelled"));
    assert_eq!(server.get(&format!("/jobs/{running}/result")).status, 409);
    // The queue has room again, and the next job runs.
    let next = submit(&server, 1).unwrap();
    assert!(wait_until(Duration::from_secs(60), || state(&server, &next) == "done"));
}

#[test]
fn interrupt_stops_a_running_txt2img() {
    let server = std::sync::Arc::new(Server::tiny(&[]));
    let s = server.clone();
    let call = std::thread::spawn(move || {
        s.post_json(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "x", "steps": 900, "sampler_name": "Euler", "width": 128, "height": 128}),
        )
    });
    assert!(wait_until(Duration::from_secs(30), || server.get("/sdapi/v1/progress").json()["state"]["sampling_step"]
        .as_u64()
        .is_some_and(|s| s > 0)));
    assert_eq!(server.post("/sdapi/v1/interrupt", "").json()["interrupted"], json!(true));
    let reply = call.join().unwrap();
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert!(reply.json()["detail"].as_str().unwrap().contains("interrupted"));
    assert_eq!(server.get("/sdapi/v1/progress").json()["progress"], json!(0.0));
}

#[test]
fn job_api_streams_progress_and_gives_the_cli_image() {
    let server = Server::tiny(&[]);
    let image = picture_base64(CONTROL);
    let request = json!({"prompt": "a cat", "steps": 2, "seed": 5, "scheduler": "euler-a",
        "controls": [{"image": image, "controlnet": "tiny-controlnet-a"}]});
    let reply = server.post_json("/jobs", &request);
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_string();
    // Server-sent events until the job has finished.
    let events = reply_text(ureq::get(&server.url(&format!("/jobs/{id}/events"))).call());
    let states: Vec<serde_json::Value> =
        events.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(states.last().unwrap()["state"], "done", "{events}");
    assert!(events.contains("event: status"), "{events}");
    let result = server.get(&format!("/jobs/{id}/result")).json();
    let png = unbase64(result["images"][0]["png"].as_str().unwrap());
    let cli = cli_image(&["--controlnet", CN_A, "--control", CONTROL]);
    assert_eq!(pixels(&png), cli);
    assert_eq!(result["images"][0]["metadata"]["seed"], json!(5));
    let file = server.get(&format!("/jobs/{id}/images/1.png"));
    assert_eq!((file.status, file.content_type.as_str()), (200, "image/png"));
    assert_eq!(file.body, png);

    // The same job as a multipart upload.
    let boundary = "XyZboundary";
    let mut body = Vec::new();
    let request =
        json!({"prompt": "a cat", "steps": 2, "seed": 5, "scheduler": "euler-a", "controls": [{"image": "@control"}]});
    body.extend(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"request\"\r\n\r\n{request}\r\n").as_bytes(),
    );
    body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"control\"; filename=\"c.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes());
    body.extend(std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(CONTROL)).unwrap());
    body.extend(format!("\r\n--{boundary}--\r\n").as_bytes());
    let reply = server::reply(
        ureq::post(&server.url("/jobs"))
            .set("Content-Type", &format!("multipart/form-data; boundary={boundary}"))
            .send_bytes(&body),
    );
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_string();
    assert!(wait_until(Duration::from_secs(60), || state(&server, &id) == "done"));
    let result = server.get(&format!("/jobs/{id}/result")).json();
    assert_eq!(pixels(&unbase64(result["images"][0]["png"].as_str().unwrap())), cli);

    let openapi = server.get("/openapi.json").json();
    assert!(openapi["paths"]["/jobs/{id}/events"].is_object());
    let page = server.get("/");
    assert!(page.content_type.starts_with("text/html") && page.text().contains("<progress"), "{}", page.content_type);
}

fn reply_text(r: Result<ureq::Response, ureq::Error>) -> String {
    reply(r).text()
}

#[test]
fn sigterm_cancels_the_running_job_and_exits_cleanly() {
    let mut server = Server::tiny(&[]);
    let url = server.url("/sdapi/v1/txt2img");
    // An A1111 call waiting on a job: it is answered (409, cancelled), not cut off.
    let call = std::thread::spawn(move || {
        let body = json!({"prompt": "x", "steps": 900, "sampler_name": "Euler", "width": 128, "height": 128});
        server::reply(ureq::post(&url).set("Content-Type", "application/json").send_string(&body.to_string()))
    });
    assert!(wait_until(Duration::from_secs(30), || server.get("/sdapi/v1/progress").json()["state"]["sampling_step"]
        .as_u64()
        .is_some_and(|s| s > 0)));
    let queued = submit(&server, 900).unwrap();
    let status = server.terminate(Duration::from_secs(30)).expect("the server stops within 30 s");
    assert!(status.success(), "{status}");
    let reply = call.join().expect("the waiting call got an answer");
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert!(!queued.is_empty());
}

#[test]
fn a_public_address_needs_a_key_and_the_key_is_checked() {
    let res = controlnet(&["serve", "--host", "0.0.0.0", "--port", "0", "--model", SD15]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--api-key: serving on 0.0.0.0"), "{}", stderr(&res));

    // Models that cannot load are named by their flag, before anything listens.
    let res = controlnet(&["serve", "--port", "0", "--model", SD15, "--controlnet", "tests/fixtures/models/nope"]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--controlnet: tests/fixtures/models/nope"), "{}", stderr(&res));
    let empty = temp_dir();
    let res = controlnet(&["serve", "--port", "0", "--model", SD15, "--models-dir", empty.path().to_str().unwrap()]);
    assert!(
        stderr(&res).contains("--models-dir: ") && stderr(&res).contains("holds no ControlNet"),
        "{}",
        stderr(&res)
    );

    let server = Server::tiny(&["--api-key", "s3cret"]);
    assert_eq!(server.get("/controlnet/model_list").status, 401);
    let ok = reply(ureq::get(&server.url("/controlnet/model_list")).set("Authorization", "Bearer s3cret").call());
    assert_eq!(ok.status, 200);
    let basic = format!("Basic {}", base64(b"user:s3cret"));
    assert_eq!(reply(ureq::get(&server.url("/info")).set("Authorization", &basic).call()).status, 200);
    assert_eq!(server.get("/controlnet/model_list?key=s3cret").status, 200);
    // The page itself is public (it asks for the key).
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn two_units_from_a_models_dir_make_the_cli_image() {
    let dir = temp_dir();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for net in [CN_A, CN_B] {
        let name = std::path::Path::new(net).file_name().unwrap();
        std::os::unix::fs::symlink(repo.join(net), dir.path().join(name)).unwrap();
    }
    let server = Server::start(&["--model", SD15, "--models-dir", dir.path().to_str().unwrap()]);
    let titles = server.get("/controlnet/model_list").json()["model_list"].clone();
    assert_eq!(titles.as_array().unwrap().len(), 2, "{titles}");
    let box_png = "tests/fixtures/pipeline/control_box.png";
    let units = vec![
        unit(&picture_base64(CONTROL), json!({"weight": 0.8})),
        // By A1111 title, as clients copy it from model_list; a disabled unit in between is skipped.
        json!({"enabled": false, "model": "nope"}),
        unit(&picture_base64(box_png), json!({"model": titles[1], "weight": 0.5, "guidance_end": 0.5})),
    ];
    let png = first_image(&server.post_json("/sdapi/v1/txt2img", &txt2img(units, json!({}))));
    let want = cli_image(&[
        "--controlnet",
        CN_A,
        "--control",
        CONTROL,
        "--conditioning-scale",
        "0.8",
        "--controlnet",
        CN_B,
        "--control",
        box_png,
        "--conditioning-scale",
        "0.5",
        "--control-end",
        "0.5",
    ]);
    assert_eq!(pixels(&png), want);
    // An error about the third unit names it by its place in the request.
    let units = vec![
        unit(&picture_base64(CONTROL), json!({})),
        json!({"enabled": false}),
        unit(
            &picture_base64(box_png),
            json!({"model": "tiny-controlnet-b", "guidance_start": 0.9, "guidance_end": 0.5}),
        ),
    ];
    let reply = server.post_json("/sdapi/v1/txt2img", &txt2img(units, json!({})));
    assert_eq!(reply.json()["field"], "alwayson_scripts.controlnet.args[2].guidance_start", "{}", reply.text());
}

#[test]
fn job_api_runs_img2img_and_inpainting_as_generate() {
    let server = Server::tiny(&[]);
    let submit = |request: serde_json::Value| {
        let reply = server.post_json("/jobs", &request);
        assert_eq!(reply.status, 202, "{}", reply.text());
        let id = reply.json()["id"].as_str().unwrap().to_string();
        assert!(wait_until(Duration::from_secs(60), || state(&server, &id) == "done"), "{}", state(&server, &id));
        let result = server.get(&format!("/jobs/{id}/result")).json();
        (pixels(&unbase64(result["images"][0]["png"].as_str().unwrap())), result["images"][0]["metadata"].clone())
    };
    let job = |extra: serde_json::Value| {
        let mut b = json!({ "prompt": "a cat", "steps": 2, "seed": 5, "scheduler": "euler-a" });
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let init = format!("data:image/png;base64,{}", picture_base64(INIT));
    // 1. img2img: the init picture (a data URL, as the page sends it) and a strength.
    let (img, metadata) = submit(job(json!({ "init_image": init, "strength": 0.6 })));
    assert_eq!(img, cli_image(&["--init-image", INIT, "--strength", "0.6"]));
    assert_eq!(metadata["strength"], json!(0.6), "{metadata}");
    // 2. Inpainting with a blurred mask (plain base64).
    let inpaint = json!({ "init_image": init, "mask": picture_base64(MASK), "strength": 0.6, "mask_blur": 4 });
    let (img, _) = submit(job(inpaint));
    assert_eq!(img, cli_image(&["--init-image", INIT, "--mask", MASK, "--strength", "0.6", "--mask-blur", "4"]));

    // 3. Refused before queueing, naming the field.
    let refused = |extra: serde_json::Value, field: &str, detail: &str| {
        let reply = server.post_json("/jobs", &job(extra));
        assert_eq!((reply.status, reply.json()["field"].as_str()), (422, Some(field)), "{}", reply.text());
        assert_eq!(reply.json()["detail"], json!(detail), "{}", reply.text());
    };
    refused(json!({ "init_image": init, "strength": 0 }), "strength", "strength: 0 must lie in (0, 1]");
    refused(
        json!({ "mask": picture_base64(MASK) }),
        "mask",
        "mask: inpainting needs the picture to paint in: set init_image",
    );
    refused(
        json!({ "init_image": init, "mask": picture_base64("tests/fixtures/img2img/i2i_resized.png") }),
        "mask",
        "mask: is 96x64 but init_image is 128x128: a mask covers the picture pixel for pixel",
    );
    refused(json!({ "init_image": "@nope" }), "init_image", "init_image: no upload named \"nope\"");
}

/// A union net (SDXL) through the extension's `union_control_type`, or the type its preprocessor's maps have:
/// the CLI's `--control-type` image; a union unit without either is refused naming the field.
#[test]
fn union_units_take_the_extensions_control_type() {
    const SDXL: &str = "tests/fixtures/models/tiny-sdxl";
    const UNION: &str = "tests/fixtures/models/tiny-controlnet-sdxl-union";
    let server = Server::start(&["--model", SDXL, "--controlnet", UNION]);
    let cli = |extra: &[&str]| {
        let dir = temp_dir();
        let out = dir.path().join("cli.png");
        let mut args = vec!["generate", "--model", SDXL, "--prompt", "a cat", "--steps", "2", "--seed", "5"];
        args.extend(["--scheduler", "euler-a", "--width", "128", "--height", "128", "--quiet"]);
        args.extend(["--controlnet", UNION, "--control", CONTROL]);
        args.extend_from_slice(extra);
        args.extend(["--output", out.to_str().unwrap()]);
        let res = controlnet(&args);
        assert!(res.status.success(), "{}", stderr(&res));
        image::open(&out).unwrap().to_rgb8()
    };
    let body = |unit_extra: serde_json::Value| {
        let mut u = unit(&picture_base64(CONTROL), unit_extra);
        u["model"] = json!("tiny-controlnet-sdxl-union");
        txt2img(vec![u], json!({ "width": 128, "height": 128 }))
    };
    // 1. The extension's name for the type (webuiapi sends the enum's value).
    let png = first_image(&server.post_json("/sdapi/v1/txt2img", &body(json!({ "union_control_type": "Hard Edge" }))));
    let canny = pixels(&png);
    assert!(canny == cli(&["--control-type", "canny"]), "Hard Edge unit != --control-type canny");
    let png = first_image(&server.post_json("/sdapi/v1/txt2img", &body(json!({ "union_control_type": "Depth" }))));
    let depth = pixels(&png);
    assert!(depth == cli(&["--control-type", "depth"]), "Depth unit != --control-type depth");
    assert!(depth != canny, "the type changes the picture");
    // 2. "Unknown": the type of the preprocessor's maps (a blur map is read as tile; pixel perfect: the CLI's
    //    own preprocess at the output size).
    let unknown = json!({ "union_control_type": "Unknown", "module": "blur", "pixel_perfect": true });
    let png = first_image(&server.post_json("/sdapi/v1/txt2img", &body(unknown)));
    let tile = pixels(&png);
    assert!(tile == cli(&["--control-type", "tile", "--preprocess", "blur"]), "blur unit != the CLI's");
    assert!(tile != depth, "the type changes the picture");
    // 3. Neither: refused, naming the field; a type name the extension does not have: refused.
    for (extra, detail) in [
        (json!({}), "the model is a union ControlNet: name the condition's type"),
        (json!({ "union_control_type": "Sketch" }), "\"Sketch\" is not a union control type"),
    ] {
        let reply = server.post_json("/sdapi/v1/txt2img", &body(extra));
        assert_eq!(reply.status, 422, "{}", reply.text());
        assert_eq!(reply.json()["field"], "alwayson_scripts.controlnet.args[0].union_control_type");
        let got = reply.json()["detail"].as_str().unwrap().to_string();
        assert!(got.starts_with(&format!("alwayson_scripts.controlnet.args[0].union_control_type: {detail}")), "{got}");
    }
}
