"""Class-incremental splits of a labelled image set stored as webdataset shards (tar files of
`<key>.<image ext>` + `<key>.cls` members), the format for sets whose files are too many for a folder."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path

from cli.errors import ConfigError
from datamodules.image_folder import IMAGENET_MEAN, IMAGENET_STD
from datamodules.images import ImageClassIncremental


def read_shards(root: Path, pattern: str, image_keys: str, label_key: str) -> tuple[list[bytes], list[int], list[str]]:
    """Encoded images, integer labels and sample keys of every sample in the shards `pattern`
    (brace notation, e.g. `train-{000000..000009}.tar`, relative to `root`)."""
    try:
        import webdataset as wds
    except ImportError:
        raise ConfigError("data: webdataset shards need webdataset: pip install -e '.[classification]'") from None
    urls = [str(root / u) for u in wds.shardlists.expand_urls(pattern)]
    if missing := [u for u in urls if not Path(u).is_file()]:
        raise ConfigError(
            f"data.root: shard {missing[0]} not found ({len(missing)} of {len(urls)} missing); "
            "check root and the shard pattern"
        )
    for url in urls:  # webdataset stops quietly at a truncated shard; tarfile reads every header to the end
        try:
            with tarfile.open(url) as archive:
                archive.getmembers()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ConfigError(f"{url}: not a complete tar shard ({err}); re-create it") from None
    blobs, labels, keys = [], [], []
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    try:
        for sample in dataset:
            image = next((sample[k] for k in image_keys.split(";") if k in sample), None)
            where = f"{sample['__url__']}: sample {sample['__key__']!r}"
            if image is None or label_key not in sample:
                fields = sorted(k for k in sample if not k.startswith("__"))
                raise ConfigError(
                    f"{where} has {fields}, expected one of {image_keys!r} and {label_key!r}; "
                    "set data.init_args.image_keys / label_key"
                )
            try:
                labels.append(int(sample[label_key].decode().strip()))
            except ValueError:
                raise ConfigError(f"{where}: its .{label_key} is not an integer label") from None
            blobs.append(image)
            keys.append(f"{sample['__url__']}:{sample['__key__']}")
    except (OSError, ValueError, tarfile.TarError) as err:  # a truncated or non-tar shard
        raise ConfigError(f"data.root: cannot read the shards {pattern!r} ({err}); re-create them") from None
    if not blobs:
        raise ConfigError(f"data.root: the shards {pattern!r} hold no samples")
    return blobs, labels, keys


def _check_labels(labels: list[int], num_classes: int, split: str) -> None:
    if bad := [y for y in labels if not 0 <= y < num_classes]:
        raise ConfigError(f"data.num_classes={num_classes}: the {split} shards have label {bad[0]}")


class SplitWebDataset(ImageClassIncremental):
    """`root/<train_shards>` and `root/<test_shards>`; integer labels 0..num_classes-1 in `.cls`.
    Samples are decoded into memory at setup (uint8), so indexing, shuffling, DDP sharding and resume
    work as for the other image sets; that bounds the set by the host's memory, not by the file count.

    Args:
        num_classes: classes of the set (default: the largest training label + 1).
        image_size: [H, W] to resize every image to (default: they must share one size).
    """

    def __init__(
        self,
        root: str = "data",
        train_shards: str = "train-{000000..000000}.tar",
        test_shards: str = "test-{000000..000000}.tar",
        num_tasks: int = 5,
        num_classes: int | None = None,
        class_order: Sequence[int] | None = None,
        image_size: tuple[int, int] | None = None,
        image_keys: str = "jpg;jpeg;png;webp",
        label_key: str = "cls",
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        **kwargs,
    ):
        super().__init__(root=root, num_tasks=num_tasks, class_order=class_order, **kwargs)
        self._set_geometry(image_size, mean, std)
        self._keys = image_keys, label_key
        # The stream (classes, input size) must be known before the model is built: read the training shards now.
        self._train_blobs, self._train_labels, self._train_names = read_shards(self.root, train_shards, *self._keys)
        self.test_shards = test_shards
        classes = num_classes or max(self._train_labels) + 1
        _check_labels(self._train_labels, classes, "training")
        self._adopt_classes(classes, self._train_blobs[0], self._train_names[0])

    def setup(self, stage: str | None = None) -> None:
        if self._train:
            return
        test_blobs, test_labels, test_names = read_shards(self.root, self.test_shards, *self._keys)
        _check_labels(test_labels, self.num_classes, "test")
        self._split_encoded(
            self._train_blobs, self._train_labels, test_blobs, test_labels, (self._train_names, test_names)
        )
        self._train_blobs = []  # decoded now; keep memory to one copy
