"""Runs `controlnet bench` and tools/bench_torch.py on the same configs, one after the other (never both at
once: they would share the cores), and prints a markdown table with ours/torch ratios for the README.

Each run's JSON goes to --out (default target/bench/) as `{rust,torch}_{preset}_{latent}_b{batch}.json`;
`--table-only` prints the table from the files already there (for runs made in the background).

With --train the two time a ControlNet training update instead (`controlnet bench --train`,
`bench_torch.py --train`); those reports are `{rust,torch}_train_{preset}_{latent}_b{batch}.json` and get their own
table.

--rust-dtypes / --torch-dtypes run each implementation in several modes (ours: f32 bf16 auto; torch: f32 bf16
autocast), in one go: the f32 table as before, then per configuration one row per measurement with every
mode's seconds and the ratio of our fastest mode to torch's fastest (reports of other modes than f32 are
`{rust,torch}_{preset}_{latent}_b{batch}_{dtype}.json`). With --train, bf16 is mixed precision on both sides
(`controlnet bench --train --dtype bf16`, `bench_torch.py --train --dtype bf16`: diffusers' --mixed_precision).

Usage: python3 tools/bench_compare.py --latent 32 64 [--preset sd15] [--batch 2] [--iters 3] [--skip-vae]
       python3 tools/bench_compare.py --latent 32 64 --rust-dtypes f32 bf16 --torch-dtypes f32 bf16 autocast
       python3 tools/bench_compare.py --train --latent 32 --batch 1
       python3 tools/bench_compare.py --train --latent 32 --batch 1 --rust-dtypes f32 bf16 --torch-dtypes f32 bf16
       python3 tools/bench_compare.py --latent 64 --iters 2 --rounds 3
       python3 tools/bench_compare.py --table-only [--train]

--rounds N repeats the whole comparison N times, ours and torch's runs alternating, each round's reports in
`--out/round{i}/`, and prints per measurement every round's ratio of our fastest mode to torch's fastest and their
median: on a machine whose speed drifts within minutes (shared VMs), one run of each side can land in different
periods; alternating rounds show the drift and the median ratio is less at its mercy.
"""
import argparse
import datetime
import glob
import json
import os
import statistics
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


def load_modes(out, tag, dtypes, who):
    """The reports of `who` (rust/torch) for one configuration, by mode."""
    reports = {}
    for d in dtypes:
        path = os.path.join(out, f"{who}_{tag}.json" if d == "f32" else f"{who}_{tag}_{d}.json")
        if os.path.exists(path):
            with open(path) as f:
                reports[d] = json.load(f)
    return reports


def modes_table(out, configs, rust_dtypes, torch_dtypes, train=False):
    """Per configuration and measurement: every mode's seconds, then our fastest over torch's fastest (with
    `train`, the training update's rows: bf16 is mixed precision on both sides)."""
    cols = [f"rs {d}" for d in rust_dtypes] + [f"torch {d}" for d in torch_dtypes]
    lines = ["| config | measurement | " + " | ".join(f"{c} (s)" for c in cols) + " | best rs / best torch |",
             "| --- | --- | " + " | ".join("---:" for _ in cols) + " | ---: |"]
    machine = None
    for preset, latent, batch in configs:
        tag = f"{'train_' if train else ''}{preset}_{latent}_b{batch}"
        rs, th = load_modes(out, tag, rust_dtypes, "rust"), load_modes(out, tag, torch_dtypes, "torch")
        machine = machine or next(iter(rs.values()), {}).get("machine")
        name = f"{preset} {8 * latent}px b{batch}"
        rows = (TRAIN_ROWS + [("peak RSS", "peak_rss_bytes")] if train
                else ROWS + [("peak RSS (UNet+ControlNet)", "peak_rss_unet_controlnet_bytes")])
        for label, key in rows:
            vals = [r.get(d, {}).get(key) for r, ds in ((rs, rust_dtypes), (th, torch_dtypes)) for d in ds]
            if all(v is None for v in vals):
                continue
            cell = (lambda v: gib(v)) if key.endswith("bytes") else (lambda v: f"{v:.2f}" if v else "–")
            best = lambda r: min((v.get(key) for v in r.values() if v.get(key)), default=None)
            a, b = best(rs), best(th)
            ratio = f"{a / b:.2f}" if a and b else "–"
            lines.append(f"| {name} | {label} | " + " | ".join(cell(v) for v in vals) + f" | {ratio} |")
        for who, r in (("rs", rs), ("torch", th)):
            for d, rep in r.items():
                if rep.get("kernels"):
                    lines.append(f"| {name} | kernels {who} {d} | {rep['kernels']} |" + " |" * len(cols))
    lines += ["", f"Machine: {machine}; {datetime.date.today().isoformat()}."]
    return "\n".join(lines)


def rounds_table(out, configs, rounds, rust_dtypes, torch_dtypes, train=False):
    """Per configuration and measurement: each round's ratio of our fastest mode to torch's fastest, and the
    medians of both sides' seconds and of the ratios."""
    median = lambda v: statistics.median(v) if v else None
    lines = ["| config | measurement | ratio per round | median rs | median torch | median ratio |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    machine = None
    for preset, latent, batch in configs:
        tag = f"{'train_' if train else ''}{preset}_{latent}_b{batch}"
        name = f"{preset} {8 * latent}px b{batch}"
        per_round = []
        for i in range(1, rounds + 1):
            d = os.path.join(out, f"round{i}")
            per_round.append((load_modes(d, tag, rust_dtypes, "rust"), load_modes(d, tag, torch_dtypes, "torch")))
        machine = machine or next((next(iter(rs.values())).get("machine") for rs, _ in per_round if rs), None)
        memory = ("peak RSS", "peak_rss_bytes") if train else ("peak RSS (UNet+ControlNet)",
                                                                "peak_rss_unet_controlnet_bytes")
        for label, key in (TRAIN_ROWS if train else ROWS) + [memory]:
            # The fastest mode's seconds; for memory, the smallest peak of any mode.
            best = lambda r: min((v.get(key) for v in r.values() if v.get(key)), default=None)
            pairs = [(best(rs), best(th)) for rs, th in per_round]
            ratios = [a / b for a, b in pairs if a and b]
            if not ratios:
                continue
            a = median([a for a, _ in pairs if a])
            b = median([b for _, b in pairs if b])
            cell = gib if key.endswith("bytes") else (lambda v: f"{v:.2f}")
            lines.append(f"| {name} | {label} | " + ", ".join(f"{r:.2f}" for r in ratios)
                         + f" | {cell(a)} | {cell(b)} | {median(ratios):.2f} |")
    lines += ["", f"Machine: {machine}; {datetime.date.today().isoformat()}; {rounds} rounds, ours then torch's in each."]
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
    ap.add_argument("--rust-dtypes", nargs="+", default=["f32"], choices=["f32", "bf16", "f16", "auto"])
    ap.add_argument("--torch-dtypes", nargs="+", default=["f32"], choices=["f32", "bf16", "autocast"])
    ap.add_argument("--rounds", type=int, default=1, help="alternate both sides' runs this many times")
    args = ap.parse_args()
    if args.rounds < 1:
        sys.exit("--rounds: give 1 or more")
    mode = ["--train"] if args.train else []
    prefix = "train_" if args.train else ""
    os.makedirs(args.out, exist_ok=True)
    round_dirs = ([os.path.join(args.out, f"round{i}") for i in range(1, args.rounds + 1)]
                  if args.rounds > 1 else [args.out])
    for out in [] if args.table_only else round_dirs:
        os.makedirs(out, exist_ok=True)
        for preset in args.preset:
            for latent in args.latent:
                common = ["--preset", preset, "--latent", str(latent), "--batch", str(args.batch),
                          "--iters", str(args.iters)] + mode
                if args.skip_vae and not args.train:
                    common.append("--skip-vae")
                tag = f"{prefix}{preset}_{latent}_b{args.batch}"
                for d in args.rust_dtypes:
                    name = f"rust_{tag}.json" if d == "f32" else f"rust_{tag}_{d}.json"
                    run([args.binary, "bench", "--json", "--dtype", d] + common, os.path.join(out, name))
                for d in args.torch_dtypes:
                    name = f"torch_{tag}.json" if d == "f32" else f"torch_{tag}_{d}.json"
                    run([args.python, os.path.join(REPO, "tools", "bench_torch.py"), "--dtype", d] + common,
                        os.path.join(out, name))
    configs = [(p, l, args.batch) for p in args.preset for l in args.latent]
    if args.rounds > 1:
        print(rounds_table(args.out, configs, args.rounds, args.rust_dtypes, args.torch_dtypes, args.train))
        return
    pairs = {}
    pattern = "rust_train_*.json" if args.train else "rust_*.json"
    modes = args.rust_dtypes != ["f32"] or args.torch_dtypes != ["f32"]
    if modes:
        print(modes_table(args.out, configs, args.rust_dtypes, args.torch_dtypes, args.train))
        return
    for path in glob.glob(os.path.join(args.out, pattern)):
        if not args.train and os.path.basename(path).startswith("rust_train_"):
            continue
        if os.path.basename(path).count("_") > 3 + prefix.count("_"):
            continue  # another mode's report (`..._b2_bf16.json`; `train_` adds one)
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
