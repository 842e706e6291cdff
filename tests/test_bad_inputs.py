"""The catalogue of bad inputs. Each case runs a `lifelong` command in this process and must end with exit code
2, exactly one stderr line `lifelong: error: ...` that contains the expected words (the option or file, what
is wrong), no traceback, and no file written or changed in the case's folder. Add a case with every new
reader or option."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import config, fit_args

ER = "classification/er_splitdigits.yaml"
EWC_CONFIG = "classification/ewc_splitdigits.yaml"
FAST = ("--data.init_args.num_tasks", "2", "--task_switch.steps_per_task", "2")
CIFAR = "classification/er_cifar10.yaml"
FOLDER = "classification/er_splitdigits.yaml"
ROTATED = "classification/er_rotdigits.yaml"
R2MOE = "diffusion/r2moe_concepts_tiny.yaml"
ROBOT = "robot/er_cw3.yaml"
RID = "diffusion/rid_rewards_tiny.yaml"
ROREM = "removal/rorem_tiny.yaml"
ENGINE = "removal/data_engine_tiny.yaml"
DISCRIMINATOR = "removal/discriminator_tiny.yaml"
STAGES = "removal/stages_tiny.yaml"
NO_DISCRIMINATOR = ("--model.init_args.discriminator=null",)
ROBOT_FAST = (
    "--data.init_args.suite=null",
    "--data.init_args.tasks=[reach-v3]",
    "--data.init_args.demos=2",
    "--data.init_args.horizon=30",
    "--data.init_args.eval_episodes=1",
    "--model.init_args.language_encoder=tiny",
    "--model.init_args.rollout_workers=0",
)


@dataclass(frozen=True)
class Case:
    """`args(folder)` are the command's arguments; `prepare(folder, trained)` writes the case's files first
    (`trained` is a folder holding a finished ER run's `checkpoints/last.ckpt`)."""

    id: str
    args: Callable[[Path], list[str]]
    expect: tuple[str, ...]
    prepare: Callable[[Path, Path], None] | None = None
    marks: tuple = field(default=())


def fit(folder: Path, *extra: str, experiment: str = ER) -> list[str]:
    return fit_args(experiment, folder / "run", *FAST, *extra)


def stage(name: str, folder: Path, *extra: str, experiment: str = ER) -> list[str]:
    return [name, "-c", config("trainer/cpu.yaml"), "-c", config(experiment), *FAST, *extra]


def copy_checkpoint(folder: Path, trained: Path) -> None:
    (folder / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(trained / "checkpoints" / "last.ckpt", folder / "run" / "checkpoints" / "last.ckpt")


def write(name: str, content: bytes | str) -> Callable[[Path, Path], None]:
    def prepare(folder: Path, trained: Path) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return prepare


def truncated_checkpoint(folder: Path, trained: Path) -> None:
    data = (trained / "checkpoints" / "last.ckpt").read_bytes()
    (folder / "half.ckpt").write_bytes(data[: len(data) // 2])


def plain_torch_file(folder: Path, trained: Path) -> None:
    torch_file("plain.ckpt", {"a": 1})(folder, trained)


def torch_file(name: str, content) -> Callable[[Path, Path], None]:
    def prepare(folder: Path, trained: Path) -> None:
        import torch

        torch.save(content, folder / name)

    return prepare


def aesthetic_head_file(path: Path, dim: int) -> None:
    """LAION's aesthetic MLP for a `dim`-d CLIP embedding, saved under the released file's keys."""
    import torch

    from lightning_modules.nn.rewards.clip_rewards import aesthetic_head

    torch.save({f"layers.{k}": v for k, v in aesthetic_head(dim).state_dict().items()}, path)


def data(folder: Path, class_path: str, root: Path, *extra: str, **init_args) -> list[str]:
    """`fit` of ER on another datamodule, read from `root`."""
    import json

    spec = {"class_path": class_path, "init_args": {"root": str(root), **init_args}}
    return fit_args(ER, folder / "run", "--task_switch.steps_per_task", "2", "--data", json.dumps(spec), *extra)


def image_folder(empty_class: str | None = None, test_missing: str | None = None) -> Callable[[Path, Path], None]:
    def prepare(folder: Path, trained: Path) -> None:
        from PIL import Image

        for split in ("train", "test"):
            for name in ("cat", "dog"):
                sub = folder / "images" / split / name
                sub.mkdir(parents=True)
                if name != empty_class and not (split == "test" and name == test_missing):
                    Image.new("RGB", (8, 8), (40, 80, 120)).save(sub / "0.png")
        if test_missing:
            (folder / "images" / "test" / test_missing).rmdir()

    return prepare


def cifar(crafted=False, missing=None, garbage=None, labels: int | None = None, labels_only=False) -> Callable:
    def prepare(folder: Path, trained: Path) -> None:
        from tests.datamodules.test_cifar import write_cifar10

        write_cifar10(folder / "data")
        batches = folder / "data" / "cifar-10-batches-py"
        if missing:
            (batches / missing).unlink()
        if garbage:
            (batches / garbage).write_text("garbage")
        if labels_only:
            import pickle

            (batches / "data_batch_1").write_bytes(pickle.dumps({b"labels": [0] * 10}))
        if labels is not None:
            import pickle

            import numpy as np

            data = np.zeros((10, 3072), dtype=np.uint8)
            (batches / "data_batch_1").write_bytes(pickle.dumps({b"data": data, b"labels": [labels] * 10}))
        if crafted:
            import pickle

            class Payload:
                def __reduce__(self):
                    return (os.system, (f"touch {folder / 'ran'}",))

            (batches / "data_batch_2").write_bytes(pickle.dumps({b"data": Payload(), b"labels": []}))

    return prepare


def concepts(caption=True, captions=2, binary_captions=False, reg_file=None, prompts=None) -> Callable:
    def prepare(folder: Path, trained: Path) -> None:
        from tests.datamodules.test_concepts import write_concept

        write_concept(folder / "concepts", "mug", ["a photo of a mug"] * 2)
        write_concept(folder / "concepts", "cat", ["a photo of a cat"] * 2, prompts)
        (folder / "concepts" / "cat" / "caption.txt").write_text("a photo of a cat\n" * captions)
        if not caption:
            (folder / "concepts" / "cat" / "caption.txt").unlink()
        if binary_captions:
            (folder / "concepts" / "cat" / "caption.txt").write_bytes(bytes(range(128, 256)))
        if reg_file:
            (folder / "concepts" / "reg").mkdir()
            (folder / "concepts" / "reg" / reg_file).write_text("a file where a folder goes")

    return prepare


def shards(truncate: bool = False) -> Callable[[Path, Path], None]:
    def prepare(folder: Path, trained: Path) -> None:
        from tests.datamodules.test_image_formats import write_shards

        (folder / "shards").mkdir()
        write_shards(folder / "shards", "train", [0, 1] * 3, per_shard=6)
        write_shards(folder / "shards", "test", [0, 1], per_shard=6)
        if truncate:
            shard = folder / "shards" / "train-000000.tar"
            shard.write_bytes(shard.read_bytes()[:1500])

    return prepare


def delta(name: str, method: str) -> Callable[[Path, Path], None]:
    def prepare(folder: Path, trained: Path) -> None:
        import torch
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(folder / name), metadata={"method": method})

    return prepare


def concept_fit(folder: Path) -> list[str]:
    root = f"--data.init_args.root={folder / 'concepts'}"
    return fit_args(R2MOE, folder / "run", root, "--data.init_args.prior_preservation=false")


def reward_fit(folder: Path, *extra: str) -> list[str]:
    return fit_args(RID, folder / "run", *extra)


def robot(*extra: str) -> Callable[[Path], list[str]]:
    return lambda f: fit_args(ROBOT, f / "run", *ROBOT_FAST, "--model.init_args.policy_checkpoint=null", *extra)


CKPT = "run/checkpoints/last.ckpt"

CASES = [
    # -- the command line and config files ---------------------------------------------------------------
    Case("config file missing", lambda f: ["fit", "-c", str(f / "nope.yaml")], ("-c", "nope.yaml", "not found")),
    Case(
        "config file not YAML",
        lambda f: ["fit", "-c", str(f / "bad.yaml")],
        ("bad.yaml", "line 4", "starts at line 3", "not valid YAML"),
        write("bad.yaml", "model:\n  class_path: lightning_modules.ER\n  init_args: {buffer_size: 3\n"),
    ),
    Case(
        "config file a list",
        lambda f: ["fit", "-c", str(f / "list.yaml")],
        ("list.yaml", "not settings"),
        write("list.yaml", "- a\n- b\n"),
    ),
    Case("unknown method", lambda f: fit(f, "--model", "Nope"), ("model", "unknown class_path 'Nope'", "ER")),
    Case(
        "unknown data class",
        lambda f: fit(f, "--data", "datamodules.Nope"),
        ("data", "unknown class_path", "SplitDigits"),
    ),
    Case(
        "misspelled option",
        lambda f: fit(f, "--model.init_args.buffer_sise", "3"),
        ("model", "'buffer_sise' is not accepted"),
    ),
    Case(
        "wrong type of an int",
        lambda f: fit(f, "--data.init_args.batch_size", "abc"),
        ("data.init_args.batch_size", "expected an int", "'abc'"),
    ),
    Case(
        "float for an int",
        lambda f: fit(f, "--model.init_args.buffer_size", "1.5"),
        ("model.init_args.buffer_size", "expected an int", "'1.5'"),
    ),
    Case(
        "wrong type of an optimizer argument",
        lambda f: fit(f, "--model.init_args.optimizer.init_args.lr", "abc"),
        ("model.init_args.optimizer.init_args.lr", "expected a float", "'abc'"),
    ),
    Case(
        "unknown optimizer",
        lambda f: fit(f, "--model.init_args.optimizer", "torch.optim.Nope"),
        ("model.init_args.optimizer", "unknown class 'torch.optim.Nope'"),
    ),
    Case(
        "negative learning rate",
        lambda f: fit(f, "--model.init_args.optimizer.init_args.lr", "-0.1"),
        ("model.optimizer", "Invalid learning rate: -0.1"),
    ),
    Case("batch size 0", lambda f: fit(f, "--data.init_args.batch_size", "0"), ("data.batch_size", "at least 1")),
    Case("negative batch size", lambda f: fit(f, "--data.init_args.batch_size", "-4"), ("data.batch_size",)),
    Case("negative workers", lambda f: fit(f, "--data.init_args.num_workers", "-1"), ("data.num_workers",)),
    Case("minibatch size 0", lambda f: fit(f, "--model.init_args.minibatch_size", "0"), ("model.minibatch_size",)),
    Case("negative buffer", lambda f: fit(f, "--model.init_args.buffer_size", "-1"), ("model.buffer_size",)),
    Case(
        "tasks that do not split",
        lambda f: fit(f, "--data.init_args.num_tasks", "4"),
        ("data.num_tasks=4", "choose one of"),
    ),
    Case("zero tasks", lambda f: fit(f, "--data.init_args.num_tasks", "0"), ("data.num_tasks=0",)),
    Case(
        "rotation angles not one per task",
        lambda f: fit(f, "--data.init_args.angles=[0, 45, 90]", experiment=ROTATED),
        ("data.angles has 3 angles for data.num_tasks=2", "one angle per task"),
    ),
    Case(
        "zero rotated tasks",
        lambda f: fit(f, "--data.init_args.num_tasks", "0", experiment=ROTATED),
        ("data.num_tasks must be at least 1",),
    ),
    Case(
        "class order not a permutation",
        lambda f: fit(f, "--data.init_args.class_order", "[1, 2]"),
        ("data.class_order", "permutation"),
    ),
    Case("epochs per task 0", lambda f: fit(f, "--task_switch.epochs_per_task", "0"), ("task_switch.epochs_per_task",)),
    Case("negative steps per task", lambda f: fit(f, "--task_switch.steps_per_task", "-3"), ("steps_per_task",)),
    Case(
        "max_epochs the task clock would override",
        lambda f: fit(f, "--trainer.max_epochs", "3"),
        ("trainer.max_epochs=3", "task_switch"),
    ),
    Case("negative seed", lambda f: fit(f, "--seed_everything", "-1"), ("seed_everything=-1",)),
    Case("seed not a number", lambda f: fit(f, "--seed_everything", "abc"), ("seed_everything", "'abc'")),
    Case("zero devices", lambda f: fit(f, "--trainer.devices", "0"), ("trainer", "devices")),
    Case("unknown accelerator", lambda f: fit(f, "--trainer.accelerator", "tpuu"), ("trainer", "tpuu")),
    Case(
        "output folder under a file",
        lambda f: fit_args(ER, f / "afile" / "run", *FAST),
        ("trainer.default_root_dir", "is not a folder"),
        write("afile", "not a folder"),
    ),
    Case(
        "curves every 0 epochs",
        lambda f: fit(f, "--continual_metrics.curve_every", "0"),
        ("continual_metrics.curve_every",),
    ),
    Case(
        "held-out curve points on data without held-out items",
        lambda f: fit(f, "--continual_metrics.curve_every", "1", "--continual_metrics.curve_on", "held_out"),
        ("continual_metrics.curve_on: held_out", "SplitDigits", "use curve_on: eval"),
    ),
    Case(
        "step checkpoints every 0 steps",
        lambda f: fit(f, "--checkpoint.every_n_train_steps", "0"),
        ("checkpoint.every_n_train_steps",),
    ),
    Case(
        "time checkpoints every 0 minutes",
        lambda f: fit(f, "--checkpoint.every_n_minutes", "0"),
        ("checkpoint.every_n_minutes",),
    ),
    Case(
        "a signal that cannot be handled",
        lambda f: fit(f, "--checkpoint.stop_signals", "[SIGKILL]"),
        ("checkpoint.stop_signals", "SIGKILL"),
    ),
    Case(
        "an initialisation that does not exist",
        lambda f: fit(f, "--model.init_args.head_init", "glorot"),
        ("model.head_init", "'glorot'", "xavier_uniform"),
    ),
    Case(
        "a Fisher normalisation that does not exist",
        lambda f: fit(f, "--model.init_args.fisher_normalisation", "examples", experiment=EWC_CONFIG),
        ("model.init_args.fisher_normalisation", "'examples'", "batches"),
    ),
    # -- checkpoints ------------------------------------------------------------------------------------
    Case(
        "resume with nothing to resume", lambda f: fit(f, "--ckpt_path", "last"), ("--ckpt_path last", "no checkpoint")
    ),
    Case(
        "resume from a missing file",
        lambda f: fit(f, "--ckpt_path", str(f / "nope.ckpt")),
        ("--ckpt_path", "nope.ckpt", "not found"),
    ),
    Case(
        "resume from a folder",
        lambda f: fit(f, "--ckpt_path", str(f / "run")),
        ("--ckpt_path", "a folder"),
        copy_checkpoint,
    ),
    Case(
        "resume from an empty file",
        lambda f: fit(f, "--ckpt_path", str(f / "empty.ckpt")),
        ("empty.ckpt", "not a torch file, or a truncated one"),
        write("empty.ckpt", b""),
    ),
    Case(
        "resume from a text file",
        lambda f: fit(f, "--ckpt_path", str(f / "notes.ckpt")),
        ("notes.ckpt", "not a torch file, or a truncated one"),
        write("notes.ckpt", "hello"),
    ),
    Case(
        "resume from a truncated checkpoint",
        lambda f: fit(f, "--ckpt_path", str(f / "half.ckpt")),
        ("half.ckpt", "not a torch file, or a truncated one"),
        truncated_checkpoint,
    ),
    Case(
        "resume from a torch file of something else",
        lambda f: fit(f, "--ckpt_path", str(f / "plain.ckpt")),
        ("plain.ckpt", "not a checkpoint written by lifelong fit"),
        plain_torch_file,
    ),
    Case(
        "resume another method's checkpoint",
        lambda f: fit(f, "--ckpt_path", "last", experiment="classification/derpp_splitdigits.yaml"),
        ("other settings", "model.class_path", "--allow_changes"),
        copy_checkpoint,
    ),
    Case(
        "resume with another task count",
        lambda f: fit(f, "--data.init_args.num_tasks", "5", "--ckpt_path", "last"),
        ("other settings", "data.init_args.num_tasks (checkpoint 2, config 5)"),
        copy_checkpoint,
    ),
    Case("test without a checkpoint", lambda f: stage("test", f), ("lifelong test", "--ckpt_path")),
    Case("validate without a checkpoint", lambda f: stage("validate", f), ("lifelong validate", "--ckpt_path")),
    Case(
        "test a missing checkpoint",
        lambda f: stage("test", f, "--ckpt_path", str(f / "nope.ckpt")),
        ("--ckpt_path", "nope.ckpt", "not found"),
    ),
    Case(
        "test a garbage checkpoint",
        lambda f: stage("test", f, "--ckpt_path", str(f / "notes.ckpt")),
        ("notes.ckpt", "not a torch file, or a truncated one"),
        write("notes.ckpt", "hello"),
    ),
    Case(
        "validate another method's checkpoint",
        lambda f: stage("validate", f, "--ckpt_path", str(f / CKPT), experiment="classification/der_splitdigits.yaml"),
        ("other settings", "model.class_path"),
        copy_checkpoint,
    ),
    # -- data on disk -----------------------------------------------------------------------------------
    Case(
        "image folder with an empty class folder",
        lambda f: data(f, "datamodules.SplitImageFolder", f / "images", num_tasks=1),
        ("train/dog", "no images", "class 'dog'"),
        image_folder(empty_class="dog"),
    ),
    Case(
        "image folder whose test split lacks a class",
        lambda f: data(f, "datamodules.SplitImageFolder", f / "images", num_tasks=1),
        ("test/dog", "no images"),
        image_folder(test_missing="dog"),
    ),
    Case(
        "image folder root missing",
        lambda f: data(f, "datamodules.SplitImageFolder", f / "nope", num_tasks=1),
        ("data.root", "nope", "not found"),
    ),
    Case(
        "CUB-200 folder with another class count",
        lambda f: data(f, "datamodules.SplitCUB200", f / "images"),
        ("images/train has 2 class folders", "Split-CUB-200 has 200"),
        image_folder(),
    ),
    Case(
        "ImageNet-R training copies smaller than the crop",
        lambda f: data(f, "datamodules.SplitImageNetR", f / "images", train_size=100),
        ("data.train_size=100", "choose 224 or more"),
    ),
    Case(
        "CIFAR batch missing",
        lambda f: data(f, "datamodules.SplitCIFAR10", f / "data"),
        ("data_batch_3", "not found", "extract"),
        cifar(missing="data_batch_3"),
    ),
    Case(
        "CIFAR batch that would run code",
        lambda f: data(f, "datamodules.SplitCIFAR10", f / "data"),
        ("data_batch_2", "posix.system"),
        cifar(crafted=True),
    ),
    Case(
        "CIFAR batch that is garbage",
        lambda f: data(f, "datamodules.SplitCIFAR10", f / "data"),
        ("test_batch", "not a CIFAR python batch"),
        cifar(garbage="test_batch"),
    ),
    Case(
        "Tiny-ImageNet folder missing",
        lambda f: data(f, "datamodules.SplitTinyImageNet", f),
        ("tiny-imagenet-200", "unzip"),
    ),
    Case(
        "webdataset shards missing",
        lambda f: data(f, "datamodules.SplitWebDataset", f, num_classes=2, num_tasks=1),
        ("train-",),
    ),
    # -- text-to-image concepts ---------------------------------------------------------------------------
    Case(
        "concept folder without captions",
        lambda f: fit_args(
            R2MOE, f / "run", f"--data.init_args.root={f / 'concepts'}", "--data.init_args.prior_preservation=false"
        ),
        ("concepts/cat", "no caption.txt"),
        concepts(caption=False),
    ),
    Case(
        "concept with fewer captions than images",
        lambda f: fit_args(
            R2MOE, f / "run", f"--data.init_args.root={f / 'concepts'}", "--data.init_args.prior_preservation=false"
        ),
        ("cat/caption.txt",),
        concepts(captions=1),
    ),
    Case(
        "base model folder missing",
        lambda f: fit_args(R2MOE, f / "run", f"--model.init_args.pretrained_model_name_or_path={f / 'sd'}"),
        ("pretrained_model_name_or_path", "sd"),
    ),
    Case(
        "export without --out",
        lambda f: ["export", "-c", config(R2MOE), "--ckpt_path", str(f / "x.ckpt")],
        ("--out missing",),
    ),
    Case(
        "export onto a folder",
        lambda f: ["export", "-c", config(R2MOE), "--ckpt_path", str(f / "x.ckpt"), "--out", str(f / "folder")],
        ("--out", "not a regular file"),
        write("folder/keep.txt", "mine"),
    ),
    Case(
        "export onto a device",
        lambda f: ["export", "-c", config(R2MOE), "--ckpt_path", str(f / "x.ckpt"), "--out", "/dev/null"],
        ("--out /dev/null", "not a regular file"),
    ),
    # -- robots ---------------------------------------------------------------------------------------------
    Case(
        "unknown robot suite",
        robot("--data.init_args.tasks=null", "--data.init_args.suite=cw33"),
        ("cw33",),
    ),
    Case("unknown Meta-World task", robot("--data.init_args.tasks=[reach-v9]"), ("reach-v9",)),
    Case("unknown observation key", robot("--data.init_args.obs_keys=[nope]"), ("data.obs_keys", "nope")),
    Case("window of 0 steps", robot("--data.init_args.window=0"), ("data.window=0",)),
    Case("0 evaluation episodes", robot("--data.init_args.eval_episodes=0"), ("data.eval_episodes=0",)),
    Case(
        "held-out curve episodes beyond the initial states",
        robot("--data.init_args.eval_episodes=26", "--continual_metrics.curve_on=held_out"),
        ("data.eval_episodes=26", "held-out curve episodes", "curve_on: eval"),
    ),
    Case(
        "garbage demonstration file",
        lambda f: robot()(f) + [f"--data.init_args.root={f / 'demos'}"],
        ("reach-v3.hdf5",),
        write("demos/reach-v3.hdf5", "not hdf5"),
    ),
    Case(
        "policy checkpoint missing",
        lambda f: fit_args(ROBOT, f / "run", *ROBOT_FAST, f"--model.init_args.policy_checkpoint={f / 'p.ckpt'}"),
        ("policy_checkpoint", "p.ckpt"),
    ),
    Case(
        "policy checkpoint that is garbage",
        lambda f: fit_args(ROBOT, f / "run", *ROBOT_FAST, f"--model.init_args.policy_checkpoint={f / 'p.ckpt'}"),
        ("policy_checkpoint", "p.ckpt"),
        write("p.ckpt", "garbage"),
    ),
    Case(
        "make-demos without --out",
        lambda f: ["make-demos", "--tasks", "[reach-v3]"],
        ("--out",),
    ),
    Case(
        "make-demos of an unknown suite",
        lambda f: ["make-demos", "--suite", "cw33", "--out", str(f / "demos")],
        ("cw33",),
    ),
    # -- found by a hostile run of every command --------------------------------------------------------------
    Case(
        "resume from a dict that only claims to be ours",
        lambda f: fit(f, "--ckpt_path", str(f / "fake.ckpt")),
        ("fake.ckpt", "not a checkpoint written by lifelong fit"),
        torch_file("fake.ckpt", {"continual": 1}),
    ),
    Case(
        "score another method's weights with every change allowed",
        lambda f: stage(
            "test",
            f,
            "--ckpt_path",
            str(f / CKPT),
            "--allow_changes=[all]",
            experiment="classification/lwf_splitdigits.yaml",
        ),
        ("weights do not fit LwF",),
        copy_checkpoint,
    ),
    Case(
        "allow a change to a setting that does not exist",
        lambda f: fit(f, "--allow_changes=[model.init_args.nope]"),
        ("--allow_changes", "model.init_args.nope"),
    ),
    Case("demo with an unknown option", lambda f: ["demo", "--bogus", "1"], ("unrecognized arguments: --bogus",)),
    Case("predict", lambda f: ["predict", "-c", config(ER)], ("predict",)),
    Case(
        "CIFAR label out of range",
        lambda f: data(f, "datamodules.SplitCIFAR10", f / "data"),
        ("data_batch_1", "label 12 is outside 0..9"),
        cifar(labels=12),
    ),
    Case(
        "image size 0",
        lambda f: data(f, "datamodules.SplitImageFolder", f / "images", num_tasks=1, image_size=[0, 8]),
        ("data.image_size",),
        image_folder(),
    ),
    Case(
        "normalisation that divides by 0",
        lambda f: data(f, "datamodules.SplitImageFolder", f / "images", num_tasks=1, std=[0.0, 1.0, 1.0]),
        ("data.mean and data.std",),
        image_folder(),
    ),
    Case("test fraction above 1", lambda f: fit(f, "--data.init_args.test_fraction", "1.5"), ("data.test_fraction",)),
    Case("eval batch size 0", lambda f: fit(f, "--data.init_args.eval_batch_size", "0"), ("data.eval_batch_size",)),
    Case(
        "negative weight decay",
        lambda f: fit(f, "--model.init_args.optimizer.init_args.weight_decay", "-1"),
        ("model.optimizer", "weight_decay"),
    ),
    Case("negative minibatch", lambda f: fit(f, "--model.init_args.minibatch_size", "-1"), ("model.minibatch_size",)),
    Case(
        "stop after 0 tasks", lambda f: fit(f, "--task_switch.stop_after_task", "0"), ("task_switch.stop_after_task",)
    ),
    Case("train on no batches", lambda f: fit(f, "--trainer.limit_train_batches", "0"), ("limit_train_batches",)),
    Case(
        "accumulate 0 batches", lambda f: fit(f, "--trainer.accumulate_grad_batches", "0"), ("accumulate_grad_batches",)
    ),
    Case("a GPU where there is none", lambda f: fit(f, "--trainer.accelerator", "gpu"), ("trainer", "gpu")),
    Case(
        "caption file that is not text",
        concept_fit,
        ("cat/caption.txt", "not a UTF-8 text file"),
        concepts(binary_captions=True),
    ),
    Case("LoRA rank 0", lambda f: fit_args(R2MOE, f / "run", "--model.init_args.rank=0"), ("model.rank",)),
    Case("top-k of 0 experts", lambda f: fit_args(R2MOE, f / "run", "--model.init_args.top_k=0"), ("model.top_k",)),
    Case(
        "export with a bad --set",
        lambda f: ["export", "-c", config(R2MOE), "--set=--model.init_args.rank=abc", "--ckpt_path", "x", "--out", "y"],
        ("model.init_args.rank", "expected an int"),
    ),
    Case(
        "export with a config that is not YAML",
        lambda f: ["export", "-c", str(f / "bad.yaml"), "--ckpt_path", "x", "--out", str(f / "y")],
        ("bad.yaml", "not valid YAML"),
        write("bad.yaml", "model: {a: 1\n"),
    ),
    Case(
        "sample with 0 steps",
        lambda f: ["sample", "-c", config(R2MOE), "--delta", "x", "--prompt", "p", "--steps", "0", "--out", "o"],
        ("--steps",),
    ),
    Case(
        "sample with 0 images",
        lambda f: ["sample", "-c", config(R2MOE), "--delta", "x", "--prompt", "p", "--num_images", "0", "--out", "o"],
        ("--num_images",),
    ),
    Case(
        "sample into a folder under a file",
        lambda f: ["sample", "-c", config(R2MOE), "--delta", "x", "--prompt", "p", "--out", str(f / "afile" / "o")],
        ("--out", "is not a folder"),
        write("afile", "a file"),
    ),
    Case(
        "sample from a base model folder that does not exist",
        lambda f: [
            "sample",
            "-c",
            config(R2MOE),
            f"--set=--model.init_args.pretrained_model_name_or_path={f / 'sd'}",
            "--delta",
            "x",
            "--prompt",
            "p",
            "--out",
            str(f / "o"),
        ],
        ("pretrained_model_name_or_path", "sd"),
    ),
    Case(
        "make-reg with batches of 0",
        lambda f: ["make-reg", "-c", config(R2MOE), "--batch_size", "0"],
        ("--batch_size",),
    ),
    Case(
        "make-reg for a concepts folder that does not exist",
        lambda f: ["make-reg", "-c", config(R2MOE), f"--set=--data.init_args.root={f / 'nope'}"],
        ("data.root", "nope"),
    ),
    Case(
        "make-reg where a class's folder is a file",
        lambda f: ["make-reg", "-c", config(R2MOE), f"--set=--data.init_args.root={f / 'concepts'}", "--steps", "1"],
        ("reg/cat", "is not a folder"),
        concepts(reg_file="cat"),
    ),
    Case(
        "policy checkpoint that is text",
        lambda f: fit_args(ROBOT, f / "run", *ROBOT_FAST, f"--model.init_args.policy_checkpoint={f / 'p.ckpt'}"),
        ("policy_checkpoint", "p.ckpt"),
        write("p.ckpt", "some text"),
    ),
    Case(
        "policy checkpoint that is empty",
        lambda f: fit_args(ROBOT, f / "run", *ROBOT_FAST, f"--model.init_args.policy_checkpoint={f / 'p.ckpt'}"),
        ("policy_checkpoint", "p.ckpt"),
        write("p.ckpt", b""),
    ),
    Case(
        "policy checkpoint holding a list",
        lambda f: fit_args(ROBOT, f / "run", *ROBOT_FAST, f"--model.init_args.policy_checkpoint={f / 'p.ckpt'}"),
        ("policy_checkpoint", "holds no weights"),
        torch_file("p.ckpt", [1, 2, 3]),
    ),
    Case(
        "checkpoint folder under a file",
        lambda f: fit(f, f"--checkpoint.dirpath={f / 'afile' / 'ck'}"),
        ("checkpoint.dirpath", "is not a folder"),
        write("afile", "a file"),
    ),
    Case(
        "stop after more tasks than the stream has",
        lambda f: fit(f, "--task_switch.stop_after_task", "9"),
        ("stop_after_task=9", "2 tasks"),
    ),
    Case(
        "empty config file",
        lambda f: ["fit", "-c", str(f / "empty.yaml")],
        ("empty.yaml", "empty"),
        write("empty.yaml", ""),
    ),
    Case("unknown precision", lambda f: fit(f, "--trainer.precision", "bogus"), ("trainer.precision", "'bf16-mixed'")),
    Case("unknown train_on", lambda f: fit(f, "--data.init_args.train_on", "bogus"), ("one of 'current', 'seen'",)),
    Case(
        "CIFAR batch without its data entry",
        lambda f: data(f, "datamodules.SplitCIFAR10", f / "data"),
        ("data_batch_1", "no 'data' entry"),
        cifar(labels_only=True),
    ),
    Case(
        "truncated webdataset shard",
        lambda f: data(f, "datamodules.SplitWebDataset", f / "shards", num_classes=2, num_tasks=1),
        ("train-000000.tar", "not a complete tar shard"),
        shards(truncate=True),
    ),
    Case(
        "evaluation prompt without the concept",
        concept_fit,
        ("prompts/cat.txt:2", "no {}"),
        concepts(prompts=["a photo of {}", "a beach"]),
    ),
    Case(
        "a listed concept that is not a folder",
        lambda f: concept_fit(f) + ["--data.init_args.concepts=[cat, dog]"],
        ("data.concepts", "'dog' is not a folder"),
        concepts(),
    ),
    Case(
        "removal threshold above 1",
        lambda f: fit_args(R2MOE, f / "run", "--model.init_args.removal_threshold=1.5"),
        ("model.removal_threshold",),
    ),
    Case(
        "DINO folder missing",
        lambda f: fit_args(R2MOE, f / "run", f"--model.init_args.dino_model={f / 'dino-vits16'}"),
        ("model.dino_model", "dino-vits16' does not exist"),
    ),
    Case(
        "DINO folder without a config.json",
        lambda f: fit_args(R2MOE, f / "run", f"--model.init_args.dino_model={f / 'dino'}"),
        ("model.dino_model", "not a folder with a config.json"),
        write("dino/model.safetensors", "not a model"),
    ),
    Case(
        "unknown inference gate",
        lambda f: fit_args(R2MOE, f / "run", "--data.init_args.inference_gate=class"),
        ("inference_gate", "'token_class', 'caption'"),
    ),
    Case(
        "unknown training resize",
        lambda f: fit_args(R2MOE, f / "run", "--data.init_args.resize=crop"),
        ("resize", "'center_crop', 'stretch'"),
    ),
    Case(
        "unknown embedded concept set",
        lambda f: fit_args(R2MOE, f / "run", "--data.init_args.embedded=faces"),
        ("embedded", "'photos', 'digits'"),
    ),
    Case(
        "unknown augmentation caption placement",
        lambda f: fit_args(R2MOE, f / "run", "--data.init_args.augment_caption=after"),
        ("augment_caption", "'prefix', 'insert'"),
    ),
    Case(
        "DeepSpeed where it cannot run (no CUDA or no deepspeed package)",
        lambda f: fit_args(ER, f / "run", "-c", config("trainer/deepspeed_zero2.yaml")),
        ("trainer.strategy deepspeed_stage_2", "CUDA GPUs only", "ddp"),
    ),
    Case(
        "DeepSpeed for a method that trains other parameters at a later task",
        lambda f: fit_args(R2MOE, f / "run", "-c", config("trainer/deepspeed_zero2.yaml")),
        ("trainer.strategy deepspeed_stage_2", "R2MoE trains a new expert and router", "ddp"),
    ),
    Case(
        "unknown zoom-out canvas",
        lambda f: fit_args(R2MOE, f / "run", "--data.init_args.canvas=white"),
        ("canvas", "grey", "black"),
    ),
    Case(
        "unknown expert init",
        lambda f: fit_args(R2MOE, f / "run", "--model.init_args.expert_init=xavier"),
        ("expert_init", "released", "per_expert"),
    ),
    Case(
        "unknown removed-expert handling in training",
        lambda f: fit_args(R2MOE, f / "run", "--model.init_args.removed_experts_training=drop"),
        ("removed_experts_training", "masked", "faithful"),
    ),
    Case(
        "unknown CFG half for R2MoE's delta",
        lambda f: fit_args(R2MOE, f / "run", "--model.init_args.cfg_delta=unconditional"),
        ("cfg_delta", "conditional", "both"),
    ),
    Case(
        "unknown DMPEL router init",
        lambda f: fit_args("robot/dmpel_cw3.yaml", f / "run", "--model.init_args.router_init=uniform"),
        ("router_init", "released", "favour_new", "inherit"),
    ),
    Case(
        "DMPEL's inherited router with a new expert outside (0, 2)",
        lambda f: fit_args(
            "robot/dmpel_cw3.yaml",
            f / "run",
            "--model.init_args.policy_checkpoint=null",
            "--model.init_args.router_init=inherit",
            "--model.init_args.router_new_start=2.5",
        ),
        ("router_new_start", "(0, 2)", "2.5"),
    ),
    Case(
        "export in an unknown format",
        lambda f: ["export", "-c", config(R2MOE), "--ckpt_path", str(f / "last.ckpt"), "--out", "d", "--format=onnx"],
        ("--format", "delta", "diffusers"),
    ),
    Case(
        "unknown loss reduction",
        lambda f: fit_args(R2MOE, f / "run", "--model.init_args.loss_reduction=sum"),
        ("loss_reduction", "channel_sum", "mean"),
    ),
    Case(
        "export in an unknown dtype",
        lambda f: ["export", "-c", config(R2MOE), "--ckpt_path", str(f / "last.ckpt"), "--out", "d.st", "--dtype=fp8"],
        ("--dtype", "float16"),
    ),
    Case(
        "sample a delta of another method",
        lambda f: ["sample", "-c", config(R2MOE), "--delta", str(f / "cd.safetensors"), "--prompt", "p", "--out", "o"],
        ("--delta", "exported by CustomDiffusion", "R2MoE"),
        delta("cd.safetensors", "CustomDiffusion"),
    ),
    Case(
        "export a checkpoint trained with other settings",
        lambda f: ["export", "-c", config(R2MOE), "--ckpt_path", str(f / "x.ckpt"), "--out", str(f / "y")],
        ("--ckpt_path", "x.ckpt", "other settings", "model.class_path"),
        torch_file(
            "x.ckpt",
            {"state_dict": {}, "continual": {}, "lifelong": {"settings": {"model.class_path": "lightning_modules.X"}}},
        ),
    ),
    Case("negative rollout workers", robot("--model.init_args.rollout_workers=-1"), ("model.rollout_workers",)),
    Case(
        "make-demos with negative extra steps",
        lambda f: ["make-demos", "--tasks=[reach-v3]", "--extra_steps=-4", "--out", str(f / "demos")],
        ("--extra_steps=-4",),
    ),
    Case(
        "make-demos of an unknown task",
        lambda f: ["make-demos", "--tasks=[nope-v3]", "--out", str(f / "demos")],
        ("--tasks", "'nope-v3'"),
    ),
    # -- the reward stream --------------------------------------------------------------------------------------
    Case(
        "an unknown reward",
        lambda f: reward_fit(f, "--data.init_args.rewards=[beauty]"),
        ("data.rewards[0].name", "unknown reward 'beauty'", "compressibility", "aesthetic"),
    ),
    Case(
        "a reward prompt file that is empty",
        lambda f: reward_fit(f, f"--data.init_args.rewards=[{{name: brightness, prompts: {f / 'p.txt'}}}]"),
        ("data.rewards[0].prompts", "p.txt", "holds no prompt"),
        write("p.txt", "\n \n"),
    ),
    Case(
        "a reward prompt file that is missing",
        lambda f: reward_fit(f, "--data.init_args.rewards=[{name: brightness, eval_prompts: nope.txt}]"),
        ("data.rewards[0].eval_prompts", "'nope.txt'", "embedded prompt set", "digits"),
    ),
    Case(
        "an unknown reward option",
        lambda f: reward_fit(f, "--data.init_args.rewards=[{name: compressibility, options: {qualty: 90}}]"),
        ("data.rewards[0].options", "'qualty'", "takes quality"),
    ),
    Case(
        "an aesthetic head of the wrong shape",
        lambda f: reward_fit(
            f, "--data.init_args.rewards=[{name: aesthetic, options: {clip_model: tiny, head_weights: l14.pth}}]"
        ),
        ("aesthetic.options.head_weights", "l14.pth", "(1024, 768)", "head made for this CLIP"),
        lambda f, t: aesthetic_head_file(f / "l14.pth", 768),
    ),
    Case(
        "export a merged UNet of a method without one",
        lambda f: [
            *("export", "-c", config(R2MOE), "--ckpt_path", str(f / "x.ckpt"), "--out", str(f / "out")),
            *("--format=diffusers", "--merged_unet=true"),
        ],
        ("--merged_unet", "R2MoE has no merged UNet"),
    ),
    Case(
        "export a merged UNet as a delta file",
        lambda f: ["export", "-c", config(RID), "--ckpt_path", "x.ckpt", "--out", "d.st", "--merged_unet=true"],
        ("--merged_unet", "--format diffusers"),
    ),
    Case(
        "RID without its EMA teacher",
        lambda f: reward_fit(f, "--trainer.callbacks=[]"),
        ("RID distils from an EMA teacher", "callbacks.EMATeacher"),
    ),
    # -- the small pretrained bases -------------------------------------------------------------------------
    Case(
        "pretrain-bases into a folder that cannot be made",
        lambda f: ["pretrain-bases", "--cache", str(f / "a_file" / "cache"), "--models", "[digit-classifier]"],
        ("a_file/cache", "not writable", "LIFELONG_CACHE"),
        write("a_file", ""),
    ),
    Case(
        "pretrain-bases of an unknown model",
        lambda f: ["pretrain-bases", "--cache", str(f / "cache"), "--models", "[unet]"],
        ("--models", "unet", "digit-classifier"),
    ),
    Case(
        "pretrain-bases with a zero scale",
        lambda f: ["pretrain-bases", "--cache", str(f / "cache"), "--scale", "0"],
        ("--scale", "(0, 1]"),
    ),
    Case(
        "a cached base that does not load",
        lambda f: ["pretrain-bases", "--cache", str(f / "cache"), "--models", "[clip]"],
        ("bases-v3-seed0/clip", "does not load", "delete that folder", "pretrain-bases"),
        lambda f, t: (
            write("cache/bases-v3-seed0/clip/lifelong_base.json", "{}")(f, t),
            write("cache/bases-v3-seed0/clip/config.json", "not json")(f, t),
        ),
    ),
    # -- object-removal data --------------------------------------------------------------------------------
    Case(
        "check-data of a meta.json entry without GT and with missing files",
        lambda f: ["check-data", str(f / "data" / "meta.json")],
        ("3 problem(s) in 1 file(s)", "meta.json: entry 0: source 's.png' not found"),
        write("data/meta.json", '[{"source": "s.png", "mask": "m.png"}]'),
    ),
    Case(
        "check-data of a JSON Lines meta.json",
        lambda f: ["check-data", str(f / "meta.json")],
        ("meta.json: not JSON (line 2", "JSON Lines", "wrap the entries in [ ]"),
        write("meta.json", '{"source": "s.png"}\n{"source": "t.png"}\n'),
    ),
    Case(
        "check-data --need_score of entries without a score",
        lambda f: ["check-data", str(f / "set"), "--need_score"],
        ("2 problem(s) in 1 file(s)", "entry 0: no 'score' key"),
        lambda f, t: write_embedded_removal(f / "set", count=2),
    ),
    Case("check-data without a file", lambda f: ["check-data", "--need_score"], ("check-data", "no file given")),
    # -- object-removal methods, the data engine, remove and score -------------------------------------------
    Case(
        "a removal round with an unknown key",
        lambda f: fit_args(
            ROREM, f / "run", "--data.init_args.rounds=[{name: a, training: embedded:digits-on-photos}]"
        ),
        ("data.rounds[0]", "training"),
    ),
    Case(
        "a discriminator checkpoint that does not exist",
        lambda f: fit_args(ENGINE, f / "run", f"--model.init_args.discriminator={f / 'no.ckpt'}"),
        ("model.discriminator", "no.ckpt", "not found"),
    ),
    Case(
        "a discriminator checkpoint of another method",
        lambda f: fit_args(ENGINE, f / "run", f"--model.init_args.discriminator={f / 'er.ckpt'}"),
        ("model.discriminator", "er.ckpt", "not a RemovalDiscriminator checkpoint"),
        lambda f, t: shutil.copy(t / "checkpoints" / "last.ckpt", f / "er.ckpt"),
    ),
    Case(
        "a data engine judged by a discriminator the model does not have",
        lambda f: fit_args(ENGINE, f / "run", "--model.init_args.discriminator=null"),
        ("data_engine.judge", "model.discriminator"),
    ),
    Case(
        "a data engine with fewer judges than rounds",
        lambda f: fit_args(ENGINE, f / "run", *NO_DISCRIMINATOR, "--trainer.callbacks.judge=[human, human]"),
        ("data_engine.judge", "2 judges for 3 rounds"),
    ),
    Case(
        "a removal strength of 0",
        lambda f: fit_args(ROREM, f / "run", "--model.init_args.eval_strength=0"),
        ("model.eval_strength", "(0, 1]"),
    ),
    Case(
        "a resolution the discriminator's head cannot read",
        lambda f: fit_args(DISCRIMINATOR, f / "run", "--data.init_args.resolution=24"),
        ("data.resolution", "4 x 2^n"),
    ),
    Case(
        "remove with a source and no mask",
        lambda f: ["remove", "-c", config(ROREM), "--source", str(f / "set/source/00000.png"), "--out", str(f / "o")],
        ("--source, --mask", "once per image"),
        lambda f, t: write_embedded_removal(f / "set", count=1),
    ),
    Case(
        "remove with a discriminator config",
        lambda f: ["remove", "-c", config(DISCRIMINATOR), "--meta", str(f / "set/meta.json"), "--out", str(f / "o")],
        ("model", "RemovalDiscriminator is not an object remover"),
        lambda f, t: write_embedded_removal(f / "set", count=1),
    ),
    Case(
        "check-data of a shard pattern whose shards do not exist",
        lambda f: ["check-data", str(f / "shards" / "removal-{000..001}.tar")],
        ("removal-000.tar", "not found"),
    ),
    Case(
        "remove with a strength above 1",
        lambda f: (
            ["remove", "-c", config(ROREM), "--meta", str(f / "set/meta.json"), "--out", str(f / "o")]
            + ["--strength", "2"]
        ),
        ("--strength", "(0, 1]"),
        lambda f, t: write_embedded_removal(f / "set", count=1),
    ),
    Case(
        "score with a remover that has no discriminator",
        lambda f: ["score", "-c", config(ROREM), "--meta", str(f / "set/meta.json"), "--out", str(f / "s.json")],
        ("model.discriminator is not set",),
        lambda f, t: write_embedded_removal(f / "set", count=1),
    ),
    # -- the methods after RORem: LCM, DPO, PPO as stages ---------------------------------------------------
    Case(
        "a removal stage that does not exist",
        lambda f: fit_args(STAGES, f / "run", "--model.init_args.stages=[rorem, distill, lcm, dpo, ppo]"),
        ("model.stages[1]", "'distill'", "rorem, discriminator, lcm, dpo, ppo"),
    ),
    Case(
        "fewer removal stages than rounds",
        lambda f: fit_args(STAGES, f / "run", "--model.init_args.stages=[rorem, lcm]"),
        ("model.stages has 2 entries", "5 rounds"),
    ),
    Case(
        "a PPO stage before any discriminator",
        lambda f: fit_args(STAGES, f / "run", "--model.init_args.stages=[rorem, ppo, lcm, dpo, discriminator]"),
        ("model.stages[1] (ppo)", "D_phi", "discriminator stage first"),
    ),
    Case(
        "a removal run started from another method's checkpoint",
        lambda f: fit_args(STAGES, f / "run", f"--model.init_args.init_from={f / 'er.ckpt'}"),
        ("model.init_from", "er.ckpt", "none of its tensors fits"),
        lambda f, t: shutil.copy(t / "checkpoints" / "last.ckpt", f / "er.ckpt"),
    ),
    Case(
        "an LCM strength that leaves no step",
        lambda f: fit_args(STAGES, f / "run", "--model.init_args.lcm.strength=0.1"),
        ("model.lcm.strength", "at least one"),
    ),
    Case(
        "remove with the fast sampler and no LCM student",
        lambda f: (
            ["remove", "-c", config(ROREM), "--meta", str(f / "set/meta.json"), "--out", str(f / "o")]
            + ["--sampler", "fast"]
        ),
        ("--sampler fast", "no LCM student"),
        lambda f, t: write_embedded_removal(f / "set", count=1),
    ),
    Case(
        "DPO online pairs from one removal per input",
        lambda f: fit_args(STAGES, f / "run", "--model.init_args.dpo.online_samples=1"),
        ("model.dpo.online_samples", "at least 2"),
    ),
    Case(
        "throughput.compile with an argument torch.compile does not take",
        lambda f: fit(f, "--throughput.compile={modee: max-autotune}"),
        ("throughput.compile", "modee", "torch.compile"),
    ),
    Case(
        "a preference pair without its preferred removal",
        lambda f: ["check-data", str(f / "set" / "pairs.json")],
        ("pairs.json", "entry 0", "without a 'preferred' key"),
        lambda f, t: write_pairs_without_preferred(f / "set"),
    ),
]


def write_pairs_without_preferred(folder: Path) -> None:
    """A removal set whose meta.json entries became pairs that name only the rejected removal."""
    write_embedded_removal(folder, count=1)
    entries = json.loads((folder / "meta.json").read_text())
    pairs = [{"source": e["source"], "mask": e["mask"], "rejected": e["GT"]} for e in entries]
    (folder / "pairs.json").write_text(json.dumps(pairs))


def write_embedded_removal(folder: Path, count: int) -> None:
    from datamodules.removal import write_embedded_removal

    write_embedded_removal(folder, count=count)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a digest of its bytes and its modification time."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            out[str(path.relative_to(folder))] = f"{hashlib.sha1(path.read_bytes()).hexdigest()}:{stat.st_mtime_ns}"
        elif path.is_dir():
            out[str(path.relative_to(folder)) + "/"] = ""
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished two-task ER run (2 steps per task)."""
    from cli.main import QUIET, LifelongCLI

    root = tmp_path_factory.mktemp("trained")
    LifelongCLI(args=fit_args(ER, root, *FAST, *QUIET))
    return root


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case: Case, tmp_path, trained, capsys):
    from cli.main import main

    folder = tmp_path / "case"
    folder.mkdir()
    if case.prepare is not None:
        case.prepare(folder, trained)
    before = snapshot(folder)
    cwd = os.getcwd()
    os.chdir(folder)  # anything written to a relative path lands here and is seen
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(case.args(folder))
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err[-2000:]
    assert "Traceback" not in captured.err
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("lifelong:")]
    assert len(lines) == 1 and lines[0].startswith("lifelong: error: "), captured.err[-2000:]
    for words in case.expect:
        assert words in lines[0], lines[0]
    assert snapshot(folder) == before


def test_the_catalogue_is_counted_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"{len(CASES)} bad inputs" in readme
