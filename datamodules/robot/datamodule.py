"""`RobotDataModule`: a lifelong robot-imitation stream. Task t trains on the windows of its demonstration
file and is evaluated by rollouts: its evaluation set is just the episode numbers 0..eval_episodes-1, which
the method's `eval_step` plays in the simulator (one batch = every episode of a task by default).

Meta-World suites make their demonstrations with the scripted experts on first use (`prepare_data`, once
per node), into `root` or, when `root` is None, into a cache shared by every suite and run:
`$XDG_CACHE_HOME/lifelong/metaworld/<recipe>/<env name>.hdf5` (`~/.cache` without XDG_CACHE_HOME), where
`<recipe>` names the generation settings (seed, horizon, noise, extra steps, image size). Only that cache's
files are ever made again (when stale: made there with fewer demos, say); a file in `root` that is unreadable
or was made with other settings stops the run with one line, untouched. LIBERO suites read LIBERO's download:
`root/<suite>/<task name>_demo.hdf5`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from cli.errors import ConfigError
from datamodules.base import ContinualDataModule, TensorDictDataset
from datamodules.robot.augment import CameraAugment
from datamodules.robot.demos import DemoSettings, file_status, make_task_demos, stale_reason
from datamodules.robot.envs import ACTION_DIM, METAWORLD_LOWDIM, METAWORLD_NUM_INITS
from datamodules.robot.hdf5 import DemoWindows, read_info
from datamodules.robot.stream import EnvSpec, RobotTaskStream, is_image_key
from datamodules.robot.suites import CAMERA_KEYS, LOWDIM_KEYS, resolve_suite

#: per-suite defaults: steps per evaluation episode (and most steps per demonstration), settling steps
HORIZON = {"metaworld": 150, "libero": 600}  # Meta-World: the scripted experts need ~100 steps
SETTLE_STEPS = {"metaworld": 0, "libero": 5}
#: distinct initial states per task (Meta-World's MT1 draws 50; LIBERO's init-state files hold 50)
HELD_OUT_LIMIT = METAWORLD_NUM_INITS


def default_cache() -> Path:
    """Where generated Meta-World demonstrations go when `root` is None."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lifelong" / "metaworld"


class RobotDataModule(ContinualDataModule):
    """Args:
    suite: cw10, cw3, mt10 (Meta-World) or libero_spatial, libero_object, libero_goal, libero_10.
    tasks: a list of Meta-World env names instead of a suite, e.g. [reach-v3, push-v3].
    root: folder of the demonstration files (None: the Meta-World cache; LIBERO needs it).
    demos: demonstrations per task used for training (the first n of each file; Meta-World makes them).
    window: steps per training sample (T).
    obs_keys: observation keys the policy reads (default: the suite's low-dim keys, plus its cameras
        when image_size > 0).
    image_size: camera height = width (0: state only; Meta-World cameras need an OpenGL backend).
    eval_episodes: rollouts per task at each evaluation.
    horizon: policy steps per episode (default 150 Meta-World, as every CW config and `make-demos`; 600 LIBERO);
        also bounds the demos' length.
    settle_steps: zero actions after each reset before the policy acts (default 0 Meta-World, 5 LIBERO).
    eval_seed: seed of the evaluation episodes' initial states (the demonstrations use demo_seed).
    demo_noise, demo_seed, demo_extra_steps: how Meta-World demos are made (see datamodules.robot.demos).
    eval_batch_size: episodes per evaluation batch (default: eval_episodes, one batch per task).
    augment: augment camera images in training (datamodules.robot.augment: colour jitter, affine, shift).
    """

    def __init__(
        self,
        suite: str | None = None,
        tasks: list[str] | None = None,
        root: str | None = None,
        demos: int = 50,
        window: int = 10,
        obs_keys: list[str] | None = None,
        image_size: int = 0,
        eval_episodes: int = 20,
        horizon: int | None = None,
        settle_steps: int | None = None,
        eval_seed: int = 1000,
        demo_noise: float = 0.0,
        demo_seed: int = 0,
        demo_extra_steps: int = 5,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_on: Literal["current", "seen", "all"] = "current",
        seed: int | None = None,
        pin_memory: bool | None = None,
        augment: bool = True,
    ):
        for option, value, least in (
            ("demos", demos, 1),
            ("window", window, 1),
            ("eval_episodes", eval_episodes, 1),
            ("horizon", 1 if horizon is None else horizon, 1),
            ("settle_steps", settle_steps or 0, 0),
            ("image_size", image_size, 0),
            ("demo_noise", demo_noise, 0),
            ("demo_extra_steps", demo_extra_steps, 0),
        ):
            if value < least:
                raise ConfigError(f"data.{option}={value}: must be at least {least}")
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size or eval_episodes,
            num_workers=num_workers,
            train_on=train_on,
            seed=seed,
            pin_memory=pin_memory,
        )
        self.suite = resolve_suite(suite, tasks)
        kind = self.suite.kind
        if kind == "libero" and root is None:
            raise ConfigError(
                f"data.root: suite {self.suite.name} reads LIBERO's demonstration files; set data.root to the "
                f"folder holding {self.suite.name}/"
            )
        self.demos, self.window, self.image_size = demos, window, image_size
        self.eval_episodes, self.eval_seed = eval_episodes, eval_seed
        self.horizon = HORIZON[kind] if horizon is None else horizon
        self.settle_steps = SETTLE_STEPS[kind] if settle_steps is None else settle_steps
        self.settings = None
        if kind == "metaworld":
            self.settings = DemoSettings(
                demos=demos,
                horizon=self.horizon,
                noise=demo_noise,
                seed=demo_seed,
                extra_steps=demo_extra_steps,
                image_size=image_size,
            )
        self.root = Path(root) if root is not None else default_cache() / self.settings.folder_name()
        #: the suite's own cache, where stale demonstration files are made again (never in a folder the user named)
        self.in_cache = root is None
        cameras = CAMERA_KEYS[kind] if image_size > 0 else ()
        self.obs_keys = tuple(obs_keys) if obs_keys is not None else LOWDIM_KEYS[kind] + cameras
        if not self.obs_keys:
            raise ConfigError("data.obs_keys is empty: list the observation keys the policy reads")
        if image_size == 0 and any(is_image_key(k) for k in self.obs_keys):
            raise ConfigError(f"data.obs_keys {list(self.obs_keys)} has camera keys: set data.image_size to their size")
        if kind == "metaworld":
            known = [*METAWORLD_LOWDIM, *CAMERA_KEYS["metaworld"]]
            unknown = [k for k in self.obs_keys if k not in known]
            if unknown:
                raise ConfigError(f"data.obs_keys: {unknown} are not Meta-World keys; valid keys are {known}")
        cameras_used = [k for k in self.obs_keys if is_image_key(k)]
        #: obs dict -> augmented obs dict (None without cameras); methods apply it to what they replay too
        self.camera_augment = CameraAugment(cameras_used, image_size) if augment and cameras_used else None
        self._train: dict[int, DemoWindows] = {}
        self._shapes: tuple[tuple[str, tuple[int, ...]], ...] | None = None

    # -- the stream ---------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self.suite.env_names)

    def demo_file(self, task_id: int) -> Path:
        """Task `task_id`'s demonstration file."""
        return self.suite.demo_file(self.root, task_id)

    @property
    def env_spec(self) -> EnvSpec:
        options = (("benchmark", self.suite.name),) if self.suite.kind == "libero" else ()
        return EnvSpec(
            suite=self.suite.kind,
            env_names=self.suite.env_names,
            horizon=self.horizon,
            settle_steps=self.settle_steps,
            obs_keys=self.obs_keys,
            image_size=self.image_size,
            eval_seed=self.eval_seed,
            options=options,
        )

    def _obs_shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Per-step shapes of the observation keys: Meta-World's are fixed by the adapter; LIBERO's are read
        from the first task's file (which must then exist)."""
        if self._shapes is None:
            s = self.image_size
            if self.suite.kind == "metaworld":
                known = {**METAWORLD_LOWDIM, **{k: (3, s, s) for k in CAMERA_KEYS["metaworld"]}}
            else:
                info = read_info(self.demo_file(0))
                known = info.obs_shapes
                missing = [k for k in self.obs_keys if k not in known]
                if missing:
                    raise ConfigError(f"data.obs_keys: {missing} not in {info.path}; available keys: {sorted(known)}")
                wrong = [k for k in self.obs_keys if is_image_key(k) and known[k] != (3, s, s)]
                if wrong:
                    raise ConfigError(
                        f"data.image_size={s}: {info.path} has {wrong[0]} frames of shape {known[wrong[0]]}; "
                        "set data.image_size to their size"
                    )
            self._shapes = tuple((k, tuple(known[k])) for k in self.obs_keys)
        return self._shapes

    @property
    def stream(self) -> RobotTaskStream:
        return RobotTaskStream(
            task_names=tuple(self.task_names),
            instructions=self.suite.instructions,
            obs_shapes=self._obs_shapes(),
            action_dim=ACTION_DIM[self.suite.kind],
            window=self.window,
            env=self.env_spec,
            train_transform=self.camera_augment,
        )

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Seeds the step's RNG (the base class), then augments the cameras of training batches."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        trainer = self.trainer
        if self.camera_augment is not None and trainer is not None and trainer.training:
            batch = {**batch, "obs": self.camera_augment.to(batch["actions"].device)(batch["obs"])}
        return batch

    # -- data ---------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Meta-World: makes the demonstration files that are missing and, in the suite's own cache only
        (root None), those made there with other settings or fewer demos. Files in a folder the user named are
        never replaced: a stale or unreadable one stops the run with a line naming it, before any episode is
        played; files made elsewhere are used as they are. LIBERO: checks they exist."""
        todo = []
        for t, name in enumerate(self.task_names):
            path = self.demo_file(t)
            if self.settings is None:
                if not path.is_file():
                    raise ConfigError(
                        f"{path}: LIBERO demonstration file not found; download the {self.suite.name} datasets "
                        "into data.root"
                    )
                continue
            status = file_status(path, name, self.settings)
            if status == "stale" and not self.in_cache:
                raise ConfigError(
                    f"{path}: {stale_reason(path, name, self.settings)}; files in data.root are never replaced: "
                    "delete it, or set data.root to another folder (or null, for the cache)"
                )
            if status in ("missing", "stale"):
                todo.append((t, name, path))
        for t, name, path in todo:
            rank_zero_info(f"Making {self.demos} demonstrations of {name} with the scripted expert -> {path}")
            r = make_task_demos(
                self.suite, t, self.root, self.settings, replace_stale=self.in_cache, option="data.root"
            )
            if r.skipped:
                rank_zero_info(f"{name}: made meanwhile by another run, used as it is")
            else:
                rank_zero_info(f"{name}: {r.demos} demos from {r.attempts} episodes, mean length {r.mean_length:.1f}")

    def setup(self, stage: str | None = None) -> None:
        for t in range(self.num_tasks):
            self.train_dataset(t)

    def train_dataset(self, task_id: int) -> Dataset:
        """Windows of task `task_id`'s first `demos` demonstrations; items carry `task`."""
        if task_id not in self._train:
            ds = DemoWindows(self.demo_file(task_id), self.obs_keys, self.window, demos=self.demos, task=task_id)
            shapes = dict(self._obs_shapes())
            for k in self.obs_keys:
                if ds.info.obs_shapes[k] != shapes[k]:
                    raise ConfigError(
                        f"{ds.path}: obs key {k} has per-step shape {ds.info.obs_shapes[k]}, expected {shapes[k]}"
                    )
            if ds.info.action_dim != ACTION_DIM[self.suite.kind]:
                raise ConfigError(
                    f"{ds.path}: actions have {ds.info.action_dim} entries, {self.suite.kind} uses "
                    f"{ACTION_DIM[self.suite.kind]}"
                )
            self._train[task_id] = ds
        return self._train[task_id]

    def eval_dataset(self, task_id: int) -> Dataset:
        """The episode numbers the rollout evaluation plays for task `task_id`."""
        return TensorDictDataset(episode=torch.arange(self.eval_episodes))

    def held_out_dataset(self, task_id: int) -> Dataset:
        """As many other episodes (numbers eval_episodes..2 eval_episodes-1: other initial states), for
        choosing a task's best curve point apart from the episodes the matrix reports."""
        if 2 * self.eval_episodes > HELD_OUT_LIMIT:
            raise ConfigError(
                f"data.eval_episodes={self.eval_episodes}: held-out curve episodes need 2 x eval_episodes <= "
                f"{HELD_OUT_LIMIT} distinct initial states; lower it or use continual_metrics.curve_on: eval"
            )
        return TensorDictDataset(episode=torch.arange(self.eval_episodes, 2 * self.eval_episodes))
