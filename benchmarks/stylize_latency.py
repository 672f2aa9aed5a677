"""Stylize latency of a face photo through `stylecast serve`, split into its stages: decode, alignment (dlib
detection + 68 landmarks + FFHQ crop), encoder (pSp IR-SE50 on the 256 px crop), synthesis, paste-back and
image encoding, as the server reports them in StylizeResponse.timings, plus the client's wall time.

    python -m benchmarks.stylize_latency [--size 1024] [--photo astronaut] [--requests 10] [--out runs/bench]

The bundle is the real architecture with random weights (config-f generator at --size, the official pSp
GradualStyleEncoder on IR-SE50 at 256 px), built once into --cache; the photo is scikit-image's astronaut
(512x512) or matplotlib's Grace Hopper (512x600). The server is a separate process with --max-queue-delay-ms 0
(a lone client; no batching wait). Requests are sequential. Writes stylize_latency.json / .md to --out and one
JSON line to benchmarks/results/stylize-<device>-<date>.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.server_overhead import ROOT, Server, percentiles

STAGES = ("decode_ms", "align_ms", "encoder_ms", "synthesis_ms", "composite_ms", "encode_ms", "total_ms")


def build_face_bundle(path: Path, size: int, seed: int = 0) -> Path:
    """A config-f generator at `size` px and an official-architecture pSp encoder, random weights."""
    import torch

    from export.bundle import BundleOptions, build_bundle
    from training.checkpoints import save_native
    from training.inversion.encoders import EncoderConfig, build_encoder, save_encoder
    from training.networks import Generator, GeneratorConfig

    torch.manual_seed(seed)
    G = Generator(GeneratorConfig.rosinality(size, 2)).eval()
    enc = build_encoder(EncoderConfig.official("psp", size)).eval()
    with torch.no_grad():
        enc.latent_avg.copy_(G.mapping.w_avg.expand_as(enc.latent_avg))
    with tempfile.TemporaryDirectory(prefix="stylecast-bench-src-") as work:
        ckpt = save_native(Path(work) / "g", G)
        enc_dir = save_encoder(Path(work) / "enc", enc)
        return build_bundle(ckpt, path, BundleOptions(name="face", encoder=enc_dir), progress=True)


def photo_bytes(name: str) -> tuple[bytes, tuple[int, int]]:
    from PIL import Image
    if name == "astronaut":
        from skimage import data
        arr = data.astronaut()
    elif name == "grace_hopper":
        import matplotlib.cbook as cbook
        arr = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
    else:
        arr = np.asarray(Image.open(name).convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue(), (arr.shape[1], arr.shape[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="generator resolution")
    ap.add_argument("--photo", default="astronaut", help="astronaut | grace_hopper | a file")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads in the server (0 = its default)")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench" / "bundles")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = ap.parse_args(argv)

    bundle = args.cache / f"face-{args.size}"
    if not bundle.exists():
        print(f"building {bundle} (random weights; once)", file=sys.stderr)
        build_face_bundle(bundle, args.size)
    repo = Path(tempfile.mkdtemp(prefix="stylecast-bench-"))
    (repo / "face").symlink_to(bundle.resolve())
    data, (pw, ph) = photo_bytes(args.photo)

    from serving.client import StyleClient
    extra = ["--max-queue-delay-ms", "0"] + (["--threads", str(args.threads)] if args.threads else [])
    load_before = os.getloadavg()[0]
    srv = Server(repo, *extra)
    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    wall: list[float] = []
    try:
        with StyleClient(f"127.0.0.1:{srv.port}", timeout=600) as c:
            for i in range(args.warmup + args.requests):
                t0 = time.perf_counter()
                resp = c.stylize_raw(c.stylize_request("face", data))
                dt = (time.perf_counter() - t0) * 1000
                assert resp.image.data[:4] == b"\x89PNG" and len(resp.faces) == 1
                if i >= args.warmup:
                    wall.append(dt)
                    for k in STAGES:
                        stages[k].append(getattr(resp.timings, k))
    finally:
        srv.stop()
        (repo / "face").unlink()
        repo.rmdir()
    load_after = os.getloadavg()[0]
    res = {k: percentiles(v) for k, v in stages.items()}
    res["client_wall_ms"] = percentiles(wall)
    meta = {"kind": "stylize", "device": "cpu", "size": args.size, "photo": args.photo, "photo_size": [pw, ph],
            "encoder": "pSp GradualStyleEncoder IR-SE50 256 px (random weights)",
            "generator": f"config-f {args.size} px (random weights)", "requests": args.requests,
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "loadavg_1min_before_after": [load_before, load_after],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m benchmarks.stylize_latency " + " ".join(argv if argv is not None else sys.argv[1:])}
    names = {"decode_ms": "decode photo (PNG)", "align_ms": "alignment (dlib detect + landmarks + FFHQ crop)",
             "encoder_ms": "encoder (pSp, 256 px crop -> W+)", "synthesis_ms": f"synthesis ({args.size} px)",
             "composite_ms": "paste-back", "encode_ms": "encode image (PNG)", "total_ms": "server total",
             "client_wall_ms": "client wall time"}
    lines = [f"Stylize, one {pw}x{ph} photo ({args.photo}), paste-back, PNG out; {meta['generator']}, "
             f"{meta['encoder']}; {args.requests} sequential requests after {args.warmup} warm-up, "
             f"`--max-queue-delay-ms 0`, {os.cpu_count()} CPU cores, 1-min load {load_before:.1f} -> {load_after:.1f}",
             "", "| stage | p50 ms | p90 ms | share of server total (p50) |", "|---|---|---|---|"]
    total = res["total_ms"]["p50_ms"]
    for k in (*STAGES, "client_wall_ms"):
        share = f"{100 * res[k]['p50_ms'] / total:.0f}%" if k not in ("total_ms", "client_wall_ms") else ""
        lines.append(f"| {names[k]} | {res[k]['p50_ms']:.1f} | {res[k]['p90_ms']:.1f} | {share} |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stylize_latency.json").write_text(json.dumps({"meta": meta, "results": res}, indent=2) + "\n")
    (args.out / "stylize_latency.md").write_text(table)
    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with open(results_dir / f"stylize-cpu-{stamp}.jsonl", "a") as f:
        f.write(json.dumps({**meta, "results": res}) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
