"""Split-ImageNet-R, Split-CUB-200 and Split-Cars-196 on tiny ImageFolder trees (4 classes, images of varied
sizes), their transforms against PIL computed by hand, and their configs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate

from cli.errors import ConfigError
from datamodules import SplitCars196, SplitCUB200, SplitImageNetR
from datamodules.lmsrr_benchmarks import RandomResizedCrop, resized_crop_boxes
from tests.conftest import config

BENCHMARKS = (SplitImageNetR, SplitCUB200, SplitCars196)
SIZES = [(90, 60), (64, 130), (300, 200)]  # (width, height) of a class's images, in turn


def _flat(value: int, size: tuple[int, int]) -> Image.Image:
    """An RGB image of `size` (width, height) whose R channel is `value` everywhere (any resize keeps it)."""
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[..., 0] = value
    arr[..., 1] = 7
    return Image.fromarray(arr)


def write_tree(root, classes: int = 4, per_class: int = 3) -> dict[int, tuple[int, int]]:
    """train/ and test/ with one folder per class; image k of class c has R = 10c + k and size SIZES[k]
    (train), and R = 10c (test). Returns R -> (height, width) of the training images."""
    sizes = {}
    for c in range(classes):
        for split, n in (("train", per_class), ("test", 1)):
            (root / split / f"class{c}").mkdir(parents=True)
            for k in range(n):
                _flat(10 * c + k, SIZES[k % len(SIZES)]).save(root / split / f"class{c}" / f"{k}.png")
                sizes[10 * c + k] = SIZES[k % len(SIZES)][::-1]
    return sizes


@pytest.fixture
def four_classes(monkeypatch):
    for cls in BENCHMARKS:
        monkeypatch.setattr(cls, "num_classes", 4)


def _train_step(dm, batch: dict, step: int) -> dict:
    dm.trainer = SimpleNamespace(training=True, global_step=step, global_rank=0)
    return dm.on_after_batch_transfer(dict(batch), 0)


@pytest.mark.parametrize("cls", BENCHMARKS, ids=lambda c: c.__name__)
def test_tree_is_read_into_tasks_of_224_inputs(cls, tmp_path, four_classes):
    sizes = write_tree(tmp_path)
    dm = cls(root=str(tmp_path), num_tasks=2, class_order=[3, 2, 1, 0], seed=0)
    dm.setup()
    assert dm.num_tasks == 2 and dm.stream.classes_per_task == (2, 2) and dm.stream.input_shape == (3, 224, 224)
    stored = 300 if cls is SplitCUB200 else 224  # CUB keeps its 300 x 300 squash, the others 224
    task0 = dm.train_dataset(0)
    assert len(task0) == 6 and len(dm.eval_dataset(1)) == 2
    for item in task0:  # task 0 holds class folders 3 and 2, relabelled 0 and 1
        value = int(item["x"][0, 100, 100])
        assert item["x"].shape == (3, stored, stored) and item["x"].dtype == torch.uint8
        assert value // 10 == 3 - int(item["y"])
        if cls is SplitImageNetR:  # the original's (height, width), split with its image
            assert tuple(item["size"].tolist()) == sizes[value]
    test_item = dm.eval_dataset(0)[0]
    assert test_item["x"].shape == (3, 224, 224) and test_item["x"].dtype == torch.float32
    out = _train_step(dm, default_collate([task0[i] for i in range(4)]), step=1)
    assert out["x"].shape == (4, 3, 224, 224) and out["x_raw"].shape == (4, 3, stored, stored)
    assert "size" not in out
    # Flat images stay flat whatever the crop: the normalised value of the R channel is known.
    mean, std = dm.stream.normalization
    expected = (out["x_raw"][:, 0, 0, 0] - mean[0]) / std[0]
    assert torch.allclose(out["x"][:, 0].amin(dim=(1, 2)), expected, atol=1e-4)
    assert torch.allclose(out["x"][:, 0].amax(dim=(1, 2)), expected, atol=1e-4)
    replayed = dm.stream.train_transform(out["x_raw"])  # what a replay memory does with x_raw
    assert replayed.shape == (4, 3, 224, 224)


@pytest.mark.parametrize(
    "cls, extra, resized, top, left",
    [
        # 320 x 240 -> shorter side 256: 341 x 256 (341.33 truncated), centre 224 at (16, round(58.5) = 58)
        (SplitCUB200, {}, (341, 256), 16, 58),
        (SplitImageNetR, {}, (341, 256), 16, 58),
        (SplitImageNetR, {"test_resize": "square"}, (256, 256), 16, 16),
        # Cars: shorter side 224: 298 x 224 (298.67 truncated), centre 224 at (0, 37)
        (SplitCars196, {}, (298, 224), 0, 37),
    ],
)
def test_the_test_transform_is_resize_then_centre_crop(cls, extra, resized, top, left, tmp_path, four_classes):
    write_tree(tmp_path, per_class=1)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    photo.save(tmp_path / "test" / "class0" / "0.png")
    dm = cls(root=str(tmp_path), num_tasks=2, **extra)
    dm.setup()
    by_hand = np.asarray(photo.resize(resized, Image.BICUBIC))[top : top + 224, left : left + 224]
    mean, std = torch.tensor(dm.stream.normalization).view(2, 3, 1, 1)
    expected = (torch.from_numpy(by_hand.copy()).permute(2, 0, 1) / 255 - mean) / std
    assert torch.allclose(dm.eval_dataset(0)[0]["x"], expected, atol=1e-5)


@pytest.mark.parametrize("cls", BENCHMARKS, ids=lambda c: c.__name__)
def test_train_draws_follow_the_step_seed(cls, tmp_path, four_classes):
    write_tree(tmp_path, per_class=2)
    rng = np.random.default_rng(1)
    for k in range(2):  # textured images, so every crop or flip shows
        Image.fromarray(rng.integers(0, 256, (150 + 40 * k, 260, 3), dtype=np.uint8)).save(
            tmp_path / "train" / "class0" / f"{k}.png"
        )
    dm = cls(root=str(tmp_path), num_tasks=2, seed=0)
    dm.setup()
    batch = default_collate([dm.train_dataset(0)[i] for i in range(2)] * 4)
    first, again, other = (_train_step(dm, batch, step)["x"] for step in (5, 5, 6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    dm.seed = 1
    assert not torch.equal(first, _train_step(dm, batch, 5)["x"])


def test_resized_crop_draws_its_box_in_the_originals_pixels():
    """A crop cut from the stored 224 squash of a wide original shows what the same box of the original shows."""
    height, width = 240, 480
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    original = torch.stack([xs, ys, xs * ys])[None].double()  # smooth, so resolution hardly matters
    stored = F.interpolate(original, size=(224, 224), mode="bicubic", antialias=True)
    sizes = torch.tensor([[height, width]] * 8)
    torch.manual_seed(3)
    cut = RandomResizedCrop()(stored.expand(8, -1, -1, -1).contiguous(), sizes)
    torch.manual_seed(3)
    for k, (top, left, h, w) in enumerate(resized_crop_boxes(sizes).tolist()):
        assert 0.75 - 0.02 <= w / h <= 4 / 3 + 0.02 and 0.08 - 0.01 <= h * w / (height * width) <= 1
        box = original[:, :, top : top + h, left : left + w]
        expected = F.interpolate(box, size=(224, 224), mode="bicubic", antialias=True)
        assert (cut[k] - expected[0]).abs().mean() < 0.01, (k, top, left, h, w)


def test_boxes_fall_back_to_a_centre_crop_of_allowed_ratio():
    torch.manual_seed(0)
    assert resized_crop_boxes(torch.tensor([[10, 1000]])).tolist() == [[0, 493, 10, 13]]  # 1000 wide: 13 = 10 x 4/3


def test_bad_inputs_name_the_folder_file_or_option(tmp_path, four_classes):
    write_tree(tmp_path, classes=3)
    with pytest.raises(ConfigError, match=r"train has 3 class folders but Split-CUB-200 has 4"):
        SplitCUB200(root=str(tmp_path), num_tasks=2).setup()
    write_tree(tmp_path / "full")
    (tmp_path / "full" / "test" / "class2" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"class2/0.png: not a readable image.*remove or replace it"):
        SplitImageNetR(root=str(tmp_path / "full"), num_tasks=2).setup()
    with pytest.raises(ConfigError, match=r"data.root: .*nowhere/train not found"):
        SplitCars196(root=str(tmp_path / "nowhere"), num_tasks=2).setup()
    with pytest.raises(ConfigError, match=r"data.train_size=100.*choose 224 or more"):
        SplitImageNetR(root=str(tmp_path), train_size=100)
    with pytest.raises(ConfigError, match=r"data.num_tasks=3: 4 classes do not split into 3 tasks"):
        SplitCars196(root=str(tmp_path), num_tasks=3)


@pytest.mark.parametrize("name", ["imagenet_r", "cub200", "cars196"])
def test_config_parses_without_data_or_weights(name, capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "-c",
                config("trainer/cpu.yaml"),
                "-c",
                config(f"classification/lmsrr_{name}.yaml"),
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_modules.LMSRR" in printed and "alpha: 0.3" in printed
