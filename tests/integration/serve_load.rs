//! A bounded load test of `controlnet serve` on loopback: 10 clients send 50 txt2img requests (5 each, each
//! with its own prompt and seed) to one server. Every request must be answered with its own image (the recipe
//! in its PNG names its prompt and seed, and the pixels equal those of the same request sent alone), and the
//! server's memory must stay flat. The figures are printed (`cargo test --test integration serve_load -- --nocapture`;
//! tools/serve/load_test.sh); docs/serve.md quotes them.
use crate::common;
use crate::common::server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use server::*;

const CLIENTS: usize = 10;
const PER_CLIENT: usize = 5;

fn body(image: &str, client: usize, k: usize) -> serde_json::Value {
    json!({
        "prompt": format!("client {client} request {k}"), "seed": (client * 100 + k) as u64, "steps": 2,
        "sampler_name": "Euler a", "width": 64, "height": 64,
        "alwayson_scripts": {"controlnet": {"args": [{"image": image, "model": "tiny-controlnet-a"}]}},
    })
}

/// Resident memory of a process, in KiB (Linux).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[test]
fn fifty_requests_from_ten_clients_are_all_answered_with_their_own_image() {
    let server = Arc::new(Server::tiny(&["--max-queue", "16"]));
    let image = Arc::new(picture_base64(CONTROL));
    // Warm up and take the reference images of two requests, sent alone.
    let reference: Vec<Vec<u8>> = [(0, 0), (9, 4)]
        .iter()
        .map(|&(c, k)| {
            let r = server.post_json("/sdapi/v1/txt2img", &body(&image, c, k));
            assert_eq!(r.status, 200, "{}", r.text());
            unbase64(r.json()["images"][0].as_str().unwrap())
        })
        .collect();
    let rss_before = rss_kib(server.child.id());

    let t0 = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (server, image) = (server.clone(), image.clone());
            std::thread::spawn(move || {
                (0..PER_CLIENT)
                    .map(|k| {
                        let t = Instant::now();
                        let r = server.post_json("/sdapi/v1/txt2img", &body(&image, client, k));
                        (client, k, r, t.elapsed())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let answers: Vec<_> = clients.into_iter().flat_map(|c| c.join().expect("a client thread")).collect();
    let wall = t0.elapsed();
    let rss_after = rss_kib(server.child.id());

    assert_eq!(answers.len(), CLIENTS * PER_CLIENT);
    let mut latencies: Vec<Duration> = Vec::new();
    for (client, k, reply, latency) in &answers {
        assert_eq!(reply.status, 200, "client {client} request {k}: {}", reply.text());
        let png = unbase64(reply.json()["images"][0].as_str().unwrap());
        let dir = common::temp_dir();
        let path = dir.path().join("a.png");
        std::fs::write(&path, &png).unwrap();
        let chunks = controlnet::io::images::read_png_text(&path).unwrap();
        let recipe = controlnet::pipeline::ImageMetadata::from_text_chunks(&chunks).unwrap();
        assert_eq!(recipe.prompt, format!("client {client} request {k}"));
        assert_eq!(recipe.seed, (client * 100 + k) as u64);
        match (client, k) {
            (0, 0) => assert_eq!(pixels(&png), pixels(&reference[0])),
            (9, 4) => assert_eq!(pixels(&png), pixels(&reference[1])),
            _ => {}
        }
        latencies.push(*latency);
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize].as_secs_f64();
    println!(
        "load: {} requests from {CLIENTS} clients in {:.2} s ({:.1} requests/s); latency p50 {:.2} s, p95 {:.2} s, \
         max {:.2} s; server RSS {:?} KiB before, {:?} KiB after",
        answers.len(),
        wall.as_secs_f64(),
        answers.len() as f64 / wall.as_secs_f64(),
        pct(0.5),
        pct(0.95),
        pct(1.0),
        rss_before,
        rss_after,
    );
    // Memory flat: the load may not grow the server by more than a quarter (or 64 MiB) over its warmed-up size.
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        assert!(after <= before + (before / 4).max(64 * 1024), "RSS grew from {before} KiB to {after} KiB");
    }
}
