"""`RobotImitationModule`: what every lifelong robot-imitation method shares.

It builds the foundation policy from the stream (observation shapes, action size, window), embeds each
task's instruction once with a frozen language encoder, trains by behaviour cloning (the GMM's negative
log-likelihood, logged as `train/nll`) and evaluates by rollouts: `eval_step(batch, j)` plays the batch's
episode numbers of task j in the simulator and returns one success (0/1) per episode, which the
continual-metrics callback turns into the success matrix. At rollout time `act` uses the task id only to
pick the task's instruction embedding (an input of the policy, as in LIBERO); beyond that it reaches the
method only through `prepare_step` and `eval_step` (PackNet and TAIL use it to choose weights; DMPEL, L2M
and IsCiL must not).

Shared here as well: the seeds a method derives from the run seed (`task_seed`), end-of-task passes over a
task's training windows (`task_batches`) and the per-episode histories of rollouts (`push_history`). The DDP
check of methods that train a subset of their parameters (`require_find_unused_parameters`) is
`ContinualModule`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cli.errors import ConfigError
from cli.files import load_torch_file
from cli.runtime import run_seed
from datamodules.robot.stream import is_image_key
from lightning_modules.base import ContinualModule
from lightning_modules.nn.robot.encoders import encode_instructions
from lightning_modules.nn.robot.policy import FoundationPolicy, PolicyConfig


def to_policy_obs(obs: dict[str, np.ndarray], device: torch.device) -> dict[str, Tensor]:
    """One simulator step of n episodes (dataset keys; images uint8 HWC) -> policy inputs with T = 1."""
    out = {}
    for k, v in obs.items():
        x = torch.as_tensor(np.asarray(v), device=device)
        if is_image_key(k):
            x = x.permute(0, 3, 1, 2).float().div_(255)
        out[k] = x.float().unsqueeze(1)
    return out


def task_seed(salt: int, task_id: int, offset: int = 0) -> int:
    """A seed derived from the run seed, the same on every rank: (run_seed * 1,000,003 + offset + salt *
    (task_id + 1)) mod 2^63. Each kind of draw has its own `salt` (and `offset`), so kinds do not share seeds."""
    return (run_seed() * 1_000_003 + offset + salt * (task_id + 1)) % 2**63


def end_of_task_seed(task_id: int) -> int:
    """Seed of the passes a method makes over task `task_id` at its end (EWC's Fisher, PackNet's fine-tuning)."""
    return task_seed(7_919, task_id)


@contextmanager
def module_mode(module: torch.nn.Module, training: bool) -> Iterator[None]:
    """Runs the block with `module` in train (True) or eval (False) mode; its previous mode is restored after."""
    was_training = module.training
    module.train(training)
    try:
        yield
    finally:
        module.train(was_training)


def push_history(history: dict[int, Tensor], ids: Any, reset: Any, values: Tensor, window: int) -> list[Tensor]:
    """Appends row b of `values` to episode ids[b]'s history (restarted where reset[b] or new) and keeps its
    last `window` entries; returns the rows' histories in order. `history` maps episode ids to tensors."""
    out = []
    for row, (i, r) in enumerate(zip(ids.tolist(), reset.tolist(), strict=True)):
        new = values[row : row + 1]
        kept = new if r or i not in history else torch.cat([history[i], new])
        history[i] = kept[-window:]
        out.append(history[i])
    return out


def weights_fingerprint(state: dict[str, Tensor]) -> str:
    """The first 12 hex digits of a SHA-256 over a state dict's names, dtypes, shapes and values, in name
    order: equal for bit-identical weights, whatever file or device they came from."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name].detach().cpu()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


class RobotImitationModule(ContinualModule):
    """Args:
    policy: sizes and encoders of the foundation policy (see `PolicyConfig`).
    language_encoder: `minilm` (packaged sentence encoder), `tiny`, or a local CLIP folder.
    policy_checkpoint: a local file with pretrained policy weights (a `policy.` state dict as saved by
        `lifelong fit` of a multitask run, or a plain policy state dict); None: random initialisation. Its
        `weights_fingerprint` becomes `policy_fingerprint`, so result tables can name the foundation they used.
    rollout_workers: simulator worker processes for evaluation (0: in this process).
    rollout_media: at each evaluation, episode 0 of each task goes to TensorBoard as `rollout/<task>`: an
        animated GIF where MuJoCo renders offscreen (`MUJOCO_GL=egl|osmesa`), else its state trajectory as a
        figure (one line says so, once per run); recording costs a render per step of that episode.
    """

    def __init__(
        self,
        stream=None,
        policy: PolicyConfig | None = None,
        language_encoder: str = "minilm",
        policy_checkpoint: str | None = None,
        rollout_workers: int = 0,
        rollout_media: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__(stream, optimizer, lr_scheduler)
        if getattr(stream, "env", None) is None or not getattr(stream, "obs_shapes", None):
            raise ConfigError("data: a robot method needs a robot stream (datamodules.RobotDataModule)")
        self.policy_config = policy or PolicyConfig()
        # Plain values in the checkpoint's hyperparameters, so it loads with torch.load(weights_only=True).
        if "policy" in self.hparams:
            self.hparams["policy"] = dataclasses.asdict(self.policy_config)
        self.policy = FoundationPolicy(
            self.policy_config,
            stream.shapes,
            stream.action_dim,
            lang_dim=encode_instructions(language_encoder, ["x"]).shape[-1],
            window=stream.window,
        )
        self.register_buffer("lang_table", encode_instructions(language_encoder, list(stream.instructions)))
        self.policy_fingerprint: str | None = None  # of the loaded foundation weights (`weights_fingerprint`)
        if policy_checkpoint is not None:
            self.load_policy(policy_checkpoint)
        if rollout_workers < 0:
            raise ConfigError(f"model.rollout_workers must be 0 (in this process) or more, got {rollout_workers}")
        self.rollout_workers = rollout_workers
        self.rollout_media = rollout_media
        self._media_note_given = False
        self._runner = None
        self._queue: dict[int, Tensor] = {}  # per episode: its last `window` steps' tokens
        self._query_fifo: dict[int, Tensor] = {}  # per episode: its last `window` routing queries (if routed)

    # -- weights ------------------------------------------------------------------------------------
    def load_policy(self, path: str) -> None:
        """Loads pretrained foundation weights (the lifelong phase starts from them)."""
        if not os.path.exists(path):
            raise ConfigError(
                f"model.policy_checkpoint: {path} does not exist; train one with a multitask run (Meta-World: "
                "lifelong fit -c configs/trainer/cpu.yaml -c configs/robot/pretrain_metaworld.yaml) or set it to null"
            )
        state = load_torch_file(path, "model.policy_checkpoint")
        if not isinstance(state, dict):
            raise ConfigError(f"model.policy_checkpoint {path}: holds no weights; pass a checkpoint of a robot policy")
        state = state.get("state_dict", state)
        if any(k.startswith("policy.") for k in state):
            state = {k[len("policy.") :]: v for k, v in state.items() if k.startswith("policy.")}
        missing, unexpected = self.policy.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("image.")]:
            raise ConfigError(
                f"model.policy_checkpoint: {path} does not fit this policy (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); use the model.policy settings it was trained with"
            )
        self.policy_fingerprint = weights_fingerprint(state)

    # -- tasks --------------------------------------------------------------------------------------
    def on_task_start(self, task_id: int) -> None:
        super().on_task_start(task_id)
        self._query_fifo = {}

    def compute_modules(self) -> dict[str, nn.Module]:
        """The temporal transformer's blocks (called one by one, with the block-causal mask) and the
        image encoder where there are cameras."""
        found: dict[str, nn.Module] = {f"block_{i}": b for i, b in enumerate(self.policy.blocks)}
        if self.policy.image is not None:
            found["image"] = self.policy.image
        return found

    def added_parameters(self, task_id: int) -> int:
        """Parameters added for task `task_id`: none here - the method trains the weights it has (Sequential,
        ER, EWC, PackNet; their other costs are in `added_memory`). Methods that grow override it."""
        return 0

    # -- passes over a task's training windows ------------------------------------------------------
    def as_model_batch(self, batch: dict[str, Any], augment: bool) -> dict[str, Any]:
        """A collated batch of dataset items -> a training batch on the module's device. With `augment`, the
        observations go through the stream's `train_transform` when it has one (obs dict -> obs dict)."""
        batch = move_data_to_device(batch, self.device)
        transform = getattr(self.stream, "train_transform", None)
        if augment and transform is not None:
            batch = {**batch, "obs": transform(batch["obs"])}
        return batch

    def ordered_windows(self, task_id: int, batch_size: int, dataset=None, num_workers: int | None = None):
        """Task `task_id`'s windows in order, without augmentation, with the module in eval mode while they
        are read (DMPEL records its replay set, IsCiL its prototypes this way)."""
        with module_mode(self, False):
            yield from self.task_batches(
                task_id, batch_size, shuffle=False, seed=None, augment=False, dataset=dataset, num_workers=num_workers
            )

    def task_batches(
        self,
        task_id: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int | None = 0,
        augment: bool = True,
        max_batches: int | None = None,
        dataset: Dataset | None = None,
        num_workers: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Task `task_id`'s training windows as batches on the module's device (their `task` set to
        `task_id`), for end-of-task passes: EWC's Fisher, PackNet's fine-tuning, DMPEL's recorded
        coefficients, IsCiL's queries. The order depends on `seed` alone, so every rank sees the same batches
        (None: no generator of its own, the loader's worker seed comes from the global RNG; for ordered
        passes). Without `dataset`: the datamodule's `train_dataset(task_id)` and its workers; with one: no
        workers unless `num_workers` says so."""
        if dataset is None:
            data = self.trainer.datamodule
            if not callable(getattr(data, "train_dataset", None)):
                raise ConfigError(
                    f"data: {type(self).__name__} reads task windows from `train_dataset(t)`; use a robot datamodule"
                )
            dataset = data.train_dataset(task_id)
            num_workers = getattr(data, "num_workers", 0) if num_workers is None else num_workers
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=None if seed is None else torch.Generator().manual_seed(seed),
            num_workers=num_workers or 0,
        )
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                return
            batch["task"] = torch.full((len(batch["actions"]),), task_id, dtype=torch.long)
            yield self.as_model_batch(batch, augment)

    # -- training -----------------------------------------------------------------------------------
    def lang(self, task: Tensor) -> Tensor:
        """Instruction embeddings for a batch of task ids."""
        return self.lang_table[task]

    def bc_loss(self, batch: dict[str, Any]) -> Tensor:
        """Behaviour cloning: mean NLL of the demonstrated actions under the policy."""
        return self.policy.nll(batch["obs"], self.lang(batch["task"]), batch["actions"])

    def training_terms(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The loss terms of one batch, already weighted; their sum is minimised. Methods add terms."""
        return {"nll": self.bc_loss(batch)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        terms = self.training_terms(batch)
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "nll")
        return sum(terms.values())

    # -- rollouts -----------------------------------------------------------------------------------
    @property
    def runner(self):
        if self._runner is None:
            from datamodules.robot.rollout import RolloutRunner

            self._runner = RolloutRunner(self.stream.env, num_workers=self.rollout_workers)
        return self._runner

    def prepare_step(self, obs: dict[str, Tensor], lang: Tensor, ids: Tensor, reset: Tensor, task_id: int) -> None:
        """Called before the policy acts on a group of running episodes (obs with T = 1), once per group of
        episodes whose token history has the same length, with exactly that group's rows: methods that route
        or select experts per sample set them here (they then match the rows of every forward until the next
        call); `task_id` may only be used by methods that assume it is known."""

    def finish_step(self) -> None:
        """Called when `act` is done (also after an error): methods clear what `prepare_step` set."""

    def episode_query_means(self, queries: Tensor, ids: Tensor, reset: Tensor) -> Tensor:
        """(n, Q): each episode's mean routing query over its last `window` steps, this step's (`queries`,
        one row per episode) included: the training query of the episode's latest window."""
        history = push_history(self._query_fifo, ids, reset, queries, self.policy.window)
        return torch.stack([h.mean(0) for h in history])

    def encode_step(self, obs: dict[str, Tensor], lang: Tensor) -> Tensor:
        """(n, 1, M, E) tokens of the current step (methods with encoder adapters may override)."""
        return self.policy.encode(obs, lang)

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray], ids: np.ndarray, reset: np.ndarray, task_id: int) -> np.ndarray:
        """Actions for the running episodes `ids` of task `task_id` (whose instruction embedding the policy
        gets). Per group of episodes whose history will have the same length (shortest first, rows in order):
        `prepare_step`, encode this step, append it to each episode's queue of the last `window` steps'
        tokens, run the transformer and sample from the GMM at the newest step; then `finish_step`."""
        ids, reset = np.asarray(ids), np.asarray(reset)
        window = self.policy.window
        lengths = np.array(
            [
                1 if r or i not in self._queue else min(len(self._queue[i]) + 1, window)
                for i, r in zip(ids.tolist(), reset.tolist(), strict=True)
            ]
        )
        x = to_policy_obs(obs, self.device)
        lang = self.lang_table[task_id].expand(len(ids), -1)
        actions = torch.empty(len(ids), self.stream.action_dim, device=self.device)
        try:
            for n in np.unique(lengths).tolist():
                rows = np.flatnonzero(lengths == n)
                index = torch.as_tensor(rows, device=self.device)
                part, part_lang = {k: v[index] for k, v in x.items()}, lang[index]
                ids_t, reset_t = (torch.as_tensor(a[rows], device=self.device) for a in (ids, reset))
                self.prepare_step(part, part_lang, ids_t, reset_t, task_id)
                tokens = self.encode_step(part, part_lang)[:, 0]
                seq = torch.stack(push_history(self._queue, ids[rows], reset[rows], tokens, window))
                actions[index] = self.policy.head(self.policy.temporal(seq)[:, -1]).sample()
        finally:
            self.finish_step()
        return actions.clamp_(-1, 1).float().cpu().numpy()

    def play(self, task_id: int, episodes: list[int], record: int = 0):
        """A `RolloutResult` of `episodes` (initial-state numbers) of task `task_id`, seeded by the first
        episode so a batch plays the same wherever it runs; the first `record` episodes are recorded."""
        self._queue, self._query_fifo = {}, {}
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.stream.env.eval_seed + 7919 * task_id + episodes[0])
                policy = lambda obs, ids, reset: self.act(obs, ids, reset, task_id)  # noqa: E731
                return self.runner.run(task_id, episodes, policy, record=record)
        finally:
            self._queue, self._query_fifo = {}, {}

    def eval_step(self, batch: dict[str, Tensor], task_id: int) -> dict[str, Tensor]:
        """Plays the batch's episodes of task `task_id`; one success (0/1) per episode. The batch holding
        episode 0 (first) records it for `rollout_media`."""
        episodes = batch["episode"].tolist()
        record = int(self._media_writer() is not None and episodes[0] == 0)
        result = self.play(task_id, episodes, record)
        if record:
            self._log_rollout(task_id, result)
        return {"success_rate": torch.as_tensor(result.success, dtype=torch.float32, device=self.device)}

    def _media_writer(self):
        """The TensorBoard writer rollout media go to, or None (off, no trainer, another logger)."""
        from lightning.pytorch.loggers import TensorBoardLogger

        if not self.rollout_media or self._trainer is None or not isinstance(self.logger, TensorBoardLogger):
            return None
        return self.logger.experiment

    def _log_rollout(self, task_id: int, result) -> None:
        """Episode 0 of task `task_id` (the first row of the batch) to TensorBoard; a failure is one line."""
        from lightning.pytorch.utilities import rank_zero_warn

        from datamodules.robot.media import log_rollout

        frames = result.frames[0] if result.frames else None
        tag = f"rollout/{self.stream.task_names[task_id]}"
        try:
            what = log_rollout(
                self._media_writer(), tag, frames, result.trajectories[0], bool(result.success[0]), self.global_step
            )
        except Exception as err:  # noqa: BLE001 - media are a view on the run; never stop it
            rank_zero_warn(f"model.rollout_media: {tag} was not written ({type(err).__name__}: {err})")
            return
        if what == "figure" and not self._media_note_given:
            self._media_note_given = True
            rank_zero_warn(
                "model.rollout_media: MuJoCo cannot render here, so rollouts go to TensorBoard as state-trajectory "
                "figures; set MUJOCO_GL=egl (GPU) or MUJOCO_GL=osmesa (CPU, needs libosmesa) for videos"
            )

    def on_fit_end(self) -> None:
        self.close_runner()

    def on_test_end(self) -> None:
        self.close_runner()

    def close_runner(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_runner"] = None  # worker processes are not copied
        return state
