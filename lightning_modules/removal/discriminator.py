"""RORem's discriminator D_phi as a method: LoRA (rank 4) on the attention of the base inpainting UNet's down
and mid blocks plus a classification head, trained to regress the human label of a removal:

    s = softplus(head(mid(E(x_edit) noised at t = 0 | m | E(x_src))))        L = (s - y)^2 averaged over the batch

(MSE, not BCE: the score approximates P(success) without being bounded by 1; the released checkpoint's
calibration depends on it). The edited image is the entry's `GT` in discriminator data; the source enters
whole, not masked. Evaluation on held-out labelled removals: `accuracy` at 0.5 and `accuracy_90` at 0.9
(prediction >= threshold against label >= 0.5), `squared_error` and the mean `score`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_modules.removal.base import RemovalModule


def scorer_loss(scores: Tensor, labels: Tensor) -> Tensor:
    """RORem's discriminator loss: MSE between the softplus scores and the labels, in float32."""
    return F.mse_loss(scores.float(), labels.float().to(scores.device))


class RemovalDiscriminator(RemovalModule):
    """Args (besides `RemovalModule`'s; RORem: AdamW lr 1e-5, weight decay 1e-2, batch 32, 15,000 steps, grad
    clip 1, from the optimizer, data and trainer settings):
    rank / lora_alpha: the LoRA on the attention projections (RORem: 4 / 4, gaussian initialisation).
    eval_seed: seeds the VAE samples and the t = 0 noise of the evaluation, so scores are reproducible.
    """

    def __init__(
        self,
        stream=None,
        pretrained_model_name_or_path: str = "tiny",
        prompt_embedding: Literal["encoded", "zeros"] = "encoded",
        binarize_mask: bool = False,
        rank: int = 4,
        lora_alpha: float = 4.0,
        gradient_checkpointing: bool = False,
        eval_seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__(
            stream,
            pretrained_model_name_or_path,
            prompt_embedding,
            binarize_mask,
            gradient_checkpointing,
            optimizer,
            lr_scheduler,
        )
        # D_phi is the base UNet cut after its mid block: this method needs no full UNet, so it is cut in place.
        self.scorer = self.build_scorer(rank, lora_alpha, unet=self.parts.unet)
        for p in self.scorer.trainable():  # LoRA and head train in every task (a resumed run starts none)
            p.requires_grad_(True)
        self.eval_seed = eval_seed

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """D_phi's LoRA matrices and head; the UNet's own weights (conv_in included) stay frozen."""
        return self.scorer.trainable()

    def is_delta(self, name: str) -> bool:
        return self.is_scorer_delta(name)

    def scores(self, batch: dict[str, Tensor], generator=None) -> Tensor:
        return self.score_removals(batch["source"], batch["mask"], batch["target"], generator)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.scorer_step(batch)

    @torch.no_grad()
    def eval_step(self, batch: dict[str, Any], task_id: int) -> dict[str, Tensor]:
        generators = [torch.Generator().manual_seed(self.eval_seed + int(i)) for i in batch["index"]]
        s = self.scores(batch, generators)
        label = batch["score"].float().to(s.device) >= 0.5
        return {
            "accuracy": ((s >= 0.5) == label).float(),
            "accuracy_90": ((s >= 0.9) == label).float(),
            "squared_error": (s - batch["score"].float().to(s.device)) ** 2,
            "score": s,
        }
