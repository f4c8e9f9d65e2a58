"""Drive `controlnet serve` with the `webuiapi` client (PyPI), as A1111 users script it.

Usage: webuiapi_test.py HOST PORT CONTROL_PNG OUT_DIR

Checks model_list, txt2img with a ControlNetUnit (the client's own defaults: "Resize and Fill", processor_res
512, thresholds 64) and controlnet_detect; writes OUT_DIR/txt2img.png and OUT_DIR/detect.png for the Rust test
(tests/serve_clients.rs) to compare with `controlnet generate` and `controlnet annotate`. Exits non-zero on any
failure.
"""
import os
import sys

import webuiapi
from PIL import Image


def main():
    host, port, control_path, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    api = webuiapi.WebUIApi(host=host, port=port, sampler="Euler a", steps=2)
    control = Image.open(control_path)

    models = api.controlnet_model_list()
    assert any(m.startswith("tiny-controlnet-a [") for m in models), models
    assert "canny" in api.controlnet_module_list(), api.controlnet_module_list()
    assert api.controlnet_version() == 2

    unit = webuiapi.ControlNetUnit(image=control, module="none", model=models[0])
    result = api.txt2img(prompt="a cat", seed=5, cfg_scale=7.5, width=128, height=128, controlnet_units=[unit])
    assert len(result.images) == 1, result.images
    image = result.images[0]
    assert image.size == (128, 128), image.size
    assert result.info["all_seeds"] == [5], result.info
    assert "parameters" in image.info and image.info["parameters"].startswith("a cat"), image.info
    assert "controlnet-rs" in image.info, sorted(image.info)
    image.save(os.path.join(out_dir, "txt2img.png"))

    again = api.txt2img(prompt="a cat", seed=5, cfg_scale=7.5, width=128, height=128, controlnet_units=[unit])
    assert again.images[0].tobytes() == image.tobytes(), "the same seed gave another image"

    detected = api.controlnet_detect(images=[control], module="canny")
    assert len(detected.images) == 1, detected.json
    mapped = detected.images[0]
    assert mapped.size == control.size, (mapped.size, control.size)
    mapped.save(os.path.join(out_dir, "detect.png"))

    # A field that would change the picture is refused, naming it: the client raises with the server's text.
    try:
        api.txt2img(prompt="x", enable_hr=True, width=128, height=128)
    except RuntimeError as e:
        assert e.args[0] == 422 and "enable_hr" in e.args[1], e.args
    else:
        raise AssertionError("enable_hr=True was accepted")
    print("webuiapi: all checks passed")


if __name__ == "__main__":
    main()
