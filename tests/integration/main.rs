//! The integration tests, as one test binary: each module is one area (the CLI's commands, the library's
//! pipelines, the server); `common` holds the helpers they share. One binary rather than one per file: CI builds
//! and links it once, and its tests share the cores.
mod common;

mod cli_annotate;
mod cli_annotate_depth;
mod cli_annotate_dwpose;
mod cli_annotate_midas;
mod cli_annotate_neural;
mod cli_annotate_normalbae;
mod cli_annotate_openpose;
mod cli_annotate_seg;
mod cli_batch;
mod cli_bench_dwpose;
mod cli_embeddings_vae;
mod cli_errors;
mod cli_generate;
mod cli_generate_half;
mod cli_img2img;
mod cli_img2img_hires;
mod cli_load;
mod cli_load_generate;
mod cli_lora;
mod cli_output_formats;
mod cli_preprocess;
mod cli_schedulers;
mod cli_train;
mod control_lora;
mod demo;
mod layers;
mod pipeline_parity;
mod pipeline_request;
mod sdxl;
mod sdxl_img2img;
mod sdxl_lora;
mod sdxl_union;
mod serve;
mod serve_clients;
mod serve_load;
mod serve_settings;
