"""The server-only install from a clean clone (deploy/install.sh, which the images run): no torch, a working
`stylecast serve` / `client` / `export verify`, the same pixels as the development install; and the wheel and sdist
built from a clean clone carry the generated gRPC modules.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("protos/stylecast/v1/style_pb2.py", "protos/stylecast/v1/style_pb2_grpc.py",
             "protos/stylecast/v1/common_pb2.py", "protos/inference/grpc_service_pb2.py",
             "protos/inference/grpc_service_pb2_grpc.py", "protos/inference/model_config_pb2.py")
# What the server-only install must not hold (training, export, GPU stacks, dev tools).
ABSENT = ("torch", "torchvision", "open_clip", "onnx", "safetensors", "tensorrt", "tensorrt_rtx", "dlib",
          "grpc_tools", "pytest", "tritonclient")
CPU_VENV_LIMIT_MB = 300


def clean_env() -> dict[str, str]:
    """The environment of a shell outside this checkout's dev setup (no PYTHONPATH pointing at the tree)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def dir_mb(path: Path) -> float:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


@pytest.fixture(scope="module")
def server_only_venv(clean_clone, tmp_path_factory) -> Path:
    """deploy/install.sh of the clean clone into a fresh venv: the server-only install."""
    venv = tmp_path_factory.mktemp("server-only") / "venv"
    r = subprocess.run(["sh", str(clean_clone / "deploy" / "install.sh"), "--venv", str(venv),
                        "--python", sys.executable, str(clean_clone)], env=clean_env(), capture_output=True,
                       text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return venv


def run(venv: Path, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "stylecast"), *args], cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_server_only_install_serves_like_the_dev_install(server_only_venv, demo_models, replica_factory,
                                                         free_ports, tmp_path):
    venv = server_only_venv
    py = venv / "bin" / "python"
    found = subprocess.run([str(py), "-c", "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] "
                            "if u.find_spec(m)))", *ABSENT], env=clean_env(), cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert found.returncode == 0 and found.stdout.split() == [], found.stdout + found.stderr
    r = subprocess.run([str(py), "-c", "import torch"], env=clean_env(), cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    size = dir_mb(venv)
    print(f"server-only CPU venv: {size:.0f} MB")
    assert size < CPU_VENV_LIMIT_MB, f"server-only venv is {size:.0f} MB"

    # the CLI: help lists everything, serve/client work, a torch command names its extra in one line
    r = run(venv, "--help", cwd=tmp_path)
    assert r.returncode == 0 and "serve" in r.stdout and "train" in r.stdout, r.stderr
    r = run(venv, "info", "x.pt", cwd=tmp_path)
    assert r.returncode == 2 and 'pip install "stylecast[train]"' in r.stderr and "Traceback" not in r.stderr

    p = free_ports(4)
    mine = replica_factory(demo_models, p[0], p[1], "--threads", "1", command=[str(venv / "bin" / "stylecast")],
                           env={**clean_env(), "PYTHONUNBUFFERED": "1"}, cwd=tmp_path).start().wait_ready()
    dev = replica_factory(demo_models, p[2], p[3], "--threads", "1").start().wait_ready()
    from serving.client import StyleClient
    seeds = list(range(8))
    for kw in ({"fmt": "png"}, {"fmt": "raw"}, {"fmt": "png", "psi": 0.5}, {"fmt": "jpeg", "quality": 90}):
        with StyleClient(mine.target) as a, StyleClient(dev.target) as b:
            assert [im.data for im in a.generate("demo", seeds=seeds, **kw)] == \
                [im.data for im in b.generate("demo", seeds=seeds, **kw)], kw
    out = tmp_path / "out"
    r = run(venv, "client", "generate", "--server", mine.target, "--model", "demo", "--seeds", "0-3", "--outdir",
            str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with StyleClient(dev.target) as b:
        assert [(out / f"seed{s:04d}.png").read_bytes() for s in range(4)] == \
            [im.data for im in b.generate("demo", seeds=[0, 1, 2, 3])]
    r = run(venv, "client", "list", "--server", mine.target, cwd=tmp_path)
    assert r.returncode == 0 and "demo" in r.stdout and "ready" in r.stdout, r.stderr
    mine.sigterm()
    assert mine.wait(30) == 0


def test_server_only_export_verify(server_only_venv, demo_models, tmp_path):
    r = run(server_only_venv, "export", "verify", str(demo_models / "demo"), cwd=tmp_path)
    assert r.returncode == 0 and "verified" in r.stdout, r.stdout + r.stderr


def test_wheel_and_sdist_carry_the_generated_modules(clean_clone, tmp_path):
    """`python -m build` (isolated: the build hook gets the pinned grpcio-tools) from a clean clone, which has no
    generated module: the sdist and the wheel built from it both hold them, compiled by the pinned version."""
    tracked = subprocess.run(["git", "ls-files"], cwd=clean_clone, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if "_pb2" in f], "generated modules are committed"
    assert not list((clean_clone / "protos").rglob("*_pb2*.py"))
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(clean_clone)], env=clean_env(),
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        grpc_module = z.read("protos/stylecast/v1/style_pb2_grpc.py").decode()
        pb_module = z.read("protos/stylecast/v1/style_pb2.py").decode()
    assert set(GENERATED) <= names, sorted(set(GENERATED) - names)
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]
        in_sdist = {n.removeprefix(top + "/") for n in t.getnames()}
    assert set(GENERATED) <= in_sdist and "setup.py" in in_sdist and "protos/stylecast/v1/style.proto" in in_sdist
    assert not list((clean_clone / "protos").rglob("*_pb2*.py")), "the build wrote generated modules into the tree"

    # The gencode matches the pins: grpcio-tools (build) == the grpcio floor, its protobuf gencode <= the floor.
    meta = tomllib.loads((clean_clone / "pyproject.toml").read_text())
    tools = next(r for r in meta["build-system"]["requires"] if r.startswith("grpcio-tools"))
    deps = meta["project"]["dependencies"]
    assert tools.startswith("grpcio-tools==")
    tools_version = tools.split("==")[1]
    assert f"GRPC_GENERATED_VERSION = '{tools_version}'" in grpc_module
    assert f"grpcio>={tools_version}" in deps
    gencode = re.search(r"Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", pb_module).groups()
    (protobuf,) = [d for d in deps if d.startswith("protobuf")]
    floor = tuple(int(x) for x in re.search(r">=(\d+)\.(\d+)\.(\d+)", protobuf).groups())
    ceiling = int(re.search(r"<(\d+)", protobuf).group(1))
    assert floor >= tuple(int(x) for x in gencode) and ceiling == int(gencode[0]) + 1, (protobuf, gencode)
