"""PackNet (Mallya & Lazebnik, 2018) as in LIBERO / the DMPEL code: every Linear/Conv weight of the policy
has an owner (0 = free, t + 1 = task t). Task t takes all free weights and trains only those; at its end
the `prune_perc` smallest of them (per layer) are zeroed and freed for later tasks and the survivors are
fine-tuned. Task j is evaluated with the weights owned by tasks 0..j only, so it needs the task id.

    loss = nll      (gradients of weights not owned by t are zeroed after clipping)

Deliberate differences from the reference code: (1) earlier tasks' weights stay bit-identical - AdamW's
decoupled weight decay would shrink them although their gradient is zero, so they are restored after every
optimizer step (`faithful_weight_decay: true` keeps the reference's drift); (2) tensors that are neither
Linear/Conv weights nor biases/norms (a CLIP tower's class and position embeddings) have no owner; the
reference lets every task update them, here they train in task 0 only (`unmasked_params: always` for the
reference); (3) the post-prune fine-tuning is a plain loop (fresh optimizer of the module's kind, constant
lr, full precision, no rollout selection). Biases and norm parameters never train, norm layers stay in eval mode.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cli.errors import ConfigError
from lightning_modules.robot.base import RobotImitationModule, end_of_task_seed, module_mode

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.LayerNorm, nn.GroupNorm, _BatchNorm)


def prune_smallest(weight: Tensor, owner: Tensor, task_id: int, share: float) -> int:
    """Frees (owner 0, value 0) the round(share * n) smallest-magnitude of the n weights task `task_id`
    owns in this layer (ties broken by position); returns how many were freed."""
    owned = (owner.view(-1) == task_id + 1).nonzero().squeeze(1)
    k = round(share * owned.numel())
    drop = owned[torch.argsort(weight.detach().view(-1)[owned].abs(), stable=True)[:k]]
    owner.view(-1)[drop] = 0
    weight.data.view(-1)[drop] = 0
    return k


class PackNet(RobotImitationModule):
    """Args:
    prune_perc: share of a task's weights freed at its end, per layer (spec: 0.75).
    post_prune_epochs: epochs of fine-tuning the survivors after pruning (spec: 10; configs use 1).
    unmasked_params: `first_task` (tensors without an owner train in task 0 only) or `always` (reference).
    faithful_weight_decay: let weight decay move earlier tasks' weights, as the reference code does.
    """

    def __init__(
        self,
        *args: Any,
        prune_perc: float = 0.75,
        post_prune_epochs: int = 10,
        unmasked_params: Literal["first_task", "always"] = "first_task",
        faithful_weight_decay: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if not 0.0 <= prune_perc < 1.0:
            raise ConfigError(f"model.prune_perc={prune_perc}: must be in [0, 1)")
        if post_prune_epochs < 0:
            raise ConfigError(f"model.post_prune_epochs={post_prune_epochs}: must be >= 0")
        if unmasked_params not in ("first_task", "always"):
            raise ConfigError(f"model.unmasked_params={unmasked_params!r}: choose 'first_task' or 'always'")
        self.prune_perc = prune_perc
        self.post_prune_epochs = post_prune_epochs
        self.unmasked_params = unmasked_params
        self.faithful_weight_decay = faithful_weight_decay
        self.masked_names: list[str] = []
        fixed: set[str] = set()
        for mname, m in self.policy.named_modules():
            prefix = f"{mname}." if mname else ""
            if isinstance(m, PRUNABLE):
                self.masked_names.append(prefix + "weight")
            if isinstance(m, NORMS):
                fixed.update(prefix + n for n, _ in m.named_parameters(recurse=False))
        params = dict(self.policy.named_parameters())
        fixed.update(n for n in params if n.endswith("bias"))
        for n in fixed:
            params[n].requires_grad_(False)
        self.unmasked_names = [n for n in params if n not in fixed and n not in self.masked_names]
        # One owner mask per masked weight (int16: 0 free, t + 1 owned by task t).
        self.owners = nn.Module()
        for i, n in enumerate(self.masked_names):
            self.owners.register_buffer(f"m{i}", torch.zeros(params[n].shape, dtype=torch.int16))
        self._frozen: list[Tensor] | None = None  # values of the weights task t must not move

    def masked_weights(self) -> list[tuple[nn.Parameter, Tensor]]:
        """(weight, owner mask) pairs, in policy order."""
        params = dict(self.policy.named_parameters())
        return [(params[n], self.owners.get_buffer(f"m{i}")) for i, n in enumerate(self.masked_names)]

    def deepspeed_unsupported(self) -> str | None:
        return "PackNet masks gradients and restores frozen weights around each step, which ZeRO bypasses"

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = dict(self.policy.named_parameters())
        unmasked = self.unmasked_params == "always" or self.current_task == 0
        return [params[n] for n in self.masked_names + (self.unmasked_names if unmasked else [])]

    def train(self, mode: bool = True) -> PackNet:
        super().train(mode)
        for m in self.policy.modules():
            if isinstance(m, _BatchNorm):
                m.eval()  # running statistics are shared by every task: frozen like the norm weights
        return self

    # -- training task t ----------------------------------------------------------------------------
    def on_task_start(self, task_id: int) -> None:
        super().on_task_start(task_id)
        for _, owner in self.masked_weights():
            owner.masked_fill_(owner == 0, task_id + 1)
        self._frozen = None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clips as configured, then zeroes the gradients of weights task t does not own (the reference order)."""
        if self._frozen is None:
            self._frozen = self._frozen_values()  # before this task's first step (also after a resume)
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.mask_gradients()

    def mask_gradients(self) -> None:
        for w, owner in self.masked_weights():
            if w.grad is not None:
                w.grad.masked_fill_(owner != self.current_task + 1, 0)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.restore_frozen()

    def _frozen_values(self) -> list[Tensor]:
        return [w.detach()[owner != self.current_task + 1].clone() for w, owner in self.masked_weights()]

    def restore_frozen(self) -> None:
        """Puts back the weights task t does not own (undoes weight decay on them)."""
        if self.faithful_weight_decay or self._frozen is None:
            return
        for (w, owner), values in zip(self.masked_weights(), self._frozen, strict=True):
            w.data.masked_scatter_(owner != self.current_task + 1, values)

    # -- end of task t: prune, then fine-tune the survivors ------------------------------------------
    def on_task_end(self, task_id: int) -> None:
        super().on_task_end(task_id)
        for w, owner in self.masked_weights():
            prune_smallest(w, owner, task_id, self.prune_perc)
        self._frozen = self._frozen_values()
        if self.post_prune_epochs:
            self.fine_tune(task_id)
        self._frozen = None

    def fine_tune(self, task_id: int) -> None:
        """`post_prune_epochs` epochs over the task's windows with a fresh optimizer; the same batches and
        random draws on every rank, then rank 0's weights everywhere (no gradient sync in this loop)."""
        params = self.trainable_parameters()
        optimizer = self.build_optimizer(params)
        clip, algorithm = self.trainer.gradient_clip_val, self.trainer.gradient_clip_algorithm
        seed = end_of_task_seed(task_id)
        with module_mode(self, True), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for epoch in range(self.post_prune_epochs):
                for batch in self.task_batches(task_id, self.trainer.datamodule.batch_size, seed=seed + epoch):
                    optimizer.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        sum(self.training_terms(batch).values()).backward()
                    if clip:
                        if algorithm == "value":
                            torch.nn.utils.clip_grad_value_(params, clip)
                        else:
                            torch.nn.utils.clip_grad_norm_(params, clip)
                    self.mask_gradients()
                    optimizer.step()
                    self.restore_frozen()
        optimizer.zero_grad(set_to_none=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)

    # -- evaluation of task j: only the weights of tasks 0..j ----------------------------------------
    @contextmanager
    def task_weights(self, task_id: int):
        """Within the block the policy computes with the weights owned by tasks 0..task_id (the others zero)."""
        saved = []
        with torch.no_grad():
            for w, owner in self.masked_weights():
                off = (owner == 0) | (owner > task_id + 1)
                saved.append((off, w.detach()[off].clone()))
                w.masked_fill_(off, 0)
        try:
            yield
        finally:
            with torch.no_grad():
                for (w, _), (off, values) in zip(self.masked_weights(), saved, strict=True):
                    w.masked_scatter_(off, values)

    def eval_step(self, batch: dict[str, Tensor], task_id: int) -> dict[str, Tensor]:
        """Rollouts of task `task_id` with its sub-network (the task id is given at test time)."""
        with self.task_weights(task_id):
            return super().eval_step(batch, task_id)

    # -- bookkeeping ---------------------------------------------------------------------------------
    def owned_weights(self, task_id: int) -> int:
        """How many masked weights task `task_id` owns."""
        return sum(int((owner == task_id + 1).sum()) for _, owner in self.masked_weights())

    def added_memory(self, task_id: int) -> dict[str, int]:
        """Numbers stored for task `task_id`: the int16 owner masks, created once (task 0)."""
        return {"owner_mask": sum(o.numel() for _, o in self.masked_weights()) if task_id == 0 else 0}
