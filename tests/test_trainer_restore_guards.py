"""What a resume restores, and what it refuses: ml.trainer's Trainer._resume, load_checkpoint
and _restore, in one process (kills the mutants `make mutate` found surviving there;
benchmarks/mutation.py, figures in benchmarks/results/mutation.md).

A real checkpoint is written by a real (tiny) training run stopped mid second epoch; it is then
resumed by a trainer built from another init, in one process, and as rank 0 or rank 1 of a
simulated 2-rank world: the DDP attributes (distributed, rank, world_size, the lane shards) are
set on a plain trainer and ml.distributed's collectives are replaced by stand-ins that play the
other rank (tests/test_distributed.py runs the real thing in spawned processes, which mutmut
cannot reach). Pinned: weights, optimizer, scheduler, torch's and the augmentation's RNG
(each rank's own stream, or a fresh one for a checkpoint of another world size), position,
best_val, lr_scale, best_weights, history, the epoch's losses, the carried state sliced to the
rank's lanes on its device; that only rank 0 reads the file, onto the CPU and without running
pickled code; the errors for a checkpoint that does not fit (path, lane groups, lanes, the
fix), agreed on every rank; and the "resumed from" log line."""

import logging
import pickle

import pytest
import torch
import torch.serialization
from torch.overrides import TorchFunctionMode

from ml import distributed
from ml.state import flatten_state, unflatten_state
from ml.trainer import Trainer
from tests.test_trainer import make_model, quick_cfg, toy_sequences

STOP_AT = 7  # mid second epoch (4 steps an epoch): epoch 1, chunk 3, every group carried
LOGGER = "mambacast.trainer"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible CPU kernels, as in test_trainer
    yield
    torch.set_num_threads(threads)


class _Stop(Exception):
    pass


def _data():
    # two lane groups: 3 lanes (ranks 0 and 1 of 2 hold lanes 0-1 and 2) and 1 lane (rank 1
    # holds a ghost of lane 0)
    return [toy_sequences(3, 64, 0), toy_sequences(1, 64, 2)], toy_sequences(1, 64, 1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path, checkpoint) of a run stopped right after its step-7 checkpoint."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ckpt_dir = tmp_path_factory.mktemp("run") / "ckpt"

    def stop(step):
        if step == STOP_AT:
            raise _Stop

    model, loss = make_model()
    trainer = Trainer(
        model, loss, *_data(), quick_cfg(checkpoint_every=1), checkpoint_dir=ckpt_dir, on_step=stop
    )
    with pytest.raises(_Stop):
        trainer.fit()
    torch.set_num_threads(threads)
    path = ckpt_dir / "last.pt"
    return path, torch.load(path, weights_only=True)


def _fresh(checkpoint_dir=None, data=None):
    model, loss = make_model(seed=123)
    return Trainer(
        model,
        loss,
        *(data or _data()),
        quick_cfg(),
        checkpoint_dir=checkpoint_dir,
        data_parallel=False,
    )


def _write(tmp_path, ckpt, name="ckpt"):
    d = tmp_path / name
    d.mkdir()
    torch.save(ckpt, d / "last.pt")
    return d


def _as_rank(trainer, rank, world=2):
    """Give a plain trainer the lane shards _setup_distributed gives rank `rank` of `world`."""
    trainer.distributed, trainer.rank, trainer.world_size = True, rank, world
    trainer._info = logging.getLogger(LOGGER).info if rank == 0 else logging.getLogger(LOGGER).debug
    trainer.train_bounds, trainer.state_bounds, trainer.train_shards = [], [], []
    for seq in trainer.train_data:
        lo, hi = distributed.lane_bounds(seq.lanes, rank, world, allow_empty=True)
        trainer.train_bounds.append((lo, hi))
        if hi > lo:
            trainer.state_bounds.append((lo, hi))
            trainer.train_shards.append(seq.select_lanes(lo, hi))
        else:
            trainer.state_bounds.append((0, 1))
            trainer.train_shards.append(seq.select_lanes(0, 1))
    return trainer


@pytest.fixture
def world(monkeypatch):
    """world(rank, from_rank0=None): ml.distributed's collectives as rank `rank` of 2 sees
    them, the other rank failing nothing; broadcast_object hands rank 1 `from_rank0`. Returns
    the list of objects this rank broadcast."""

    def enter(rank, from_rank0=None):
        sent = []

        def broadcast_object(obj, src=0):
            sent.append(obj)
            return obj if rank == src else from_rank0

        monkeypatch.setattr(distributed, "world", lambda: (rank, 2))
        monkeypatch.setattr(
            distributed,
            "all_gather_objects",
            lambda obj: [obj if r == rank else None for r in (0, 1)],
        )
        monkeypatch.setattr(distributed, "broadcast_object", broadcast_object)
        return sent

    return enter


def _rng_of(seed):
    return torch.Generator().manual_seed(seed).get_state()


def _two_rank_ckpt(ckpt, cuda=None):
    """The checkpoint as a 2-rank run writes it: each rank's own torch and CUDA RNG states
    (empty CUDA states: CPU ranks)."""
    cuda = cuda or (torch.zeros(0, dtype=torch.uint8),) * 2
    return {
        **ckpt,
        "world_size": 2,
        "rank_torch_rng": [_rng_of(100), _rng_of(101)],
        "rank_cuda_rng": list(cuda),
    }


def _carried(ckpt):
    return unflatten_state(ckpt["carried"])


def _assert_state_equal(got, want):
    g, w = flatten_state(got), flatten_state(want)
    assert g["spec"] == w["spec"]
    assert len(g["tensors"]) == len(w["tensors"])
    for a, b in zip(g["tensors"], w["tensors"], strict=True):
        assert torch.equal(a, b)


def _slice(state, lo, hi):
    flat = flatten_state(state)
    return unflatten_state({"spec": flat["spec"], "tensors": [t[lo:hi] for t in flat["tensors"]]})


def _assert_restored(trainer, ckpt):
    """Everything but torch's RNG and the carried state (which depend on the rank)."""
    for k, v in trainer._weights().items():
        assert torch.equal(v, ckpt["weights"][k]), k
    got, want = trainer.optimizer.state_dict(), ckpt["optimizer"]
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for i, s in want["state"].items():
        for k, v in s.items():
            assert torch.equal(got["state"][i][k], v), (i, k)
    assert trainer.scheduler.state_dict()["last_epoch"] == STOP_AT
    assert trainer.scheduler.state_dict() == ckpt["scheduler"]
    assert torch.equal(trainer.generator.get_state(), ckpt["aug_rng"])
    assert [trainer.epoch, trainer.chunk, trainer.step, trainer.skipped, trainer.bad_epochs] == (
        ckpt["position"].tolist()
    )
    assert trainer.step == STOP_AT
    assert [trainer.best_val, trainer.lr_scale] == ckpt["floats"].tolist()
    assert trainer._epoch_losses == ckpt["epoch_losses"].tolist()
    assert len(trainer._epoch_losses) == STOP_AT - 4  # the second epoch's losses so far
    assert trainer.history == ckpt["history"] and len(trainer.history) == 1
    assert trainer.best_weights is not None
    assert trainer.best_weights.keys() == ckpt["best_weights"].keys()
    for k, v in ckpt["best_weights"].items():
        assert torch.equal(trainer.best_weights[k], v), k


def _resumed_line(path, ckpt):
    epoch, chunk, step = ckpt["position"].tolist()[:3]
    return f"resumed from {path} at epoch {epoch + 1}, chunk {chunk} (step {step})"


# -- one process ---------------------------------------------------------------------------


def test_a_resume_restores_the_whole_training_state_and_says_where_from(saved, caplog):
    path, ckpt = saved
    trainer = _fresh(path.parent)
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert trainer._resume(True) is True
    _assert_restored(trainer, ckpt)
    assert torch.equal(torch.get_rng_state(), ckpt["torch_rng"])  # the dropout stream
    _assert_state_equal(trainer.carried, _carried(ckpt))
    assert all(s is not None for s in trainer.carried)
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER] == [
        (logging.INFO, _resumed_line(path, ckpt))
    ]
    assert "epoch 2, chunk 3 (step 7)" in caplog.text


def test_load_checkpoint_names_the_file_it_resumed_from(saved, caplog):
    path, ckpt = saved
    trainer = _fresh()
    caplog.set_level(logging.INFO, logger=LOGGER)
    trainer.load_checkpoint(path)
    _assert_restored(trainer, ckpt)
    assert caplog.messages == [_resumed_line(path, ckpt)]


def test_a_trainer_kept_out_of_a_process_group_resumes_without_a_collective(saved, monkeypatch):
    """data_parallel=False inside an initialized group (rank 0 alone after training): a
    collective would wait forever for ranks that are not there."""
    path, ckpt = saved
    trainer = _fresh(path.parent)

    def no_collective(*a, **k):
        raise AssertionError("a single-process resume entered a collective")

    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    for name in ("broadcast_object", "all_gather_objects", "raise_if_any", "agreed"):
        monkeypatch.setattr(distributed, name, no_collective)
    assert trainer._resume(True) is True
    _assert_restored(trainer, ckpt)


def test_resume_false_or_no_checkpoint_starts_afresh(saved, tmp_path):
    path, _ = saved
    trainer = _fresh(path.parent)
    assert trainer._resume(False) is False
    assert trainer.step == 0 and trainer.history == []
    assert _fresh(tmp_path / "empty")._resume(True) is False


def _cuda_tagged(tmp_path, ckpt):
    """The checkpoint as a GPU run writes it: every storage tagged cuda:0."""
    d = tmp_path / "gpu"
    d.mkdir()
    real = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(ckpt, d / "last.pt")
    finally:
        torch.serialization.location_tag = real
    with pytest.raises(RuntimeError, match="CUDA"):  # as torch.load without a map_location
        torch.load(d / "last.pt", weights_only=True)
    return d


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_a_checkpoint_written_on_a_gpu_loads_onto_this_trainers_device(saved, tmp_path):
    path, ckpt = saved
    d = _cuda_tagged(tmp_path, ckpt)
    trainer = _fresh()
    trainer.load_checkpoint(d / "last.pt")
    _assert_restored(trainer, ckpt)


class _RunsCode:
    ran: list = []

    def __reduce__(self):
        return (_RunsCode.ran.append, ("pickled code ran",))


def _booby_trapped(tmp_path, ckpt):
    _RunsCode.ran.clear()
    return _write(tmp_path, {**ckpt, "note": _RunsCode()}, "trapped")


# torch warns where the variable overrides a default: the test judges the load, not the warning
@pytest.mark.filterwarnings("ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
def test_a_checkpoint_that_would_run_pickled_code_is_refused(saved, tmp_path, monkeypatch):
    """weights_only, also where the environment asks torch to default to full unpickling."""
    _, ckpt = saved
    d = _booby_trapped(tmp_path, ckpt)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _fresh().load_checkpoint(d / "last.pt")
    assert _RunsCode.ran == []


def test_an_old_checkpoint_without_epoch_losses_resumes_with_none(saved, tmp_path):
    _, ckpt = saved
    d = _write(tmp_path, {k: v for k, v in ckpt.items() if k != "epoch_losses"})
    trainer = _fresh()
    trainer._epoch_losses = [9.0]
    trainer.load_checkpoint(d / "last.pt")
    assert trainer._epoch_losses == []


def test_empty_best_weights_restore_as_none(saved, tmp_path):
    _, ckpt = saved
    d = _write(tmp_path, {**ckpt, "best_weights": {}})
    trainer = _fresh()
    trainer.load_checkpoint(d / "last.pt")
    assert trainer.best_weights is None


def test_a_gpu_checkpoint_restores_every_gpus_generator_on_a_cuda_host(
    saved, tmp_path, monkeypatch
):
    _, ckpt = saved
    states = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    d = _write(tmp_path, {**ckpt, "cuda_rng": states})
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", calls.append)
    trainer = _fresh()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    trainer.load_checkpoint(d / "last.pt")
    assert len(calls) == 1 and [s.tolist() for s in calls[0]] == [s.tolist() for s in states]


def test_a_gpu_checkpoint_resumes_on_a_host_without_cuda_without_touching_cuda(
    saved, tmp_path, monkeypatch
):
    _, ckpt = saved
    d = _write(tmp_path, {**ckpt, "cuda_rng": [torch.arange(8, dtype=torch.uint8)]})
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer = _fresh()
    trainer.load_checkpoint(d / "last.pt")
    assert calls == []
    assert torch.equal(torch.get_rng_state(), ckpt["torch_rng"])


def test_a_carried_state_that_is_not_one_per_lane_group_is_refused_with_the_fix(saved, tmp_path):
    _, ckpt = saved
    for i, carried in enumerate((_carried(ckpt)[:1], tuple(_carried(ckpt)))):
        d = _write(tmp_path, {**ckpt, "carried": flatten_state(carried)}, f"c{i}")
        msg = (
            f"checkpoint {d / 'last.pt'} does not hold one carried state per lane group; this "
            f"run has 2 lane groups. Delete the checkpoint to start afresh."
        )
        with pytest.raises(ValueError) as err:
            _fresh().load_checkpoint(d / "last.pt")
        assert str(err.value) == msg


def test_a_carried_state_of_other_lanes_is_refused_with_the_path_and_the_fix(saved, tmp_path):
    path, _ = saved
    data = [toy_sequences(2, 64, 0), toy_sequences(1, 64, 2)], toy_sequences(1, 64, 1)
    with pytest.raises(ValueError) as err:
        _fresh(data=data).load_checkpoint(path)
    assert str(err.value) == (
        f"checkpoint {path} carries a state of [3] lanes for lane group 0, which has 2. "
        f"Delete the checkpoint to start afresh."
    )


def test_every_lane_tensor_counts_and_scalars_carry_no_lanes(saved, tmp_path):
    """A 1-d tensor of the wrong lanes is refused; a 0-d one (no lane dimension) is kept."""
    _, ckpt = saved
    one = [{"h": torch.zeros(3, 4), "pos": torch.zeros(2)}, {"h": torch.zeros(1, 4)}]
    d = _write(tmp_path, {**ckpt, "carried": flatten_state(one)}, "one_d")
    with pytest.raises(ValueError, match=r"carries a state of \[2, 3\] lanes for lane group 0"):
        _fresh().load_checkpoint(d / "last.pt")
    scalar = [{"h": torch.zeros(3, 4), "n": torch.tensor(7)}, {"h": torch.ones(1, 4)}]
    d = _write(tmp_path, {**ckpt, "carried": flatten_state(scalar)}, "zero_d")
    trainer = _fresh()
    trainer.load_checkpoint(d / "last.pt")
    _assert_state_equal(trainer.carried, scalar)


# -- a 2-rank world, simulated -------------------------------------------------------------


def test_rank_0_reads_the_checkpoint_sends_it_and_keeps_its_own_lanes(saved, world, caplog):
    path, ckpt = saved
    trainer = _as_rank(_fresh(path.parent), 0)
    sent = world(0)
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert trainer._resume(True) is True
    # rank 0 broadcast the checkpoint as it read it (onto the CPU) and where from
    assert len(sent) == 1 and sent[0][1] == str(path)
    assert sent[0][0].keys() == ckpt.keys()
    _assert_restored(trainer, ckpt)
    # a checkpoint of one process (no rank RNG states): rank 0 keeps its stream
    assert torch.equal(torch.get_rng_state(), ckpt["torch_rng"])
    full = _carried(ckpt)
    _assert_state_equal(trainer.carried, [_slice(full[0], 0, 2), _slice(full[1], 0, 1)])
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        _resumed_line(path, ckpt)
    ]


def test_each_rank_resumes_its_own_rng_stream_from_a_checkpoint_of_this_world(
    saved, tmp_path, world
):
    _, ckpt = saved
    two = _two_rank_ckpt(ckpt)
    d = _write(tmp_path, two)
    full = _carried(ckpt)
    for rank, lanes in ((0, [(0, 2), (0, 1)]), (1, [(2, 3), (0, 1)])):
        trainer = _as_rank(_fresh(d), rank)
        world(rank, from_rank0=(torch.load(d / "last.pt", weights_only=True), str(d / "last.pt")))
        assert trainer._resume(True) is True
        _assert_restored(trainer, ckpt)
        assert torch.equal(torch.get_rng_state(), two["rank_torch_rng"][rank]), rank
        want = [_slice(s, lo, hi) for s, (lo, hi) in zip(full, lanes, strict=True)]
        _assert_state_equal(trainer.carried, want)


def test_a_checkpoint_of_another_world_size_reseeds_the_dropout_of_ranks_past_0(
    saved, tmp_path, world
):
    """Rank 0 keeps the checkpoint's stream; rank 1 starts from seed + rank + step."""
    _, ckpt = saved
    three = {**ckpt, "world_size": 3, "rank_torch_rng": [_rng_of(100 + r) for r in range(3)]}
    three["rank_cuda_rng"] = [torch.zeros(0, dtype=torch.uint8)] * 3
    for written in (ckpt, three):
        d = _write(tmp_path, written, f"w{len(written.get('rank_torch_rng', []))}")
        payload = (torch.load(d / "last.pt", weights_only=True), str(d / "last.pt"))
        trainer = _as_rank(_fresh(d), 0)
        world(0)
        assert trainer._resume(True) is True
        assert torch.equal(torch.get_rng_state(), ckpt["torch_rng"])
        trainer = _as_rank(_fresh(), 1)
        world(1, from_rank0=payload)
        assert trainer._resume(True) is True
        _assert_restored(trainer, ckpt)
        seed = quick_cfg().seed + 1 + STOP_AT
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(seed).get_state())


def test_rank_1_takes_rank_0s_checkpoint_and_never_reads_its_own(saved, tmp_path, world, caplog):
    """Rank 1's own last.pt (here unreadable) is not looked at; it names rank 0's file."""
    path, ckpt = saved
    own = tmp_path / "rank1"
    own.mkdir()
    (own / "last.pt").write_bytes(b"not a checkpoint")
    trainer = _as_rank(_fresh(own), 1)
    sent = world(1, from_rank0=(torch.load(path, weights_only=True), str(path)))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    assert trainer._resume(True) is True
    assert sent == [(None, str(own / "last.pt"))]
    _assert_restored(trainer, ckpt)
    full = _carried(ckpt)
    _assert_state_equal(trainer.carried, [_slice(full[0], 2, 3), _slice(full[1], 0, 1)])
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER] == [
        (logging.DEBUG, _resumed_line(path, ckpt))
    ]


def test_rank_0_without_a_checkpoint_tells_every_rank_to_start_afresh(saved, tmp_path, world):
    path, _ = saved
    trainer = _as_rank(_fresh(tmp_path / "empty"), 0)
    sent = world(0)
    assert trainer._resume(True) is False
    assert sent == [(None, str(tmp_path / "empty" / "last.pt"))]
    trainer = _as_rank(_fresh(path.parent), 0)  # there is one, but resume=False
    sent = world(0)
    assert trainer._resume(False) is False
    assert sent[0][0] is None and trainer.step == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_rank_0_reads_a_gpu_checkpoint_onto_the_cpu(saved, tmp_path, world):
    _, ckpt = saved
    d = _cuda_tagged(tmp_path, ckpt)
    trainer = _as_rank(_fresh(d), 0)
    sent = world(0)
    assert trainer._resume(True) is True
    assert all(t.device.type == "cpu" for t in sent[0][0]["weights"].values())
    _assert_restored(trainer, ckpt)


# torch warns where the variable overrides a default: the test judges the load, not the warning
@pytest.mark.filterwarnings("ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
def test_rank_0_refuses_pickled_code_and_every_rank_learns_why(saved, tmp_path, world, monkeypatch):
    _, ckpt = saved
    d = _booby_trapped(tmp_path, ckpt)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    trainer = _as_rank(_fresh(d), 0)
    world(0)
    with pytest.raises(distributed.RankFailed) as err:
        trainer._resume(True)
    assert str(err.value).startswith(
        f"rank 0 failed to read the checkpoint {d / 'last.pt'}: UnpicklingError: Weights only"
    )
    assert _RunsCode.ran == []


def test_a_checkpoint_that_does_not_fit_one_ranks_lanes_fails_that_rank_agreed(saved, world):
    """4 lanes on 2 ranks: rank 1 holds lanes 2-3, of which a 3-lane state has one; the
    failure is agreed, naming the rank, the checkpoint and the fix."""
    path, ckpt = saved
    data = [toy_sequences(4, 64, 0), toy_sequences(1, 64, 2)], toy_sequences(1, 64, 1)
    trainer = _as_rank(_fresh(data=data), 1)
    world(1, from_rank0=(torch.load(path, weights_only=True), str(path)))
    with pytest.raises(distributed.RankFailed) as err:
        trainer._resume(True)
    assert str(err.value) == (
        f"rank 1 failed to restore the checkpoint {path}: ValueError: checkpoint {path} carries "
        f"a state of [1] lanes for lane group 0, which has 4. Delete the checkpoint to start "
        f"afresh."
    )


class _Moves(TorchFunctionMode):
    """Records the device each Tensor.to(device) call sends a view of `tensors` to."""

    def __init__(self, tensors):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in tensors}
        self.devices = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args[0].untyped_storage().data_ptr() in self.storages:
            self.devices.append(args[1] if len(args) > 1 else kwargs.get("device"))
        return func(*args, **kwargs)


def test_a_ranks_carried_state_is_sent_to_its_device(saved, world):
    """Each carried tensor of the rank's lanes, as rank 0 sent it (read onto the CPU), is
    moved to the rank's device (the CPU here: the move is watched)."""
    path, ckpt = saved
    trainer = _as_rank(_fresh(path.parent), 1)
    payload = torch.load(path, weights_only=True)
    world(1, from_rank0=(payload, str(path)))
    with _Moves(payload["carried"]["tensors"]) as moves:
        assert trainer._resume(True) is True
    assert moves.devices == [trainer.device] * len(ckpt["carried"]["tensors"])


def _no_carried(ckpt, **extra):
    return {**ckpt, "carried": flatten_state([None, None]), **extra}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_rank_restores_its_own_cuda_generator_only_on_a_gpu(saved, world, monkeypatch, device):
    """A checkpoint of GPU ranks: on a GPU rank its own CUDA state goes back; a CPU rank
    (--device cpu) never touches CUDA."""
    path, ckpt = saved
    cuda = (torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8))
    two = _no_carried(_two_rank_ckpt(ckpt, cuda))
    trainer = _as_rank(_fresh(), 1)
    trainer.device = torch.device(device)  # no carried tensor is moved: no GPU needed
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", calls.append)
    world(1, from_rank0=(two, str(path)))
    assert trainer._resume(True) is True
    assert torch.equal(torch.get_rng_state(), two["rank_torch_rng"][1])
    assert [c.tolist() for c in calls] == ([cuda[1].tolist()] if device == "cuda" else [])
