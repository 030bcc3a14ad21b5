"""Distributed data parallel training: two CPU processes (gloo, env:// as torchrun sets it up)
train one model exactly as one process does on the same data."""

import contextlib
import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ml.backbone import BackboneConfig, Forecaster, MultiTaskLoss
from ml.distributed import lane_bounds
from ml.trainer import AugmentConfig, Sequences, TrainConfig, Trainer

N_FEATURES = 5
WORLD = 2
KILL_AT = 7  # mid second epoch (5 steps an epoch): the checkpoint carries a recurrent state


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lane_group(lanes: int, steps: int, seed: int, masked_lane: int | None = None) -> Sequences:
    """Targets from features three steps back, with NaN returns scattered element by element
    and (optionally) one lane scored only in its second half: the ranks' shards then hold
    different numbers of targets of each task."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(lanes, steps, N_FEATURES, generator=g)
    lagged = torch.roll(x[..., 0], 3, dims=1)
    lagged[:, :3] = float("nan")
    ret = torch.stack([0.5 * lagged, 0.2 * lagged], dim=-1)
    ret[torch.rand(ret.shape, generator=g) < 0.3] = float("nan")
    direction = torch.where(lagged > 0.4, 2, torch.where(lagged < -0.4, 0, 1))
    direction[:, :3] = -1
    mask = None
    if masked_lane is not None:
        mask = torch.ones(lanes, steps, dtype=torch.bool)
        mask[masked_lane, : steps // 2] = False
    return Sequences(x, {"returns": ret, "direction": direction}, mask)


def training_data() -> list[Sequences]:
    # 3 lanes (ranks take 2 and 1) and 1 lane of another length (rank 1 runs a masked ghost)
    return [lane_group(3, 96, 0, masked_lane=2), lane_group(1, 64, 1)]


def validation_data() -> list[Sequences]:
    return [lane_group(3, 64, 2), lane_group(1, 32, 3)]  # 1 lane: rank 1 has none of it


def make_model() -> tuple[Forecaster, MultiTaskLoss]:
    torch.manual_seed(0)
    cfg = BackboneConfig.preset("tiny", N_FEATURES, horizons=(1, 5))
    return Forecaster(cfg), MultiTaskLoss()


def config(**kw) -> TrainConfig:
    base = {
        "tbptt_len": 32,
        "epochs": 2,
        "lr": 3e-3,
        "warmup_steps": 2,
        "patience": 10,
        "progress": False,
        "seed": 5,
        "augment": AugmentConfig(noise_std=0.1, magnitude_warp=0.1, feature_dropout=0.1),
    }
    return TrainConfig(**{**base, **kw})


def train(checkpoint_dir=None, on_step=None, **kw) -> tuple[Trainer, list[float]]:
    """A run of the training data; the global loss of every step."""
    model, loss = make_model()
    losses: list[float] = []

    def record(step: int) -> None:
        losses.append(trainer.last_loss)
        if on_step:
            on_step(step)

    trainer = Trainer(
        model,
        loss,
        training_data(),
        validation_data(),
        config(**kw),
        checkpoint_dir=checkpoint_dir,
        on_step=record,
    )
    trainer.fit()
    return trainer, losses


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer._weights().items()}


class Stop(Exception):
    pass


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: joins the group as under torchrun, runs the scenarios, saves what it saw."""
    import os
    from pathlib import Path

    from ml import distributed

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    info = distributed.init_from_env()
    assert (info.rank, info.world_size) == (rank, WORLD)
    try:
        out_dir = Path(out)
        trainer, losses = train(checkpoint_dir=out_dir / f"ckpt_rank{rank}")
        result = {"weights": weights(trainer), "losses": losses, "history": trainer.history}

        def stop(step: int) -> None:
            if step == KILL_AT:
                raise Stop

        # interrupted mid-epoch, on every rank alike, after a checkpoint at every step
        with contextlib.suppress(Stop):
            train(checkpoint_dir=out_dir / f"killed_rank{rank}", on_step=stop, checkpoint_every=1)
        try:  # rank 1 would have no lane to train on in any group
            Trainer(*make_model(), [lane_group(1, 32, 0)] * 2, validation_data(), config())
        except ValueError as e:
            result["error"] = str(e)
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results (runs in two spawned processes), and their output folder."""
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)], out


@pytest.fixture(scope="module")
def single():
    trainer, losses = train()
    return weights(trainer), losses, trainer.history


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def test_distributed_ranks_end_with_identical_weights(ranks):
    (r0, r1), _ = ranks
    assert r0["weights"].keys() == r1["weights"].keys()
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    assert r0["losses"] == r1["losses"]
    assert r0["history"] == r1["history"]  # the same validation figures: the same stopping


def test_distributed_training_equals_one_process_on_uneven_shards(ranks, single):
    """Ranks hold 2 and 1 lanes of the first group, with different target counts per task, and
    1 and 0 (a ghost) of the second; augmentation on: loss curve, validation figures and
    weights are the single-process ones."""
    (r0, _), _ = ranks
    ref_weights, ref_losses, ref_history = single
    sizes = [lane_bounds(3, r, WORLD) for r in range(WORLD)]
    assert sizes == [(0, 2), (2, 3)]  # uneven, and the union is the whole batch
    assert len(r0["losses"]) == len(ref_losses) == 10
    assert all(math.isfinite(v) for v in ref_losses)
    for got, want in zip(r0["losses"], ref_losses, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=0)
    for got, want in zip(r0["history"], ref_history, strict=True):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-12), k
    moved = max(float((ref_weights[k] - w).abs().max()) for k, w in make_weights().items())
    assert moved > 1e-3  # the run did learn: equal weights are not just the initial ones
    # summation order differs (per shard, then across ranks): ~1e-7, up to 2e-6 on an element
    # whose gradient nearly cancels, which Adam's normalisation magnifies
    for k, want in ref_weights.items():
        got = r0["weights"][k]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (k, _max_abs(got, want))


def make_weights() -> dict[str, torch.Tensor]:
    model, loss = make_model()
    return {
        **{f"model.{k}": v for k, v in model.state_dict().items()},
        **{f"loss.{k}": v for k, v in loss.state_dict().items()},
    }


def test_distributed_checkpoints_come_from_rank_0_and_resume_in_one_process(ranks, single):
    """Only rank 0 writes; its mid-epoch checkpoint holds every lane's state, so one process
    resumes it to the weights of an uninterrupted run."""
    (_, _), out = ranks
    assert (out / "ckpt_rank0" / "last.pt").exists()
    assert not (out / "ckpt_rank1").exists() and not (out / "killed_rank1").exists()
    saved = torch.load(out / "killed_rank0" / "last.pt", weights_only=True)
    assert saved["position"].tolist()[:3] == [1, 2, KILL_AT] and saved["world_size"] == WORLD
    lanes = {t.shape[0] for t in saved["carried"]["tensors"]}
    assert lanes == {3, 1}  # every lane of both groups, gathered from the shards (2+1, 1+0)
    trainer, _ = train(checkpoint_dir=out / "killed_rank0")
    assert trainer.step == 10
    ref_weights = single[0]
    for k, want in ref_weights.items():
        got = weights(trainer)[k]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (k, _max_abs(got, want))


def test_distributed_refuses_more_ranks_than_the_largest_lane_group(ranks):
    (r0, r1), _ = ranks
    for r in (r0, r1):
        assert "largest training lane group has 1 lane(s), fewer than the 2 ranks" in r["error"]
        assert "--nproc-per-node 1" in r["error"]


def test_distributed_lane_shards_cover_the_batch_in_rank_order():
    for lanes in (2, 3, 7, 64):
        for world in (1, 2, 3):
            if lanes < world:
                continue
            bounds = [lane_bounds(lanes, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == lanes
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert lane_bounds(1, 1, 2, allow_empty=True) == (1, 1)
    with pytest.raises(ValueError, match="fewer than the 3 ranks"):
        lane_bounds(2, 0, 3)


def test_distributed_off_leaves_the_single_process_path():
    trainer = Trainer(*make_model(), training_data(), validation_data(), config())
    assert not trainer.distributed and trainer.ddp is None
