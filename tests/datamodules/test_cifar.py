"""Split-CIFAR readers against tiny files written in the CIFAR python-batch format."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

from cli.errors import ConfigError
from datamodules import SplitCIFAR10, SplitCIFAR100


def write_cifar10(root, per_file: int = 10) -> None:
    """Five training batches and a test batch; image i has pixel value i in R, 2i in G, 3i in B."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        values = np.arange(per_file, dtype=np.uint8)
        data = np.concatenate([np.repeat(values[:, None] * k, 1024, axis=1) for k in (1, 2, 3)], axis=1)
        with open(folder / name, "wb") as f:
            pickle.dump(
                {b"batch_label": name.encode(), b"data": data, b"labels": list(range(10)) * (per_file // 10)}, f
            )


def write_cifar100(root, n: int = 200) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        data = np.random.default_rng(0).integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": [i % 100 for i in range(n)], b"coarse_labels": [0] * n}, f)


def test_cifar10_layout_labels_and_normalisation(tmp_path):
    write_cifar10(tmp_path)
    dm = SplitCIFAR10(root=str(tmp_path))
    dm.setup()
    assert dm.num_tasks == 5 and dm.stream.classes_per_task == (2,) * 5
    train0 = dm.train_dataset(0)
    assert len(train0) == 10 and set(train0.tensors["y"].tolist()) == {0, 1}  # 5 files x 2 images of classes 0/1
    raw = train0[1]["x"]  # image 1: R = 1, G = 2, B = 3 everywhere, stored raw (uint8)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 32, 32)
    assert raw[:, 0, 0].tolist() == [1, 2, 3] and (raw[0] == 1).all()
    item = dm.eval_dataset(0)[1]["x"]  # evaluation items arrive normalised
    expected = (torch.tensor([1, 2, 3]) / 255 - torch.tensor(dm.mean)) / torch.tensor(dm.std)
    assert torch.allclose(item[:, 5, 5], expected, atol=1e-5)


def test_training_batches_are_augmented_and_keep_the_raw_images(tmp_path):
    write_cifar10(tmp_path)
    dm = SplitCIFAR10(root=str(tmp_path), batch_size=4)
    dm.setup()

    class _Trainer:
        training, global_rank, world_size, global_step = True, 0, 1, 0

    dm.trainer = _Trainer()
    batch = next(iter(dm.train_dataloader()))
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["x_raw"].dtype == torch.float32 and out["x_raw"].max() <= 1.0
    assert out["x"].shape == (4, 3, 32, 32)
    # Normalised: a constant image maps to (v - mean) / std except where the crop padded zeros in.
    v = out["x_raw"][:, :, 16, 16]
    centre = out["x"][:, :, 16, 16]
    assert torch.allclose(centre, (v - torch.tensor(dm.mean)) / torch.tensor(dm.std), atol=1e-5)
    # The augmentation of a step is a function of (seed, step, rank): repeatable, and new at the next step.
    torch.rand(5)
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)["x"], out["x"])
    _Trainer.global_step = 1
    assert not torch.equal(dm.on_after_batch_transfer(batch, 0)["x"], out["x"])
    _Trainer.training = False
    assert dm.on_after_batch_transfer(batch, 0) is batch  # evaluation batches untouched


def test_cifar100_reads_fine_labels_into_ten_tasks(tmp_path):
    write_cifar100(tmp_path)
    dm = SplitCIFAR100(root=str(tmp_path))
    dm.setup()
    assert dm.num_tasks == 10 and dm.stream.classes_per_task == (10,) * 10
    assert set(dm.train_dataset(3).tensors["y"].tolist()) == set(range(30, 40))


def test_missing_or_broken_files_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"data_batch_1 not found; extract cifar-10-python.tar.gz into"):
        SplitCIFAR10(root=str(tmp_path)).setup()
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="test_batch: not a CIFAR python batch"):
        SplitCIFAR10(root=str(tmp_path)).setup()


class _Planted:
    """Pickles as a call of `func(*args)`: what a crafted file would run while it is loaded."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_crafted_batches_run_no_code(tmp_path):
    import builtins
    import os

    from datamodules.cifar import read_cifar_batch

    marker = tmp_path / "ran"
    write_cifar10(tmp_path / "data")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3"
    for func, args in (
        (os.system, (f"touch {marker}",)),  # pickled as posix.system
        (builtins.open, (str(marker), "w")),  # io.open
        (builtins.eval, (f"open({str(marker)!r}, 'w')",)),  # builtins.eval (__builtin__.eval in protocol 2)
    ):
        for protocol in (2, pickle.HIGHEST_PROTOCOL):
            with open(batch, "wb") as f:
                pickle.dump({b"data": _Planted(func, *args), b"labels": [0] * 10}, f, protocol=protocol)
            refused = rf"names \w+\.{func.__name__}, which loading would call"
            with pytest.raises(ConfigError) as err:
                read_cifar_batch(batch, "labels")
            message = str(err.value)
            assert message.startswith(f"{batch}: not a CIFAR python batch") and re.search(refused, message)
            assert "\n" not in message
            with pytest.raises(ConfigError, match=f"data_batch_3: .*{refused}"):  # through the datamodule too
                SplitCIFAR10(root=str(tmp_path / "data")).setup()
            assert not marker.exists()


def test_genuine_batches_load_under_every_pickle_protocol(tmp_path):
    from datamodules.cifar import read_cifar_batch
    from datamodules.restricted_pickle import RefusedGlobal, load_restricted

    data = np.arange(4 * 3072, dtype=np.uint8).reshape(4, 3072)
    batch = {b"data": data, b"labels": [3, 1, 4, 1], b"scalar": np.int64(7), b"floats": np.linspace(0, 1, 5)}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"batch_p{protocol}"
        with open(path, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        raw = load_restricted(path, encoding="bytes")
        np.testing.assert_array_equal(raw[b"data"], data)
        assert raw[b"data"].dtype == np.uint8 and raw[b"scalar"] == 7 and raw[b"floats"].dtype == np.float64
        x, y = read_cifar_batch(path, "labels")
        assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32) and y.tolist() == [3, 1, 4, 1]
        assert torch.equal(x.reshape(4, -1), torch.from_numpy(data))
    # protocol 2 stores bytes through _codecs.encode: only its latin1 form is accepted
    crafted = pickle.dumps(_Planted(__import__("_codecs").encode, "x", "rot13"), protocol=2)
    (tmp_path / "codec").write_bytes(crafted)
    with pytest.raises(RefusedGlobal, match="rot13"):
        load_restricted(tmp_path / "codec")
