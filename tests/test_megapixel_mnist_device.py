"""Device-side Megapixel MNIST: same placements -> the same pixels as the CPU generator;
the fast training path built on it (the ``accel.device_data`` option of
ats_wsi.experiments.megapixel_mnist, pieces in ats_wsi.experiments.device_protocol) on CPU.

Run on CPU: every comparison is exact (``torch.equal``), since the device renderer uses the
CPU generator's own resized pieces and the same float32 arithmetic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ats_wsi.baselines import BaselineCNN
from ats_wsi.config import ConfigError
from ats_wsi.datasets.megapixel_mnist import MegapixelMNIST
from ats_wsi.datasets.megapixel_mnist_device import (
    DeviceLoader,
    DeviceMegapixelMNIST,
    PlacementPatchSource,
)
from ats_wsi.datasets.mnist import DigitPool
from ats_wsi.experiments import megapixel_mnist as experiment
from ats_wsi.experiments.device_protocol import FullImageFeatureNet, accelerate_, count_macs
from ats_wsi.model import ATSModel
from ats_wsi.nets import build_feature_net
from ats_wsi.patches import PatchSource, TensorPatchSource


@pytest.fixture(scope="module")
def pool() -> DigitPool:
    # Textured "digits" (random grey levels in a blob) so that resampling and every pixel
    # value matter; 8 per class.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 8)
    yy, xx = np.mgrid[:28, :28]
    images = np.zeros((len(labels), 28, 28), np.uint8)
    for i in range(len(labels)):
        cy, cx, r = rng.uniform(9, 19), rng.uniform(9, 19), rng.uniform(5, 10)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        images[i][blob] = rng.integers(1, 256, blob.sum())
    return DigitPool(images, labels.astype(np.int64), "synthetic-textured")


def _dense(pool: DigitPool, order: str, **kw: object) -> MegapixelMNIST:
    """Small canvas with much noise: pieces overlap, so paste order is exercised."""
    args = dict(canvas_size=(150, 190), scale=0.2, n_noise=40, noise_order=order, seed=5)
    args.update(kw)
    return MegapixelMNIST(pool, 12, **args)


@pytest.mark.parametrize("order", ["after", "before"])
def test_canvases_and_low_view_match_cpu_generator(pool: DigitPool, order: str) -> None:
    ds = _dense(pool, order)
    dev = DeviceMegapixelMNIST(ds)
    idx = torch.arange(len(ds))
    low = dev.render_low(idx)[:, 0].numpy()
    high_u8 = dev.render_high(idx, "uint8")[:, 0].numpy()
    high_f = dev.render_high(idx, "float32")[:, 0].numpy()
    assert high_u8.dtype == np.uint8 and high_f.dtype == low.dtype == np.float32
    for i in range(len(ds)):
        np.testing.assert_array_equal(low[i], ds.render_low(i))
        np.testing.assert_array_equal(high_u8[i], ds.render_high_uint8(i))
        np.testing.assert_array_equal(high_f[i], ds.render_high(i))


def test_paste_order_is_reproduced(pool: DigitPool) -> None:
    # Not vacuous: with this much noise the two orders give different canvases, and the
    # device renderer follows each one.
    after, before = _dense(pool, "after"), _dense(pool, "before")
    a = DeviceMegapixelMNIST(after).render_high(range(12))
    b = DeviceMegapixelMNIST(before).render_high(range(12))
    assert not torch.equal(a, b)
    assert np.array_equal(a[3, 0].numpy(), after.render_high_uint8(3))


def _boxes(dev: DeviceMegapixelMNIST, idx: torch.Tensor, n: int, p: int) -> torch.Tensor:
    """Boxes near pieces (digits and noise), some reaching or lying outside the canvas."""
    g = torch.Generator().manual_seed(1)
    pos = dev.pos[idx]
    pick = torch.randint(0, pos.shape[1], (len(idx), n), generator=g)
    centre = pos.gather(1, pick[..., None].expand(-1, -1, 2)) + 14
    tl = centre - p // 2 + torch.randint(-p, p, (len(idx), n, 2), generator=g)
    tl[:, 0] = torch.tensor([-p - 3, -p - 3])  # wholly outside
    tl[:, 1] = torch.tensor([-5, dev.canvas_size[1] - p + 9])  # partly outside
    return tl


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("p", [50, 13])
def test_patches_equal_cuts_from_the_cpu_canvas(pool: DigitPool, dtype: str, p: int) -> None:
    ds = _dense(pool, "after")
    dev = DeviceMegapixelMNIST(ds)
    idx = torch.tensor([7, 0, 3, 11, 5])
    src = dev.patch_source(idx, p, dtype)
    assert isinstance(src, PatchSource) and src.shape == (150, 190) and src.patch_size == p
    tl = _boxes(dev, idx, 24, p)
    render = ds.render_high_uint8 if dtype == "uint8" else ds.render_high
    canvas = torch.from_numpy(np.stack([render(int(i)) for i in idx]))[:, None]
    expected = TensorPatchSource(canvas, p).extract(tl)
    got = src.extract(tl)
    assert got.dtype == torch.float32 and got.shape == (5, 24, 1, p, p)
    assert torch.equal(got, expected)
    assert float(got.sum()) > 0 and not bool(got[:, 0].any())  # content; empty outside


def test_ats_forward_same_with_either_source(pool: DigitPool) -> None:
    ds = _dense(pool, "after")
    dev = DeviceMegapixelMNIST(ds)
    idx = torch.arange(4)
    x_low = torch.from_numpy(np.stack([ds.render_low(i) for i in range(4)]))[:, None]
    x_high = torch.from_numpy(np.stack([ds.render_high_uint8(i) for i in range(4)]))[:, None]
    torch.manual_seed(0)
    model = ATSModel.from_config(
        {
            "attention_net": "mnist",
            "feature_net": {"name": "mnist", "width": 8},
            "num_classes": 10,
            "n_patches": 5,
            "patch_size": 20,
        }
    )
    a = model(x_low, x_high, generator=torch.Generator().manual_seed(3))
    b = model(
        dev.render_low(idx), dev.patch_source(idx, 20), generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a.locations, b.locations)
    assert torch.equal(a.patches, b.patches) and float(a.patches.sum()) > 0
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


@pytest.mark.parametrize("target", ["majority", "top", "multi"])
def test_labels_match(pool: DigitPool, target: str) -> None:
    ds = _dense(pool, "after", target=target)
    dev = DeviceMegapixelMNIST(ds)
    for i in range(len(ds)):
        y = ds[i][2]
        got = dev.labels[i]
        if target == "multi":
            assert torch.equal(got, y)
        else:
            assert int(got) == y


def test_loader_shuffles_reproducibly_and_covers_every_item(pool: DigitPool) -> None:
    dev = DeviceMegapixelMNIST(_dense(pool, "after"))
    runs = []
    for _ in range(2):
        loader = DeviceLoader(dev, 5, shuffle=True, generator=torch.Generator().manual_seed(4))
        runs.append([b for b in loader])
    assert len(loader) == 3 and [len(b[2]) for b in runs[0]] == [5, 5, 2]
    order = torch.cat([b[1].idx for b in runs[0]])
    assert sorted(order.tolist()) == list(range(12)) and order.tolist() != list(range(12))
    assert torch.equal(order, torch.cat([b[1].idx for b in runs[1]]))
    x_low, src, y = runs[0][0]
    assert x_low.shape == (5, 1, 30, 38) and isinstance(src, PlacementPatchSource)
    assert torch.equal(y, dev.labels[src.idx])
    low, high, _ = DeviceLoader(dev, 4, views="high").__iter__().__next__()
    assert low.numel() == 0 and high.shape == (4, 1, 150, 190) and high.dtype == torch.uint8
    low, high, _ = next(iter(DeviceLoader(dev, 4, views="low")))
    assert low.shape == (4, 1, 30, 38) and high.numel() == 0


def test_subset_and_errors(pool: DigitPool) -> None:
    ds = _dense(pool, "after")
    dev = DeviceMegapixelMNIST(ds, n_items=3)
    assert len(dev) == 3
    with pytest.raises(ValueError, match="n_items"):
        DeviceMegapixelMNIST(ds, n_items=13)
    with pytest.raises(ValueError, match="dtype"):
        dev.render_high([0], "float16")
    with pytest.raises(ValueError, match="top_left"):
        dev.patch_source([0, 1], 10).extract(torch.zeros(3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="views"):
        dev.batch([0], views="canvas")


# ----------------------------------------------------------------------------- fast path


TINY = """\
seed: 0
device: cpu
data:
  canvas_size: 200
  n_noise: 4
  n_train: 32
  n_test: 16
  high_dtype: uint8
model:
  feature_net_args: {width: 8}
  n_patches: 4
  patch_size: 24
train:
  epochs: 2
  batch_size: 16
  lr: 3.0e-3
  eval_every: 1
baselines:
  low_res_cnn: {width: 8, depth: 2, epochs: 1}
  full_res_cnn: {width: 8, depth: 3, stem_stride: 2, epochs: 1}
report:
  n_figures: 1
accel:
  device_data: true
  amp: bf16
  channels_last: true
  compile: true
  cost_batch_sizes: [2]
  cost_repeats: 1
"""


def _tiny(tmp_path: Path, text: str = TINY) -> dict:
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return experiment.load_config(str(path))


def test_accelerate_is_a_noop_on_cpu_and_bf16_when_forced() -> None:
    torch.manual_seed(0)
    cnn = BaselineCNN(1, 10, width=8, depth=2)
    x = torch.rand(3, 1, 40, 40)
    ref = cnn(x)
    active = accelerate_(cnn, "cpu", amp="bf16", channels_last=True, compile=True)
    assert active == {"amp": None, "channels_last": False, "compile": False}
    assert "forward" not in vars(cnn)  # nothing patched: CPU results stay as they are
    assert torch.equal(cnn(x), ref)
    keys = list(cnn.state_dict())
    active = accelerate_(cnn, "cpu", amp="bf16", channels_last=True, on_cpu=True)
    assert active["amp"] == "bf16" and active["channels_last"]
    out = cnn(x)
    # bf16 keeps ~3 significant digits: the logits move by well under 2 % of their scale,
    # but they do move (the autocast is really on).
    assert out.dtype == torch.float32 and list(cnn.state_dict()) == keys
    err = float((out - ref).abs().max().detach())
    assert 0 < err < 0.02 * float(ref.abs().max().detach())
    out.sum().backward()
    assert cnn.body[0].weight.grad.dtype == torch.float32


def test_full_image_feature_net_and_mac_count() -> None:
    net = build_feature_net("mnist", width=8)
    full = FullImageFeatureNet(net, 10)
    x = torch.rand(2, 1, 40, 50)
    assert full(x).shape == (2, 10)
    h, w, expected = 40, 50, 0
    for k, cin in ((7, 1), (3, 8), (3, 8), (3, 8)):  # 'valid' convs of the mnist feature net
        h, w = h - k + 1, w - k + 1
        expected += h * w * 8 * cin * k * k
    assert count_macs(full, lambda: full(x)) == 2 * (expected + 8 * 10)


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, dict]:
    """One tiny run of the fast path on CPU (ATS 2 epochs, both CNNs 1), shared by the tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is fastest on a shared CI machine
    try:
        tmp = tmp_path_factory.mktemp("fast")
        cfg = _tiny(tmp)
        return cfg, tmp / "run", experiment.run(cfg, tmp / "run", progress=False)
    finally:
        torch.set_num_threads(before)


def _ats_log(out: Path) -> list[dict]:
    """The ATS metrics log without its timings."""
    recs = [json.loads(line) for line in (out / "ats_metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in recs]


def test_fast_run_writes_results(fast_run: tuple[dict, Path, dict]) -> None:
    _, out, res = fast_run
    assert res["complete"]
    assert res["accel"] == {"amp": None, "channels_last": False, "compile": False}  # CPU
    assert set(res["models"]) == {"ats", "low_res_cnn", "full_res_cnn"}
    for m in res["models"].values():
        assert m["train_samples_per_s"] > 0 and 0 <= m["test_error"] <= 1
    assert [r["epoch"] for r in _ats_log(out)] == [1, 2]
    costs = {r["model"]: r for r in res["step_costs"]}
    assert set(costs) == {"ats", "full_image_features", "full_res_cnn", "low_res_cnn"}
    # The same feature net over the whole 200 px canvas does far more arithmetic than on
    # 4 patches of 24 px: (194^2 + ...) vs 4 * (18^2 + ...) multiply-adds, > 20x.
    assert costs["full_image_features"]["forward_gmacs_per_sample_vs_ats"] > 20
    assert costs["ats"]["train_ms_per_sample"] > 0
    assert res["models"]["ats"]["cost"][0]["model"] == "ats"
    for fig in ("figures/test_error.png", "figures/ats_test_00.png", "results.json"):
        assert (out / fig).stat().st_size > 0


def test_fast_run_resumes(
    fast_run: tuple[dict, Path, dict], tmp_path: Path, one_thread: None
) -> None:
    cfg, out, _ = fast_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    first = _ats_log(copy)
    cfg = json.loads(json.dumps(cfg))
    cfg["train"]["epochs"] = 3
    cfg["baselines"]["low_res_cnn"]["epochs"] = 1  # already done: nothing to train
    res = experiment.run(cfg, copy, resume_run=True, progress=False)
    log = _ats_log(copy)
    assert log[:2] == first and [r["epoch"] for r in log] == [1, 2, 3]
    assert res["models"]["ats"]["epochs_completed"] == 3


def test_fast_run_is_deterministic_on_cpu(
    fast_run: tuple[dict, Path, dict], tmp_path: Path, one_thread: None
) -> None:
    cfg, out, _ = fast_run
    cfg = json.loads(json.dumps(cfg))
    cfg["baselines"]["low_res_cnn"]["enabled"] = False  # ATS trains first: same log without
    cfg["baselines"]["full_res_cnn"]["enabled"] = False
    cfg["accel"]["cost_sizes"], cfg["accel"]["cost_batch_sizes"] = [100], [1]
    experiment.run(cfg, tmp_path / "again", progress=False)
    again = _ats_log(tmp_path / "again")
    assert again == _ats_log(out) and again[0]["train_loss"] > 0


def test_costs_only_on_the_experiment_cli(tmp_path: Path, one_thread: None) -> None:
    from pipelines import megapixel_mnist as pipe

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "costs"
    args = ["--config", str(config), "--out", str(out), "--device", "cpu", "--costs-only"]
    assert pipe.main([*args, "--sizes", "100", "--batch", "1", "--repeats", "1"]) == 0
    rows = json.loads((out / "step_costs.json").read_text())["rows"]
    assert [(r["model"], r["canvas"], r["batch"]) for r in rows] == [
        (m, 100, 1) for m in ("ats", "full_image_features", "full_res_cnn", "low_res_cnn")
    ]
    assert not (out / "results.json").exists()  # nothing trained


def test_accel_settings_need_device_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="accel.amp' needs 'accel.device_data: true'"):
        _tiny(tmp_path, TINY.replace("  device_data: true\n", "  device_data: false\n"))
    cfg = _tiny(tmp_path, TINY.split("accel:")[0])  # no accel block: the DataLoader path
    assert cfg["accel"]["device_data"] is False


@pytest.mark.slow
def test_gpu_check_script_on_cpu_runs_and_resumes(tmp_path: Path) -> None:
    """scripts/gpu_check.sh end to end on CPU with the tiny config, then again resuming from
    the archive it wrote: at most 8 files come back, the second call continues the epochs."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    mnist = repo.parent / "shared" / "data" / "mnist"
    if not mnist.is_dir():
        pytest.skip("no MNIST t10k files beside the checkout")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "CONFIG": str(config),
        "DEVICE": "cpu",
        "BENCH": "0",
        "MNIST_DIR": str(mnist),
        "RUN_DIR": str(tmp_path / "run"),
        "OMP_NUM_THREADS": "1",
    }
    script = repo / "scripts" / "gpu_check.sh"
    first = tmp_path / "out1"
    subprocess.run(["bash", str(script)], env={**env, "OUT": str(first)}, check=True, timeout=600)
    files = sorted(p.name for p in first.iterdir())
    assert len(files) <= 8 and {"results.json", "run.tar.gz", "gpu_check.log"} <= set(files)
    res = json.loads((first / "results.json").read_text())
    assert res["models"]["ats"]["epochs_completed"] == 2 and "t10k" in res["data"]["train_source"]
    config.write_text(TINY.replace("  epochs: 2\n", "  epochs: 4\n"))
    second = tmp_path / "out2"
    env2 = {**env, "OUT": str(second), "RESUME_FROM": str(first / "run.tar.gz")}
    env2["RUN_DIR"] = str(tmp_path / "run2")
    subprocess.run(["bash", str(script)], env=env2, check=True, timeout=600)
    log = [json.loads(x) for x in (second / "ats_metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert "resuming from" in (second / "gpu_check.log").read_text()
