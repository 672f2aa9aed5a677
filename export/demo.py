"""The built-in demo bundle: an UNTRAINED, random-initialised StyleGAN2 generator (torch.manual_seed(0)), small
enough that the server answers one seed in a few tens of milliseconds on 2 CPU cores. It draws abstract colour
fields, not faces: it exists so that `make serve` works on a fresh clone with nothing downloaded.

Usage: python -m export.demo --out demo/models/demo      (does nothing when the bundle already exists)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

DESCRIPTION = ("untrained random-initialised demo generator (torch.manual_seed(0), 128 px, w_dim 256): "
               "abstract colour fields, not a trained model")
DEMO_NAME = "demo"


def demo_config():
    from training.networks import GeneratorConfig
    return GeneratorConfig.tiny(resolution=128, w_dim=256, max_channels=256, min_channels=32, mapping_layers=8)


def build_demo_generator():
    """The deterministic demo generator: seed 0 init, noise strength 0.1, w_avg = mean of 4096 mapped z."""
    import torch

    from training.networks import Generator
    torch.manual_seed(0)
    G = Generator(demo_config()).eval()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.1)
        z = torch.randn(4096, G.z_dim, generator=torch.Generator().manual_seed(1))
        G.mapping.w_avg.copy_(G.mapping(z).mean(0))  # so that truncation (psi) pulls towards a real mean
    return G.requires_grad_(False)


def build_demo_bundle(out: str | Path, quiet: bool = False) -> Path:
    """Write the demo bundle to `out` atomically (the bundle writer's all-or-nothing directory); returns out. An
    existing `out` is left alone. Its golden outputs are checked by the server before it serves the bundle."""
    from export.bundle import BundleOptions, build_bundle
    from training.checkpoints import save_native

    out = Path(out)
    if out.exists():
        if not quiet:
            print(f"{out} exists; keeping it")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # The checkpoint is written under a hidden temporary directory next to `out` (the server ignores hidden
    # directories) and removed afterwards.
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        ckpt = save_native(work / "checkpoint", build_demo_generator(), meta={"description": DESCRIPTION})
        build_bundle(ckpt, out, BundleOptions(name=DEMO_NAME, default_psi=0.7, description=DESCRIPTION))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(f"wrote demo bundle {out} ({DESCRIPTION})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo/models/demo", help="bundle directory to create")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    build_demo_bundle(args.out, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
