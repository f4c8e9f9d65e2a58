"""Training throughput: `controlnet train` against diffusers' train_controlnet step, same data, same settings.

Both train tiny-controlnet-a on the tiny-sd15 base (tests/fixtures/models) on a circles dataset made by
`controlnet dataset circles`, batch B at R px, torch and candle on the same number of threads. Fixed costs (model
loading, the dataset check, the final save) are cancelled by timing two runs of N1 and N2 updates and dividing the
extra samples by the extra time; the torch loop is timed after one warm-up update.

    .venv-ref/bin/python tools/bench_train.py [--binary target/release/controlnet] [--batch 2] [--resolution 64]
                                              [--threads 2] [--n1 3] [--n2 13]

The torch side is the step of diffusers' examples/controlnet/train_controlnet.py (as tools/fixtures/gen_train.py
re-states it): VAE encode, text encoder, ControlNet + locked UNet, MSE, backward, clip_grad_norm_, AdamW.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
from common import REPO, TINY_CN_A, TINY_SD15  # noqa: E402


def rust_run(binary, dataset, out, steps, args) -> float:
    cmd = [binary, "train", "--model", TINY_SD15, "--controlnet", TINY_CN_A, "--dataset", dataset,
           "--output", out, "--resolution", str(args.resolution), "--batch-size", str(args.batch),
           "--max-steps", str(steps), "--checkpointing-steps", "0", "--seed", "0", "--quiet"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def torch_loop(dataset, steps, args) -> float:
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    torch.set_num_threads(args.threads)
    tok = CLIPTokenizer.from_pretrained(TINY_SD15, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(TINY_SD15, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(TINY_SD15, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(TINY_SD15, subfolder="unet")
    sched = DDPMScheduler.from_pretrained(TINY_SD15, subfolder="scheduler")
    for m in (te, vae, unet):
        m.requires_grad_(False)
    cn = ControlNetModel.from_pretrained(TINY_CN_A)
    cn.train()
    opt = torch.optim.AdamW(cn.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lines = [json.loads(l) for l in open(os.path.join(dataset, "prompt.json"))]

    def load(path, norm):
        img = Image.open(os.path.join(dataset, path)).convert("RGB").resize((args.resolution,) * 2, Image.BILINEAR)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
        return (x - 0.5) / 0.5 if norm else x

    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    # One more update than timed: the first one warms torch up (lazy initialisation, allocator).
    for step in range(steps + 1):
        if step == 1:
            t = time.perf_counter()
        rows = [lines[(step * args.batch + i) % len(lines)] for i in range(args.batch)]
        pixels = torch.stack([load(r["target"], True) for r in rows])
        cond = torch.stack([load(r["source"], False) for r in rows])
        prompts = [r["prompt"] if torch.rand((), generator=g) >= 0.5 else "" for r in rows]
        ids = tok(prompts, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=g) * vae.config.scaling_factor
            ehs = te(ids)[0]
        noise = torch.randn(latents.shape, generator=g)
        ts = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=g)
        noisy = sched.add_noise(latents, noise, ts)
        down, mid = cn(noisy, ts, encoder_hidden_states=ehs, controlnet_cond=cond, return_dict=False)
        pred = unet(noisy, ts, encoder_hidden_states=ehs, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cn.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--binary", default=os.path.join(REPO, "target", "release", "controlnet"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n1", type=int, default=3)
    p.add_argument("--n2", type=int, default=13)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = os.path.join(tmp, "circles")
        subprocess.run([args.binary, "dataset", "circles", "--count", "32", "--size", str(args.resolution),
                        "--output", dataset, "--quiet"], check=True, stdout=subprocess.DEVNULL)
        r1 = rust_run(args.binary, dataset, os.path.join(tmp, "r1"), args.n1, args)
        r2 = rust_run(args.binary, dataset, os.path.join(tmp, "r2"), args.n2, args)
        t = torch_loop(dataset, args.n2 - args.n1, args)
    samples = (args.n2 - args.n1) * args.batch
    ours, theirs = samples / (r2 - r1), samples / t
    print(json.dumps({"batch": args.batch, "resolution": args.resolution, "threads": args.threads,
                      "controlnet_rs_samples_per_s": round(ours, 3), "diffusers_samples_per_s": round(theirs, 3),
                      "ratio": round(ours / theirs, 3)}))


if __name__ == "__main__":
    main()
