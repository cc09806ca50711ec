"""Plots the soak's RSS curve as a PNG (no plotting library: a few lines of zlib), prints its
figures, and with --check fails on growth in the second half or failed requests."""
import json, struct, sys, zlib

csv, png, title, run = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
check = "--check" in sys.argv
rows = [tuple(map(int, l.split(","))) for l in open(csv).read().split("\n")[1:] if l.strip()]
t = [r[0] for r in rows]
rss = [r[1] / 1024 for r in rows]  # MiB
n = len(rss)
q = lambda a, b: sum(rss[int(n * a):max(int(n * b), int(n * a) + 1)]) / max(1, max(int(n * b), int(n * a) + 1) - int(n * a))
second, last = q(0.25, 0.5), q(0.75, 1.0)
growth = (last - second) / second * 100
stats = json.loads(run)
print(f"RSS MiB: start {rss[0]:.1f}, peak {max(rss):.1f}, second quarter {second:.1f}, "
      f"last quarter {last:.1f} ({growth:+.1f}%); requests {stats.get('requests')}, "
      f"failed {stats.get('non_2xx_or_errors', 0)}")

W, H, M = 640, 320, 30
img = [[(255, 255, 255)] * W for _ in range(H)]
top = max(rss) * 1.1 or 1
def px(i, v):
    x = M + int((W - 2 * M) * (t[i] - t[0]) / max(1, t[-1] - t[0]))
    y = H - M - int((H - 2 * M) * v / top)
    return x, y
for x in range(M, W - M):
    img[H - M][x] = (0, 0, 0)
for y in range(M, H - M):
    img[y][M] = (0, 0, 0)
for mib in range(0, int(top) + 1, max(1, int(top) // 5)):  # grid lines every ~fifth
    y = H - M - int((H - 2 * M) * mib / top)
    for x in range(M, W - M, 4):
        img[y][x] = (200, 200, 200)
for i in range(1, n):
    (x0, y0), (x1, y1) = px(i - 1, rss[i - 1]), px(i, rss[i])
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    for s in range(steps + 1):
        x, y = x0 + (x1 - x0) * s // steps, y0 + (y1 - y0) * s // steps
        for dy in (0, 1):
            if 0 <= y + dy < H:
                img[y + dy][x] = (200, 30, 30)
raw = b"".join(b"\0" + bytes(c for p in row for c in p) for row in img)
chunk = lambda k, d: struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d) & 0xFFFFFFFF)
open(png, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
                      + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
print(f"wrote {png} ({title}; y: 0 to {top:.0f} MiB, grid every {max(1, int(top) // 5)} MiB; x: {t[-1]} s)")
if check and (growth > 10 or stats.get("non_2xx_or_errors", 0) > 0):
    sys.exit(f"soak check failed: RSS grew {growth:+.1f}% in the second half, {stats.get('non_2xx_or_errors', 0)} failed")
