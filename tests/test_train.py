"""Float training: loss falls on real event data, the checkpoint round-trips, schedule and augmentation."""

from __future__ import annotations

import pytest
import torch

from hq_ptq.checkpoint import load_float, read_metadata, save_float
from hq_ptq.data import make_loaders
from hq_ptq.models import build_model
from hq_ptq.train import TrainConfig, cosine_lr, evaluate, random_shift, train_float


@pytest.fixture(scope="module")
def trained():
    train, test = make_loaders("digits", batch_size=16, T=2, train_subset=160, test_subset=60)
    torch.manual_seed(0)  # the initial weights do not depend on what ran before in this process
    model = build_model("spikformer-tiny", embed_dim=32, num_heads=2, depth=1)
    losses: list[float] = []
    result = train_float(
        model,
        train,
        test,
        TrainConfig(epochs=6, lr=1e-2, shift_augment=1, label_smoothing=0.0),
        on_epoch=lambda epoch, loss: losses.append(loss),
    )
    return model, result, losses, test


def test_short_training_run_loss_falls(trained):
    _, result, losses, _ = trained
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0]
    assert result.test_accuracy is not None and result.test_accuracy > 0.2  # 10 classes: chance is 0.1


def test_float_checkpoint_round_trip(trained, tmp_path):
    model, _, _, test = trained
    path = save_float(model, tmp_path / "fp.safetensors", meta={"note": "test"})
    loaded, meta = load_float(path)
    assert meta == {"note": "test"}
    assert loaded.hq_config == model.hq_config
    x, _ = next(iter(test))
    model.eval()
    assert torch.equal(loaded(x), model(x))
    assert evaluate(loaded, test) == evaluate(model, test)
    assert read_metadata(path)["format"] == "hq_ptq.float"


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_float(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_float(bad)
    with pytest.raises(ValueError, match="build_model"):
        save_float(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_cosine_schedule_warms_up_then_decays():
    factors = [cosine_lr(s, total=100, warmup=10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] < 0.01


def test_random_shift_moves_each_sample_within_bounds():
    x = torch.zeros(3, 4, 2, 8, 8)
    x[:, :, :, 4, 4] = 1
    g = torch.Generator().manual_seed(0)
    y = random_shift(x, 2, g)
    assert y.shape == x.shape and torch.equal(y.sum((0, 2, 3, 4)), x.sum((0, 2, 3, 4)))
    for b in range(4):
        (ys, xs) = torch.nonzero(y[0, b, 0], as_tuple=True)
        assert abs(int(ys) - 4) <= 2 and abs(int(xs) - 4) <= 2
        assert torch.equal(y[:, b], y[:1, b].expand_as(y[:, b]))  # the same shift at every time step
    assert torch.equal(random_shift(x, 0, g), x)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


class _Stop(Exception):
    pass


def _resumable_run(tmp_path, config: TrainConfig, stop_after: int | None = None):
    # fresh loaders and model each time, as a new process would build them
    train, _ = make_loaders("digits", batch_size=16, T=2, train_subset=64, test_subset=16)
    torch.manual_seed(1)
    model = build_model("spikformer-tiny", embed_dim=16, num_heads=2, depth=1)

    def crash(epoch: int, loss: float) -> None:
        if epoch == stop_after:
            raise _Stop

    result = train_float(model, train, None, config, on_epoch=crash, checkpoint=tmp_path / "run.train.pt")
    return model, result


def test_a_stopped_training_run_continues_bit_for_bit(tmp_path):
    config = TrainConfig(epochs=3, lr=1e-2, shift_augment=1)
    whole, _ = _resumable_run(tmp_path / "a", config)
    with pytest.raises(_Stop):
        _resumable_run(tmp_path / "b", config, stop_after=2)
    assert (tmp_path / "b" / "run.train.pt").is_file()
    resumed, result = _resumable_run(tmp_path / "b", config)
    assert result.resumed_after == 2
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # the file stays until the caller has saved the model (train_recipe removes it after save_float)
    assert _resumable_run(tmp_path / "b", config)[1].resumed_after == 3


def test_resume_restores_a_shuffle_generator_held_by_the_sampler(tmp_path):
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g))

    def run(folder, stop_after=None):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(7))
        loader = DataLoader(data, batch_size=5, sampler=sampler)

        def crash(epoch, loss):
            if epoch == stop_after:
                raise _Stop

        config = TrainConfig(epochs=3)
        train_float(model, loader, None, config, on_epoch=crash, checkpoint=folder / "s.train.pt")
        return model

    whole = run(tmp_path / "a")
    with pytest.raises(_Stop):
        run(tmp_path / "b", stop_after=1)
    resumed = run(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters(), strict=True))


def test_a_training_checkpoint_from_other_settings_is_refused(tmp_path):
    with pytest.raises(_Stop):
        _resumable_run(tmp_path, TrainConfig(epochs=3, lr=1e-2), stop_after=1)
    with pytest.raises(ValueError, match=r"run\.train\.pt was written with other settings .*delete .* start"):
        _resumable_run(tmp_path, TrainConfig(epochs=3, lr=5e-3))
    (tmp_path / "run.train.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"training checkpoint .* is unreadable"):
        _resumable_run(tmp_path, TrainConfig(epochs=3, lr=1e-2))
