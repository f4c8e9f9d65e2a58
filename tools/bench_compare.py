"""Runs `controlnet bench` and tools/bench_torch.py on the same configs, one after the other (never both at
once: they would share the cores), and prints a markdown table with ours/torch ratios for the README.

Each run's JSON goes to --out (default target/bench/) as `{rust,torch}_{preset}_{latent}_b{batch}.json`;
`--table-only` prints the table from the files already there (for runs made in the background).

With --train the two time a ControlNet training update instead (`controlnet bench --train`,
`bench_torch.py --train`); those reports are `{rust,torch}_train_{preset}_{latent}_b{batch}.json` and get their own
table.

Usage: python3 tools/bench_compare.py --latent 32 64 [--preset sd15] [--batch 2] [--iters 3] [--skip-vae]
       python3 tools/bench_compare.py --train --latent 32 --batch 1
       python3 tools/bench_compare.py --table-only [--train]
"""
import argparse
import datetime
import glob
import json
import os
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_PYTHON = os.path.join(REPO, ".venv-ref", "bin", "python")
ROWS = [
    ("UNet + ControlNet step", "unet_controlnet_step_s"),
    ("UNet", "unet_step_s"),
    ("ControlNet", "controlnet_s"),
    ("ControlNet hint embedding", "controlnet_embed_s"),
    ("VAE decode (1 image)", "vae_decode_s"),
]


def run(cmd, path):
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return report


def gib(n):
    return f"{n / 2**30:.2f} GiB" if n else "–"


def secs(r, key):
    v = r.get(key)
    return f"{v:.2f}" if isinstance(v, (int, float)) else "–"


def footer(pairs, warmup, timed):
    """The line under a table: machine, date, repetitions, both implementations."""
    any_rs, any_th = next(iter(pairs.values()))
    runs = ", ".join(f"{p} {8 * l}px b{b}: {rs['iters']} (rs) / {th['iters']} (torch)"
                     for (p, l, b), (rs, th) in sorted(pairs.items()))
    warmup = f"warm-up {warmup}" if warmup else "warm-up"
    return (f"Machine: {any_rs['machine']}, {any_rs['cpus']} CPUs, {any_rs['threads']} threads, f32; "
            f"{datetime.date.today().isoformat()}. Medians after one {warmup} of {runs} {timed}. "
            f"controlnet-rs: {any_rs['implementation']}; torch: {any_th['implementation']}.")


TRAIN_ROWS = [
    ("training update", "train_step_s"),
    ("forward", "forward_s"),
    ("backward", "backward_s"),
    ("clip + AdamW", "optimizer_s"),
]


def train_table(pairs):
    lines = [
        "| config | measurement | controlnet-rs | diffusers/torch | ratio rs/torch |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for (preset, latent, batch), (rs, th) in sorted(pairs.items()):
        name = f"{preset} {8 * latent}px b{batch}"
        for label, key in TRAIN_ROWS:
            a, b = rs.get(key), th.get(key)
            ratio = f"{a / b:.2f}" if a and b else "–"
            lines.append(f"| {name} | {label} (s) | {secs(rs, key)} | {secs(th, key)} | {ratio} |")
        a, b = rs.get("peak_rss_bytes"), th.get("peak_rss_bytes")
        lines.append(f"| {name} | peak RSS | {gib(a)} | {gib(b)} | " + (f"{a / b:.2f}" if a and b else "–") + " |")
        loads = lambda r: f"{r.get('load_before', float('nan')):.1f} → {r.get('load_after', float('nan')):.1f}"
        lines.append(f"| {name} | load average before → after | {loads(rs)} | {loads(th)} | |")
    lines += ["", footer(pairs, "update", "timed updates")]
    return "\n".join(lines)


def table(pairs):
    lines = [
        "| config | measurement | controlnet-rs (s) | diffusers/torch (s) | ratio rs/torch | rs GFLOP/s | torch GFLOP/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (preset, latent, batch), (rs, th) in sorted(pairs.items()):
        name = f"{preset} {8 * latent}px b{batch}"
        for label, key in ROWS:
            a, b = rs.get(key), th.get(key)
            if a is None and b is None:
                continue
            ratio = f"{a / b:.2f}" if a and b else "–"
            rate = key[:-2].replace("_step", "") if key != "unet_controlnet_step_s" else "unet_controlnet_step"
            ga = rs.get("gflops_per_s", {}).get(rate)
            gb = th.get("gflops_per_s", {}).get(rate)
            fmt = lambda g: f"{g:.0f}" if g else "–"
            if key == "controlnet_s":
                label += " (torch: with hint embedding)"
            lines.append(f"| {name} | {label} | {secs(rs, key)} | {secs(th, key)} | {ratio} | {fmt(ga)} | {fmt(gb)} |")
        lines.append(
            f"| {name} | peak RSS (UNet+ControlNet) | {gib(rs.get('peak_rss_unet_controlnet_bytes'))} | "
            f"{gib(th.get('peak_rss_unet_controlnet_bytes'))} | "
            + (f"{rs['peak_rss_unet_controlnet_bytes'] / th['peak_rss_unet_controlnet_bytes']:.2f}"
               if rs.get('peak_rss_unet_controlnet_bytes') and th.get('peak_rss_unet_controlnet_bytes') else "–")
            + " | | |"
        )
        loads = lambda r: f"{r.get('load_before', float('nan')):.1f} → {r.get('load_after', float('nan')):.1f}"
        lines.append(f"| {name} | load average before → after | {loads(rs)} | {loads(th)} | | | |")
        if rs.get("peak_rss_vae_bytes") or th.get("peak_rss_vae_bytes"):
            lines.append(f"| {name} | peak RSS (VAE) | {gib(rs.get('peak_rss_vae_bytes'))} | "
                         f"{gib(th.get('peak_rss_vae_bytes'))} | | | |")
    lines += ["", footer(pairs, "", "timed runs")]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", nargs="+", default=["sd15"], choices=["sd15", "sd21"])
    ap.add_argument("--latent", nargs="+", type=int, default=[32])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--skip-vae", action="store_true")
    ap.add_argument("--binary", default=os.path.join(REPO, "target", "release", "controlnet"))
    ap.add_argument("--python", default=DEFAULT_PYTHON if os.path.exists(DEFAULT_PYTHON) else sys.executable)
    ap.add_argument("--out", default=os.path.join(REPO, "target", "bench"))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--train", action="store_true", help="time a ControlNet training update instead")
    args = ap.parse_args()
    mode = ["--train"] if args.train else []
    prefix = "train_" if args.train else ""
    os.makedirs(args.out, exist_ok=True)
    if not args.table_only:
        for preset in args.preset:
            for latent in args.latent:
                common = ["--preset", preset, "--latent", str(latent), "--batch", str(args.batch),
                          "--iters", str(args.iters)] + mode
                if args.skip_vae and not args.train:
                    common.append("--skip-vae")
                tag = f"{prefix}{preset}_{latent}_b{args.batch}"
                run([args.binary, "bench", "--json"] + common, os.path.join(args.out, f"rust_{tag}.json"))
                run([args.python, os.path.join(REPO, "tools", "bench_torch.py")] + common,
                    os.path.join(args.out, f"torch_{tag}.json"))
    pairs = {}
    pattern = "rust_train_*.json" if args.train else "rust_*.json"
    for path in glob.glob(os.path.join(args.out, pattern)):
        if not args.train and os.path.basename(path).startswith("rust_train_"):
            continue
        twin = path.replace("rust_", "torch_")
        if os.path.exists(twin):
            with open(path) as f, open(twin) as g:
                rs, th = json.load(f), json.load(g)
            pairs[(rs["preset"], rs["latent"], rs["batch"])] = (rs, th)
    if not pairs:
        sys.exit(f"no pairs of rust_{prefix}*/torch_{prefix}* reports in {args.out}")
    print(train_table(pairs) if args.train else table(pairs))


if __name__ == "__main__":
    main()
