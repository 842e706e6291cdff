import pytest
import torch

from cli.errors import ConfigError
from datamodules import SplitDigits
from datamodules.base import EpochShuffleSampler, UnpaddedShardSampler


@pytest.fixture(scope="module")
def digits():
    dm = SplitDigits(num_tasks=5)
    dm.setup()
    return dm


def test_split_sizes_are_a_stratified_80_20(digits):
    n_train = sum(len(digits.train_dataset(t)) for t in range(5))
    n_test = sum(len(digits.eval_dataset(t)) for t in range(5))
    assert (n_train, n_test) == (1437, 360)
    test_labels = torch.cat([digits.eval_dataset(t).tensors["y"] for t in range(5)])
    per_class = torch.bincount(test_labels, minlength=10)
    assert per_class.min() >= 35 and per_class.max() <= 37  # 1797 digits, ~180 per class


def test_tasks_own_consecutive_label_ranges(digits):
    assert digits.num_tasks == 5 and digits.stream.classes_per_task == (2,) * 5
    for t in range(5):
        ds = digits.train_dataset(t)
        assert set(ds.tensors["y"].tolist()) == {2 * t, 2 * t + 1}
        assert (ds.tensors["task"] == t).all()
        item = ds[0]
        assert set(item) == {"x", "y", "task"} and item["x"].shape == (1, 8, 8)
        assert 0.0 <= float(ds.tensors["x"].min()) and float(ds.tensors["x"].max()) <= 1.0


def test_class_order_renumbers_labels():
    dm = SplitDigits(num_tasks=2, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    dm.setup()
    ref = SplitDigits(num_tasks=2)
    ref.setup()
    # Task 0 holds original digits 9..5, renumbered 0..4: original 9 -> 0.
    assert dm.task_names[0] == "classes 9,8,7,6,5"
    n9 = int((ref.eval_dataset(1).tensors["y"] == 9).sum())
    assert int((dm.eval_dataset(0).tensors["y"] == 0).sum()) == n9


def test_classes_that_do_not_split_into_tasks_are_refused():
    with pytest.raises(ConfigError, match=r"data.num_tasks=3: 10 classes do not split into 3 tasks.*\[1, 2, 5, 10\]"):
        SplitDigits(num_tasks=3)
    with pytest.raises(ConfigError, match="permutation"):
        SplitDigits(num_tasks=2, class_order=[0, 1, 2])


def test_train_on_seen_serves_the_union_of_tasks(digits):
    dm = SplitDigits(num_tasks=5, train_on="seen")
    dm.setup()
    dm.set_task(2)
    labels = torch.cat([b["y"] for b in dm.train_dataloader()])
    assert set(labels.tolist()) == set(range(6))
    assert len(labels) == sum(len(dm.train_dataset(t)) for t in range(3))


def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_shards_disjointly():
    data = list(range(23))
    a = EpochShuffleSampler(data, num_replicas=1, rank=0, seed=5)
    b = EpochShuffleSampler(data, num_replicas=1, rank=0, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert sorted(a) == data
    shards = [EpochShuffleSampler(data, num_replicas=2, rank=r, seed=5) for r in range(2)]
    for s in shards:
        s.set_epoch(3)
    merged = list(shards[0]) + list(shards[1])
    assert len(shards[0]) == len(shards[1]) == 12 and set(merged) == set(data)


def test_steps_mode_epoch_has_exact_length():
    s = EpochShuffleSampler(list(range(10)), num_replicas=1, rank=0, seed=0, total=25)
    assert len(list(s)) == len(s) == 25


def test_eval_shards_cover_every_item_exactly_once():
    data = list(range(11))
    shards = [list(UnpaddedShardSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(shards, [])) == data
    assert [len(UnpaddedShardSampler(data, num_replicas=3, rank=r)) for r in range(3)] == [4, 4, 3]


@pytest.mark.parametrize(("pin_memory", "pinned"), [(None, False), (True, True), (False, False)])
def test_pin_memory_reaches_every_loader(pin_memory, pinned):
    """`pin_memory` pins train and eval batches; by default only when training on CUDA (never on CPU)."""
    dm = SplitDigits(num_tasks=5, pin_memory=pin_memory)
    dm.setup()
    assert [loader.pin_memory for loader in (dm.train_dataloader(), *dm.eval_dataloaders())] == [pinned] * 6
