"""Fixtures for the neural style tests: a random-weight VGG19 (real layer indices), small real images, a
tiny image folder and a random VGG19 weights file in torchvision's layout (no download ever happens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# Every layer the Gatys and fast-style defaults use (relu5_1 is the deepest: 30 of the 37 layers).
ALL_LAYERS = ("relu1_1", "relu1_2", "relu2_1", "relu2_2", "relu3_1", "relu3_3", "relu4_1", "relu4_2",
              "relu4_3", "relu5_1")


@pytest.fixture(autouse=True)
def _no_downloads_one_thread(monkeypatch, tmp_path_factory):
    """Tests never download (offline mode, an empty torch hub dir, no weights variable) and run torch on one
    thread: on 32 px tensors OpenMP synchronisation costs more than it saves, badly so on a busy machine."""
    import torch

    monkeypatch.setenv("STYLECAST_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty-torch-home")))  # fresh per test
    monkeypatch.delenv("STYLECAST_VGG19_WEIGHTS", raising=False)
    monkeypatch.delenv("STYLECAST_DEBUG", raising=False)  # CLI tests expect one-line errors, not tracebacks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vgg():
    from training.style.vgg import random_vgg19
    return random_vgg19(ALL_LAYERS, seed=0)


@pytest.fixture(scope="session")
def astronaut_u8() -> np.ndarray:
    """scikit-image's astronaut (public domain), 64x48 (H x W, a non-square crop), uint8 [H, W, 3]."""
    from PIL import Image
    from skimage import data
    return np.asarray(Image.fromarray(data.astronaut()[:, 64:448]).resize((48, 64), Image.Resampling.BILINEAR))


@pytest.fixture(scope="session")
def hopper_u8() -> np.ndarray:
    """matplotlib's grace_hopper.jpg, 40x32, uint8 [H, W, 3]."""
    from matplotlib import cbook
    from PIL import Image
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        im = Image.open(f).convert("RGB")
        return np.asarray(im.resize((32, 40), Image.Resampling.BILINEAR))


@pytest.fixture(scope="session")
def content(astronaut_u8):
    from training.style.images import from_uint8
    return from_uint8(astronaut_u8)


@pytest.fixture(scope="session")
def style(hopper_u8):
    from training.style.images import from_uint8
    return from_uint8(hopper_u8)


@pytest.fixture(scope="session")
def image_files(tmp_path_factory, astronaut_u8, hopper_u8) -> dict[str, Path]:
    """content.png, style.png and a data/ folder: 5 crops (png/jpg/webp, nested), a corrupt jpg, a text file."""
    from PIL import Image
    root = tmp_path_factory.mktemp("style-images")
    Image.fromarray(astronaut_u8).save(root / "content.png")
    Image.fromarray(hopper_u8).save(root / "style.png")
    data = root / "data"
    (data / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.RandomState(0)
    names = ["a.png", "nested/b.jpg", "nested/deeper/c.webp", "d.PNG", "nested/e.jpeg"]
    for name in names:
        y, x = rng.randint(0, 24, 2)
        Image.fromarray(astronaut_u8[y:y + 40, x:x + 24]).save(data / name)
    (data / "nested" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (data / "notes.txt").write_text("not an image")
    return {"content": root / "content.png", "style": root / "style.png", "data": data}


@pytest.fixture(scope="session")
def vgg_weights_file(tmp_path_factory) -> Path:
    """A random VGG19 in torchvision's full layout (features.N.* + classifier.*), saved with torch.save."""
    import torch

    from training.style.vgg import random_vgg19, vgg19_state_dict
    net = random_vgg19(["relu5_4"], seed=1)
    sd = {f"features.{k}": v for k, v in vgg19_state_dict(net).items()}
    sd["classifier.6.bias"] = torch.zeros(1000)  # a full state dict also has the classifier: ignored
    path = tmp_path_factory.mktemp("vgg") / "vgg19-random.pth"
    torch.save(sd, path)
    return path
