"""The fast stylizer (Johnson et al.): any-size forward, ONNX export with dynamic H and W, training on a tiny
folder lowers the loss, resume is bit-identical to an uninterrupted run, corrupt / empty folders."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch

from training.style.data import ContentStream, find_images
from training.style.fast_style import (FastStyleConfig, TransformerNet, TransformerNetConfig, build_transformer_net,
                                       latest_checkpoint, load_fast_style, save_fast_style, style_targets,
                                       train_fast_style)
from training.style.losses import total_loss

TINY = TransformerNetConfig(channels=8, res_blocks=1)


def tiny_config(files, **kw) -> FastStyleConfig:
    base = dict(style=str(files["style"]), data=str(files["data"]), image_size=16, style_size=24, batch_size=2,
                learning_rate=1e-3, style_weight=3000.0, iterations=4, checkpoint_every=2, preview_every=3,
                preview_count=2,
                channels=8, res_blocks=1, content_layers=("relu2_2",), style_layers=("relu1_2", "relu2_2"))
    base.update(kw)
    return FastStyleConfig(**base)


@pytest.mark.parametrize("h, w", [(5, 5), (33, 47), (31, 18), (64, 64), (17, 6)])
def test_output_size_equals_input_size(h, w):
    net = build_transformer_net(TINY)
    out = net(torch.rand(2, 3, h, w) * 2 - 1)
    assert out.shape == (2, 3, h, w)
    assert out.abs().max() <= 1
    with pytest.raises(ValueError, match="at least 5x5"):
        net(torch.zeros(1, 3, 4, 9))


def test_default_architecture_is_johnsons():
    net = TransformerNet()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs[:3]] == [(32, 3, 9, 9), (64, 32, 3, 3), (128, 64, 3, 3)]
    assert tuple(convs[-1].weight.shape) == (3, 32, 9, 9)
    assert len(net.res) == 5
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())
    assert sum(isinstance(m, torch.nn.InstanceNorm2d) for m in net.modules()) == 2 * 5 + 5


def test_onnx_export_runs_at_other_sizes():
    """Export-friendly: the legacy exporter with dynamic N, H, W; ONNX Runtime at odd sizes matches eager."""
    import onnxruntime as ort
    net = build_transformer_net(TINY).eval()
    buf = io.BytesIO()
    axes = {0: "n", 2: "h", 3: "w"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 20, 24),), buf, input_names=["img"], output_names=["img_out"],
                          dynamic_axes={"img": axes, "img_out": axes}, opset_version=17, dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 33, 47), (1, 3, 18, 31)]:
        x = torch.rand(*shape) * 2 - 1
        y = sess.run(None, {"img": x.numpy()})[0]
        assert y.shape == shape
        np.testing.assert_allclose(y, net(x).detach().numpy(), atol=1e-4)


def test_find_images_and_corrupt_files(image_files, tmp_path):
    files = find_images(image_files["data"])
    rel = [p.relative_to(image_files["data"]).as_posix() for p in files]
    assert rel == ["a.png", "d.PNG", "nested/b.jpg", "nested/broken.jpg", "nested/deeper/c.webp", "nested/e.jpeg"]
    stream = ContentStream(files, image_size=16, batch_size=3, seed=0)
    with pytest.warns(UserWarning, match="broken.jpg"):
        batches = [stream.next_batch() for _ in range(4)]  # 12 images = 2 epochs of 5 good + 1 bad
    assert all(b.shape == (3, 3, 16, 16) for b in batches)
    assert stream.bad == {str(image_files["data"] / "nested" / "broken.jpg")}
    assert stream.state_dict()["epoch"] == 2  # the bad file was skipped and counted once per epoch, warned once
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        find_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "missing")
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "x.png").write_bytes(b"nope")
    bad = ContentStream(find_images(tmp_path / "allbad"), image_size=16, batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="could be read"):
            bad.next_batch()


def test_stream_resumes_in_the_same_order(image_files):
    files = find_images(image_files["data"])
    a = ContentStream(files, 16, 2, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = [a.next_batch() for _ in range(5)]
        b = ContentStream(files, 16, 2, seed=5, workers=2)
        [b.next_batch() for _ in range(2)]
        c = ContentStream(files, 16, 2, seed=5)
        c.load_state_dict(json.loads(json.dumps(b.state_dict())))
        rest = [c.next_batch() for _ in range(3)]
        b.close()
    for x, y in zip(ref[2:], rest):
        assert torch.equal(x, y)


def _fixed_batch_loss(net, cfg, vgg, batch) -> dict[str, float]:
    weights = cfg.loss_weights()
    with torch.no_grad():
        out = net(batch)
        parts = total_loss(out, vgg(out, weights.layers), vgg(batch, list(weights.content)),
                           style_targets(cfg, vgg), weights)
    return {k: float(v) for k, v in parts.items()}


def test_training_lowers_the_loss_and_resume_is_identical(image_files, vgg, tmp_path):
    cfg = tiny_config(image_files, iterations=6)
    files = find_images(image_files["data"])
    with pytest.warns(UserWarning, match="broken.jpg"):
        batch = ContentStream(files, 16, 4, seed=123).next_batch()
    before = _fixed_batch_loss(build_transformer_net(cfg.net_config(), seed=cfg.seed), cfg, vgg, batch)

    losses: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = train_fast_style(cfg, tmp_path / "full", vgg, progress=False,
                                on_step=lambda step, parts: losses.append(parts["total"]))
    assert len(losses) == 6
    after = _fixed_batch_loss(full, cfg, vgg, batch)
    assert after["total"] < 0.8 * before["total"], (before, after)
    assert after["style"] < before["style"] and after["content"] < before["content"], (before, after)

    class Interrupted(Exception):
        pass

    def crash(step, parts):
        if step == 3:
            raise Interrupted

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Interrupted):
            train_fast_style(cfg, tmp_path / "part", vgg, progress=False, on_step=crash)
        assert latest_checkpoint(tmp_path / "part").name == "step0000002"
        assert not (tmp_path / "part" / "final").exists()
        resumed = train_fast_style(cfg, tmp_path / "part", vgg, resume=True, progress=False, workers=2)
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    # Both runs wrote the same artefacts; the run directory loads as its final network.
    run = tmp_path / "part"
    assert sorted(p.name for p in (run / "previews").iterdir()) == ["step0000003.png", "step0000006.png"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step0000002", "step0000004", "step0000006"]
    doc = json.loads((run / "config.json").read_text())
    assert doc["format"] == "stylecast.fast_style_run/v1" and FastStyleConfig.from_dict(doc["config"]) == cfg
    loaded = load_fast_style(run)
    x = torch.rand(1, 3, 11, 13) * 2 - 1
    assert torch.equal(loaded(x), resumed(x))
    with pytest.raises(ValueError, match="already finished"):
        train_fast_style(cfg, run, vgg, resume=True, progress=False)
    with pytest.raises(ValueError, match="config differs"):
        train_fast_style(tiny_config(image_files, iterations=7), run, vgg, resume=True, progress=False)


def test_save_and_load_checkpoint_errors(tmp_path):
    net = build_transformer_net(TINY, seed=1)
    save_fast_style(tmp_path / "m", net)
    assert set(p.name for p in (tmp_path / "m").iterdir()) == {"config.json", "model.safetensors"}
    torch.testing.assert_close(load_fast_style(tmp_path / "m").state_dict(), net.state_dict(), rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        save_fast_style(tmp_path / "m", net)
    with pytest.raises(FileNotFoundError):
        load_fast_style(tmp_path / "none")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="corrupt"):
        load_fast_style(tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    doc["format"] = "stylecast.generator/v1"
    (tmp_path / "m" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not a fast stylizer"):
        load_fast_style(tmp_path / "m")


def test_bad_training_inputs_write_nothing(image_files, vgg, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = tiny_config(image_files, data=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no images"):
        train_fast_style(cfg, tmp_path / "run1", vgg, progress=False)
    assert not any((tmp_path / "run1").iterdir())
    (tmp_path / "style.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read image"):
        train_fast_style(tiny_config(image_files, style=str(tmp_path / "style.jpg")), tmp_path / "run2", vgg,
                         progress=False)
    assert not any((tmp_path / "run2").iterdir())
    with pytest.raises(ValueError, match="too small"):
        tiny_config(image_files, image_size=16, style_layers=("pool5",))


@pytest.mark.gpu
def test_cuda_matches_cpu_and_trains(image_files, vgg, tmp_path):
    """On CUDA: the stylizer agrees with the CPU forward, and a tiny training run completes and resumes."""
    import copy
    net = build_transformer_net(TINY, seed=2)
    x = torch.rand(2, 3, 33, 47) * 2 - 1
    ref = net(x)
    got = copy.deepcopy(net).cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    vgg_cuda = copy.deepcopy(vgg).cuda()
    cfg = tiny_config(image_files, iterations=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = train_fast_style(cfg, tmp_path / "run", vgg_cuda, progress=False)
    assert next(trained.parameters()).is_cuda
    assert load_fast_style(tmp_path / "run", device="cuda")(x.cuda()).shape == x.shape
