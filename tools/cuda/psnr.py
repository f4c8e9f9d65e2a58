"""PSNR (dB) between two 8-bit PNG images, with only the standard library (the GPU machine may lack Pillow).

Usage: python3 tools/cuda/psnr.py OURS.png THEIRS.png   -> prints the PSNR over the RGB channels
"""
import math
import struct
import sys
import zlib


def read_png(path):
    """(width, height, rows of RGB bytes) of a non-interlaced 8-bit grey/RGB/RGBA PNG."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour, _, _, interlace = header
    channels = {0: 1, 2: 3, 6: 4}.get(colour)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"{path}: only 8-bit grey/RGB/RGBA non-interlaced PNGs are read")
    raw, stride, bpp = zlib.decompress(idat), width * channels, channels
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line[x * channels + min(k, channels - 1)] for x in range(width) for k in range(3)))
        prev = line
    return width, height, rows


def psnr(a, b):
    wa, ha, ra = read_png(a)
    wb, hb, rb = read_png(b)
    if (wa, ha) != (wb, hb):
        raise ValueError(f"sizes differ: {a} is {wa}x{ha}, {b} is {wb}x{hb}")
    se = sum((x - y) ** 2 for la, lb in zip(ra, rb) for x, y in zip(la, lb))
    mse = se / (wa * ha * 3)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


if __name__ == "__main__":
    print(f"{psnr(sys.argv[1], sys.argv[2]):.2f}")
