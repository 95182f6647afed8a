"""Training engine: loss, metrics, atomic checkpoints, weights-only resume, helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ats_wsi import checkpoint
from ats_wsi.benchmarking import PeakMemory
from ats_wsi.checkpoint import load_checkpoint, read_jsonl, save_checkpoint, truncate_jsonl
from ats_wsi.training import (
    FitSettings,
    NonFiniteLossError,
    StepOutput,
    class_balanced_weights,
    compute_loss,
    evaluate,
    fit,
    loader_steps,
    param_groups,
    pick_device,
    recalibrate_batchnorm,
    summarise_history,
)


def _data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorDataset(x, y)


def _forward(model: nn.Module, batch, device) -> StepOutput:
    x, y = batch
    return StepOutput(model(x.to(device)), y.to(device))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    # MultiStepLR keeps a Counter in its state: must survive the weights-only round trip.
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    shuffle = torch.Generator().manual_seed(1)
    loader = DataLoader(_data(), batch_size=8, shuffle=True, generator=shuffle)
    return model, opt, sched, shuffle, loader


def _fit(out: Path, epochs: int, resume: bool = False, **kw):
    model, opt, sched, shuffle, loader = _setup()
    loop = FitSettings(epochs=epochs, **kw)
    hist = fit(
        model,
        opt,
        **loader_steps(
            model,
            opt,
            loader,
            DataLoader(_data(16), batch_size=8),
            forward=_forward,
            progress=False,
        ),
        loop=loop,
        out_dir=out,
        scheduler=sched,
        generators={"shuffle": shuffle},
        config={"lr": 0.05, "nested": {"a": [1, 2]}},
        resume_run=resume,
    )
    return model, hist


def test_loss_parts_and_class_weights() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    loss, parts = compute_loss(StepOutput(logits, y, probs), entropy_lambda=0.1)
    reg = (probs * torch.log(probs + 1e-6)).sum() / 3
    ce = nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(loss, ce + 0.1 * reg)
    assert parts["entropy_reg"] == pytest.approx(float(reg))
    w = class_balanced_weights([0, 1, 1, 1], 3)
    torch.testing.assert_close(w, torch.tensor([4 / 3, 4 / 9, 0.0]))
    wl, _ = compute_loss(StepOutput(logits, y), class_weights=w[:2])
    torch.testing.assert_close(wl, nn.functional.cross_entropy(logits, y, weight=w[:2]))


def test_evaluate_metrics() -> None:
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
        model.bias.zero_()
    m = evaluate(model, DataLoader(_data(), batch_size=5), forward=_forward, progress=False)
    assert m["test_accuracy"] == 1.0 and m["test_balanced_accuracy"] == 1.0
    assert m["test_error"] == 0.0 and m["test_n"] == 32


def test_checkpoint_is_atomic_and_weights_only(tmp_path: Path, monkeypatch) -> None:
    model, opt, sched, shuffle, _ = _setup()
    path = save_checkpoint(
        tmp_path / "c.pt",
        model=model,
        optimizer=opt,
        scheduler=sched,
        epoch=3,
        config={"a": 1},
        generators={"shuffle": shuffle},
    )
    ckpt = torch.load(path, weights_only=True)  # plain types and tensors only
    assert ckpt["epoch"] == 3 and ckpt["config"] == {"a": 1}
    assert ckpt["versions"]["torch"] == torch.__version__
    assert set(ckpt["rng"]) == {"torch", "shuffle"}
    assert oct(path.stat().st_mode & 0o777) != "0o600"  # not the temp file's mode
    before = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, model=model, epoch=4)
    assert path.read_bytes() == before  # the old checkpoint survived the failed write
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # and no temp file was left behind
    assert load_checkpoint(path)["epoch"] == 3


def test_resume_continues_without_duplicate_log_lines(tmp_path: Path) -> None:
    ref_model, ref_hist = _fit(tmp_path / "ref", epochs=5)
    assert [r["epoch"] for r in ref_hist] == [1, 2, 3, 4, 5]

    out = tmp_path / "run"
    _fit(out, epochs=3)
    # A run that died after logging epoch 4 but before checkpointing it: the resumed run must
    # drop that line and redo epoch 4.
    checkpoint.append_jsonl(out / "ats_metrics.jsonl", {"epoch": 4, "train_loss": -1.0})
    model, hist = _fit(out, epochs=5, resume=True)
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in read_jsonl(out / "ats_metrics.jsonl")] == [1, 2, 3, 4, 5]
    # Model, optimizer, scheduler and shuffling state all came back: same result as one run.
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert hist[-1]["lr"] == ref_hist[-1]["lr"] == pytest.approx(0.05 * 0.01)
    for k in ("train_loss", "test_loss"):
        assert hist[-1][k] == pytest.approx(ref_hist[-1][k])

    # Resuming a finished run trains nothing and keeps the log as it is.
    _, again = _fit(out, epochs=5, resume=True)
    assert [r["epoch"] for r in again] == [1, 2, 3, 4, 5]
    # A fresh (non-resumed) run starts a new log.
    _, fresh = _fit(out, epochs=1)
    assert [r["epoch"] for r in fresh] == [1]


def test_time_budget_stops_after_a_checkpointed_epoch(tmp_path: Path) -> None:
    _, hist = _fit(tmp_path, epochs=50, time_budget_s=0.0)
    assert [r["epoch"] for r in hist] == [1]
    assert load_checkpoint(tmp_path / "ats_checkpoint.pt")["epoch"] == 1


def test_truncate_jsonl_and_torn_last_line(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    for e in (1, 2, 3):
        checkpoint.append_jsonl(p, {"epoch": e})
    with open(p, "a") as fh:
        fh.write('{"epoch": 4, "tr')  # interrupted write
    assert [r["epoch"] for r in read_jsonl(p)] == [1, 2, 3]
    assert truncate_jsonl(p, 2) == 2
    assert p.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


def test_peak_memory_cpu() -> None:
    with PeakMemory() as mem:
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # 4 MiB
        del a, b
        c = torch.ones(512, 1024)  # 2 MiB, after the others were freed
        _ = c.view(-1)  # a view allocates nothing
    assert mem.peak == 8 * 2**20


def test_param_groups_scale_only_the_head() -> None:
    model = nn.Sequential()
    model.add_module("body", nn.Linear(3, 4))
    model.add_module("head", nn.Linear(4, 2))
    rest, head = param_groups(model, 1e-3, 10.0)
    assert [p.shape for p in rest["params"]] == [(4, 3), (4,)]
    assert [p.shape for p in head["params"]] == [(2, 4), (2,)]
    assert (rest["lr"], head["lr"]) == (1e-3, pytest.approx(1e-2))


def test_summarise_history_reports_the_last_evaluation() -> None:
    history = [
        {"epoch": 1, "train_time_s": 2.0, "train_loss": 1.0, "train_accuracy": 0.5},
        {"epoch": 2, "train_time_s": 2.0, "train_loss": 0.5, "train_accuracy": 0.7,
         "test_error": 0.3, "test_accuracy": 0.7},
        {"epoch": 3, "train_time_s": 2.0, "train_loss": 0.4, "train_accuracy": 0.8},
    ]  # fmt: skip
    s = summarise_history(history, epochs=4, n_train=10)
    assert (s["epochs_planned"], s["epochs_completed"]) == (4, 3)
    assert (s["test_error"], s["test_evaluated_at_epoch"], s["best_test_error"]) == (0.3, 2, 0.3)
    assert s["final_train_loss"] == 0.4 and s["train_wall_time_s"] == 6.0
    assert s["train_time_per_sample_ms"] == pytest.approx(200.0)
    assert summarise_history([], 4, 10)["epochs_completed"] == 0


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected


class _BNNet(nn.Module):
    """Linear -> BatchNorm1d -> Linear, plus a buffer that every training-mode call moves."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        return self.head(self.bn(self.fc(x)))


def test_recalibrate_batchnorm_sets_the_plain_average_and_touches_nothing_else() -> None:
    torch.manual_seed(0)
    model = _BNNet().eval()
    model.bn.running_mean.fill_(5.0)  # stale statistics, as after a fast weight change
    model.bn.running_var.fill_(9.0)
    model.bn.num_batches_tracked.fill_(100)
    batches = list(DataLoader(_data(24), batch_size=8))
    n = recalibrate_batchnorm(model, batches, forward=_forward)
    assert n == 3 and not model.training
    with torch.no_grad():
        feats = [model.fc(x) for x, _ in batches]
    # momentum=None: the running stats are the mean of the per-batch mean / unbiased variance.
    want_mean = torch.stack([f.mean(0) for f in feats]).mean(0)
    want_var = torch.stack([f.var(0, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, want_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var, want_var, rtol=0, atol=1e-6)
    assert model.bn.momentum == 0.1 and float(model.calls) == 0.0


def test_recalibrate_batchnorm_without_batchnorm_reads_nothing() -> None:
    def never() -> object:
        raise AssertionError("read a batch")
        yield

    assert recalibrate_batchnorm(nn.Linear(4, 2), never(), forward=_forward) == 0


def test_fit_bn_loader_changes_evaluation_not_training(tmp_path: Path) -> None:
    def run(out: Path, bn_loader):
        torch.manual_seed(0)
        model = _BNNet()
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        loader = DataLoader(
            _data(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1)
        )
        steps = loader_steps(
            model,
            opt,
            loader,
            DataLoader(_data(16), batch_size=8),
            forward=_forward,
            bn_loader=bn_loader,
            progress=False,
        )
        hist = fit(model, opt, loop=FitSettings(epochs=3), **steps, out_dir=out)
        return model, hist

    calib = list(DataLoader(_data(16), batch_size=8))
    plain_model, plain = run(tmp_path / "plain", None)
    model, hist = run(tmp_path / "calib", calib)
    for a, b in zip(plain, hist, strict=True):
        assert a["train_loss"] == b["train_loss"]  # training never reads running statistics
    torch.testing.assert_close(model.fc.weight, plain_model.fc.weight, rtol=0, atol=0)
    assert float(model.calls) == float(plain_model.calls)
    want = _BNNet()
    want.load_state_dict(model.state_dict())
    recalibrate_batchnorm(want, calib, forward=_forward)
    saved = load_checkpoint(tmp_path / "calib" / "ats_checkpoint.pt")["model"]
    torch.testing.assert_close(saved["bn.running_mean"], want.bn.running_mean, rtol=0, atol=0)
    assert not torch.equal(saved["bn.running_mean"], plain_model.bn.running_mean)


def test_nan_loss_stops_training_naming_epoch_and_step(tmp_path: Path) -> None:
    model, opt, _, _, loader = _setup()

    def poisoned(model: nn.Module, batch, device) -> StepOutput:
        step = _forward(model, batch, device)
        poisoned.calls += 1
        if poisoned.calls == 6:  # epoch 2, step 2 of 4
            step.logits = step.logits * float("nan")
        return step

    poisoned.calls = 0
    steps = loader_steps(model, opt, loader, forward=poisoned, epochs=3, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"ats epoch 2/3, step 2: loss is nan"):
        fit(model, opt, loop=FitSettings(epochs=3), **steps, out_dir=tmp_path)
    # The bad step's backward never ran, so the weights stay finite; the checkpoint on disk is
    # epoch 1's.
    saved = load_checkpoint(tmp_path / "ats_checkpoint.pt")
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_select_metric_keeps_the_best_epoch(tmp_path: Path) -> None:
    _, hist = _fit(tmp_path, epochs=4, select_metric="test_accuracy")
    accs = [r["test_accuracy"] for r in hist]
    best_epoch = 1 + accs.index(max(accs))  # the first epoch reaching the best value
    best = load_checkpoint(tmp_path / "ats_best.pt")
    assert best["epoch"] == best_epoch and best["extra"]["best"] == max(accs)
    assert [r["best"] for r in hist] == [max(accs[: i + 1]) for i in range(4)]
    assert load_checkpoint(tmp_path / "ats_checkpoint.pt")["extra"]["best"] == max(accs)


def test_fit_in_memory_writes_nothing_and_trains_the_same(tmp_path: Path, monkeypatch) -> None:
    """``out_dir=None`` (the benchmarks' in-memory fit): the same weights and records as a run
    in a folder, and not one file written."""
    ref_model, ref_hist = _fit(tmp_path / "ref", epochs=3, select_metric="val_loss")
    empty = tmp_path / "cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)
    model, hist = _fit(None, epochs=3, select_metric="val_loss")
    assert list(empty.iterdir()) == []
    timing = ("train_time_s", "epoch_time_s")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in hist]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in ref_hist]
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
