"""`RobotImitationModule`: what every lifelong robot-imitation method shares.

It builds the foundation policy from the stream (observation shapes, action size, window), embeds each
task's instruction once with a frozen language encoder, trains by behaviour cloning (the GMM's negative
log-likelihood, logged as `train/nll`) and evaluates by rollouts: `eval_step(batch, j)` plays the batch's
episode numbers of task j in the simulator and returns one success (0/1) per episode, which the
continual-metrics callback turns into the success matrix. The task id reaches the policy at rollout
time only through `prepare_step` (PackNet and TAIL use it; DMPEL, L2M and IsCiL must not).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from cli.errors import ConfigError
from lightning_modules.base import ContinualModule
from lightning_modules.nn.robot.encoders import encode_instructions
from lightning_modules.nn.robot.policy import FoundationPolicy, PolicyConfig


def to_policy_obs(obs: dict[str, np.ndarray], device: torch.device) -> dict[str, Tensor]:
    """One simulator step of n episodes (dataset keys; images uint8 HWC) -> policy inputs with T = 1."""
    out = {}
    for k, v in obs.items():
        x = torch.as_tensor(np.asarray(v), device=device)
        if k.endswith("_rgb"):
            x = x.permute(0, 3, 1, 2).float().div_(255)
        out[k] = x.float().unsqueeze(1)
    return out


class RobotImitationModule(ContinualModule):
    """Args:
    policy: sizes and encoders of the foundation policy (see `PolicyConfig`).
    language_encoder: `minilm` (packaged sentence encoder), `tiny`, or a local CLIP folder.
    policy_checkpoint: a local file with pretrained policy weights (a `policy.` state dict as saved by
        `lifelong fit` of a multitask run, or a plain policy state dict); None: random initialisation.
    rollout_workers: simulator worker processes for evaluation (0: in this process).
    """

    def __init__(
        self,
        stream=None,
        policy: PolicyConfig | None = None,
        language_encoder: str = "minilm",
        policy_checkpoint: str | None = None,
        rollout_workers: int = 0,
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
        if policy_checkpoint is not None:
            self.load_policy(policy_checkpoint)
        self.rollout_workers = rollout_workers
        self._runner = None
        self._queue: dict[int, Tensor] = {}

    # -- weights ------------------------------------------------------------------------------------
    def load_policy(self, path: str) -> None:
        """Loads pretrained foundation weights (the lifelong phase starts from them)."""
        if not os.path.isfile(path):
            raise ConfigError(f"model.policy_checkpoint: {path} does not exist; train one with a multitask run")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        if any(k.startswith("policy.") for k in state):
            state = {k[len("policy.") :]: v for k, v in state.items() if k.startswith("policy.")}
        missing, unexpected = self.policy.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("image.")]:
            raise ConfigError(
                f"model.policy_checkpoint: {path} does not fit this policy (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); use the model.policy settings it was trained with"
            )

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
        """Called before the policy acts at each simulator step (obs with T = 1). Methods that route or
        select experts set them here; `task_id` may only be used by methods that assume it is known."""

    def encode_step(self, obs: dict[str, Tensor], lang: Tensor) -> Tensor:
        """(n, 1, M, E) tokens of the current step (methods with encoder adapters may override)."""
        return self.policy.encode(obs, lang)

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray], ids: np.ndarray, reset: np.ndarray, task_id: int) -> np.ndarray:
        """Actions for the running episodes `ids`: encode this step, append it to each episode's queue of
        the last `window` steps' tokens, run the transformer and sample from the GMM at the newest step."""
        x = to_policy_obs(obs, self.device)
        lang = self.lang_table[task_id].expand(len(ids), -1)
        ids_t = torch.as_tensor(ids, device=self.device)
        self.prepare_step(x, lang, ids_t, torch.as_tensor(reset, device=self.device), task_id)
        tokens = self.encode_step(x, lang)[:, 0]
        for row, (i, r) in enumerate(zip(ids.tolist(), reset.tolist(), strict=True)):
            q = (
                tokens[row : row + 1]
                if r or i not in self._queue
                else torch.cat([self._queue[i], tokens[row : row + 1]])
            )
            self._queue[i] = q[-self.policy.window :]
        actions = torch.empty(len(ids), self.stream.action_dim, device=self.device)
        lengths = torch.tensor([len(self._queue[i]) for i in ids.tolist()])
        for n in lengths.unique().tolist():  # episodes with the same history length run together
            rows = (lengths == n).nonzero().flatten()
            seq = torch.stack([self._queue[ids[r]] for r in rows.tolist()])
            h = self.policy.temporal(seq)[:, -1]
            actions[rows.to(self.device)] = self.policy.head(h).sample()
        return actions.clamp_(-1, 1).float().cpu().numpy()

    def eval_step(self, batch: dict[str, Tensor], task_id: int) -> dict[str, Tensor]:
        """Plays the batch's episodes of task `task_id`; one success (0/1) per episode."""
        episodes = batch["episode"].tolist()
        self._queue = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.stream.env.eval_seed + 7919 * task_id + episodes[0])
            result = self.runner.run(task_id, episodes, lambda obs, ids, reset: self.act(obs, ids, reset, task_id))
        self._queue = {}
        return {"success_rate": torch.as_tensor(result.success, dtype=torch.float32, device=self.device)}

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
