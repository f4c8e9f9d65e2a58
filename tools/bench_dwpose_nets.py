"""DWPose's two ONNX nets at full size with seeded random weights, for `controlnet bench --annotators dwpose`,
and onnxruntime's time on them (what A1111's and ComfyUI's DWPose preprocessors run).

The published files (`yolox_l.onnx`, `dw-ll_ucoco_384.onnx`, hub `yzd-v/DWPose`) are ONNX graphs, which cannot be
rebuilt from a list of tensor shapes as the torch annotators' are: this script builds the two architectures in
PyTorch, fills them with random numbers and exports them the way the published files were exported
(tools/fixtures/gen_dwpose.py's conventions: `torch.onnx.export`, opset 11, batch-norm folded into the
convolutions, the upstream input and output names):

  yolox_l.onnx          YOLOX-L (Megvii's YOLOX: depth 1.0, width 1.0): CSPDarknet with a Focus stem and an SPP
                        block, YOLOX's PAFPN, the decoupled YOLOX head (width 256, 80 classes), exported as YOLOX's
                        `export_onnx.py` does with `decode_in_inference` off: 1x3x640x640 `images` -> 1x8400x85
                        `output` (per cell: 4 raw box values, sigmoid objectness, 80 sigmoid class scores).
  dw-ll_ucoco_384.onnx  RTMPose-l whole-body as DWPose distilled it (mmpose's rtmpose-l coco-ubody-wholebody 384x288
                        config): CSPNeXt P5 (deepen 1.0, widen 1.0, expand 0.5, channel attention, SPP in the last
                        stage) + RTMCCHead (in 1024, 7x7 final conv, GAU hidden 256, s 128, expansion 2, SiLU, no
                        relative bias, SimCC split 2.0, input 288x384), as mmdeploy exports it: Nx3x384x288 `input`
                        -> `simcc_x` Nx133x576, `simcc_y` Nx133x768.

The parameter counts are printed beside the published ones (YOLOX-L 54.2 M, Megvii's README; RTMPose-l 384x288
27.79 M with 17 keypoints and 28.24 M with 26, mmpose's RTMPose model zoo: the same architecture with a
17-keypoint and a 26-keypoint head is built and counted too; the 133-keypoint head adds 116 · 1024 · 49 weights
of its 7x7 conv over the 17-keypoint one).

Random weights would make the detector find nobody (the pose net would never run) or thousands of boxes (the
NMS would dominate). As the test fixtures do, the detector's last 1x1 convolutions are rescaled on the bench
picture (`person_image`, which `controlnet bench` draws identically): class 0 the likely class, boxes of person
size, and the objectness such that exactly one cell scores as a person (0.80) and one more is a candidate (0.20),
what one person in a photo gives after NMS. The batch norms take their statistics from the bench picture (one
training-mode pass), so every layer's activations have a trained net's scale. None of this changes what the nets
compute per image.

    /work/venv-ref/bin/python tools/bench_dwpose_nets.py OUT_DIR [--seed 0]
    /work/venv-ref/bin/python tools/bench_dwpose_nets.py OUT_DIR --time --a1111 DIR [--iters 3] [--threads 0]

`--time` reads the files in OUT_DIR and times controlnet_aux 0.0.10's `DWposeDetector.__call__` with its nets
run by onnxruntime through sd-webui-controlnet's `cv_ox_det.py` / `cv_ox_pose.py` (DIR holds those two files,
as for tools/fixtures/gen_dwpose.py) on the bench picture at detect and image resolution 512: the call
`controlnet bench --annotators dwpose --weights OUT_DIR` times. `--threads 0` leaves onnxruntime's default (one
thread per physical core, what A1111 and ComfyUI get).
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
# The file names, the opset, ONNX export, sd-webui-controlnet's modules and the OpenPose reordering are the
# fixture generator's (tools/fixtures/gen_dwpose.py).
from gen_dwpose import DET_FILE, POSE_FILE, export, load_a1111, openpose_order  # noqa: E402

CLASSES = 80
KEYPOINTS = 133
DET_SIZE = 640
POSE_H, POSE_W = 384, 288
SIMCC_SPLIT = 2.0
SIZE = 512
# objectness x class-0 score of the one person cell and of the one other candidate
PERSON_SCORE, CANDIDATE_SCORE = 0.80, 0.20
CLASS0_LOGIT, OTHER_LOGIT = 4.0, -6.0
PUBLISHED = {"YOLOX-L": 54.2e6, "RTMPose-l 384x288, 17 keypoints": 27.79e6, "RTMPose-l 384x288, 26 keypoints": 28.24e6}


# --- the bench picture ---

def person_image(s=SIZE):
    """The bench picture (`bench::dwpose::person_image` draws the same, integer arithmetic on both sides): a
    gradient background and a standing figure (head, torso, arms, legs) in the middle, RGB uint8."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.int64)
    img = np.stack([xx * 255 // (s - 1), yy * 255 // (s - 1), np.full_like(xx, 128)], axis=-1)
    skin, shirt, trousers = (230, 190, 160), (40, 90, 200), (30, 30, 70)

    def box(x0, x1, y0, y1):
        return (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)

    img[box(3 * s // 8, 5 * s // 8, s // 4, 9 * s // 16)] = shirt
    img[box(s // 4, 3 * s // 8, s // 4, s // 2) | box(5 * s // 8, 3 * s // 4, s // 4, s // 2)] = skin
    img[box(3 * s // 8, 15 * s // 32, 9 * s // 16, 15 * s // 16)] = trousers
    img[box(17 * s // 32, 5 * s // 8, 9 * s // 16, 15 * s // 16)] = trousers
    img[(xx - s // 2) ** 2 + (yy - 3 * s // 16) ** 2 < (s // 16) ** 2] = skin
    return img.astype(np.uint8)


def detector_input(rgb):
    """What the detector sees of the picture at detect resolution 512: controlnet_aux hands over the BGR image
    (512 already), letterboxed into 640x640 (bilinear; no padding for a square), raw 0..255, 1x3x640x640."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    r = min(DET_SIZE / bgr.shape[0], DET_SIZE / bgr.shape[1])
    size = (int(bgr.shape[1] * r), int(bgr.shape[0] * r))
    padded = np.full((DET_SIZE, DET_SIZE, 3), 114, np.uint8)
    padded[:size[1], :size[0]] = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(padded.transpose(2, 0, 1).astype(np.float32)[None])


def pose_input(rgb):
    """A 288x384 view of the picture normalised as the pose model's crops are (BGR values, ImageNet mean and
    std): only for the batch-norm statistics and the classifier scale."""
    bgr = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), (POSE_W, POSE_H), interpolation=cv2.INTER_LINEAR)
    x = (bgr.astype(np.float32) - np.array([123.675, 116.28, 103.53], np.float32)) / np.array(
        [58.395, 57.12, 57.375], np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1)[None].copy())


# --- shared blocks: convolution + batch norm + SiLU ---

class ConvBnAct(nn.Module):
    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Spp(nn.Module):
    """Halve the channels, concatenate max-pools of 5, 9, 13 (stride 1) with the input, mix back with a 1x1."""

    def __init__(self, cin, cout, kernels=(5, 9, 13)):
        super().__init__()
        mid = cin // 2
        self.reduce = ConvBnAct(cin, mid, 1)
        self.kernels = kernels
        self.mix = ConvBnAct(mid * (len(kernels) + 1), cout, 1)

    def forward(self, x):
        x = self.reduce(x)
        return self.mix(torch.cat([x] + [F.max_pool2d(x, k, 1, k // 2) for k in self.kernels], 1))


# --- YOLOX-L ---

class DarkBottleneck(nn.Module):
    """1x1 then 3x3 at the same width, plus the input when `residual`."""

    def __init__(self, c, residual):
        super().__init__()
        self.a, self.b, self.residual = ConvBnAct(c, c, 1), ConvBnAct(c, c, 3), residual

    def forward(self, x):
        y = self.b(self.a(x))
        return y + x if self.residual else y


class YoloCsp(nn.Module):
    """YOLOX's CSP layer: two 1x1 branches of half the output width, `n` bottlenecks on the first, concatenated
    (bottleneck branch first) and mixed by a 1x1."""

    def __init__(self, cin, cout, n, residual=True):
        super().__init__()
        mid = cout // 2
        self.main, self.side = ConvBnAct(cin, mid, 1), ConvBnAct(cin, mid, 1)
        self.blocks = nn.Sequential(*[DarkBottleneck(mid, residual) for _ in range(n)])
        self.mix = ConvBnAct(2 * mid, cout, 1)

    def forward(self, x):
        return self.mix(torch.cat([self.blocks(self.main(x)), self.side(x)], 1))


class YoloxL(nn.Module):
    """YOLOX-L: depth 1.0 (3/9/9/3 bottlenecks in the backbone, 3 per PAFPN layer), width 1.0 (64..1024
    channels), head width 256; inference output as exported without decoding."""

    def __init__(self, width=64, depth=3):
        super().__init__()
        w = width
        self.focus = ConvBnAct(12, w, 3)
        self.dark2 = nn.Sequential(ConvBnAct(w, 2 * w, 3, 2), YoloCsp(2 * w, 2 * w, depth))
        self.dark3 = nn.Sequential(ConvBnAct(2 * w, 4 * w, 3, 2), YoloCsp(4 * w, 4 * w, 3 * depth))
        self.dark4 = nn.Sequential(ConvBnAct(4 * w, 8 * w, 3, 2), YoloCsp(8 * w, 8 * w, 3 * depth))
        self.dark5 = nn.Sequential(ConvBnAct(8 * w, 16 * w, 3, 2), Spp(16 * w, 16 * w),
                                   YoloCsp(16 * w, 16 * w, depth, residual=False))
        c3, c4, c5 = 4 * w, 8 * w, 16 * w
        # top-down
        self.lateral5 = ConvBnAct(c5, c4, 1)
        self.td4 = YoloCsp(2 * c4, c4, depth, residual=False)
        self.lateral4 = ConvBnAct(c4, c3, 1)
        self.td3 = YoloCsp(2 * c3, c3, depth, residual=False)
        # bottom-up
        self.down3 = ConvBnAct(c3, c3, 3, 2)
        self.bu4 = YoloCsp(2 * c3, c4, depth, residual=False)
        self.down4 = ConvBnAct(c4, c4, 3, 2)
        self.bu5 = YoloCsp(2 * c4, c5, depth, residual=False)
        # decoupled head per level
        hw = 256
        self.stems = nn.ModuleList([ConvBnAct(c, hw, 1) for c in (c3, c4, c5)])
        self.cls_convs = nn.ModuleList([nn.Sequential(ConvBnAct(hw, hw, 3), ConvBnAct(hw, hw, 3)) for _ in range(3)])
        self.reg_convs = nn.ModuleList([nn.Sequential(ConvBnAct(hw, hw, 3), ConvBnAct(hw, hw, 3)) for _ in range(3)])
        self.cls_preds = nn.ModuleList([nn.Conv2d(hw, CLASSES, 1) for _ in range(3)])
        self.reg_preds = nn.ModuleList([nn.Conv2d(hw, 4, 1) for _ in range(3)])
        self.obj_preds = nn.ModuleList([nn.Conv2d(hw, 1, 1) for _ in range(3)])

    def features(self, x):
        # Focus: the four pixel phases stacked as channels (even/even, odd rows, odd columns, odd/odd)
        x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
        x = self.dark2(self.focus(x))
        p3 = self.dark3(x)
        p4 = self.dark4(p3)
        p5 = self.dark5(p4)
        up = lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
        l5 = self.lateral5(p5)
        t4 = self.td4(torch.cat([up(l5), p4], 1))
        l4 = self.lateral4(t4)
        o3 = self.td3(torch.cat([up(l4), p3], 1))
        o4 = self.bu4(torch.cat([self.down3(o3), l4], 1))
        o5 = self.bu5(torch.cat([self.down4(o4), l5], 1))
        return o3, o4, o5

    def head(self, feats):
        """Per level (reg, obj, cls) before any sigmoid."""
        out = []
        for i, f in enumerate(feats):
            f = self.stems[i](f)
            r = self.reg_convs[i](f)
            out.append((self.reg_preds[i](r), self.obj_preds[i](r), self.cls_preds[i](self.cls_convs[i](f))))
        return out

    def forward(self, x):
        rows = [torch.cat([reg, obj.sigmoid(), cls.sigmoid()], 1).flatten(start_dim=2)
                for reg, obj, cls in self.head(self.features(x))]
        return torch.cat(rows, 2).permute(0, 2, 1)


# --- RTMPose-l ---

class ChannelAttention(nn.Module):
    """Global average, a 1x1 convolution with bias, hard sigmoid, times the input."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))


class NextBlock(nn.Module):
    """CSPNeXt block: 3x3 conv, then a depthwise 5x5 and a pointwise 1x1 (each with BN and SiLU), plus the input
    when `residual`."""

    def __init__(self, c, residual):
        super().__init__()
        self.a = ConvBnAct(c, c, 3)
        self.dw = ConvBnAct(c, c, 5, groups=c)
        self.pw = ConvBnAct(c, c, 1)
        self.residual = residual

    def forward(self, x):
        y = self.pw(self.dw(self.a(x)))
        return y + x if self.residual else y


class NextCsp(nn.Module):
    """CSPNeXt's CSP layer: two 1x1 branches of `expand` times the output width, blocks on the first,
    concatenated (blocks first), channel attention, mixed by a 1x1."""

    def __init__(self, cin, cout, n, residual, expand=0.5):
        super().__init__()
        mid = int(cout * expand)
        self.main, self.side = ConvBnAct(cin, mid, 1), ConvBnAct(cin, mid, 1)
        self.blocks = nn.Sequential(*[NextBlock(mid, residual) for _ in range(n)])
        self.attention = ChannelAttention(2 * mid)
        self.mix = ConvBnAct(2 * mid, cout, 1)

    def forward(self, x):
        return self.mix(self.attention(torch.cat([self.blocks(self.main(x)), self.side(x)], 1)))


class ScaleNorm(nn.Module):
    """x / max(||x|| / sqrt(dim), eps) * g over the last axis."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.scale, self.eps = dim ** -0.5, eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x):
        norm = torch.linalg.norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class Gau(nn.Module):
    """RTMCC's gated attention unit over the keypoint tokens: ScaleNorm, one projection to u, v (e each) and a
    shared base (s) through SiLU, q and k as per-channel affine maps of the base, squared-ReLU attention scaled
    by 1/sqrt(s), u gating the attended v, a projection back, plus the input scaled per channel."""

    def __init__(self, dim, e, s):
        super().__init__()
        self.e, self.s = e, s
        self.norm = ScaleNorm(dim)
        self.uv = nn.Linear(dim, 2 * e + s, bias=False)
        self.gamma = nn.Parameter(torch.rand(2, s))
        self.beta = nn.Parameter(torch.rand(2, s))
        self.out = nn.Linear(e, dim, bias=False)
        self.res_scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        u, v, base = torch.split(F.silu(self.uv(self.norm(x))), [self.e, self.e, self.s], dim=2)
        qk = base.unsqueeze(2) * self.gamma[None, None] + self.beta
        q, k = qk[:, :, 0], qk[:, :, 1]
        attn = torch.square(F.relu(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(self.s)))
        return x * self.res_scale + self.out(u * torch.bmm(attn, v))


class RtmposeL(nn.Module):
    """CSPNeXt-l (P5: stages of 3/6/6/3 blocks from 128 to 1024 channels, residual blocks except the last stage,
    which has the SPP) and the RTMCC head; stride 32, so a 12x9 map per keypoint."""

    def __init__(self, keypoints=KEYPOINTS, hidden=256, s=128, expansion=2):
        super().__init__()
        self.stem = nn.Sequential(ConvBnAct(3, 32, 3, 2), ConvBnAct(32, 32, 3), ConvBnAct(32, 64, 3))
        stages = []
        for cin, cout, n, residual, spp in ((64, 128, 3, True, False), (128, 256, 6, True, False),
                                            (256, 512, 6, True, False), (512, 1024, 3, False, True)):
            layers = [ConvBnAct(cin, cout, 3, 2)] + ([Spp(cout, cout)] if spp else [])
            stages.append(nn.Sequential(*layers, NextCsp(cout, cout, n, residual)))
        self.stages = nn.Sequential(*stages)
        tokens = (POSE_H // 32) * (POSE_W // 32)
        self.final_layer = nn.Conv2d(1024, keypoints, 7, 1, 3)
        self.mlp = nn.Sequential(ScaleNorm(tokens), nn.Linear(tokens, hidden, bias=False))
        self.gau = Gau(hidden, hidden * expansion, s)
        self.cls_x = nn.Linear(hidden, int(POSE_W * SIMCC_SPLIT), bias=False)
        self.cls_y = nn.Linear(hidden, int(POSE_H * SIMCC_SPLIT), bias=False)

    def forward(self, x):
        x = self.final_layer(self.stages(self.stem(x))).flatten(start_dim=2)
        x = self.gau(self.mlp(x))
        return self.cls_x(x), self.cls_y(x)


# --- random weights with a trained net's scale ---

def params(m):
    return sum(p.numel() for p in m.parameters())


def settle_batch_norms(model, x):
    """Batch-norm statistics from one training-mode pass on `x` (scales 1, small random shifts): every layer
    then puts out roughly unit-scale activations, as a trained net does, however deep the random stack."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.uniform_(m.bias, -0.1, 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one pass, exactly that pass's statistics
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def affine(conv, raw, scale, shift):
    """Rescale a 1x1 conv per output channel so that its outputs `raw` on the bench input ([channels, cells])
    become `(raw - mean) * scale + shift` (`scale`, `shift`: one value per channel)."""
    with torch.no_grad():
        mean = raw.mean(1)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        conv.bias.copy_((conv.bias - mean) * scale + shift)


def calibrate_detector(net, x):
    """The last 1x1 convolutions of each level, from the bench input: class 0 the likely class (logit about
    +4), the others about -6 (never a candidate); boxes of person size; objectness with one cell at a person's
    score and one more at a candidate's, all others far below."""
    with torch.no_grad():
        levels = net.head(net.features(x))
    flat = lambda t: t[0].flatten(1)  # noqa: E731  [channels, cells]
    for i, (stride, (reg, _, cls)) in enumerate(zip((8, 16, 32), levels)):
        want = torch.full((CLASSES,), OTHER_LOGIT)
        want[0] = CLASS0_LOGIT
        raw = flat(cls)
        affine(net.cls_preds[i], raw, 0.3 / raw.std(1).clamp(min=1e-6), want)
        raw = flat(reg)
        box = torch.tensor([0.0, 0.0, math.log(200.0 / stride), math.log(320.0 / stride)])
        affine(net.reg_preds[i], raw, 0.2 / raw.std(1).clamp(min=1e-6), box)
    # objectness: one map for all levels, so the ranking across levels stays the raw one
    obj = torch.cat([flat(o)[0] for _, o, _ in levels])
    top2 = torch.topk(obj, 2).values
    cls0 = 1.0 / (1.0 + math.exp(-CLASS0_LOGIT))
    logit = lambda p: math.log(p / cls0 / (1.0 - p / cls0))  # noqa: E731  objectness giving score p
    a = (logit(PERSON_SCORE) - logit(CANDIDATE_SCORE)) / float(top2[0] - top2[1])
    with torch.no_grad():
        for conv in net.obj_preds:
            conv.weight.mul_(a)
            conv.bias.copy_((conv.bias - top2[0]) * a + logit(PERSON_SCORE))


def calibrate_pose(net, x):
    """Scale the SimCC classifiers so the points' scores straddle the 0.3 at which they are drawn."""
    with torch.no_grad():
        sx, sy = net(x)
        k = 0.5 / float(torch.minimum(sx.max(-1).values, sy.max(-1).values).median())
        net.cls_x.weight.mul_(k)
        net.cls_y.weight.mul_(k)


def check(out_dir, det_x):
    """The exported files through onnxruntime: the signatures, and what the detector finds."""
    import onnxruntime as ort
    det = ort.InferenceSession(os.path.join(out_dir, DET_FILE), providers=["CPUExecutionProvider"])
    pose = ort.InferenceSession(os.path.join(out_dir, POSE_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in det.get_inputs()] == ["images"] and [o.name for o in det.get_outputs()] == ["output"]
    assert [i.name for i in pose.get_inputs()] == ["input"]
    assert [o.name for o in pose.get_outputs()] == ["simcc_x", "simcc_y"]
    rows = det.run(None, {"images": det_x.numpy()})[0]
    assert rows.shape == (1, 8400, 85), rows.shape
    scores = rows[0, :, 4:5] * rows[0, :, 5:]
    people = int((scores[:, 0] > 0.3).sum())
    candidates = int((scores > 0.1).sum())
    print(f"detector on the bench picture: {people} cell(s) above 0.3 (class 0), {candidates} candidate(s) above "
          f"0.1; best scores {np.sort(scores[:, 0])[::-1][:3].round(4).tolist()}")
    assert people == 1 and candidates == 2, (people, candidates)
    sx, sy = pose.run(None, {"input": np.zeros((2, 3, POSE_H, POSE_W), np.float32)})
    assert sx.shape == (2, KEYPOINTS, 576) and sy.shape == (2, KEYPOINTS, 768), (sx.shape, sy.shape)


def generate(out_dir, seed):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    img = person_image()
    det_x, pose_x = detector_input(img), pose_input(img)

    yolox = YoloxL()
    counts = {"YOLOX-L": params(yolox)}
    settle_batch_norms(yolox, det_x)
    calibrate_detector(yolox, det_x)
    export(yolox, os.path.join(out_dir, DET_FILE), det_x, "images", ["output"], False)
    del yolox

    for k in (17, 26):
        counts[f"RTMPose-l 384x288, {k} keypoints"] = params(RtmposeL(keypoints=k))
    rtm = RtmposeL()
    counts["RTMPose-l 384x288, 133 keypoints (dw-ll_ucoco_384)"] = params(rtm)
    settle_batch_norms(rtm, pose_x)
    calibrate_pose(rtm, pose_x)
    export(rtm, os.path.join(out_dir, POSE_FILE), pose_x, "input", ["simcc_x", "simcc_y"], True)

    for name, n in counts.items():
        ref = PUBLISHED.get(name)
        print(f"{name}: {n / 1e6:.2f} M parameters" + (f" (published {ref / 1e6:.2f} M)" if ref else ""))
    check(out_dir, det_x)


# --- onnxruntime's time ---

class OrtWholebody:
    """controlnet_aux's `Wholebody` contract on the ONNX nets as A1111's preprocessor runs them: the person boxes,
    the keypoints of every box in one batch, then the neck and the OpenPose order."""

    def __init__(self, det_mod, pose_mod, det, pose):
        self.det_mod, self.pose_mod, self.det, self.pose = det_mod, pose_mod, det, pose
        self.people = 0

    def __call__(self, bgr):
        boxes = self.det_mod.inference_detector(self.det, bgr)
        if boxes is None:
            self.people = 0
            return np.zeros((0, 134, 2)), np.zeros((0, 134))
        keypoints, scores = self.pose_mod.inference_pose(self.pose, boxes, bgr, (POSE_W, POSE_H))
        self.people = len(keypoints)
        info = openpose_order(keypoints, scores)
        return info[..., :2], info[..., 2]


def time_ort(out_dir, a1111, iters, threads):
    import onnxruntime as ort
    from controlnet_aux.dwpose import DWposeDetector  # (gen_dwpose stubbed matplotlib if it is missing)

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = lambda f: ort.InferenceSession(os.path.join(out_dir, f), opts,  # noqa: E731
                                             providers=["CPUExecutionProvider"])
    det_mod, pose_mod = load_a1111(a1111)
    d = DWposeDetector.__new__(DWposeDetector)
    d.pose_estimation = OrtWholebody(det_mod, pose_mod, session(DET_FILE), session(POSE_FILE))
    img = person_image()
    load_before = os.getloadavg()[0]
    call = lambda: d(img, detect_resolution=SIZE, image_resolution=SIZE, output_type="np")  # noqa: E731
    call()
    wall, cpu = [], []
    for _ in range(iters):
        t, c = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    print(json.dumps({
        "implementation": f"onnxruntime {ort.__version__} (sd-webui-controlnet cv_ox_det/cv_ox_pose, controlnet_aux "
                          "DWposeDetector)",
        "threads": threads or "default", "iters": iters, "people": d.pose_estimation.people,
        "seconds": statistics.median(wall), "cpu_seconds": statistics.median(cpu), "samples_s": wall,
        "cpu": platform.processor() or platform.machine(), "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder for yolox_l.onnx and dw-ll_ucoco_384.onnx (not committed: ~350 MB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time", action="store_true", help="time onnxruntime on the files in out_dir instead")
    p.add_argument("--a1111", help="folder with sd-webui-controlnet's cv_ox_det.py and cv_ox_pose.py (--time)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    args = p.parse_args()
    if args.time:
        if not args.a1111:
            p.error("--time needs --a1111 DIR")
        time_ort(args.out_dir, args.a1111, args.iters, args.threads)
    else:
        generate(args.out_dir, args.seed)


if __name__ == "__main__":
    main()
