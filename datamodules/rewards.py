"""`RewardDataModule`: a stream of reward objectives for reward-gradient tuning; task t is reward t, with
the prompts images are sampled from while it trains and held-out prompts it is evaluated on.

    data:
      class_path: datamodules.RewardDataModule
      init_args:
        rewards:
          - name: compressibility          # one of lightning_modules.nn.rewards.REWARDS
            prompts: digits                # an embedded prompt set, or a text file (one prompt per line)
            eval_prompts: digits-held-out  # the same choices
            loss_scale: 1.0                # optional: the reward loss is -loss_scale * reward (default: the reward's)
            options: {quality: 95}         # optional: the reward's own arguments (weights, CLIP folder, ...)

Embedded prompt sets: `digits` / `digits-held-out` (the small pretrained base's digit prompts, seven digits
to train on and three held out, so the digit judge can read the evaluation images) and `animals` /
`animals-held-out` (short animal prompts in the style of DDPO's and AlignProp's "simple animals" set).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from cli.errors import ConfigError
from datamodules import small_world as world
from datamodules.base import ContinualDataModule, TaskStream

#: digits whose prompts only evaluation uses
HELD_OUT_DIGITS = (1, 4, 7)
_ANIMALS = (
    "cat", "dog", "horse", "cow", "sheep", "pig", "goat", "rabbit", "mouse", "hamster", "fox", "wolf", "bear",
    "deer", "lion", "tiger", "leopard", "zebra", "giraffe", "elephant", "monkey", "gorilla", "kangaroo", "koala",
    "panda", "camel", "otter", "beaver", "squirrel", "hedgehog", "owl", "eagle", "parrot", "duck", "goose",
    "swan", "penguin", "chicken", "frog", "turtle", "snake", "lizard", "crocodile", "dolphin", "whale", "shark",
    "octopus", "crab", "butterfly", "bee",
)  # fmt: skip
_HELD_OUT_ANIMALS = ("raccoon", "flamingo", "hippopotamus", "seal", "llama", "peacock")


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


EMBEDDED_PROMPTS: dict[str, tuple[str, ...]] = {
    "digits": tuple(world.digit_prompt(d) for d in range(10) if d not in HELD_OUT_DIGITS),
    "digits-held-out": tuple(world.digit_prompt(d) for d in HELD_OUT_DIGITS),
    "animals": tuple(_an(a) for a in _ANIMALS),
    "animals-held-out": tuple(_an(a) for a in _HELD_OUT_ANIMALS),
}
SPEC_KEYS = ("name", "prompts", "eval_prompts", "loss_scale", "options")


@dataclass(frozen=True)
class RewardStream(TaskStream):
    """The reward stream a model is built from: per task the reward's name, loss scale (None: the reward's
    default) and options; and the image size to sample at."""

    rewards: tuple[dict[str, Any], ...] = ()
    resolution: int = 32
    #: each task's held-out evaluation prompts
    eval_prompts: tuple[tuple[str, ...], ...] = ()


class PromptDataset(Dataset):
    """Prompts as dict items {"prompt", "index", "task"}."""

    def __init__(self, task: int, prompts: tuple[str, ...]):
        self.task, self.prompts = task, prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"prompt": self.prompts[i], "index": i, "task": self.task}


def read_prompts(value: str, option: str) -> tuple[str, ...]:
    """An embedded set by name, or the non-empty lines of a text file; an empty or missing file is one line."""
    if value in EMBEDDED_PROMPTS:
        return EMBEDDED_PROMPTS[value]
    path = Path(value)
    if not path.is_file():
        raise ConfigError(
            f"{option}: {value!r} is neither an embedded prompt set ({', '.join(EMBEDDED_PROMPTS)}) nor a file; "
            "pass one of those or a text file with one prompt per line"
        )
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{option}: {path} cannot be read as UTF-8 text ({type(err).__name__})") from None
    prompts = tuple(line for line in lines if line)
    if not prompts:
        raise ConfigError(f"{option}: {path} holds no prompt; write one prompt per line")
    return prompts


class RewardDataModule(ContinualDataModule):
    """Args:
    rewards: the stream, one entry per task (see the module docstring); a bare name is
        {name, prompts: digits, eval_prompts: digits-held-out}.
    resolution: the side of the sampled images (the small pretrained base: 32).
    batch_size: prompts per training step (each gives one image).
    """

    def __init__(
        self,
        rewards: list[dict[str, Any] | str],
        resolution: int = 32,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        **kwargs: Any,
    ):
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, **kwargs)
        from lightning_modules.nn.rewards import REWARDS

        if not rewards:
            raise ConfigError("data.rewards is empty: list at least one reward (e.g. [compressibility])")
        if resolution < 8:
            raise ConfigError(f"data.resolution must be at least 8, got {resolution}")
        self.resolution = resolution
        self.specs: list[dict[str, Any]] = []
        self._train: list[tuple[str, ...]] = []
        self._eval: list[tuple[str, ...]] = []
        for t, entry in enumerate(rewards):
            where = f"data.rewards[{t}]"
            spec = {"name": entry} if isinstance(entry, str) else dict(entry)
            unknown = sorted(set(spec) - set(SPEC_KEYS))
            if unknown or "name" not in spec:
                what = f"unknown key {unknown[0]!r}" if unknown else "no name"
                raise ConfigError(f"{where}: {what}; an entry has the keys {', '.join(SPEC_KEYS)} (name required)")
            if spec["name"] not in REWARDS:
                raise ConfigError(f"{where}.name: unknown reward {spec['name']!r}; choose one of {', '.join(REWARDS)}")
            options = spec.get("options") or {}
            if not isinstance(options, dict):
                raise ConfigError(f"{where}.options must be a mapping of the reward's arguments, got {options!r}")
            self._train.append(read_prompts(str(spec.get("prompts", "digits")), f"{where}.prompts"))
            self._eval.append(read_prompts(str(spec.get("eval_prompts", "digits-held-out")), f"{where}.eval_prompts"))
            self.specs.append({"name": spec["name"], "loss_scale": spec.get("loss_scale"), "options": options})
        names = [s["name"] for s in self.specs]
        self._names = [n if names.count(n) == 1 else f"{n}_{t}" for t, n in enumerate(names)]

    @property
    def task_names(self) -> list[str]:
        return list(self._names)

    @property
    def stream(self) -> RewardStream:
        r = self.resolution
        return RewardStream(
            task_names=tuple(self._names),
            input_shape=(3, r, r),
            rewards=tuple(self.specs),
            resolution=r,
            eval_prompts=tuple(self._eval),
        )

    def train_prompts(self, task_id: int) -> tuple[str, ...]:
        return self._train[task_id]

    def eval_prompts(self, task_id: int) -> tuple[str, ...]:
        return self._eval[task_id]

    def train_dataset(self, task_id: int) -> Dataset:
        return PromptDataset(task_id, self._train[task_id])

    def eval_dataset(self, task_id: int) -> Dataset:
        return PromptDataset(task_id, self._eval[task_id])
