"""Training-data throughput: the same JPEG pairs read from WebDataset shards and from a folder dataset.

Generates COUNT pairs of SIZE-px JPEGs (a smooth gradient with a few discs as the target, their outlines as the
condition; ~20-40 kB each, like photos of that size) once into WORK/folder (metadata.jsonl) and WORK/shards
(tar shards of SHARD samples, the same bytes), then times `controlnet bench --dataset` on each: every example
decoded, resized and centre-cropped to 512 px and made a tensor as `train` reads it, no model. Each run is its own
process, so its peak RSS (VmHWM) is that source's alone; reading a tenth and all of the data shows whether memory
stays flat.

    python3 tools/bench_dataset.py [--count 10000] [--work /tmp/bench-data] [--binary target/release/controlnet]

Prints a markdown table (docs/training.md keeps the measured one).
"""
import argparse
import io
import json
import pathlib
import subprocess
import tarfile

import numpy as np
from PIL import Image, ImageDraw


def pair(i, size, rng):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0, 255, 3)
    tilt = rng.uniform(-80, 80, (2, 3))
    img = base + x[..., None] * tilt[0] + y[..., None] * tilt[1]
    target = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    cond = Image.new("RGB", (size, size))
    dt, dc = ImageDraw.Draw(target), ImageDraw.Draw(cond)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, size, 2).tolist() + [float(rng.uniform(size / 16, size / 4))]
        box = [cx - r, cy - r, cx + r, cy + r]
        dt.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        dc.ellipse(box, outline=(255, 255, 255), width=3)
    return target, cond


def jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def generate(work, count, size, shard):
    folder, shards = work / "folder", work / "shards"
    done = work / f"done-{count}-{size}"
    if done.exists():
        return
    (folder / "images").mkdir(parents=True, exist_ok=True)
    shards.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines, sink = [], None
    for i in range(count):
        if i % shard == 0:
            if sink:
                sink.close()
            sink = tarfile.open(shards / f"train-{i // shard:05d}.tar", "w")
        target, cond = pair(i, size, rng)
        parts = {"jpg": jpeg(target), "cond.jpg": jpeg(cond), "txt": f"picture {i}".encode()}
        (folder / "images" / f"{i:06d}.jpg").write_bytes(parts["jpg"])
        (folder / "images" / f"{i:06d}.cond.jpg").write_bytes(parts["cond.jpg"])
        lines.append(
            json.dumps(
                {"image": f"images/{i:06d}.jpg", "conditioning_image": f"images/{i:06d}.cond.jpg", "text": f"picture {i}"}
            )
        )
        for ext, data in parts.items():
            info = tarfile.TarInfo(f"{i:06d}.{ext}")
            info.size = len(data)
            sink.addfile(info, io.BytesIO(data))
    sink.close()
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    done.write_text("ok\n")


def bench(binary, dataset, samples, workers):
    cmd = [binary, "bench", "--dataset", dataset, "--data-samples", str(samples), "--latent", "64", "--batch", "4",
           "--data-workers", str(workers), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--shard", type=int, default=1000)
    ap.add_argument("--work", default="/tmp/bench-data")
    ap.add_argument("--binary", default="target/release/controlnet")
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()
    work = pathlib.Path(a.work)
    generate(work, a.count, a.size, a.shard)
    nshards = (a.count + a.shard - 1) // a.shard
    sources = [("folder (metadata.jsonl)", str(work / "folder")),
               ("WebDataset shards", str(work / "shards" / f"train-{{00000..{nshards - 1:05d}}}.tar"))]
    print(f"| source | examples read | samples/s | peak RSS (MiB) |")
    print(f"| --- | ---: | ---: | ---: |")
    machine = ""
    for name, path in sources:
        for n in (a.count // 10, a.count):
            r = bench(a.binary, path, n, a.workers)
            machine = r["machine"]
            label = f"{name}, {r['workers']} decoding threads" if "shards" in name else name
            print(f"| {label} | {r['samples']} | {r['samples_per_second']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    print(f"\nmachine: {machine}; {a.count} pairs of {a.size}-px JPEGs, read at 512 px, batch 4")


if __name__ == "__main__":
    main()
