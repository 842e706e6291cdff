"""TAIL (Liu et al., ICLR 2024): task-specific LoRA adapters on a frozen foundation policy.

peft LoRA (alpha 16) on every temporal block's fused `attn.qkv` (rank 16; peft adapts all of q, k and v,
not only the q/v slices DMPEL uses) and, with a CLIP image tower, on its later half's q/v projections
(rank 8); the low-dim encoders, FiLM and the GMM head stay fully trainable; everything else is frozen.

    loss = nll      (only the current task's adapter and trainable parts are in the optimizer)

`variant`:
- `task_id` (canonical): task t gets its own adapter `task_<t>` and its own copy of the trainable parts,
  starting from the pretrained ones; evaluating task j activates adapter j and task j's copy, so the
  task id is needed at test time. Tasks never interfere.
- `released` (the released DMPEL code): one adapter; task t > 0 starts from task t-1's trainable weights
  plus Gaussian noise (`noise_std`), and nothing is reloaded at evaluation: sequential LoRA fine-tuning.

All adapters exist from the start and keep requires_grad (unused ones get no gradient), so under DDP the
`task_id` variant needs `strategy: ddp_find_unused_parameters_true`.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.robot.base import RobotImitationModule, task_seed

PARTS = ("lowdim", "film", "head")


class TAIL(RobotImitationModule):
    """Args:
    variant: `task_id` (one adapter and trainable copy per task, selected by task id) or `released`.
    rank / alpha: LoRA rank and alpha of the temporal qkv adapters (16 / 16).
    image_rank: LoRA rank of the CLIP image q/v adapters (8, same alpha).
    noise_std: `released` only: noise added to the trainable weights at each new task (1e-3).
    """

    def __init__(
        self,
        *args: Any,
        variant: Literal["task_id", "released"] = "task_id",
        rank: int = 16,
        alpha: float = 16.0,
        image_rank: int = 8,
        noise_std: float = 1e-3,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if variant not in ("task_id", "released"):
            raise ConfigError(f"model.variant={variant!r}: choose 'task_id' or 'released'")
        from peft import LoraConfig, inject_adapter_in_model

        self.variant, self.noise_std = variant, noise_std
        targets = self.policy.lora_targets()
        temporal, image = [n for n, _ in targets["tem"]], [n for n, _ in targets["img"]]
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=temporal + image,
            rank_pattern={re.escape(n): image_rank for n in image},
        )
        self.adapter_names = [f"task_{t}" for t in range(self.num_tasks if variant == "task_id" else 1)]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for name in self.adapter_names:
                inject_adapter_in_model(config, self.policy, adapter_name=name)
        self.policy.requires_grad_(False)
        for n, p in self.policy.named_parameters():
            p.requires_grad_(".lora_" in n or n.split(".")[0] in PARTS)
        self._activate(self.adapter_names[0])
        if variant == "task_id":
            # Row t: task t's trainable parts (the pretrained ones until task t ends).
            self.register_buffer("parts_store", self._parts_vector().repeat(self.num_tasks, 1))

    # -- what trains --------------------------------------------------------------------------------
    def part_parameters(self) -> list[nn.Parameter]:
        """The fully trainable parts: low-dim encoders, FiLM, GMM head."""
        return [p for part in PARTS for p in getattr(self.policy, part).parameters()]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for n, p in self.policy.named_parameters() if f".lora_A.{name}." in n or f".lora_B.{name}." in n]

    @property
    def current_adapter(self) -> str:
        return self.adapter_names[self.current_task if self.variant == "task_id" else 0]

    def deepspeed_unsupported(self) -> str | None:
        return "TAIL (variant task_id) trains a new adapter at each task" if self.variant == "task_id" else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.adapter_parameters(self.current_adapter) + self.part_parameters()

    def state_to_keep(self) -> dict[str, Tensor]:
        """What the current task trains, by state-dict name (for keeping a task's best weights)."""
        keep = {id(p) for p in self.trainable_parameters()}
        return {n: p for n, p in self.named_parameters() if id(p) in keep}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.variant == "task_id":
            self.require_find_unused_parameters("TAIL (variant task_id) trains one task's adapter at a time")

    # -- switching tasks ----------------------------------------------------------------------------
    def _activate(self, name: str) -> None:
        """Makes adapter `name` the one the forward pass uses (requires_grad flags stay as they are)."""
        from peft.tuners.tuners_utils import set_adapter

        flags = [p.requires_grad for p in self.policy.parameters()]
        set_adapter(self.policy, name)
        for p, flag in zip(self.policy.parameters(), flags, strict=True):
            p.requires_grad_(flag)

    def _parts_vector(self) -> Tensor:
        return torch.cat([p.detach().flatten() for p in self.part_parameters()])

    def _load_parts(self, vector: Tensor) -> None:
        params = self.part_parameters()
        with torch.no_grad():
            for p, chunk in zip(params, vector.split([p.numel() for p in params]), strict=True):
                p.copy_(chunk.view_as(p))

    def on_task_start(self, task_id: int) -> None:
        super().on_task_start(task_id)
        if self.variant == "task_id":
            self._load_parts(self.parts_store[task_id])
            self._activate(self.current_adapter)
        elif task_id > 0 and self.noise_std > 0:
            g = torch.Generator().manual_seed(task_seed(1, task_id - 1))  # run_seed * 1,000,003 + task_id
            with torch.no_grad():
                for p in self.trainable_parameters():
                    p.add_(torch.randn(p.shape, generator=g).to(p) * self.noise_std)

    def on_task_end(self, task_id: int) -> None:
        super().on_task_end(task_id)
        if self.variant == "task_id":
            self.parts_store[task_id] = self._parts_vector()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._activate(self.current_adapter)

    @contextmanager
    def use_task(self, task_id: int):
        """Within the block the policy is task `task_id`'s (`task_id` variant; the released variant always
        uses its latest weights). Unseen tasks get the pretrained parts and an untrained (identity) adapter."""
        if self.variant != "task_id" or task_id == self.current_task:
            yield
            return
        live = self._parts_vector()
        self._load_parts(self.parts_store[task_id])
        self._activate(self.adapter_names[task_id])
        try:
            yield
        finally:
            self._load_parts(live)
            self._activate(self.current_adapter)

    def eval_step(self, batch: dict[str, Tensor], task_id: int) -> dict[str, Tensor]:
        """Rollouts of task `task_id` with its adapter and parts (`task_id` variant: the task id is given)."""
        with self.use_task(task_id):
            return super().eval_step(batch, task_id)

    # -- bookkeeping ----------------------------------------------------------------------------------
    def added_parameters(self, task_id: int) -> int:
        """Parameters added for task `task_id`: its adapter and its copy of the trainable parts (`task_id`);
        the one adapter at task 0 (`released`, which fine-tunes the pretrained parts in place)."""
        adapter = sum(p.numel() for p in self.adapter_parameters(self.adapter_names[0]))
        if self.variant == "released":
            return adapter if task_id == 0 else 0
        return adapter + sum(p.numel() for p in self.part_parameters())

    def added_memory(self, task_id: int) -> dict[str, int]:
        """Numbers stored for task `task_id` besides parameters: none."""
        return {}
