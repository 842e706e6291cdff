"""Split-Tiny-ImageNet: the 200 classes of Tiny-ImageNet (64x64) in 10 tasks of 20, read from the
official `tiny-imagenet-200/` folder (training images per class, the labelled validation set as the
test set), with Mammoth's augmentation and normalisation."""

from __future__ import annotations

from cli.errors import ConfigError
from datamodules.images import ImageClassIncremental, torchvision_datasets

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


class SplitTinyImageNet(ImageClassIncremental):
    """`root/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG,
    val/val_annotations.txt}`. Labels follow the sorted WordNet ids. All images are decoded into
    memory once at setup (110,000 x 64 x 64 x 3 bytes = 1.35 GB)."""

    num_classes = 200
    input_shape = (3, 64, 64)
    _resize = (64, 64)
    folder = "tiny-imagenet-200"
    mean = (0.4802, 0.4480, 0.3975)
    std = (0.2770, 0.2691, 0.2821)

    def __init__(self, root: str = "data", num_tasks: int = 10, **kwargs):
        super().__init__(root=root, num_tasks=num_tasks, **kwargs)

    def is_present(self) -> bool:
        return (self.root / self.folder / "wnids.txt").is_file()

    def fetch(self) -> None:
        torchvision_datasets().utils.download_and_extract_archive(URL, str(self.root))

    def setup(self, stage: str | None = None) -> None:
        if self._train:
            return
        base = self.root / self.folder
        annotations = base / "val" / "val_annotations.txt"
        for needed in (base / "wnids.txt", base / "train", annotations):
            if not needed.exists():
                raise ConfigError(
                    f"data.root: {needed} not found; unzip tiny-imagenet-200.zip ({URL}) into {self.root}, "
                    "or set data.init_args.download: true"
                )
        wnids = sorted(base.joinpath("wnids.txt").read_text().split())
        if twice := sorted({w for w in wnids if wnids.count(w) > 1}):
            raise ConfigError(f"{base / 'wnids.txt'}: {twice[0]} is listed twice; re-extract the archive")
        if len(wnids) != self.num_classes:
            raise ConfigError(f"{base / 'wnids.txt'}: {len(wnids)} class ids, expected {self.num_classes}")
        label = {w: i for i, w in enumerate(wnids)}
        train_files, train_y = [], []
        for w in wnids:
            files = sorted((base / "train" / w / "images").glob("*.JPEG"))
            if not files:
                raise ConfigError(f"{base / 'train' / w / 'images'}: no .JPEG images; re-extract the archive")
            train_files += files
            train_y += [label[w]] * len(files)
        test_files, test_y = [], []
        for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in label:
                raise ConfigError(f"{annotations}:{line_no}: expected '<file>\\t<wnid>\\t...', got {line!r}")
            test_files.append(base / "val" / "images" / fields[0])
            test_y.append(label[fields[1]])
        self._split_encoded(train_files, train_y, test_files, test_y)
