"""Times diffusers on PyTorch (CPU, f32) on the same full-size configs as `controlnet bench`.

Same structure and JSON keys as `controlnet bench --json` (src/bench/): random weights with the same scale rule
(matrices and kernels uniform with variance 1/fan_in, norm scales 1, biases uniform with variance 1/len), a
latent batch, one timestep, random text embeddings and one condition image for the batch; medians over
--iters after one warm-up; peak RSS from /proc/self/status (VmHWM, reset per phase through clear_refs).

One step = ControlNetModel(...) on the whole batch, then UNet2DConditionModel(...) with its residuals, as
StableDiffusionControlNetPipeline runs it. diffusers' ControlNet recomputes the hint embedding inside every
call, so `controlnet_s` includes it here (`controlnet_s_includes_embed`); `controlnet_embed_s` times it alone.

With --train it times one ControlNet training update instead, as diffusers' examples/controlnet/
train_controlnet.py runs it once latents and text embeddings are at hand: ControlNet (trainable) + locked UNet
(requires_grad False), MSE, backward, clip_grad_norm_(1.0), AdamW (torch defaults but lr 1e-5, weight decay 1e-2),
zero_grad(set_to_none=True); the same keys as `controlnet bench --train --json`. --train --dtype bf16 is the
script's --mixed_precision bf16: the locked UNet cast to bfloat16 (weight_dtype, as are the latents and text
embeddings it gets, and the residuals), the ControlNet f32 under accelerate's bf16 autocast, the loss in f32.

--dtype picks PyTorch's mode: f32 (default), bf16 (the models cast to bfloat16: bf16 weights and activations,
oneDNN's AMX / AVX512-BF16 kernels where the CPU has them) or autocast (f32 weights, torch.autocast("cpu",
bfloat16) around every pass). Inputs are made in f32 and cast to the models' dtype.

--device cuda runs the same on the GPU (tools/cuda/check.sh): every timed pass waits for the GPU, --dtype adds f16
(the models cast to float16, as GPU users run SD), and the report adds the GPU's name and torch's peak allocation.

Usage: .venv-ref/bin/python tools/bench_torch.py --preset sd15 --latent 32 --batch 2 --iters 3 [--skip-vae]
       .venv-ref/bin/python tools/bench_torch.py --preset sd15 --latent 32 --dtype bf16
       .venv-ref/bin/python tools/bench_torch.py --train --preset sd15 --latent 32 --batch 1 --iters 3
       python3 tools/bench_torch.py --device cuda --preset sd15 --latent 64 --dtype f16
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LAYOUTS = os.path.join(REPO, "tests", "fixtures", "unet")
TEXT_TOKENS = 77
TIMESTEP = 500.0
SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
FLOPS_FIXTURE = os.path.join(REPO, "tests", "fixtures", "bench", "flops.json")


def config(name):
    with open(os.path.join(LAYOUTS, f"layout_{name}.json")) as f:
        return json.load(f)["config"]


def build(cls, cfg, gen):
    """The model on the meta device, then materialised and filled in place (no default init pass)."""
    with torch.device("meta"):
        model = cls.from_config(cfg)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.fill_(1.0)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                bound = math.sqrt(3.0 / max(fan_in, 1))
                p.uniform_(-bound, bound, generator=gen)
    return model


def vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return 0.0


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_info(args, latent, batch):
    """The fields every report starts with (controlnet-rs's RunInfo): implementation, configuration, machine."""
    return {
        "implementation": f"diffusers {__import__('diffusers').__version__} / torch {torch.__version__}",
        "preset": args.preset,
        "latent": latent,
        "batch": batch,
        "iters": args.iters,
        "dtype": getattr(args, "dtype", "f32"),
        "machine": cpu_model(),
        "device": DEVICE,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def timing(samples):
    return {"median_s": statistics.median(samples), "samples_s": samples}


DEVICE = "cpu"


def sync():
    """Waits for the GPU's queued work (nothing to wait for on the CPU)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(iters, fn):
    out = fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        out = fn()
        sync()
        samples.append(time.perf_counter() - start)
    return timing(samples), out


def flops(preset, latent):
    """torch's FlopCounterMode counts per image (tools/fixtures/gen_bench.py), when stored for this size."""
    with open(FLOPS_FIXTURE) as f:
        for case in json.load(f)["cases"]:
            if case["preset"] == preset and case["latent"] == latent:
                return case
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=["sd15", "sd21", "sdxl"], default="sd15")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS", "2")))
    ap.add_argument("--skip-vae", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16", "autocast"], default="f32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.dtype == "f16" and DEVICE != "cuda":
        ap.error("--dtype f16 is for --device cuda (PyTorch's CPU f16 is not a mode CPU users run)")
    if args.train:
        if args.preset == "sdxl":
            ap.error("--train: the training bench builds sd15 or sd21")
        return train(args)
    load_before = load_average()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(args.seed)
    s, b = args.latent, args.batch
    log = lambda msg: print(f"bench_torch: {msg}", file=sys.stderr, flush=True)

    log("building the UNet and the ControlNet with random weights")
    reset_peak()
    start = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}.get(args.dtype, torch.float32)
    dev = DEVICE
    unet = build(UNet2DConditionModel, config(f"{args.preset}_unet"), gen).to(dtype).to(dev)
    cn = build(ControlNetModel, config(f"{args.preset}_controlnet"), gen).to(dtype).to(dev)
    build_s = time.perf_counter() - start
    autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=args.dtype == "autocast")
    autocast.__enter__()

    width = unet.config.cross_attention_dim
    sample = (torch.rand(b, 4, s, s, generator=gen) * 2 - 1).to(dtype).to(dev)
    t = torch.tensor([TIMESTEP]).to(dev)
    text = (torch.rand(b, TEXT_TOKENS, width, generator=gen) * 2 - 1).to(dtype).to(dev)
    cond = torch.rand(1, 3, 8 * s, 8 * s, generator=gen).expand(b, -1, -1, -1).to(dtype).to(dev)
    added = {}
    if unet.config.addition_embed_type == "text_time":
        # SDXL: the pooled text embedding and original size, crop, target size (1024², (0, 0), 1024²).
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"added_cond_kwargs": {
            "text_embeds": (torch.rand(b, pooled, generator=gen) * 2 - 1).to(dtype).to(dev),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(b, 1).to(dtype).to(dev),
        }}

    log("hint embedding")
    embed_t, _ = timed(args.iters, lambda: cn.controlnet_cond_embedding(cond[:1]))
    cn_s, unet_s, step_s, step_cpu = [], [], [], []
    finite = True
    for i in range(args.iters + 1):
        log("UNet + ControlNet step " + ("(warm-up)" if i == 0 else f"{i}/{args.iters}"))
        start, cpu_start = time.perf_counter(), time.process_time()
        down, mid = cn(sample, t, text, cond, return_dict=False, **added)
        sync()
        cn_done = time.perf_counter()
        out = unet(sample, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                   **added).sample
        sync()
        done = time.perf_counter()
        if i > 0:
            cn_s.append(cn_done - start)
            unet_s.append(done - cn_done)
            step_s.append(done - start)
            step_cpu.append(time.process_time() - cpu_start)
        finite &= bool(torch.isfinite(out.float()).all())
    peak_unet_cn = vm("VmHWM:")
    del unet, cn, down, mid, out

    vae_t = peak_vae = None
    if not args.skip_vae:
        log("building the VAE and decoding")
        reset = reset_peak()
        vae = build(AutoencoderKL, SD_VAE, gen).to(dtype).to(dev)
        latents = (torch.rand(1, 4, s, s, generator=gen) * 2 - 1).to(dtype).to(dev)
        vae_t, image = timed(args.iters, lambda: vae.decode(latents).sample)
        finite &= bool(torch.isfinite(image.float()).all())
        peak_vae = vm("VmHWM:") if reset else None

    step_t, unet_t, cn_t = timing(step_s), timing(unet_s), timing(cn_s)
    report = {
        **run_info(args, s, b),
        "build_s": build_s,
        "unet_controlnet_step_s": step_t["median_s"],
        "unet_step_s": unet_t["median_s"],
        "controlnet_s": cn_t["median_s"],
        "controlnet_s_includes_embed": True,
        "controlnet_embed_s": embed_t["median_s"],
        "unet_controlnet_step_cpu_s": statistics.median(step_cpu),
        "peak_rss_bytes": max(vm("VmHWM:"), peak_unet_cn),
        "peak_rss_unet_controlnet_bytes": peak_unet_cn,
        "load_before": load_before,
        "load_after": load_average(),
        "outputs_finite": finite,
        "timings": {"unet_controlnet_step": step_t, "unet": unet_t, "controlnet": cn_t, "controlnet_embed": embed_t},
    }
    if DEVICE == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
        report["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
    if vae_t is not None:
        report["vae_decode_s"] = vae_t["median_s"]
        report["peak_rss_vae_bytes"] = peak_vae
        report["timings"]["vae_decode"] = vae_t
    counts = flops(args.preset, s)
    if counts:
        g = {
            "unet": b * counts["unet"] / 1e9,
            "controlnet": b * counts["controlnet"] / 1e9,
            "controlnet_embed": counts["controlnet_embed"] / 1e9,
            "vae_decode": counts["vae_decode"] / 1e9,
        }
        g["unet_controlnet_step"] = g["unet"] + g["controlnet"]
        report["gflop"] = g
        secs = {"unet_controlnet_step": step_t, "unet": unet_t, "controlnet": cn_t, "controlnet_embed": embed_t}
        if vae_t is not None:
            secs["vae_decode"] = vae_t
        report["gflops_per_s"] = {k: g[k] / v["median_s"] for k, v in secs.items()}
    print(json.dumps(report))


def train(args):
    """One ControlNet training update per timed iteration (see the module docstring)."""
    load_before = load_average()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    s, b = args.latent, args.batch
    log = lambda msg: print(f"bench_torch: {msg}", file=sys.stderr, flush=True)
    log("building the locked UNet and the trainable ControlNet with random weights")
    reset_peak()
    start = time.perf_counter()
    if args.dtype not in ("f32", "bf16"):
        sys.exit(f"--train --dtype {args.dtype}: the training bench runs f32 or bf16 (mixed precision)")
    weight_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    unet = build(UNet2DConditionModel, config(f"{args.preset}_unet"), gen).to(weight_dtype)
    unet.requires_grad_(False)
    cn = build(ControlNetModel, config(f"{args.preset}_controlnet"), gen).train()
    # accelerate.prepare(controlnet) wraps its forward in autocast when mixed precision is on.
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    build_s = time.perf_counter() - start
    params = list(cn.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    width = unet.config.cross_attention_dim
    noisy = torch.rand(b, 4, s, s, generator=gen) * 2 - 1
    t = torch.full((b,), TIMESTEP)
    text = torch.rand(b, TEXT_TOKENS, width, generator=gen) * 2 - 1
    cond = torch.rand(b, 3, 8 * s, 8 * s, generator=gen)
    target = torch.rand(b, 4, s, s, generator=gen) * 2 - 1
    # train_controlnet.py encodes the latents with the VAE in weight_dtype, the text with the text encoder too.
    noisy, text = noisy.to(weight_dtype), text.to(weight_dtype)
    fwd, bwd, optim, total, cpu = [], [], [], [], []
    finite = True
    for i in range(args.iters + 1):
        log("training update " + ("(warm-up)" if i == 0 else f"{i}/{args.iters}"))
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast:
            down, mid = cn(noisy, t, text, cond, return_dict=False)
        down, mid = [d.to(weight_dtype) for d in down], mid.to(weight_dtype)
        pred = unet(noisy, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        loss_value = loss.item()
        forward_done = time.perf_counter()
        loss.backward()
        backward_done = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = time.perf_counter()
        finite &= math.isfinite(loss_value) and bool(torch.isfinite(norm))
        if i > 0:
            fwd.append(forward_done - start)
            bwd.append(backward_done - forward_done)
            optim.append(done - backward_done)
            total.append(done - start)
            cpu.append(time.process_time() - cpu_start)
    total_t, fwd_t, bwd_t, optim_t = timing(total), timing(fwd), timing(bwd), timing(optim)
    report = {
        **run_info(args, s, b),
        "mode": "train",
        "build_s": build_s,
        "trainable_parameters": sum(p.numel() for p in params),
        "train_step_s": total_t["median_s"],
        "forward_s": fwd_t["median_s"],
        "backward_s": bwd_t["median_s"],
        "optimizer_s": optim_t["median_s"],
        "train_step_cpu_s": statistics.median(cpu),
        "samples_per_s": b / total_t["median_s"],
        "peak_rss_bytes": vm("VmHWM:"),
        "load_before": load_before,
        "load_after": load_average(),
        "finite": finite,
        "timings": {"train_step": total_t, "forward": fwd_t, "backward": bwd_t, "optimizer": optim_t},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
