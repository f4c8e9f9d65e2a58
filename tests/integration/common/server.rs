//! A `controlnet serve` process for the serve tests: started on a free loopback port with the tiny fixture
//! models, spoken to over real HTTP (ureq), killed when dropped.
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SD15: &str = "tests/fixtures/models/tiny-sd15";
pub const CN_A: &str = "tests/fixtures/models/tiny-controlnet-a";
pub const CN_B: &str = "tests/fixtures/models/tiny-controlnet-b";
pub const CONTROL: &str = "tests/fixtures/pipeline/control_circle.png";

pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Server {
    /// `controlnet serve --port 0 ARGS` from the repository root; waits for its "listening on" line.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_controlnet"))
            .args(["serve", "--port", "0"])
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the controlnet binary runs");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("listening on ") {
                        break url.to_string();
                    }
                }
                _ => {
                    let status = child.wait().expect("wait");
                    panic!("the server stopped before listening ({status})");
                }
            }
        };
        // Keep reading stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, base }
    }

    /// The default test server: the tiny SD 1.5 and ControlNet A.
    pub fn tiny(extra: &[&str]) -> Server {
        let mut args = vec!["--model", SD15, "--controlnet", CN_A];
        args.extend_from_slice(extra);
        Server::start(&args)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> Reply {
        reply(ureq::get(&self.url(path)).call())
    }

    pub fn post(&self, path: &str, body: &str) -> Reply {
        reply(ureq::post(&self.url(path)).set("Content-Type", "application/json").send_string(body))
    }

    /// As `post`, for a body the server may refuse before reading it all: it answers and closes, and the
    /// client, still writing, can see a broken pipe instead of the answer (`None` then).
    pub fn post_may_close(&self, path: &str, body: &str) -> Option<Reply> {
        match ureq::post(&self.url(path)).set("Content-Type", "application/json").send_string(body) {
            Err(ureq::Error::Transport(t))
                if t.to_string().contains("Broken pipe") || t.to_string().contains("reset") =>
            {
                None
            }
            r => Some(reply(r)),
        }
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Reply {
        self.post(path, &body.to_string())
    }

    pub fn delete(&self, path: &str) -> Reply {
        reply(ureq::delete(&self.url(path)).call())
    }

    /// Sends SIGTERM and waits for the process to exit (at most `limit`).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status, headers we look at and body of an HTTP reply.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn reply(r: Result<ureq::Response, ureq::Error>) -> Reply {
    let response = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("HTTP request failed: {e}"),
    };
    let status = response.status();
    let retry_after = response.header("retry-after").map(str::to_string);
    let content_type = response.content_type().to_string();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut body).expect("body");
    Reply { status, retry_after, content_type, body }
}

pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unbase64(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).expect("base64")
}

/// A picture file of the repository as base64.
pub fn picture_base64(rel: &str) -> String {
    base64(&std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).expect("fixture"))
}

/// The RGB pixels of PNG bytes.
pub fn pixels(png: &[u8]) -> image::RgbImage {
    image::load_from_memory(png).expect("a PNG").to_rgb8()
}

/// Polls `f` every 20 ms until it is true or `limit` passed.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
