"""`Throughput`: GPU speed options applied to the networks that do a method's heavy lifting.

A method names those networks in `compute_modules()` (name -> module: the classifier's backbone or
LMSRR's transformer blocks, the diffusion and removal UNets, the robot policy's encoder and temporal
transformer). When fit, validate or test sets up, this callback

- `channels_last: true` stores their 4-D weights channels-last, the layout cuDNN's convolutions and
  tensor cores prefer; a no-op for networks without convolutions;
- `compile: true` (or a dict of `torch.compile` arguments, e.g. `{mode: max-autotune}`) compiles each of
  them in place with `nn.Module.compile`, so parameter names, checkpoints and LoRA exports are unchanged.
  Adapters added at a task start change a compiled network, which recompiles on its next call (once per
  task); rollouts and sampling at new batch sizes recompile too. The first steps are slow while it compiles.

Both are off by default: on CPUs and on the small `tiny` presets they cost more than they save.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
from torch import nn

from cli.errors import ConfigError


class Throughput(L.Callback):
    """Args: compile: False, True (torch.compile's defaults) or torch.compile's keyword arguments;
    channels_last: store the compute modules' 4-D weights channels-last."""

    def __init__(self, compile: bool | dict[str, Any] = False, channels_last: bool = False):  # noqa: A002
        if isinstance(compile, dict):
            known = set(inspect.signature(torch.compile).parameters) - {"model"}
            unknown = sorted(set(compile) - known)
            if unknown:
                raise ConfigError(
                    f"throughput.compile: unknown torch.compile argument(s) {', '.join(unknown)}; "
                    f"use some of {', '.join(sorted(known))}"
                )
        self.compile_args: dict[str, Any] | None = (
            dict(compile) if isinstance(compile, dict) else ({} if compile else None)
        )
        self.channels_last = channels_last
        self._done: set[int] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.compile_args is None and not self.channels_last:
            return
        modules = pl_module.compute_modules() if hasattr(pl_module, "compute_modules") else {}
        if not modules:
            raise ConfigError(
                f"throughput: {type(pl_module).__name__} names no compute_modules(); set throughput.compile "
                "and throughput.channels_last to false for it"
            )
        for module in modules.values():
            if id(module) in self._done:  # fit then test on one trainer: apply once
                continue
            if self.channels_last:
                module.to(memory_format=torch.channels_last)
            if self.compile_args is not None:
                module.compile(**self.compile_args)
            self._done.add(id(module))

    @staticmethod
    def compiled(module: nn.Module) -> bool:
        """Whether `module` was compiled in place (its calls go through torch.compile)."""
        return getattr(module, "_compiled_call_impl", None) is not None
