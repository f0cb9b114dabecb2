"""Data-parallel runs: sharded Hutchinson/Fisher equal one process exactly, DDP QAT equals full-batch
training, ``hq-ptq run --nproc 2`` (2 gloo processes) finds the single-process plan, and worker errors reach
the user."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from hq_ptq.api import analyze
from hq_ptq.cli import app
from hq_ptq.config import QATConfig
from hq_ptq.distributed import Shard, all_gather_object, launch
from hq_ptq.plan import LayerChoice, Plan
from hq_ptq.qat import finetune
from hq_ptq.sensitivity import fisher_traces, hutchinson_estimates
from hq_ptq.state import apply_plan

runner = CliRunner()


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 4))


def _batches(n: int, size: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 5, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


def _thread_world(world: int, fn):
    """``fn(rank, shard)`` in ``world`` threads whose ``reduce`` sums over them (stands in for all_reduce)."""
    barrier = threading.Barrier(world, timeout=30)  # a rank that fails alone leaves the others here
    slots: list[torch.Tensor | None] = [None] * world
    results: list = [None] * world
    errors: list[BaseException] = []

    def reduce_for(rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0].clone()
            for s in slots[1:]:
                total += s
            barrier.wait()  # nobody overwrites a slot before everyone has summed
            return total

        return reduce

    def run(rank: int) -> None:
        try:
            results[rank] = fn(rank, Shard(rank, world, reduce_for(rank)))
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


@pytest.mark.parametrize("n_batches", [1, 3, 4])
@pytest.mark.parametrize("world", [2, 3, 5])
def test_sharded_hutchinson_and_fisher_equal_one_process(n_batches, world):
    model, data = _mlp(), _batches(n_batches)
    layers = {"0": model[0], "2": model[2]}
    settings = [
        dict(rel_tol=0.3, min_samples=4, max_samples=60, seed=3),  # stops early: the replay decides
        dict(rel_tol=1e-6, min_samples=2, max_samples=13, hvps_per_batch=2, seed=4),  # hits the cap mid-visit
    ]
    stopped_early = False
    for kw in settings:
        ref = hutchinson_estimates(model, layers, data, **kw)
        stopped_early |= next(iter(ref.values())).n_samples < kw["max_samples"]

        def rank_fn(rank, shard, kw=kw):
            net = copy.deepcopy(model)  # each "rank" owns its model, as separate processes do
            return hutchinson_estimates(net, {"0": net[0], "2": net[2]}, shard.take(data), shard=shard, **kw)

        results, errors = _thread_world(world, rank_fn)
        assert not errors, errors
        assert all(r == ref for r in results)  # bit-identical samples, count and stopping point
    assert stopped_early or n_batches == 1

    ref_f = fisher_traces(model, layers, data)

    def fisher_fn(rank, shard):
        net = copy.deepcopy(model)
        return fisher_traces(net, {"0": net[0], "2": net[2]}, shard.take(data), shard=shard)

    results, errors = _thread_world(world, fisher_fn)
    assert not errors and all(r == ref_f for r in results)


def test_shards_of_the_wrong_size_fail_on_every_rank():
    model, data = _mlp(), _batches(3)

    def rank_fn(rank, shard):
        mine = data[:1] if rank == 0 else data[1:]  # 1 + 2 batches where rank::world gives 2 + 1
        net = copy.deepcopy(model)
        return fisher_traces(net, {"0": net[0]}, mine, shard=shard)

    _, errors = _thread_world(2, rank_fn)
    assert len(errors) == 2 and all("batches[rank::world]" in str(e) for e in errors)


# ------------------------------------------------------------------------------------------------
# real processes (gloo)


def _quant_mlp() -> nn.Sequential:
    net = _mlp()
    plan = Plan(
        (LayerChoice("0", "uniform", 4, net[0].weight.numel(), 0.0), LayerChoice("2", "pot", 4, 48, 0.0)),
        method="manual",
    )
    return apply_plan(net, plan)


def _ddp_worker(steps: int, out: str):
    import torch.distributed as dist

    net, data = _quant_mlp(), _batches(2 * steps)
    finetune(net, data, QATConfig(steps=steps, lr=1e-2, distill_weight=0.0), seed=0)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    everyone = all_gather_object(state)
    # ranks given different data (the contract is the same data everywhere) are refused on every rank
    refusals = []
    for step in (
        lambda: analyze(_mlp(), calib_data=_batches(2, seed=dist.get_rank())),
        lambda: finetune(_quant_mlp(), _batches(2, seed=dist.get_rank()), QATConfig(steps=1), seed=0),
    ):
        try:
            step()
        except ValueError as err:
            refusals.append(str(err))
    if dist.get_rank() == 0:
        same = all(torch.equal(s[k], state[k]) for s in everyone for k in state)
        torch.save({"state": state, "same": same, "refusals": refusals}, out)
    if dist.get_rank() == 1:
        raise ValueError("calibration data of rank 1 is bad; fix it")
    dist.barrier()  # rank 0 waits in a collective: the launcher must stop it


def test_ddp_qat_equals_full_batch_training_and_errors_reach_the_caller(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    steps, out = 3, tmp_path / "ranks.pt"
    with pytest.raises(ValueError, match="calibration data of rank 1 is bad"):  # the cause, not its echo
        launch(_ddp_worker, 2, steps, str(out))
    got = torch.load(out, weights_only=True)
    assert got["same"]  # DDP kept the replicas (weights and Brevitas scales) identical
    refused = [r.split(" differs")[0] for r in got["refusals"]]
    assert refused == ["the calibration data", "the QAT training data"]
    # rank r trains on batches r, r+2, ...: one process on the concatenated pairs takes the same steps
    data = _batches(2 * steps)
    pairs = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(data[::2], data[1::2])]
    single = _quant_mlp()
    before = {k: v.clone() for k, v in single.state_dict().items()}
    finetune(single, pairs, QATConfig(steps=steps, lr=1e-2, distill_weight=0.0), seed=0)
    scales = [k for k in before if "weight_quant" in k]
    assert scales and all(not torch.equal(before[k], single.state_dict()[k]) for k in scales)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_run_nproc_2_finds_the_single_process_plan(tmp_path, monkeypatch, tiny_recipe):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    recipe = tiny_recipe(
        tmp_path / "tiny.toml",
        quant={"seed": 7},
        search={"metric": "hessian", "calib_batches": 3, "hutchinson_probes": 12},
        qat={"checkpoint_every": 1},
    )
    one, two = tmp_path / "one", tmp_path / "two"
    # the float checkpoint does not exist yet: --nproc trains it once before starting the workers
    result = runner.invoke(app, ["run", str(recipe), "--out", str(two), "--nproc", "2", "--no-export"])
    assert result.exit_code == 0, result.output
    assert "average bits" in result.output and (tmp_path / "fp.safetensors").is_file()
    result = runner.invoke(app, ["run", str(recipe), "--out", str(one), "--no-export"])
    assert result.exit_code == 0, result.output

    a, b = (json.loads((d / "result.json").read_text()) for d in (one, two))
    assert [(c["name"], c["scheme"], c["bits"]) for c in a["plan"]["layers"]] == [
        (c["name"], c["scheme"], c["bits"]) for c in b["plan"]["layers"]
    ]
    traces_a, traces_b = a["plan"]["meta"]["traces"], b["plan"]["meta"]["traces"]
    assert traces_a.keys() == traces_b.keys()
    for name in traces_a:
        assert traces_b[name] == pytest.approx(traces_a[name], rel=1e-6)
    # rank 0 evaluated the same float and PTQ model as the single process
    assert (a["fp_accuracy"], a["ptq_accuracy"]) == (b["fp_accuracy"], b["ptq_accuracy"])
    assert 0 <= b["q_accuracy"] <= 1  # DDP QAT ran (a global batch of 2 x 16, so not the same numbers)
    ckpt = torch.load(two / "qat-checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    names = [sorted(p.name for p in (d / "cache").iterdir()) for d in (one, two)]
    assert names[0] == names[1]  # same fingerprint: same model, calibration data and options
    assert not list(two.glob(".*.tmp"))  # rank 0 alone wrote, every write completed
