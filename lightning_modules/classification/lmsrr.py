"""LMSRR: several pre-trained ViTs, fused by MSIDF, refined in their last blocks (MLRO) under a feature-
drift penalty that a learnable Gumbel-softmax switch weights per backbone and layer (ARO), with DER-style
logit replay:

    L = CE(f(x), y) + [t >= 1] * alpha * L_ARO + [memory not empty] * beta * MSE(f(x_m), z_m)
    L_ARO = sum_jk s_jk * MSE(Z_jk, Z~_jk) / sum_jk s_jk,  s_jk = softmax((w_jk + g) / tau)[0]

Z_jk is the output of trainable block k of backbone j, Z~_jk the same from a frozen copy taken when
the task started, g Gumbel noise drawn at every step. As in the released code the drift is measured on
the current task's augmented batch; one forward yields both the logits and the levels (the code's two
forwards are equal, dropout being 0), and the frozen copy reuses the frozen blocks' output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.classification.base import ReplayModule
from lightning_modules.nn.frozen import FrozenCopy
from lightning_modules.nn.fusion import MultiSourceFusion

#: two random-weight tiny HF ViTs: the architecture of the paper's pair, small enough for a CPU
TINY_SOURCES = {"sources": [{"name": "hf_vit", "args": {"preset": "tiny"}}] * 2}


def aro_loss(levels: list[Tensor], reference: list[Tensor], switches: Tensor) -> Tensor:
    """The switch-weighted average of the per-level drifts (MSE against the detached reference)."""
    drift = torch.stack([F.mse_loss(z, z_ref.detach()) for z, z_ref in zip(levels, reference, strict=True)])
    return (switches * drift).sum() / switches.sum().clamp_min(1e-12)


class LMSRR(ReplayModule):
    """Args:
    alpha: weight of the ARO drift term (the paper's "ARO weight"; 0.1 on CIFAR-10 and Tiny-ImageNet,
        0.3 on CIFAR-100).
    beta: weight of the logit replay term ("penalty weight", 0.2 everywhere).
    tau: Gumbel-softmax temperature of the switches (0.1).
    backbone_args: `sources` (the ViTs: `{name: hf_vit | timm, args: {...}}` each), `kernel_sizes` and
        `fusion_weights` of MSIDF (`faithful`: the code's unused third weight; `normalized`), and
        per source `input_norm` (`dataset`: the code feeds the data's normalisation; `model`: the
        ViT's own mean/std).
    """

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 0.2,
        tau: float = 0.1,
        buffer_size: int = 500,
        minibatch_size: int | None = 32,
        backbone: str = "multi_source",
        backbone_args: dict[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(
            buffer_size=buffer_size,
            minibatch_size=minibatch_size,
            backbone=backbone,
            backbone_args=TINY_SOURCES if backbone_args is None else backbone_args,
            **kwargs,
        )
        if not isinstance(self.backbone, MultiSourceFusion):
            raise ConfigError("model.backbone: LMSRR needs the multi_source backbone (a list of ViT sources)")
        self.alpha, self.beta, self.tau = alpha, beta, tau
        levels = sum(len(s.blocks) for s in self.backbone.sources)
        self.switch_logits = nn.Parameter(torch.randn(levels, 2))
        self.reference = FrozenCopy(self.backbone.trainable_blocks())

    def on_task_start(self, task_id: int) -> None:
        super().on_task_start(task_id)
        self.reference.load_from(self.backbone.trainable_blocks())

    def compute_modules(self) -> dict[str, nn.Module]:
        """Every transformer block of every source: the step runs them one by one (`forward_levels`), never
        through the backbone's own forward."""
        return {
            f"source_{j}.{kind}_{k}": block
            for j, source in enumerate(self.backbone.sources)
            for kind, blocks in (("frozen", source.frozen_blocks), ("block", source.blocks))
            for k, block in enumerate(blocks)
        }

    def switches(self) -> Tensor:
        """One soft switch s_jk in (0, 1) per (backbone, level), with fresh Gumbel noise."""
        return F.gumbel_softmax(self.switch_logits, tau=self.tau, hard=False)[:, 0]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y = batch["x"], batch["y"]
        regularise = self.current_task >= 1
        out = self.backbone.forward_levels(x, reference=self.reference.module if regularise else None)
        logits = self.head(out.fused)
        ce = F.cross_entropy(logits, y)
        self.log("train/ce", ce, prog_bar=True)
        loss = ce
        if regularise and out.levels:
            aro = aro_loss(out.levels, out.reference_levels, self.switches())
            self.log("train/aro", aro)
            loss = loss + self.alpha * aro
        else:  # the switches get a zero gradient, so DDP's reducer sees every parameter every step
            loss = loss + 0.0 * self.switch_logits.sum()
        if len(self.buffer):
            memory = self.replay(batch)
            logit_mse = F.mse_loss(self(memory["x"]), memory["logits"])
            self.log("train/logit_mse", logit_mse)
            loss = loss + self.beta * logit_mse
        self.remember(batch, logits=logits.detach())
        return loss
