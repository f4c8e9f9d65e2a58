//! `controlnet serve` driven by real clients: the `webuiapi` package (A1111's common Python client) and the
//! web page in headless Chromium over WebDriver. Each runs when its tool is named by an environment variable
//! (`.ci/run` sets both; `CONTROLNET_REQUIRE_CLIENT_TESTS=1` makes a missing tool a failure, so CI cannot skip
//! them silently):
//! - `CONTROLNET_WEBUIAPI_PYTHON`: a Python with `webuiapi` installed (tools/serve/webuiapi_test.py);
//! - `CONTROLNET_CHROMEDRIVER`: Debian's `chromedriver` (with `chromium`); `CONTROLNET_SCREENSHOT` keeps the
//!   page's screenshot at that path (docs/serve-page.png is made this way).
use crate::common;
use crate::common::server;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{controlnet, stderr, temp_dir};
use controlnet::annotate::ResizeMode;
use serde_json::{json, Value};
use server::*;

/// The tool an environment variable names, or `None` (a failure when client tests are required).
fn tool(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            let required = std::env::var("CONTROLNET_REQUIRE_CLIENT_TESTS").is_ok_and(|v| v == "1");
            assert!(!required, "{var} is not set but CONTROLNET_REQUIRE_CLIENT_TESTS=1");
            eprintln!("skipped: set {var} to run this test");
            None
        }
    }
}

const INIT: &str = "tests/fixtures/img2img/init.png";
const MASK: &str = "tests/fixtures/img2img/mask.png";

/// `controlnet generate` with the prompt, seed and sampler the client script sends, and `args`: its image.
fn cli_plain(args: &[&str]) -> image::RgbImage {
    let dir = temp_dir();
    let out = dir.path().join("cli.png");
    let mut all = vec!["generate", "--prompt", "a cat", "--seed", "5", "--scheduler", "euler-a", "--quiet"];
    all.extend_from_slice(args);
    all.extend(["--output", out.to_str().unwrap()]);
    let res = controlnet(&all);
    assert!(res.status.success(), "{}", stderr(&res));
    image::open(&out).unwrap().to_rgb8()
}

fn cli_image(model: &[&str], extra: &[&str]) -> image::RgbImage {
    let dir = temp_dir();
    let out = dir.path().join("cli.png");
    let mut args =
        vec!["generate", "--control", CONTROL, "--prompt", "a cat", "--seed", "5", "--scheduler", "euler-a", "--quiet"];
    args.extend_from_slice(model);
    args.extend_from_slice(extra);
    args.extend(["--output", out.to_str().unwrap()]);
    let res = controlnet(&args);
    assert!(res.status.success(), "{}", stderr(&res));
    image::open(&out).unwrap().to_rgb8()
}

#[test]
fn the_webuiapi_client_drives_the_server() {
    let Some(python) = tool("CONTROLNET_WEBUIAPI_PYTHON") else { return };
    let server = Server::tiny(&[]);
    let port = server.base.rsplit(':').next().unwrap().to_string();
    let dir = temp_dir();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(&python)
        .arg(repo.join("tools/serve/webuiapi_test.py"))
        .args(["127.0.0.1", &port, repo.join(CONTROL).to_str().unwrap(), dir.path().to_str().unwrap()])
        .args([INIT, MASK].map(|p| repo.join(p)))
        .output()
        .expect("python runs");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The client's unit (its defaults: Resize and Fill) made the image `generate` makes.
    let served = image::open(dir.path().join("txt2img.png")).unwrap().to_rgb8();
    let want = cli_image(&["--model", SD15, "--controlnet", CN_A], &["--steps", "2", "--resize", "resize-and-fill"]);
    assert_eq!(served, want);
    // The map appended to the answer: the condition fitted to the output size.
    let control = image::open(CONTROL).unwrap().to_rgb8();
    let fitted = controlnet::annotate::resize::fit_to_output(&control, 128, 128, ResizeMode::ResizeAndFill);
    assert_eq!(image::open(dir.path().join("txt2img_map.png")).unwrap().to_rgb8(), fitted);
    // img2img with a unit without a picture (the init image is its condition), and inpainting with a mask.
    let common = ["--model", SD15, "--init-image", INIT, "--strength", "0.5", "--steps", "2"];
    let want = cli_plain(&[&common[..], &["--controlnet", CN_A, "--control", INIT]].concat());
    assert_eq!(image::open(dir.path().join("img2img.png")).unwrap().to_rgb8(), want);
    // Inpainting after those jobs is exact too (the script gives each call its own `alwayson_scripts`: webuiapi
    // 0.9.17 would otherwise resend the img2img call's unit).
    let want = cli_plain(&[&common[..], &["--mask", MASK, "--mask-blur", "4"]].concat());
    assert_eq!(image::open(dir.path().join("inpaint.png")).unwrap().to_rgb8(), want);
    // Only the masked area (the client's default inpaint_full_res), 8 px of padding: --padding-mask-crop 8.
    let want = cli_plain(&[&common[..], &["--mask", MASK, "--mask-blur", "4", "--padding-mask-crop", "8"]].concat());
    assert_eq!(image::open(dir.path().join("inpaint_masked.png")).unwrap().to_rgb8(), want);
    // Its detect call (canny, processor_res 512, thresholds 64) made the map `annotate` makes.
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
        "--output",
        map.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let detected = image::open(dir.path().join("detect.png")).unwrap().to_rgb8();
    assert_eq!(detected, image::open(&map).unwrap().to_rgb8());
}

/// A WebDriver session on chromedriver.
struct Browser {
    driver: std::process::Child,
    base: String,
    session: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn start(chromedriver: &Path) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs");
        let base = format!("http://127.0.0.1:{port}");
        assert!(wait_until(Duration::from_secs(20), || ureq::get(&format!("{base}/status")).call().is_ok()));
        let binary = std::env::var("CONTROLNET_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": binary,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,1100"],
        }}}});
        let mut b = Browser { driver, base, session: String::new() };
        let r = b.call("POST", "/session", caps);
        b.session = r["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {r}")).to_string();
        b
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let r = match method {
            "GET" => reply(ureq::get(&url).call()),
            "DELETE" => reply(ureq::delete(&url).call()),
            _ => reply(ureq::post(&url).set("Content-Type", "application/json").send_string(&body.to_string())),
        };
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        r.json()["value"].clone()
    }

    fn find(&self, css: &str) -> Option<String> {
        let found = self.call("POST", "/elements", json!({"using": "css selector", "value": css}));
        found
            .as_array()
            .and_then(|a| a.first())
            .map(|e| e[ELEMENT].as_str().unwrap_or_else(|| panic!("{css}: {e}")).to_string())
    }

    fn element(&self, css: &str) -> String {
        self.find(css).unwrap_or_else(|| panic!("no element {css}"))
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/clear"), json!({}));
        self.call("POST", &format!("/element/{e}/value"), json!({ "text": text }));
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/click"), json!({}));
    }

    /// Chooses a file in a file input (WebDriver types the path into it).
    fn upload(&self, css: &str, rel: &str) {
        let e = self.element(css);
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
        self.call("POST", &format!("/element/{e}/value"), json!({ "text": path.to_str().unwrap() }));
    }

    /// Runs `script` in the page (for what keys cannot do, such as moving a slider to an exact value).
    fn run_script(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", json!({ "script": script, "args": [] }))
    }

    /// The gallery's images, newest first, as RGB pixels.
    fn gallery(&self) -> Vec<image::RgbImage> {
        let found = self.call("POST", "/elements", json!({"using": "css selector", "value": "#gallery img"}));
        let ids: Vec<String> = found.as_array().unwrap().iter().map(|e| e[ELEMENT].as_str().unwrap().into()).collect();
        ids.iter()
            .map(|e| {
                let src = self.call("GET", &format!("/element/{e}/attribute/src"), json!({}));
                pixels(&unbase64(src.as_str().unwrap().strip_prefix("data:image/png;base64,").unwrap()))
            })
            .collect()
    }

    /// Clicks Generate and waits for the gallery to hold `count` images; returns the status line.
    fn generate(&self, count: usize) -> String {
        self.click("#generate");
        let n = || self.call("POST", "/elements", json!({"using": "css selector", "value": "#gallery img"}));
        assert!(
            wait_until(Duration::from_secs(120), || n().as_array().unwrap().len() == count),
            "no image: {}",
            self.text("#status")
        );
        self.text("#status")
    }

    fn text(&self, css: &str) -> String {
        let e = self.element(css);
        self.call("GET", &format!("/element/{e}/text"), json!({})).as_str().unwrap_or_default().to_string()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn the_page_generates_in_headless_chromium() {
    let Some(chromedriver) = tool("CONTROLNET_CHROMEDRIVER") else { return };
    // The bundled demo model: what `controlnet serve` alone serves.
    let server = Server::start(&[]);
    let browser = Browser::start(&chromedriver);
    browser.call("POST", "/url", json!({ "url": server.url("/") }));
    assert!(wait_until(Duration::from_secs(20), || browser.find("#controlnet option").is_some()));
    // 1. txt2img with the picture as the condition.
    browser.upload("#picture", CONTROL);
    browser.type_into("#prompt", "a cat");
    browser.type_into("#steps", "10");
    browser.type_into("#seed", "5");
    browser.click("#scheduler option[value='euler-a']");
    // The map preview (annotator none: the picture itself).
    assert!(wait_until(Duration::from_secs(10), || browser.find("#picture-view:not([hidden])").is_some()));
    let status = browser.generate(1);
    assert!(status.starts_with("Done: 1 image(s), seed 5"), "{status}");
    let txt2img = browser.gallery().remove(0);
    assert_eq!(txt2img, cli_image(&[], &["--steps", "10"]));

    // 2. Inpainting: an init image and a mask, strength 0.6, blur 4; the same request sent to the job API
    // directly, and `generate` with the same flags, make the same image.
    browser.upload("#init", INIT);
    assert!(wait_until(Duration::from_secs(10), || browser.find("#init-view:not([hidden])").is_some()));
    browser.upload("#mask", MASK);
    assert!(wait_until(Duration::from_secs(10), || browser.find("#mask-view:not([hidden])").is_some()));
    browser.run_script(
        r#"const s = document.getElementById("strength"); s.value = "0.6"; s.dispatchEvent(new Event("input"));"#,
    );
    assert_eq!(browser.text("#strength-value"), "0.60");
    browser.type_into("#mask-blur", "4");
    let status = browser.generate(2);
    assert!(status.starts_with("Done: 1 image(s), seed 5"), "{status}");
    let inpainted = browser.gallery().remove(0);
    let direct = json!({ "prompt": "a cat", "steps": 10, "seed": 5, "scheduler": "euler-a",
        "controls": [{ "image": picture_base64(CONTROL) }],
        "init_image": picture_base64(INIT), "mask": picture_base64(MASK), "strength": 0.6, "mask_blur": 4 });
    assert_eq!(inpainted, job_image(&server, &direct));
    let flags = ["--steps", "10", "--init-image", INIT, "--mask", MASK, "--strength", "0.6", "--mask-blur", "4"];
    assert_eq!(inpainted, cli_image(&[], &flags));
    assert_ne!(inpainted, txt2img, "the init image changed nothing");
    let shot = unbase64(browser.call("GET", "/screenshot", json!({})).as_str().unwrap());
    if let Ok(path) = std::env::var("CONTROLNET_SCREENSHOT") {
        std::fs::write(path, &shot).unwrap();
    }
    assert!(pixels(&shot).width() > 0);

    // 3. A strength the server refuses: its message is shown, and no image is added.
    browser.run_script(r#"document.getElementById("strength").value = "0";"#);
    browser.click("#generate");
    assert!(wait_until(Duration::from_secs(20), || browser.find("#status.error").is_some()));
    assert_eq!(browser.text("#status"), "strength: 0 must lie in (0, 1]");
    assert_eq!(browser.gallery().len(), 2);

    // 4. Clearing the init image returns to txt2img: the first image again.
    browser.click("#clear-init");
    assert!(browser.find("#init-view:not([hidden])").is_none() && browser.find("#strength:disabled").is_some());
    browser.generate(3);
    assert_eq!(browser.gallery().remove(0), txt2img);
}

/// The image a job makes when `request` is sent to the job API directly.
fn job_image(server: &Server, request: &Value) -> image::RgbImage {
    let submitted = server.post_json("/jobs", request);
    assert_eq!(submitted.status, 202, "{}", submitted.text());
    let id = submitted.json()["id"].as_str().unwrap().to_string();
    let done = || server.get(&format!("/jobs/{id}")).json()["state"] == "done";
    assert!(wait_until(Duration::from_secs(120), done), "{}", server.get(&format!("/jobs/{id}")).text());
    let result = server.get(&format!("/jobs/{id}/result")).json();
    pixels(&unbase64(result["images"][0]["png"].as_str().unwrap()))
}
