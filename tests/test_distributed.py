"""Distributed data parallel training: two CPU processes (gloo, env:// as torchrun sets it up)
train one model exactly as one process does on the same data."""

import contextlib
import math
import socket
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from ml import distributed
from ml.backbone import BackboneConfig, Forecaster, MultiTaskLoss, _masked_sum
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


def task_sums(
    model: torch.nn.Module, loss: MultiTaskLoss, groups: list[Sequences], tbptt_len: int = 32
) -> list[dict[str, list[float]]]:
    """Per lane group: task -> [summed loss, target count] over every chunk (state carried)."""
    model.eval()
    out = []
    with torch.no_grad():
        for seq in groups:
            sums: dict[str, list[float]] = {}
            state = None
            for c in range(seq.n_chunks(tbptt_len)):
                x, targets = seq.chunk(c * tbptt_len, (c + 1) * tbptt_len)
                outputs, state = model(x, state)
                for k, (total, n) in loss.task_sums(outputs, targets).items():
                    acc = sums.setdefault(k, [0.0, 0.0])
                    acc[0], acc[1] = acc[0] + float(total), acc[1] + float(n)
            out.append(sums)
    return out


def outcome(fn) -> str:
    """ "ok", or the message of the RankFailed that fn raised (any other error propagates)."""
    try:
        fn()
    except distributed.RankFailed as e:
        return f"RankFailed: {e}"
    return "ok"


class FailingForecaster:
    """Fits with a collective, as the real one does under DDP; rank 0's prediction fails."""

    def __init__(self, kind, seed, settings) -> None:
        self.seed = seed

    def fit(self, data):
        torch.distributed.all_reduce(torch.ones(1))
        return self

    def predict(self, data):
        raise OSError("disk full")


def _pipeline_scenarios(rank: int, out_dir) -> dict[str, str]:
    """pipelines.train_sequences' artifact protocol under two ranks: rank 0 writes, rank 1
    follows; each scenario's outcome on this rank."""
    from functools import partial

    from pipelines import train_sequences as ts
    from warehouse import ArtifactStore

    store = ArtifactStore(out_dir / "artifacts")
    seeds = [0, 1]
    fits: list[int] = []

    def fit(seed: int) -> None:  # a helper rank's fit: the collective rank 0's fit joins
        fits.append(seed)
        torch.distributed.all_reduce(torch.ones(1))

    def train_ok(folder) -> None:  # _train's protocol: fit, then rank 0's writes, agreed
        for seed in seeds:
            torch.distributed.all_reduce(torch.ones(1))
            with distributed.agreed(f"to save seed {seed}"):
                (folder / f"seed{seed}.txt").write_text("ok")

    def summarize(art, fail: bool = False) -> dict:
        if fail:
            raise KeyError("val_loss")
        return {"created": art.created}

    def write(kind: str, train, fail_summary: bool = False):
        summary = partial(summarize, fail=fail_summary)
        return lambda: ts._write_artifact(store, kind, "f", "v1", train, {}, summary)

    results = {}
    if rank == 0:
        results["trained"] = outcome(write("ok", train_ok))
        results["reused_failing_summary"] = outcome(write("ok", train_ok, fail_summary=True))
        ts.SequenceForecaster = FailingForecaster  # this process only (a spawned rank)
        fold = SimpleNamespace(key="f")
        train = partial(ts._train, kind="fake", data=fold, seeds=seeds, s=None, log=print, out={})
        results["failing_predict"] = outcome(write("fake", train))
        results["left_no_artifact"] = str(not list((out_dir / "artifacts").rglob("fake/**/*.*")))
    else:
        for name in ("trained", "reused_failing_summary"):
            results[name] = outcome(lambda: ts._follow_artifact(fit, seeds))
            results[f"{name}_fits"] = str(fits)
            fits.clear()
        results["failing_predict"] = outcome(lambda: ts._follow_artifact(fit, seeds))
        results["failing_predict_fits"] = str(fits)
    return results


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
        # a rank left waiting (a regression of the failure agreements) fails the test in 2
        # minutes instead of hanging it
        MAMBACAST_DIST_TIMEOUT_S="120",
    )
    info = distributed.init_from_env(device="cpu")
    assert (info.rank, info.world_size) == (rank, WORLD)
    try:
        out_dir = Path(out)
        trainer, losses = train(checkpoint_dir=out_dir / f"ckpt_rank{rank}")
        result = {"weights": weights(trainer), "losses": losses, "history": trainer.history}
        # what this rank's shards (ghost included) add to the task sums, at the final weights
        result["shard_sums"] = task_sums(trainer.model, trainer.loss_fn, trainer.train_shards)
        result["ghost_masks"] = [
            None if s.loss_mask is None else bool(s.loss_mask.any()) for s in trainer.train_shards
        ]

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

        # failures of one rank raise on every rank instead of leaving the other waiting
        def fail_on_rank0() -> None:
            with distributed.agreed("to write its part"):
                if rank == 0:
                    raise ValueError("rank 0 only")

        result["agreed"] = outcome(fail_on_rank0)
        if rank == 0:  # rank 0's checkpoint folder cannot be made: a file is in the way
            (out_dir / "blocked").write_text("a file")
        blocked = Trainer(
            *make_model(), training_data(), validation_data(), config(), out_dir / "blocked" / "x"
        )
        result["checkpoint_write"] = outcome(blocked.save_checkpoint)
        corrupt = out_dir / f"corrupt_rank{rank}"
        if rank == 0:
            corrupt.mkdir()
            (corrupt / "last.pt").write_bytes(b"not a checkpoint")
        unreadable = Trainer(*make_model(), training_data(), validation_data(), config(), corrupt)
        result["checkpoint_read"] = outcome(unreadable.fit)
        result["pipeline"] = _pipeline_scenarios(rank, out_dir)
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


def test_distributed_ghost_lane_adds_nothing_and_shards_sum_to_the_batch(ranks):
    """Rank 1 holds no lane of the 1-lane group: its ghost (lane 0, every target masked)
    counts no target and adds no loss, and both ranks' shards add up to the whole batch's
    task sums and counts, group by group (a ghost scored as a real lane would count lane 0
    twice)."""
    (r0, r1), _ = ranks
    assert r1["ghost_masks"][1] is False  # rank 1's shard of group 1: a fully masked ghost
    ghost = r1["shard_sums"][1]
    assert ghost and all(total == 0.0 and n == 0.0 for total, n in ghost.values())
    model, loss = make_model()
    model.load_state_dict({k[6:]: v for k, v in r0["weights"].items() if k.startswith("model.")})
    loss.load_state_dict({k[5:]: v for k, v in r0["weights"].items() if k.startswith("loss.")})
    whole = task_sums(model, loss, training_data())
    for g, full in enumerate(whole):
        assert full.keys() == r0["shard_sums"][g].keys() == r1["shard_sums"][g].keys()
        for task, (total, n) in full.items():
            parts = [r["shard_sums"][g][task] for r in (r0, r1)]
            assert n > 0 and sum(p[1] for p in parts) == n, (g, task)
            assert sum(p[0] for p in parts) == pytest.approx(total, rel=1e-5), (g, task)


def test_distributed_failure_on_rank_0_raises_on_every_rank(ranks):
    """A step rank 0 alone fails (its checkpoint write or read) raises RankFailed on both
    ranks, naming rank 0 and the cause: no rank waits for a rank that has gone."""
    (r0, r1), _ = ranks
    for r in (r0, r1):
        assert r["agreed"] == "RankFailed: rank 0 failed to write its part: ValueError: rank 0 only"
        assert r["checkpoint_write"].startswith("RankFailed: rank 0 failed to write the checkpoint")
        assert r["checkpoint_read"].startswith("RankFailed: rank 0 failed to read the checkpoint")
    assert "FileExistsError" in r0["checkpoint_write"] or "NotADirectory" in r0["checkpoint_write"]


def test_distributed_pipeline_artifact_protocol_matches_and_fails_on_every_rank(ranks):
    """pipelines.train_sequences: the helper rank fits every seed with rank 0 when it trains,
    none when the artifact is reused; a failure of rank 0's summary or of a seed's prediction
    (in _train itself) raises on both ranks, and no half-written artifact stays."""
    (r0, r1), _ = ranks
    p0, p1 = r0["pipeline"], r1["pipeline"]
    assert p0["trained"] == p1["trained"] == "ok"
    assert p1["trained_fits"] == "[0, 1]" and p1["reused_failing_summary_fits"] == "[]"
    for p in (p0, p1):
        assert p["reused_failing_summary"].startswith(
            "RankFailed: rank 0 failed to write the artifact ok/f/v1: KeyError"
        )
        assert p["failing_predict"] == (
            "RankFailed: rank 0 failed to predict and save fake seed 0 of fold f: "
            "OSError: disk full"
        )
    assert p1["failing_predict_fits"] == "[0]"  # it stopped with rank 0, after seed 0
    assert p0["left_no_artifact"] == "True"


def test_distributed_agreement_in_one_process_raises_the_error_itself():
    with pytest.raises(KeyError, match="x"), distributed.agreed("anything"):
        raise KeyError("x")
    distributed.raise_if_any(None)
    with pytest.raises(OSError, match="disk"):
        distributed.raise_if_any(OSError("disk"))


def test_distributed_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_from_env() == timedelta(hours=2)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    assert distributed.timeout_from_env() == timedelta(seconds=90)
    for bad in ("0", "-5", "soon", "nan"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
            distributed.timeout_from_env()


@pytest.fixture
def fake_group(monkeypatch):
    """torch.distributed as init_from_env sees it, recording init_process_group's arguments;
    CUDA calls are recorded too (and fail where a test says CUDA must not be touched)."""
    import torch.distributed as dist

    seen: dict = {"cuda_calls": []}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: seen.update(args=a, kw=kw))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    def cuda(name, value):
        def call(*a, **kw):
            seen["cuda_calls"].append(name)
            if seen.get("no_cuda"):
                raise AssertionError(f"torch.cuda.{name} called")
            return value

        monkeypatch.setattr(torch.cuda, name, call)

    cuda("is_available", True)
    cuda("device_count", 2)  # fewer GPUs than LOCAL_RANK 3 needs
    cuda("set_device", None)
    return seen


def test_distributed_init_on_cpu_never_touches_cuda_and_sets_the_timeout(fake_group):
    fake_group["no_cuda"] = True
    info = distributed.init_from_env(device="cpu")
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 3)
    assert fake_group["args"] == ("gloo",) and fake_group["cuda_calls"] == []
    assert fake_group["kw"]["timeout"] == timedelta(seconds=90)
    assert fake_group["kw"]["rank"] == 1 and fake_group["kw"]["world_size"] == 2


def test_distributed_init_without_a_gpu_for_the_rank(fake_group):
    with pytest.raises(RuntimeError, match="LOCAL_RANK 3 has no GPU: this host has 2"):
        distributed.init_from_env(device="cuda")
    assert "args" not in fake_group
    # the device not known yet (Pipes): join with both backends, refuse the GPU later
    distributed.init_from_env()
    assert fake_group["args"] == ("cpu:gloo,cuda:nccl",)
    assert "set_device" not in fake_group["cuda_calls"]
    with pytest.raises(RuntimeError, match="LOCAL_RANK 3 has no GPU"):
        distributed.require_local_gpu()


def test_distributed_cli_device_is_read_before_joining():
    from pipelines.train_sequences import _cli_device

    assert _cli_device(["--folds", "2024", "--device", "cpu", "--epochs", "2"]) == "cpu"
    assert _cli_device(["--folds", "2024"]) == "auto"


def test_distributed_scored_steps_stay_on_the_data_device():
    """The counted-steps mask is built where the targets are (CUDA under DDP), not on the CPU:
    on the 'meta' device a CPU mask would fail to combine with them."""
    x = torch.empty(2, 6, N_FEATURES, device="meta")
    seq = Sequences(
        x,
        {
            "returns": torch.empty(2, 6, 2, device="meta"),
            "direction": torch.empty(2, 6, dtype=torch.long, device="meta"),
        },
        torch.ones(2, 6, dtype=torch.bool, device="meta"),
    )
    steps = seq.scored_steps(2, 10)
    assert steps.device.type == "meta" and steps.shape == (2, 4) and steps.dtype == torch.bool
    cpu = lane_group(3, 20, 7, masked_lane=1)  # and on CPU data, the count it always was
    for start, end in ((0, 8), (8, 16), (16, 24)):
        _, targets = cpu.chunk(start, end)
        valid = torch.zeros(3, min(end, 20) - start, dtype=torch.bool)
        for y in targets.values():
            ok = torch.isfinite(y) if y.is_floating_point() else y >= 0
            valid |= ok.reshape(*ok.shape[:2], -1).any(-1)
        assert cpu.chunk_targets(start, end) == int(valid.sum()) > 0


def test_distributed_ghost_safe_loss_ignores_non_finite_masked_outputs():
    """Masked (or NaN-target) elements add exact zeros to the task sums and take exact zero,
    finite gradients, even where the outputs there are inf or NaN (inf * 0 would be NaN);
    the valid elements' sums and gradients are those of finite outputs."""
    g = torch.Generator().manual_seed(3)
    b, t, h = 2, 8, 2
    loss = MultiTaskLoss(n_horizons=h)
    finite = {
        "direction": torch.randn(b, t, 3, generator=g),
        "quantiles": torch.randn(b, t, 2, generator=g),
        "log_sigma": torch.randn(b, t, generator=g),
        "returns": torch.randn(b, t, h, generator=g),
        "quantile_units": torch.rand(b, t, generator=g) + 0.5,
        "return_units": torch.rand(b, t, h, generator=g) + 0.5,
    }
    targets = {
        "direction": torch.randint(0, 3, (b, t), generator=g),
        "quantiles": torch.randn(b, t, generator=g),
        "sigma": torch.rand(b, t, generator=g) + 0.1,
        "returns": torch.randn(b, t, h, generator=g),
    }
    masked = torch.zeros(b, t, dtype=torch.bool)
    masked[0, :3] = masked[1, 5:] = True
    targets = {
        k: torch.where(
            masked.reshape(b, t, *[1] * (v.dim() - 2)),
            torch.full_like(v, -1 if k == "direction" else math.nan),
            v,
        )
        for k, v in targets.items()
    }
    poisoned = {}
    for k, v in finite.items():
        bad = masked.reshape(b, t, *[1] * (v.dim() - 2)).expand_as(v)
        fill = {"quantile_units": 0.0, "return_units": 0.0, "log_sigma": -math.inf}
        poisoned[k] = torch.where(bad, torch.full_like(v, fill.get(k, math.inf)), v)
    poisoned["returns"][1, 6, 0] = math.nan

    def run(outputs):
        leaves = {k: v.clone().requires_grad_() for k, v in outputs.items()}
        sums = loss.task_sums(leaves, targets)
        total = sum(s for s, _ in sums.values())
        total.backward()
        return sums, {k: v.grad for k, v in leaves.items()}

    ref, ref_grads = run(finite)
    got, grads = run(poisoned)
    assert got.keys() == ref.keys() == {"direction", "quantiles", "sigma", "returns"}
    for k, (total, n) in got.items():
        assert torch.isfinite(total), k
        assert total.item() == ref[k][0].item() and n.item() == ref[k][1].item(), k
    for k, grad in grads.items():
        assert torch.isfinite(grad).all(), k
        assert torch.equal(grad, ref_grads[k]), k
        bad = masked.reshape(b, t, *[1] * (grad.dim() - 2)).expand_as(grad)
        assert (grad[bad] == 0).all(), k
    sigma = {**poisoned, "sigma": torch.where(masked, 0.0, finite["log_sigma"].exp())}
    del sigma["log_sigma"]  # the log(sigma) path: sigma 0 at masked elements
    got, grads = run(sigma)
    assert torch.isfinite(got["sigma"][0].detach()) and torch.isfinite(grads["sigma"]).all()
    # and the masked sum itself: a non-finite element under the mask adds zero, not NaN
    total, n = _masked_sum(
        torch.tensor([1.5, math.inf, math.nan, -math.inf]), torch.tensor([1, 0, 0, 0]).bool()
    )
    assert total.item() == 1.5 and n.item() == 1
