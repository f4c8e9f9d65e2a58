//! SDXL img2img and inpainting against diffusers' StableDiffusionXLControlNetImg2ImgPipeline and
//! StableDiffusionXLControlNetInpaintPipeline on the tiny SDXL model (tools/fixtures/gen_sdxl_img2img.py).
use crate::common;

use common::run_generate_case;

const CASES: &str = "sdxl_img2img/cases.json";
/// As the SD img2img cases: same recipe, f32 on both sides.
const MIN_DB: f64 = 40.0;

#[test]
fn img2img_default_scheduler() {
    run_generate_case(CASES, "sdxl_i2i_default_60", MIN_DB);
}

#[test]
fn img2img_ddim() {
    run_generate_case(CASES, "sdxl_i2i_ddim_80", MIN_DB);
}

#[test]
fn img2img_ancestral_two_images() {
    run_generate_case(CASES, "sdxl_i2i_euler-a_two_images", MIN_DB);
}

#[test]
fn inpaint_full_strength() {
    run_generate_case(CASES, "sdxl_inp_full_strength", MIN_DB);
}

#[test]
fn inpaint_partial_strength() {
    run_generate_case(CASES, "sdxl_inp_euler_75", MIN_DB);
}
