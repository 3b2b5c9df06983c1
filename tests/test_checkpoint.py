"""Checkpoints: atomic writes, weights-only reads, clear errors, and load_model rebuilding the generative SDE."""
import os
import pickle

import pytest
import torch

from lib.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from lib.ema import EMA
from lib.models import build_drift
from lib.sdes import PluginReverseSDE

MLP = {"name": "mlp", "kwargs": {"dim": 2, "width": 32, "depth": 1}}
SDE = {"beta_min": 0.1, "beta_max": 20.0, "T": 1.0}


def write_run(path, with_ema=True):
    torch.manual_seed(0)
    drift = build_drift(MLP["name"], MLP["kwargs"])
    for p in drift.parameters():
        p.data.normal_()
    ema = EMA(drift, 0.5)
    for p in drift.parameters():  # the EMA now differs from the raw weights
        p.data.add_(1.0)
    ema.update(drift, 1000)
    save_checkpoint(path, {
        "kind": "toy", "args": {"lr": 1e-3}, "model": MLP, "sde": SDE,
        "gen_sde": {"T": 1.0, "vtype": "gaussian", "debias": True}, "iteration": 7,
        "model_state": drift.state_dict(), "ema_state": ema.shadow.state_dict() if with_ema else None,
    })
    return drift, ema.shadow


def test_load_model_returns_the_ema_generative_sde_in_eval_mode(tmp_path):
    path = tmp_path / "checkpoint.pt"
    drift, shadow = write_run(path)
    gen_sde = load_model(str(path))
    assert isinstance(gen_sde, PluginReverseSDE) and not gen_sde.training
    assert gen_sde.vtype == "gaussian" and gen_sde.debias and gen_sde.T == 1.0
    y, s = torch.randn(5, 2), torch.rand(5)
    assert torch.equal(gen_sde.a(y, s), shadow(y, s))
    assert not torch.equal(gen_sde.a(y, s), drift(y, s))


def test_load_model_falls_back_to_raw_weights_without_ema(tmp_path):
    path = tmp_path / "checkpoint.pt"
    drift, _ = write_run(path, with_ema=False)
    y, s = torch.randn(5, 2), torch.rand(5)
    assert torch.equal(load_model(str(path)).a(y, s), drift(y, s))


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"iteration": 1, "x": torch.ones(3)})
    save_checkpoint(path, {"iteration": 2, "x": torch.zeros(3)})
    assert load_checkpoint(str(path))["iteration"] == 2
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"iteration": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"iteration": 2, "bad": Unpicklable()})
    assert load_checkpoint(str(path))["iteration"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.mark.parametrize("good_writes", [0, 1, 3, 10])
def test_a_disk_that_fills_during_the_write_raises_its_oserror_and_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch, good_writes):
    """The disk fills after `good_writes` writes of the file. torch.save, given a failing file, may report the
    failure as a RuntimeError about stream positions; save_checkpoint must raise the OSError (the cause a user
    can act on) and leave the old checkpoint and no temporary file."""
    import errno
    import io

    import lib.checkpoint

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"iteration": 1})

    class FillingFile(io.FileIO):
        writes = 0

        def write(self, data):
            FillingFile.writes += 1
            if FillingFile.writes > good_writes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(lib.checkpoint.os, "fdopen", lambda fd, mode: FillingFile(fd, "wb"))
    with pytest.raises(OSError) as err:
        save_checkpoint(path, {"iteration": 2, "weights": torch.ones(100_000)})
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_checkpoint(str(path))["iteration"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.mark.parametrize("content, expected", [
    (b"", "not a readable checkpoint"),
    (b"\x00garbage" * 100, "not a readable checkpoint"),
])
def test_corrupt_files_give_one_line_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(path))
    message = str(err.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    write_run(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_model(str(path))


def test_foreign_and_code_carrying_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an sdeflow checkpoint"):
        load_checkpoint(str(foreign))

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "sdeflow-checkpoint", "payload": RunsCode()}, protocol=2))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(evil))


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(str(tmp_path / "nope.pt"))
