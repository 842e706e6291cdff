"""Tiny-ImageNet, ImageFolder and webdataset readers against tiny files written in each real format."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cli.errors import ConfigError
from datamodules import SplitImageFolder, SplitTinyImageNet, SplitWebDataset


def _image(value: int, size: tuple[int, int] = (8, 8)) -> Image.Image:
    """A constant RGB image whose R channel is `value` (lossless formats keep it exactly)."""
    arr = np.zeros((*size, 3), dtype=np.uint8)
    arr[..., 0] = value
    arr[..., 1] = 255 - value
    return Image.fromarray(arr)


def write_tiny_imagenet(root, per_class: int = 2, val_per_class: int = 1) -> list[str]:
    base = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)][::-1]  # listed unsorted, as in the real file
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for w in wnids:
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True)
        for k in range(per_class):
            _image(int(w[1:]), (64, 64)).save(folder / f"{w}_{k}.JPEG", format="PNG")  # content type sniffed
        for k in range(val_per_class):
            name = f"val_{w}_{k}.JPEG"
            _image(int(w[1:]), (64, 64)).save(base / "val" / "images" / name, format="PNG")
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return sorted(wnids)


def test_tiny_imagenet_reads_the_official_layout_into_ten_tasks_of_twenty(tmp_path):
    wnids = write_tiny_imagenet(tmp_path)
    dm = SplitTinyImageNet(root=str(tmp_path))
    dm.setup()
    assert dm.num_tasks == 10 and dm.stream.classes_per_task == (20,) * 10 and dm.stream.input_shape == (3, 64, 64)
    first, last = dm.train_dataset(0), dm.train_dataset(9)
    assert len(first) == 40 and len(dm.eval_dataset(0)) == 20
    # Labels follow the sorted ids: class c's images carry pixel value c (the id's number).
    assert all(int(first[i]["x"][0, 0, 0]) == int(first[i]["y"]) for i in range(len(first)))
    assert int(last[0]["y"]) >= 180 and wnids[0] == "n00000000"
    # Evaluation items are normalised with Tiny-ImageNet's statistics.
    item = dm.eval_dataset(1)[0]
    expected = (int(item["y"]) / 255 - dm.mean[0]) / dm.std[0]
    assert float(item["x"][0, 5, 5]) == pytest.approx(expected, abs=1e-5)
    assert dm.stream.normalization == (dm.mean, dm.std)


def test_tiny_imagenet_missing_root_says_what_to_put_where(tmp_path):
    with pytest.raises(ConfigError, match=r"tiny-imagenet-200.*unzip tiny-imagenet-200.zip"):
        SplitTinyImageNet(root=str(tmp_path)).setup()


def write_image_folder(root, classes=("cat", "dog", "eel", "fox"), per_class: int = 3, size=(6, 10)) -> None:
    for split, n in (("train", per_class), ("test", 1)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for k in range(n):
                _image(10 * c + k, size).save(root / split / name / f"{k}.png")


def test_image_folder_splits_sorted_class_folders_into_tasks(tmp_path):
    write_image_folder(tmp_path)
    dm = SplitImageFolder(root=str(tmp_path), num_tasks=2, mean=(0, 0, 0), std=(1, 1, 1))
    assert dm.classes == ["cat", "dog", "eel", "fox"] and dm.stream.input_shape == (3, 6, 10)
    dm.setup()
    task1 = dm.train_dataset(1)
    assert sorted(int(task1[i]["y"]) for i in range(len(task1))) == [2, 2, 2, 3, 3, 3]
    assert sorted(int(task1[i]["x"][0, 0, 0]) for i in range(3)) == [20, 21, 22]  # eel's images, uint8 raw
    assert len(dm.eval_dataset(0)) == 2
    resized = SplitImageFolder(root=str(tmp_path), num_tasks=4, image_size=(4, 4))
    assert resized.stream.input_shape == (3, 4, 4)


def test_image_folder_errors_name_the_file_and_the_fix(tmp_path):
    write_image_folder(tmp_path)
    _image(0, (7, 7)).save(tmp_path / "train" / "cat" / "odd.png")
    with pytest.raises(ConfigError, match=r"odd.png: image is 7x7.*image_size"):
        SplitImageFolder(root=str(tmp_path), num_tasks=2).setup()
    (tmp_path / "test" / "gnu").mkdir()
    with pytest.raises(ConfigError, match=r"classes \['gnu'\] are not in the training split"):
        SplitImageFolder(root=str(tmp_path), num_tasks=2, image_size=(7, 7)).setup()
    with pytest.raises(ConfigError, match="put one subfolder of images per class"):
        SplitImageFolder(root=str(tmp_path / "missing"))


def write_shards(root, split: str, labels: list[int], per_shard: int = 3) -> None:
    import webdataset as wds

    for s in range(0, len(labels), per_shard):
        with wds.TarWriter(str(root / f"{split}-{s // per_shard:06d}.tar")) as sink:
            for i, y in enumerate(labels[s : s + per_shard], start=s):
                buf = io.BytesIO()
                _image(y, (5, 5)).save(buf, format="PNG")
                sink.write({"__key__": f"{split}{i:05d}", "png": buf.getvalue(), "cls": str(y).encode()})


def test_webdataset_shards_are_read_and_split_by_class(tmp_path):
    write_shards(tmp_path, "train", [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])
    write_shards(tmp_path, "test", [5, 4, 3, 2, 1, 0])
    dm = SplitWebDataset(
        root=str(tmp_path),
        train_shards="train-{000000..000003}.tar",
        test_shards="test-{000000..000001}.tar",
        num_tasks=3,
    )
    assert dm.num_classes == 6 and dm.stream.input_shape == (3, 5, 5)
    dm.setup()
    t2 = dm.train_dataset(2)
    assert sorted(int(t2[i]["y"]) for i in range(len(t2))) == [4, 4, 5, 5]
    assert all(int(t2[i]["x"][0, 2, 2]) == int(t2[i]["y"]) for i in range(len(t2)))
    assert [len(dm.eval_dataset(t)) for t in range(3)] == [2, 2, 2]


def test_webdataset_problems_are_one_clear_line(tmp_path):
    write_shards(tmp_path, "train", [0, 1, 2])
    with pytest.raises(ConfigError, match=r"train-000001.tar not found \(1 of 2 missing\)"):
        SplitWebDataset(root=str(tmp_path), train_shards="train-{000000..000001}.tar", num_tasks=1)
    with pytest.raises(ConfigError, match=r"expected one of 'jpg' and 'cls'"):
        SplitWebDataset(root=str(tmp_path), train_shards="train-000000.tar", num_tasks=1, image_keys="jpg")
    (tmp_path / "bad-000000.tar").write_bytes(b"not a tar file at all" * 30)
    with pytest.raises(ConfigError, match="bad-000000.tar"):
        SplitWebDataset(root=str(tmp_path), train_shards="bad-000000.tar", num_tasks=1)


def test_training_items_are_raw_uint8_and_augmented_on_the_device(tmp_path):
    write_image_folder(tmp_path, size=(8, 8))
    dm = SplitImageFolder(root=str(tmp_path), num_tasks=2, batch_size=6)
    dm.setup()

    class _Trainer:
        training, global_rank, world_size, global_step = True, 0, 1, 0

    dm.trainer = _Trainer()
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].dtype == torch.uint8
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["x"].dtype == torch.float32 and out["x"].shape == (6, 3, 8, 8)
