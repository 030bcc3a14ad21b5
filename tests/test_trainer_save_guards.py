"""What a checkpoint holds, and who writes it: ml.trainer's Trainer.save_checkpoint,
_write_checkpoint, _carried_shards and _join_carried, in one process (kills the mutants
`make mutate` found surviving there; benchmarks/mutation.py, figures in
benchmarks/results/mutation.md).

The DDP path is played in-process: a plain (tiny, real) trainer is given the attributes
_setup_distributed gives rank 0 or rank 1 of a 2-rank world (distributed, rank, world_size,
the lane bounds and shards, _checkpointing) and ml.distributed's collectives are replaced by
stand-ins that play the other rank (tests/test_distributed.py runs the real thing in spawned
processes, which mutmut cannot reach); raise_if_any is the real one. What rank 1 sends is what
rank 0 then receives. Pinned: rank 1 sends its carried lanes (an empty ghost lane) and its RNG
states to rank 0 and writes nothing; rank 0 writes every lane of every group joined in rank
order, the world size and each rank's torch and CUDA RNG states; a failed write, or ranks
whose states differ in structure, raise RankFailed on every rank with the reason; no
checkpoint dir on rank 0 means no collective at all. In one process: the checkpoint's keys,
float64 losses and floats, best weights, CUDA RNG states only where CUDA is, a checkpoint dir
whose parents are missing, and a crash while saving leaving the previous last.pt and a
last.pt.tmp beside it."""

import pytest
import torch

from ml import distributed
from ml.state import flatten_state, unflatten_state
from ml.trainer import Trainer
from tests.test_trainer import make_model, quick_cfg, toy_sequences

KEYS = {
    "weights",
    "optimizer",
    "scheduler",
    "torch_rng",
    "cuda_rng",
    "epoch_losses",
    "aug_rng",
    "position",
    "floats",
    "best_weights",
    "carried",
    "history",
}
DDP_KEYS = KEYS | {"world_size", "rank_torch_rng", "rank_cuda_rng"}
WHAT = "to write the checkpoint"


@pytest.fixture(autouse=True)
def _one_thread():
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)  # bitwise-reproducible CPU kernels, as in test_trainer
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def _data():
    # two lane groups: 3 lanes (ranks 0 and 1 of 2 hold lanes 0-1 and 2) and 1 lane (rank 1
    # holds a ghost of lane 0)
    return [toy_sequences(3, 64, 0), toy_sequences(1, 64, 2)], toy_sequences(1, 64, 1)


@pytest.fixture
def trainer(tmp_path):
    model, loss = make_model()
    return Trainer(
        model, loss, *_data(), quick_cfg(), checkpoint_dir=tmp_path / "ckpt", data_parallel=False
    )


def _map(state, fn):
    flat = flatten_state(state)
    return unflatten_state({"spec": flat["spec"], "tensors": [fn(t) for t in flat["tensors"]]})


def _assert_state_equal(got, want):
    g, w = flatten_state(got), flatten_state(want)
    assert g["spec"] == w["spec"]
    assert len(g["tensors"]) == len(w["tensors"]) > 0
    for a, b in zip(g["tensors"], w["tensors"], strict=True):
        assert a.shape == b.shape
        assert torch.equal(a, b)


@pytest.fixture
def states(trainer):
    """Each group's carried state over all its lanes (a real forward of the model)."""
    with torch.no_grad():
        return [trainer.model(seq.x[:, :32], None)[1] for seq in trainer.train_data]


def _as_rank(trainer, rank, full, world=2):
    """Give a plain trainer what _setup_distributed gives rank `rank` of `world`, carrying its
    lanes of the `full` states (a ghost lane, lane 0 + 100, for a group it holds none of)."""
    trainer.distributed, trainer.rank, trainer.world_size = True, rank, world
    trainer._checkpointing = True
    trainer.train_bounds, trainer.state_bounds, trainer.train_shards = [], [], []
    trainer.carried = []
    for seq, state in zip(trainer.train_data, full, strict=True):
        lo, hi = distributed.lane_bounds(seq.lanes, rank, world, allow_empty=True)
        trainer.train_bounds.append((lo, hi))
        if hi > lo:
            trainer.state_bounds.append((lo, hi))
            trainer.train_shards.append(seq.select_lanes(lo, hi))
            trainer.carried.append(_map(state, lambda t, lo=lo, hi=hi: t[lo:hi].clone()))
        else:
            trainer.state_bounds.append((0, 1))
            trainer.train_shards.append(seq.select_lanes(0, 1))
            trainer.carried.append(_map(state, lambda t: t[0:1] + 100))
    return trainer


@pytest.fixture
def world(monkeypatch):
    """world(rank, peer=None, peer_error=None): ml.distributed's collectives as rank `rank` of
    2 sees them; the other rank gathers `peer` and reports `peer_error` (a message, or None)
    to raise_if_any. Returns the list of (obj, dst) this rank passed to gather_objects."""

    def enter(rank, peer=None, peer_error=None):
        sent = []

        def gather_objects(obj, dst=0):
            sent.append((obj, dst))
            return [obj if r == rank else peer for r in (0, 1)] if rank == dst else None

        monkeypatch.setattr(distributed, "world", lambda: (rank, 2))
        monkeypatch.setattr(distributed, "gather_objects", gather_objects)
        monkeypatch.setattr(
            distributed,
            "all_gather_objects",
            lambda obj: [obj if r == rank else peer_error for r in (0, 1)],
        )
        return sent

    return enter


def _seeded_state(seed):
    torch.manual_seed(seed)
    return torch.get_rng_state()


def _rank1_sends(trainer, states, world, tmp_path):
    """What rank 1 gathers to rank 0 (its RNG seeded 101), checking it writes nothing."""
    _as_rank(trainer, 1, states)
    trainer.checkpoint_dir = tmp_path / "rank1"
    sent = world(1)
    torch.manual_seed(101)
    assert trainer.save_checkpoint() is None
    assert not trainer.checkpoint_dir.exists()  # rank 1 writes nothing
    assert len(sent) == 1
    obj, dst = sent[0]
    assert dst == 0
    return obj


def test_rank1_sends_its_lanes_without_the_ghost_and_its_rng_to_rank0(
    trainer, states, world, tmp_path
):
    shards, rng = _rank1_sends(trainer, states, world, tmp_path)
    assert len(shards) == 2
    # group 0: its lane 2, as a flattened state of CPU tensors
    want = flatten_state(_map(states[0], lambda t: t[2:3]))
    assert shards[0]["spec"] == want["spec"]
    assert len(shards[0]["tensors"]) == len(want["tensors"]) == 4
    for a, b in zip(shards[0]["tensors"], want["tensors"], strict=True):
        assert torch.equal(a, b)
    # group 1: a ghost, the same structure with no lane at all
    ghost = flatten_state(states[1])
    assert shards[1]["spec"] == ghost["spec"]
    assert [t.shape for t in shards[1]["tensors"]] == [(0, *t.shape[1:]) for t in ghost["tensors"]]
    assert torch.equal(rng[0], _seeded_state(101))
    assert rng[1].numel() == 0


def test_rank0_writes_every_lane_joined_in_rank_order_and_every_ranks_rng(
    trainer, states, world, tmp_path
):
    peer = _rank1_sends(trainer, states, world, tmp_path)
    _as_rank(trainer, 0, states)
    trainer.checkpoint_dir = tmp_path / "ckpt"
    sent = world(0, peer)
    torch.manual_seed(100)
    path = trainer.save_checkpoint()
    assert [dst for _, dst in sent] == [0]
    assert path == tmp_path / "ckpt" / "last.pt"
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == DDP_KEYS
    carried = unflatten_state(ckpt["carried"])
    assert isinstance(carried, list) and len(carried) == 2
    _assert_state_equal(carried[0], states[0])  # lanes 0-1 of rank 0, then lane 2 of rank 1
    _assert_state_equal(carried[1], states[1])  # rank 0's lane; rank 1's ghost left out
    assert ckpt["world_size"] == 2
    s100, s101 = _seeded_state(100), _seeded_state(101)
    assert len(ckpt["rank_torch_rng"]) == 2
    assert torch.equal(ckpt["rank_torch_rng"][0], s100)
    assert torch.equal(ckpt["rank_torch_rng"][1], s101)
    assert torch.equal(ckpt["torch_rng"], s100)
    assert [t.numel() for t in ckpt["rank_cuda_rng"]] == [0, 0]
    assert ckpt["position"].tolist() == [0, 0, 0, 0, 0]


def test_each_ranks_cuda_rng_is_gathered_on_cuda_and_none_on_cpu(
    trainer, states, world, tmp_path, monkeypatch
):
    cuda0 = torch.arange(8, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: cuda0.clone())
    # a CPU rank sends an empty CUDA state, even where torch.cuda could answer
    shards, rng = _rank1_sends(trainer, states, world, tmp_path)
    assert rng[1].numel() == 0
    cuda1 = torch.full((8,), 9, dtype=torch.uint8)
    peer = (shards, (rng[0], cuda1))
    _as_rank(trainer, 0, states)
    trainer.device = torch.device("cuda")  # a CUDA rank 0 (its state is the stand-in's)
    trainer.checkpoint_dir = tmp_path / "ckpt"
    world(0, peer)
    ckpt = torch.load(trainer.save_checkpoint(), weights_only=True)
    assert len(ckpt["rank_cuda_rng"]) == 2
    assert torch.equal(ckpt["rank_cuda_rng"][0], cuda0)
    assert torch.equal(ckpt["rank_cuda_rng"][1], cuda1)


def test_a_write_that_fails_on_rank0_raises_rank_failed_with_the_reason(
    trainer, states, world, tmp_path
):
    peer = _rank1_sends(trainer, states, world, tmp_path)
    _as_rank(trainer, 0, states)
    trainer.checkpoint_dir = tmp_path / "taken"
    trainer.checkpoint_dir.write_text("a file, not a folder")
    world(0, peer)
    with pytest.raises(
        distributed.RankFailed,
        match=r"^rank 0 failed to write the checkpoint: FileExistsError: .*taken",
    ) as err:
        trainer.save_checkpoint()
    assert isinstance(err.value.__cause__, FileExistsError)


def test_rank1_raises_rank_failed_when_rank0_failed_to_write(trainer, states, world, tmp_path):
    _as_rank(trainer, 1, states)
    trainer.checkpoint_dir = None
    failed = f"rank 0 failed {WHAT}: OSError: disk full"
    world(1, peer_error=failed)
    with pytest.raises(distributed.RankFailed, match=f"^{failed}$"):
        trainer.save_checkpoint()


def test_ranks_carrying_states_of_different_structure_are_refused(trainer, states, world, tmp_path):
    shards, rng = _rank1_sends(trainer, states, world, tmp_path)
    peer = ([shards[0], flatten_state(None)], rng)  # rank 1 carries nothing in group 1
    _as_rank(trainer, 0, states)
    trainer.checkpoint_dir = tmp_path / "ckpt"
    world(0, peer)
    with pytest.raises(
        distributed.RankFailed,
        match=(
            rf"^rank 0 failed {WHAT}: RuntimeError: ranks carry states of different structure "
            r"in lane group 1$"
        ),
    ):
        trainer.save_checkpoint()
    assert not (tmp_path / "ckpt" / "last.pt").exists()


def test_without_a_checkpoint_dir_on_rank0_no_rank_gathers_or_writes(
    trainer, states, world, tmp_path
):
    for rank in (0, 1):
        _as_rank(trainer, rank, states)
        trainer._checkpointing = False  # rank 0 has no checkpoint dir (broadcast at setup)
        trainer.checkpoint_dir = tmp_path / f"rank{rank}"
        sent = world(rank)
        assert trainer.save_checkpoint() is None
        assert sent == []
        assert not trainer.checkpoint_dir.exists()


def test_a_carried_list_that_does_not_fit_the_lane_groups_fails_before_any_collective(
    trainer, states, world, tmp_path
):
    """As after a _restore that refused a checkpoint of one lane group (it raised once
    self.carried held that one state): nothing is gathered, nothing written."""
    _as_rank(trainer, 0, states)
    trainer.carried = trainer.carried[:1]
    trainer.checkpoint_dir = tmp_path / "ckpt"
    sent = world(0)
    with pytest.raises(ValueError, match="zip"):
        trainer.save_checkpoint()
    assert sent == []
    assert not trainer.checkpoint_dir.exists()


# -- one process ---------------------------------------------------------------------------


def test_a_checkpoint_holds_exact_float64_losses_floats_and_best_weights(trainer, tmp_path):
    trainer.checkpoint_dir = tmp_path / "a" / "b" / "ckpt"  # missing parents are created
    trainer._epoch_losses = [0.1, 1 / 3]
    trainer.best_val, trainer.lr_scale = 1 / 3, 0.1  # not float32 values
    best = {"model.w": torch.arange(3.0), "loss.v": torch.ones(2)}
    trainer.best_weights = best
    path = trainer.save_checkpoint()
    assert path == tmp_path / "a" / "b" / "ckpt" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == KEYS
    assert ckpt["epoch_losses"].dtype == torch.float64
    assert ckpt["epoch_losses"].tolist() == [0.1, 1 / 3]
    assert ckpt["floats"].dtype == torch.float64
    assert ckpt["floats"].tolist() == [1 / 3, 0.1]
    assert ckpt["best_weights"].keys() == best.keys()
    for k, v in best.items():
        assert torch.equal(ckpt["best_weights"][k], v)
    assert ckpt["cuda_rng"] == []  # no CUDA here


def test_a_checkpoint_without_best_weights_holds_an_empty_dict(trainer):
    assert trainer.best_weights is None
    ckpt = torch.load(trainer.save_checkpoint(), weights_only=True)
    assert ckpt["best_weights"] == {}


@pytest.mark.parametrize("cuda", [False, True])
def test_cuda_rng_states_are_saved_only_where_cuda_is(trainer, monkeypatch, cuda):
    states = [torch.arange(4, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    path = trainer.save_checkpoint()
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=True)
    assert len(ckpt["cuda_rng"]) == (1 if cuda else 0)
    if cuda:
        assert torch.equal(ckpt["cuda_rng"][0], states[0])


def test_a_crash_while_saving_leaves_the_previous_checkpoint_and_a_tmp_file(trainer, monkeypatch):
    path = trainer.save_checkpoint()
    trainer.step = 9
    written = []

    def crash(obj, f, *a, **k):
        written.append(f)
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert written == [path.parent / "last.pt.tmp"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt", "last.pt.tmp"]
    assert torch.load(path, weights_only=True)["position"].tolist()[2] == 0
