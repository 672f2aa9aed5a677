"""The whole photo path a user takes, through the console script only (~45 s on 2 cores).

A tiny base generator saved as a rosinality .pt and random VGG weight files stand in for the real downloads:
train an encoder -> finetune on a style folder -> DualStyleGAN destylize -> pretrain -> finetune -> refine ->
export a face bundle and a dualstylegan bundle -> `stylecast serve` -> `stylecast client styles / stylize /
generate` -> `stylecast stylize` on the bundle gives the server's bytes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parent.parent


def _prepare(root: Path) -> None:
    import torch
    from PIL import Image
    from skimage import data

    from training.checkpoints import save_rosinality
    from training.generate import generate_images
    from training.inversion.losses import build_vgg16_trunk
    from training.networks import Generator, GeneratorConfig
    from training.style.vgg import build_vgg19_trunk

    cfg = GeneratorConfig.tiny(resolution=32, w_dim=64, max_channels=64, min_channels=32, mapping_layers=2)
    torch.manual_seed(0)
    G = Generator(cfg).eval()
    save_rosinality(root / "base.pt", G)
    (root / "styles").mkdir()
    for i, im in enumerate(generate_images(G, [3, 4, 5, 6], psi=0.5)):
        Image.fromarray(255 - im).save(root / "styles" / f"s{i}.png")
    for name, trunk in (("vgg19", build_vgg19_trunk(37)), ("vgg16", build_vgg16_trunk())):
        g = torch.Generator().manual_seed(0)
        sd = {"features." + k: torch.randn(v.shape, generator=g) * (0.0 if k.endswith("bias") else
                                                                     (2.0 / v[0].numel()) ** 0.5)
              for k, v in trunk.state_dict().items()}
        torch.save(sd, root / f"{name}.pth")
    Image.fromarray(data.astronaut()).save(root / "astronaut.png")


def _run(root: Path, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STYLECAST_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "stylecast", *args], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"stylecast {' '.join(args)}\n{r.stdout}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def _only(root: Path, pattern: str) -> Path:
    (p,) = sorted(root.glob(pattern))
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_encoder_dualstylegan_bundles_server_and_local_stylize(tmp_path):
    from PIL import Image
    root = tmp_path
    _prepare(root)
    _run(root, "train", "encoder", "-g", "base.pt", "--arch", "tiny", "--synthetic", "--steps", "4", "--batch", "2",
         "--input-size", "32", "--vgg16-weights", "vgg16.pth", "--id", "none", "--id-lambda", "0",
         "--snapshot-every", "4", "--outdir", "runs", "--no-progress")
    encoder = _only(root, "runs/*-encoder/snapshots/000004")
    _run(root, "train", "finetune", "--checkpoint", "base.pt", "--data", "styles", "--kimg", "0.008", "--batch", "2",
         "--snapshot-kimg", "0.008", "--outdir", "runs", "--no-progress")
    finetuned = _only(root, "runs/*-finetune-styles/network-snapshot-000000008")
    _run(root, "train", "dualstylegan", "destylize", "--base", "base.pt", "--finetuned", str(finetuned), "--data",
         "styles", "--encoder", str(encoder), "--id", "none", "--vgg16-weights", "vgg16.pth", "--iters", "5",
         "--outdir", "runs", "--no-progress")
    codes = _only(root, "runs/*-dualstylegan-destylize-styles")
    _run(root, "train", "dualstylegan", "pretrain", "-c", "base.pt", "--iters", "10", "--batch", "2",
         "--vgg-weights", "vgg19.pth", "--snapshot-every", "12", "--sample-every", "0", "--outdir", "runs",
         "--no-progress")
    pretrained = _only(root, "runs/*-dualstylegan-pretrain/network-snapshot-000012")
    _run(root, "train", "dualstylegan", "finetune", "-c", str(pretrained), "--data", "styles", "--codes", str(codes),
         "--discriminator", str(finetuned), "--iters", "6", "--batch", "2", "--id", "none", "--vgg-weights",
         "vgg19.pth", "--snapshot-begin", "6", "--snapshot-every", "6", "--sample-every", "0", "--outdir", "runs",
         "--no-progress")
    dual = _only(root, "runs/*-dualstylegan-finetune-styles/network-snapshot-000006")
    _run(root, "train", "dualstylegan", "refine", "-c", str(dual), "--data", "styles", "--codes", str(codes),
         "--iters", "3", "--vgg-weights", "vgg19.pth", "--vgg16-weights", "vgg16.pth", "--outdir", "runs",
         "--no-progress")
    refined = _only(root, "runs/*-dualstylegan-refine-styles/refined_exstyle_code.npy")
    _run(root, "export", "bundle", "--checkpoint", "base.pt", "--out", "models/face", "--name", "face", "--encoder",
         str(encoder))
    _run(root, "export", "dualstyle-bundle", "-c", str(dual), "-s", str(refined), "-o", "models/toon", "--name",
         "toon", "--encoder-from", "models/face")

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "stylecast", "serve", "--models", "models", "--port", str(port),
                               "--metrics-port", "0", "--reload-interval", "0"], cwd=root, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        target = f"127.0.0.1:{port}"
        for _ in range(120):
            try:
                if "toon" in _run(root, "client", "list", "--server", target):
                    break
            except AssertionError:
                pass
            time.sleep(0.5)
        listing = _run(root, "client", "list", "--server", target)
        assert "face" in listing and "toon" in listing and "4 styles" in listing, listing
        styles = _run(root, "client", "styles", "--server", target, "--model", "toon")
        assert "s2.png" in styles
        _run(root, "client", "stylize", "--server", target, "--model", "toon", "--style-id", "2", "--outdir", "out",
             "astronaut.png")
        _run(root, "client", "stylize", "--server", target, "--model", "face", "--outdir", "out", "astronaut.png")
        _run(root, "client", "generate", "--server", target, "--model", "toon", "--seeds", "0-1", "--style-id", "1",
             "--outdir", "out")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert server.returncode == 0, server.stderr.read()[-2000:]
    _run(root, "stylize", "-m", "models/toon", "-i", "astronaut.png", "--style-id", "2", "--out", "out/local.png")
    served = np.asarray(Image.open(root / "out" / "astronaut.toon.png"))
    local = np.asarray(Image.open(root / "out" / "local.png"))
    assert served.shape == local.shape == (512, 512, 3) and np.array_equal(served, local)
    photo = np.asarray(Image.open(root / "astronaut.png"))
    for name in ("astronaut.toon.png", "astronaut.face.png"):
        out = np.asarray(Image.open(root / "out" / name))
        assert out.shape == photo.shape and not np.array_equal(out, photo)  # the face was replaced
    assert (root / "out" / "seed0000.png").is_file() and (root / "out" / "seed0001.png").is_file()
