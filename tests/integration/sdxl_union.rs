//! ControlNet union nets (xinsir's controlnet-union-sdxl-1.0) against diffusers' `ControlNetUnionModel` and
//! `StableDiffusionXLControlNetUnionPipeline` (tools/fixtures/gen_sdxl_union.py): one forward at the parity
//! metric (1e-4 relative), whole runs through the CLI at 40 dB PSNR.
use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use controlnet::model::controlnet::{AddedConditions, ControlNetModel};
use controlnet::model::controlnet_union::UnionCondition;

const UNION: &str = "tests/fixtures/models/tiny-controlnet-sdxl-union";

/// A guided batch of 2 (different latents, timesteps, size ids and conditions per sample), control type 3,
/// scale 0.8: the union parts (type embedding, token transformer mixing the batch, channel offsets) all count.
#[test]
fn union_forward_matches_diffusers() {
    let fx: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture("sdxl_union/components.safetensors"), &Device::Cpu).unwrap();
    let net = ControlNetModel::load(&fixture("models/tiny-controlnet-sdxl-union"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(net.num_control_type(), Some(8));
    let added = AddedConditions { text_embeds: fx["text_embeds"].clone(), time_ids: fx["time_ids"].clone() };
    let (x, t, ctx) = (&fx["sample"], &fx["timesteps"], &fx["context"]);
    let emb = net.embed_condition(&fx["cond"]).unwrap();
    assert_close(&emb, &fx["cond_embedding"], "hint embedding");
    let hint = net.union_hint(&emb, 3).unwrap().unwrap();
    let one = |hint| [UnionCondition { cond_embedding: &emb, hint, scale: 0.8 }];
    let res = net.forward_union(x, t, ctx, Some(&added), &one(&hint)).unwrap();
    for (i, d) in res.down_block_res_samples.iter().enumerate() {
        assert_close(d, &fx[&format!("controlnet_down.{i}")], &format!("union down {i}"));
    }
    assert_close(&res.mid_block_res_sample, &fx["controlnet_mid"], "union mid");

    // Another control type gives other residuals (the type is really read), and a plain call is refused.
    let other = net.union_hint(&emb, 1).unwrap().unwrap();
    let res1 = net.forward_union(x, t, ctx, Some(&added), &one(&other)).unwrap();
    assert!(max_abs(&(&res1.mid_block_res_sample - &res.mid_block_res_sample).unwrap()) > 1e-3);
    let err = net.forward_with(x, t, ctx, Some(&added), &emb, 0.8, false).unwrap_err().to_string();
    assert!(err.contains("union net"), "{err}");
    assert!(net.union_hint(&emb, 8).is_err());
}

/// diffusers' list form: several conditions in one call, each scale on its own token and hint; a third
/// condition of a type already present (the multi-hot type vector holds each type once).
#[test]
fn union_list_form_matches_diffusers() {
    let fx: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture("sdxl_union/joint.safetensors"), &Device::Cpu).unwrap();
    let net = ControlNetModel::load(&fixture("models/tiny-controlnet-sdxl-union"), DType::F32, &Device::Cpu).unwrap();
    let added = AddedConditions { text_embeds: fx["text_embeds"].clone(), time_ids: fx["time_ids"].clone() };
    let (x, t, ctx) = (&fx["sample"], &fx["timesteps"], &fx["context"]);
    let embs = [net.embed_condition(&fx["cond.0"]).unwrap(), net.embed_condition(&fx["cond.1"]).unwrap()];
    let hints = [net.union_hint(&embs[0], 1).unwrap().unwrap(), net.union_hint(&embs[1], 3).unwrap().unwrap()];
    let cond = |k: usize, scale: f64| UnionCondition { cond_embedding: &embs[k], hint: &hints[k], scale };
    for (name, conditions) in
        [("two", vec![cond(0, 0.7), cond(1, 1.2)]), ("three", vec![cond(0, 0.5), cond(1, 1.0), cond(0, 0.9)])]
    {
        let res = net.forward_union(x, t, ctx, Some(&added), &conditions).unwrap();
        for (i, d) in res.down_block_res_samples.iter().enumerate() {
            assert_close(d, &fx[&format!("{name}.down.{i}")], &format!("{name} down {i}"));
        }
        assert_close(&res.mid_block_res_sample, &fx[&format!("{name}.mid")], &format!("{name} mid"));
    }
    // One call with both is not the sum of a call per condition (what two units do).
    let joint = net.forward_union(x, t, ctx, Some(&added), &[cond(0, 0.7), cond(1, 1.2)]).unwrap();
    let a = net.forward_union(x, t, ctx, Some(&added), &[cond(0, 0.7)]).unwrap();
    let b = net.forward_union(x, t, ctx, Some(&added), &[cond(1, 1.2)]).unwrap();
    let sum = (&a.mid_block_res_sample + &b.mid_block_res_sample).unwrap();
    assert!(max_abs(&(&sum - &joint.mid_block_res_sample).unwrap()) > 1e-2);
    assert!(net.forward_union(x, t, ctx, Some(&added), &[]).is_err());
}

const MIN_PSNR_DB: f64 = 40.0;

fn run_case(name: &str) {
    run_generate_case("sdxl_union/cases.json", name, MIN_PSNR_DB);
}

#[test]
fn one_union_unit_matches_diffusers() {
    run_case("union_one_unit");
}

/// Two units of the same union net with their own types, scales and windows (diffusers'
/// MultiControlNetUnionModel).
#[test]
fn two_union_units_match_diffusers() {
    run_case("union_two_units");
}

/// One union net called once per step with two conditions (`--union-join`), a shared scale and a window, as
/// StableDiffusionXLControlNetUnionPipeline with the single net and a list of conditions.
#[test]
fn joined_union_conditions_match_diffusers_list_form() {
    run_generate_case("sdxl_union/cases_joint.json", "union_joint", MIN_PSNR_DB);
}

/// `--union-join` needs a unit before it of the same union net, and takes that unit's window.
#[test]
fn union_join_is_checked() {
    let dir = temp_dir();
    let out = dir.path().join("o.png");
    let base = ["generate", "--model", "tests/fixtures/models/tiny-sdxl", "--prompt", "x", "--steps", "2"];
    let (circle, box_) = ("tests/fixtures/pipeline/control_circle.png", "tests/fixtures/pipeline/control_box.png");
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra);
        args.extend(["--output", out.to_str().unwrap(), "--quiet"]);
        controlnet(&args)
    };
    let first = ["--controlnet", UNION, "--control", circle, "--control-type", "depth", "--control-start", "0.2"];
    let res = run(&["--controlnet", UNION, "--control", circle, "--control-type", "depth", "--union-join"]);
    assert_clean_failure(&res, &["--union-join (ControlNet 1)", "no unit before it"]);
    let plain = "tests/fixtures/models/tiny-controlnet-sdxl";
    let res = run(&[&first[..], &["--controlnet", plain, "--control", box_, "--union-join"]].concat());
    assert_clean_failure(&res, &["--union-join (ControlNet 2)", "same union net"]);
    let later = ["--controlnet", UNION, "--control", box_, "--control-type", "canny", "--control-start", "0.5"];
    let res = run(&[&first[..], &later[..], &["--union-join"]].concat());
    assert_clean_failure(&res, &["--control-start (ControlNet 2)", "0.2"]);
    let untyped = ["--controlnet", UNION, "--control", box_, "--union-join"];
    let res = run(&[&first[..], &untyped[..]].concat());
    assert_clean_failure(&res, &["--control-type (ControlNet 2)"]);
    assert!(!out.exists());
}

/// The net as the single `.safetensors` file people download, with the type by name: the same image as from
/// its folder with the type's index. (A tiny net's attention heads cannot be read from its weights, so its
/// config is given, as `--controlnet-config` does for any single file of unusual size; the union fields'
/// inference from the weights is tested in `io::single_file`.)
#[test]
fn a_union_net_single_file_with_a_type_name_matches_its_folder() {
    let dir = temp_dir();
    let run = |net: &str, kind: &str, out: &str| {
        let out = dir.path().join(out);
        let mut args = vec![
            "generate",
            "--model",
            "tests/fixtures/models/tiny-sdxl",
            "--prompt",
            "a red circle",
            "--steps",
            "3",
            "--seed",
            "4",
            "--controlnet",
            net,
            "--control",
            "tests/fixtures/pipeline/control_circle.png",
            "--control-type",
            kind,
            "--output",
            out.to_str().unwrap(),
            "--quiet",
        ];
        if net.ends_with(".safetensors") {
            args.extend(["--controlnet-config", "tests/fixtures/models/tiny-controlnet-sdxl-union/config.json"]);
        }
        let res = controlnet(&args);
        assert!(res.status.success(), "{}", stderr(&res));
        image::open(&out).unwrap().to_rgb8()
    };
    let file = format!("{UNION}/diffusion_pytorch_model.safetensors");
    let a = run(&file, "lineart", "file.png");
    let b = run(UNION, "3", "folder.png");
    assert_eq!(a, b, "single file vs folder");
    let depth = run(UNION, "depth", "depth.png");
    assert!(psnr(&depth, &b) < 60.0, "the control type changes the image");
}

/// A union net needs a control type; a plain net refuses one; guess mode is refused (diffusers' union pipeline
/// fails on it).
#[test]
fn control_type_is_required_and_checked() {
    let dir = temp_dir();
    let out = dir.path().join("o.png");
    let base = ["generate", "--model", "tests/fixtures/models/tiny-sdxl", "--prompt", "x", "--steps", "2"];
    let control = "tests/fixtures/pipeline/control_circle.png";
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra);
        args.extend(["--output", out.to_str().unwrap(), "--quiet"]);
        controlnet(&args)
    };
    let res = run(&["--controlnet", UNION, "--control", control]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--control-type"), "{}", stderr(&res));
    let res = run(&["--controlnet", UNION, "--control", control, "--control-type", "colour"]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--control-type") && stderr(&res).contains("openpose"), "{}", stderr(&res));
    let res = run(&["--controlnet", UNION, "--control", control, "--control-type", "9"]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("knows 8 types (0-7)"), "{}", stderr(&res));
    let plain = "tests/fixtures/models/tiny-controlnet-sdxl";
    let res = run(&["--controlnet", plain, "--control", control, "--control-type", "canny"]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("not a union net"), "{}", stderr(&res));
    let res = run(&["--controlnet", UNION, "--control", control, "--control-type", "canny", "--guess-mode"]);
    assert!(!res.status.success());
    assert!(stderr(&res).contains("--guess-mode"), "{}", stderr(&res));
    assert!(!out.exists());
}
