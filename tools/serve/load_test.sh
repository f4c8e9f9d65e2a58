#!/usr/bin/env bash
# The bounded load test of `controlnet serve` (tests/integration/serve_load.rs): 10 clients, 50 txt2img requests on
# loopback, every answer checked; prints the figures docs/serve.md quotes.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo test --test integration serve_load -- --nocapture 2>&1 | grep -E '^load:|test result'
