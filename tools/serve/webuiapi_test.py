"""Drive `controlnet serve` with the `webuiapi` client (PyPI), as A1111 users script it.

Usage: webuiapi_test.py HOST PORT CONTROL_PNG OUT_DIR [INIT_PNG MASK_PNG]

Checks options, scripts, model_list, txt2img with a ControlNetUnit (the client's own defaults: "Resize and
Fill", processor_res 512, thresholds 64) and controlnet_detect; writes OUT_DIR/txt2img.png (and the unit's map
appended to the answer, OUT_DIR/txt2img_map.png) and OUT_DIR/detect.png for the Rust test
(tests/integration/serve_clients.rs) to compare with `controlnet generate` and `controlnet annotate`. With INIT_PNG and
MASK_PNG also img2img with a unit without a picture (the init image is its condition) and inpainting with the
mask, whole picture and only masked: OUT_DIR/img2img.png, OUT_DIR/inpaint.png and OUT_DIR/inpaint_masked.png. Exits non-zero on any failure.
"""
import os
import sys

import webuiapi
from PIL import Image


# webuiapi 0.9.17's txt2img/img2img take `alwayson_scripts={}` as a default argument and add the ControlNet
# units to that one dict: a later call without units sends the earlier call's units again (A1111 then runs them).
# Each call here passes a dict of its own.
def fresh():
    return {"alwayson_scripts": {}}


def main():
    host, port, control_path, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    api = webuiapi.WebUIApi(host=host, port=port, sampler="Euler a", steps=2)
    control = Image.open(control_path)

    # The settings the server honours, and ControlNet listed among the scripts.
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1, api.get_options()
    assert "controlnet" in api.get_scripts()["txt2img"], api.get_scripts()

    models = api.controlnet_model_list()
    assert any(m.startswith("tiny-controlnet-a [") for m in models), models
    assert "canny" in api.controlnet_module_list(), api.controlnet_module_list()
    assert api.controlnet_version() == 2

    unit = webuiapi.ControlNetUnit(image=control, module="none", model=models[0])
    result = api.txt2img(prompt="a cat", seed=5, cfg_scale=7.5, width=128, height=128, controlnet_units=[unit],
                          **fresh())
    # The image, then the unit's map (the extension's detected map, at the output size).
    assert len(result.images) == 2, result.images
    assert result.images[1].size == (128, 128), result.images[1].size
    result.images[1].save(os.path.join(out_dir, "txt2img_map.png"))
    image = result.images[0]
    assert image.size == (128, 128), image.size
    assert result.info["all_seeds"] == [5], result.info
    assert "parameters" in image.info and image.info["parameters"].startswith("a cat"), image.info
    assert "controlnet-rs" in image.info, sorted(image.info)
    image.save(os.path.join(out_dir, "txt2img.png"))

    again = api.txt2img(prompt="a cat", seed=5, cfg_scale=7.5, width=128, height=128, controlnet_units=[unit],
                          **fresh())
    assert again.images[0].tobytes() == image.tobytes(), "the same seed gave another image"

    detected = api.controlnet_detect(images=[control], module="canny")
    assert len(detected.images) == 1, detected.json
    mapped = detected.images[0]
    assert mapped.size == control.size, (mapped.size, control.size)
    mapped.save(os.path.join(out_dir, "detect.png"))

    if len(sys.argv) > 6:
        init, mask = Image.open(sys.argv[5]), Image.open(sys.argv[6])
        blank_unit = webuiapi.ControlNetUnit(module="none", model=models[0], resize_mode="Just Resize")
        size = dict(width=init.width, height=init.height)
        result = api.img2img(images=[init], prompt="a cat", seed=5, cfg_scale=7.5, denoising_strength=0.5,
                             controlnet_units=[blank_unit], **size, **fresh())
        assert result.images[0].size == init.size, result.images[0].size
        result.images[0].save(os.path.join(out_dir, "img2img.png"))
        result = api.img2img(images=[init], mask_image=mask, inpainting_fill=1, inpaint_full_res=False,
                             prompt="a cat", seed=5, cfg_scale=7.5, denoising_strength=0.5, **size, **fresh())
        result.images[0].save(os.path.join(out_dir, "inpaint.png"))
        # "Inpaint area: Only masked", the client's default (inpaint_full_res=True), with 8 px of padding.
        result = api.img2img(images=[init], mask_image=mask, inpainting_fill=1, inpaint_full_res_padding=8,
                             prompt="a cat", seed=5, cfg_scale=7.5, denoising_strength=0.5, **size, **fresh())
        result.images[0].save(os.path.join(out_dir, "inpaint_masked.png"))
        # The client's own default fill (0, "fill") is refused, naming the field.
        try:
            api.img2img(images=[init], mask_image=mask, prompt="x", **size, **fresh())
        except RuntimeError as e:
            assert e.args[0] == 422 and "inpainting_fill" in e.args[1], e.args
        else:
            raise AssertionError("inpainting_fill=0 was accepted")

    # A field that would change the picture is refused, naming it: the client raises with the server's text.
    try:
        api.txt2img(prompt="x", enable_hr=True, hr_upscaler="ESRGAN_4x", width=128, height=128, **fresh())
    except RuntimeError as e:
        assert e.args[0] == 422 and "hr_upscaler" in e.args[1], e.args
    else:
        raise AssertionError("hr_upscaler=ESRGAN_4x was accepted")
    print("webuiapi: all checks passed")


if __name__ == "__main__":
    main()
