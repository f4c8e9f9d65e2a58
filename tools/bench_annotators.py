"""The neural annotators in PyTorch (controlnet_aux 0.0.10 and Depth Anything V2's own code) at full size, with
seeded random weights, timed on one 512-px image: the baseline for `controlnet bench --annotators`.

    python tools/bench_annotators.py [--threads 2] [--iters 3] [--json]
    python tools/bench_annotators.py --shapes tests/fixtures/annotators_neural/full_size_shapes.json

`--shapes` writes, instead, every upstream weights file's tensor names and shapes (the full architectures, read
from the upstream constructors), which the Rust bench fills with random numbers.

Both sides time the same call: the detector on a 512x512 RGB image with detect_resolution 512 and
image_resolution 512 (Depth Anything: its `infer_image` at input size 512), median of --iters after one warm-up.
Random weights: post-processing that depends on what the net finds (OpenPose's people, M-LSD's lines) does
different work than on a photo with trained weights; the nets dominate.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fixtures"))

from controlnet_aux import (HEDdetector, LineartAnimeDetector, LineartDetector, MLSDdetector,  # noqa: E402
                            OpenposeDetector, PidiNetDetector)
from controlnet_aux.hed import ControlNetHED_Apache2  # noqa: E402
from controlnet_aux.lineart import Generator  # noqa: E402
from controlnet_aux.lineart_anime import UnetGenerator  # noqa: E402
from controlnet_aux.midas import MidasDetector  # noqa: E402
from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel  # noqa: E402
from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large  # noqa: E402
from controlnet_aux.normalbae import NormalBaeDetector  # noqa: E402
from controlnet_aux.normalbae.nets.NNET import NNET  # noqa: E402
from controlnet_aux.open_pose.body import Body  # noqa: E402
from controlnet_aux.open_pose.face import Face  # noqa: E402
from controlnet_aux.open_pose.hand import Hand  # noqa: E402
from controlnet_aux.open_pose.model import bodypose_model, handpose_model  # noqa: E402
from controlnet_aux.open_pose.face import FaceNet  # noqa: E402
from controlnet_aux.pidi.model import PiDiNet, config_model  # noqa: E402
from depth_anything_v2.dpt import DepthAnythingV2  # noqa: E402
from controlnet_aux.util import ade_palette  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (ConvNextConfig, SegformerImageProcessor, UperNetConfig,  # noqa: E402
                          UperNetForSemanticSegmentation)

UPERNET = "upernet-convnext-small/model.safetensors"


def upernet_convnext_small():
    """openmmlab/upernet-convnext-small's architecture (its config.json: a ConvNeXt-S backbone, 150 ADE20K
    classes; the rest are UperNetConfig's defaults)."""
    backbone = ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, num_labels=150,
                                                        auxiliary_in_channels=384))


def segment(model, img: np.ndarray) -> np.ndarray:
    """diffusers' sd-controlnet-seg recipe (the hub processor: a 512 square), coloured with the ADE20K palette."""
    proc = SegformerImageProcessor(size={"height": SIZE, "width": SIZE}, do_reduce_labels=False)
    pixel_values = proc(Image.fromarray(img), return_tensors="pt").pixel_values
    outputs = model(pixel_values)
    seg = proc.post_process_semantic_segmentation(outputs, target_sizes=[img.shape[:2]])[0].numpy()
    out = np.zeros((seg.shape[0], seg.shape[1], 3), dtype=np.uint8)
    for label, color in enumerate(ade_palette()):
        out[seg == label, :] = color
    return out

SIZE = 512


def nets():
    """Every upstream file (its hub name) and the module whose state dict it holds, full size."""
    import functools
    import torch.nn as nn

    anime_norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return {
        "ControlNetHED.pth": ControlNetHED_Apache2(),
        "table5_pidinet.pth": PiDiNet(60, config_model("carv4"), dil=24, sa=True),
        "sk_model.pth": Generator(3, 1, 3),
        "sk_model2.pth": Generator(3, 1, 3),
        "netG.pth": UnetGenerator(3, 1, 8, 64, norm_layer=anime_norm, use_dropout=False),
        "mlsd_large_512_fp32.pth": MobileV2_MLSD_Large(),
        "body_pose_model.pth": bodypose_model(),
        "hand_pose_model.pth": handpose_model(),
        "facenet.pth": FaceNet(),
        "depth_anything_v2_vits.pth": DepthAnythingV2(encoder="vits", features=64, out_channels=[48, 96, 192, 384]),
        "dpt_hybrid-midas-501f0c75.pt": DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True),
        # NormalBaeDetector.from_pretrained's settings
        "scannet.pt": NNET(types.SimpleNamespace(mode="client", architecture="BN", pretrained="scannet",
                                                 sampling_ratio=0.4, importance_ratio=0.7)),
        UPERNET: upernet_convnext_small(),
    }


def published(file, module):
    """The state dict as the published file holds it: the OpenPose body and hand files name tensors without the
    module's first component (controlnet_aux's `transfer` adds it back)."""
    sd = module.state_dict()
    if file in ("body_pose_model.pth", "hand_pose_model.pth"):
        return {".".join(k.split(".")[1:]): v for k, v in sd.items()}
    return sd


def image() -> np.ndarray:
    """The bench image (the Rust bench draws the same): a colour gradient with a bright square and a dark disc."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    img = np.stack([xx * 255 / (SIZE - 1), yy * 255 / (SIZE - 1), np.full_like(xx, 128)], axis=-1)
    img[SIZE // 8: SIZE // 2, SIZE // 8: SIZE // 2] = 230
    img[(xx - 0.7 * SIZE) ** 2 + (yy - 0.6 * SIZE) ** 2 < (SIZE / 6) ** 2] = 25
    return img.astype(np.uint8)


def timed(fn, iters):
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--shapes", help="write the upstream files' tensor names and shapes here instead")
    args = p.parse_args()
    torch.manual_seed(0)
    modules = nets()
    if args.shapes:
        shapes = {f: [[k, list(v.shape)] for k, v in published(f, m).items() if v.dtype.is_floating_point]
                  for f, m in modules.items()}
        with open(args.shapes, "w") as fh:
            json.dump(shapes, fh, separators=(",", ":"))
            fh.write("\n")
        print(f"wrote {args.shapes}: {sum(len(v) for v in shapes.values())} tensors in {len(shapes)} files")
        return

    torch.set_num_threads(args.threads)
    img = image()
    rows = []
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        for f, m in modules.items():
            sd = published(f, m)
            if f == "table5_pidinet.pth":  # as published: DataParallel names in a training checkpoint
                sd = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
            if f == "scannet.pt":  # as published: {'model': DataParallel names}
                sd = {"model": {f"module.{k}": v for k, v in sd.items()}}
            if f == UPERNET:  # a transformers model: read in memory (our side reads its safetensors)
                continue
            torch.save(sd, os.path.join(d, f))
        call = dict(detect_resolution=SIZE, image_resolution=SIZE)
        hed = HEDdetector.from_pretrained(d)
        pidi = PidiNetDetector.from_pretrained(d)
        lineart = LineartDetector.from_pretrained(d)
        anime = LineartAnimeDetector.from_pretrained(d)
        mlsd = MLSDdetector.from_pretrained(d)
        pose = OpenposeDetector(Body(os.path.join(d, "body_pose_model.pth")),
                                Hand(os.path.join(d, "hand_pose_model.pth")),
                                Face(os.path.join(d, "facenet.pth")))
        depth = modules["depth_anything_v2_vits.pth"].eval()
        midas = MidasDetector.from_pretrained(d)
        normalbae = NormalBaeDetector.from_pretrained(d)
        bgr = np.ascontiguousarray(img[..., ::-1])
        cases = [
            ("hed", lambda: hed(img, **call)),
            ("pidinet", lambda: pidi(img, **call)),
            ("lineart", lambda: lineart(img, **call)),
            ("lineart-anime", lambda: anime(img, **call)),
            ("mlsd", lambda: mlsd(img, **call)),
            ("openpose", lambda: pose(img, **call)),
            ("openpose-full", lambda: pose(img, include_hand=True, include_face=True, **call)),
            ("depth-anything", lambda: depth.infer_image(bgr, SIZE)),
            ("depth-midas", lambda: midas(img, **call)),
            ("normal-midas", lambda: midas(img, depth_and_normal=True, **call)),
            ("normal-bae", lambda: normalbae(img, **call)),
            ("seg", lambda: segment(modules[UPERNET].eval(), img)),
        ]
        for kind, fn in cases:
            s = timed(fn, args.iters)
            rows.append({"kind": kind, "seconds": s})
            if not args.json:
                print(f"{kind:<16} {s:8.3f} s", flush=True)
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor(),
                          "rows": rows}))


if __name__ == "__main__":
    main()
