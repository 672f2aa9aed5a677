"""The image-folder dataset: formats, EXIF, crops, corrupt files, empty folders, the stateless order."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from training.finetune import ImageFolderDataset
from training.finetune.dataset import DatasetWarning


def test_scan_skips_and_counts_corrupt_files(red_folder):
    with pytest.warns(DatasetWarning, match="broken.jpg"):
        ds = ImageFolderDataset(red_folder, 16)
    assert len(ds) == 12 and ds.num_skipped == 1
    assert any(p.parent.name == "sub" for p in ds.files)  # recursive
    x = ds.batch(0, 5)
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x[:, 0].mean() > 0.5 and x[:, 1].mean() < -0.5  # reddish


def test_exif_orientation_and_modes(tmp_path):
    a = np.zeros((20, 30, 3), np.uint8)
    a[:, :15] = (255, 0, 0)  # left half red
    a[:, 15:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left half ends up on top
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif, quality=100)
    rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent: composited on white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(np.full((16, 16), 80, np.uint8), "L").save(tmp_path / "grey.bmp")
    Image.fromarray(np.full((40, 16, 3), 10, np.uint8)).save(tmp_path / "tall.webp", lossless=True)
    ds = ImageFolderDataset(tmp_path, 16)
    imgs = {p.name: ds.image(i) for i, p in enumerate(ds.files)}
    rot = imgs["rot.jpg"].astype(int)
    assert rot[1, 8, 0] > 200 and rot[1, 8, 2] < 60  # top: red
    assert rot[14, 8, 2] > 200 and rot[14, 8, 0] < 60  # bottom: blue
    assert (imgs["alpha.png"] == 255).all()
    assert (imgs["grey.bmp"] == 80).all() and imgs["grey.bmp"].shape == (16, 16, 3)
    assert (imgs["tall.webp"] == 10).all()


def test_no_readable_images_fails_clearly(tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    (tmp_path / "b.jpg").write_bytes(b"")
    (tmp_path / "readme.md").write_text("x")
    with pytest.warns(DatasetWarning):
        want = rf"^no readable images in {re.escape(str(tmp_path))} \(2 files tried\)$"
        with pytest.raises(ValueError, match=want):
            ImageFolderDataset(tmp_path, 16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"\(0 files tried\)"):
        ImageFolderDataset(empty, 16)
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "missing", 16)


def test_order_is_stateless_and_mirrored(red_folder):
    with pytest.warns(DatasetWarning):
        ds = ImageFolderDataset(red_folder, 16, mirror=True, seed=3)
    with pytest.warns(DatasetWarning):
        lazy = ImageFolderDataset(red_folder, 16, mirror=True, seed=3, preload_bytes=0)
    assert lazy._images is None
    whole = ds.batch(5, 30)  # crosses two epoch boundaries (12 images)
    parts = torch.cat([ds.batch(5 + i, 1) for i in range(30)])
    assert torch.equal(whole, parts) and torch.equal(whole, lazy.batch(5, 30))
    perm, flips = ds.order(0)
    assert sorted(perm.tolist()) == list(range(12)) and 0 < flips.sum() < 12
    i = int(np.argmax(flips))
    first = ds.batch(i, 1)[0]
    raw = torch.from_numpy(ds.image(int(perm[i])).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(first, raw.flip(2))
    assert not np.array_equal(ds.order(1)[0], perm)
