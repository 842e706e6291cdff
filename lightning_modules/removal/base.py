"""`RemovalModule`: what every object-removal method shares (task t = round t of the data engine).

The frozen SDXL-inpainting parts (`lightning_modules.nn.diffusion.inpainting`), the prompt conditioning
(RORem's empty prompt, encoded once), the discriminator D_phi where a method has one (`scorer`), and
checkpoints that hold only what the method learns (`is_delta`): the frozen base is rebuilt from
`pretrained_model_name_or_path`.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.base import ContinualModule


class RemovalModule(ContinualModule):
    """Args:
    pretrained_model_name_or_path: a local SDXL-inpainting diffusers folder, `tiny` (random weights) or
        `tiny-pretrained` (the small inpainting base trained on the embedded data).
    prompt_embedding: the conditioning of the empty prompt: `encoded` (the text encoders' encoding of "", as
        RORem trains) or `zeros` (SDXL's unconditional embedding; the small base learned its unconditional
        branch from zeros, so it reads them better).
    binarize_mask: threshold the mask at 0.5 before it is resized to the latents (the spec's advice for new
        code); False keeps RORem's training behaviour (the soft, bicubic-resized mask).
    gradient_checkpointing: recompute UNet activations in the backward pass (RORem trains with it on).
    """

    def __init__(
        self,
        stream=None,
        pretrained_model_name_or_path: str = "tiny",
        prompt_embedding: Literal["encoded", "zeros"] = "encoded",
        binarize_mask: bool = False,
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        if stream is not None and not hasattr(stream, "resolution"):
            raise ConfigError("data: an object-removal method needs removal data (datamodules.RemovalDataModule)")
        if prompt_embedding not in ("encoded", "zeros"):
            raise ConfigError(f"model.prompt_embedding: {prompt_embedding!r} is not one of 'encoded', 'zeros'")
        super().__init__(stream, optimizer, lr_scheduler)
        from lightning_modules.nn.diffusion.inpainting import load_inpainting

        self.parts = load_inpainting(pretrained_model_name_or_path)
        if gradient_checkpointing:
            self.parts.unet.enable_gradient_checkpointing()
        self.prompt_embedding = prompt_embedding
        self.binarize_mask = binarize_mask
        self.resolution = int(stream.resolution)
        self._prompts: dict[str, tuple[Tensor, Tensor]] = {}
        self.strict_loading = False  # checkpoints hold the delta only

    # -- conditioning -------------------------------------------------------------------------
    def compute_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.parts.unet}

    def prompt_conditioning(self, prompt: str = "") -> tuple[Tensor, Tensor]:
        """(context 1 x 77 x d, pooled 1 x p) of `prompt`, computed once per prompt and device; the empty prompt
        follows `prompt_embedding`."""
        device = self.parts.unet.device
        key = f"{prompt}\0{device}"
        if key not in self._prompts:
            context, pooled = self.parts.encode_prompt([prompt])
            if prompt == "" and self.prompt_embedding == "zeros":
                context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
            self._prompts[key] = (context.to(device), pooled.to(device))
        return self._prompts[key]

    def build_scorer(self, rank: int = 4, lora_alpha: float = 4.0, unet: nn.Module | None = None):
        """D_phi on a copy of the base UNet as built (or on `unet`, cut in place), for this data's resolution."""
        import copy

        from lightning_modules.nn.diffusion.discriminator import RemovalScorer, mid_feature_size

        unet = copy.deepcopy(self.parts.unet) if unet is None else unet
        latent = self.resolution // self.parts.vae_scale_factor
        return RemovalScorer(unet, mid_feature_size(unet, latent), rank, lora_alpha)

    def score_removals(self, source: Tensor, mask: Tensor, edited: Tensor, generator=None) -> Tensor:
        """`self.scorer`'s scores (B,) of removals `edited` under the empty prompt (all images in [-1, 1]);
        `generator`: one, or one per removal, for the VAE samples and the t = 0 noise."""
        context, pooled = self.prompt_conditioning("")
        return self.scorer.score(self.parts, source, mask, edited, context, pooled, self.binarize_mask, generator)

    def scorer_step(self, batch: dict[str, Tensor], where: str = "data") -> Tensor:
        """D_phi's training step on labelled removals (`target` = the removal judged, `score` = its label): RORem's
        MSE of the softplus score to the label, logged; an entry without a label is one line naming `where`."""
        from lightning_modules.removal.discriminator import scorer_loss

        if torch.isnan(batch["score"]).any():
            raise ConfigError(
                f"{where}: a training entry has no score; the discriminator needs labelled removals (a meta.json "
                "with scores, or an embedded -judged domain)"
            )
        loss = scorer_loss(self.score_removals(batch["source"], batch["mask"], batch["target"]), batch["score"])
        b = batch["score"].shape[0]
        self.log("train/mse", loss, batch_size=b)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    @staticmethod
    def is_scorer_delta(name: str) -> bool:
        """Whether state-dict entry `name` is D_phi's learned part (`scorer.` and a LoRA matrix or the head)."""
        from lightning_modules.nn.diffusion.discriminator import RemovalScorer

        return name.startswith("scorer.") and RemovalScorer.learns(name[len("scorer.") :])

    # -- checkpoints: the delta only ------------------------------------------------------------
    def is_delta(self, name: str) -> bool:
        """Whether state-dict entry `name` is something this method learns (checkpoints keep only those)."""
        return False

    def delta_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if self.is_delta(k)}

    def load_delta(self, delta: dict[str, Tensor]) -> None:
        """Loads a checkpoint's state dict (the delta) into the freshly built model; one line when it does not fit."""
        mine = self.state_dict()
        missing = {k for k in mine if self.is_delta(k)} - set(delta)
        unexpected = {k for k in delta if not self.is_delta(k) or k not in mine}
        if missing or unexpected:
            raise ConfigError(
                f"the weights do not fit this model ({len(missing)} entries missing, {len(unexpected)} unexpected, "
                f"e.g. {sorted(missing or unexpected)[0]}): load them with the config they were trained with"
            )
        self.load_state_dict(delta, strict=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.is_delta(k)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        missing = {k for k in self.state_dict() if self.is_delta(k)} - set(checkpoint["state_dict"])
        if missing:
            raise ConfigError(
                f"the checkpoint lacks {len(missing)} of this method's entries (e.g. {sorted(missing)[0]}): it was "
                "written by another method or settings; use the config it was trained with"
            )

    def _log_grid(self, rows: list[Tensor], task_id: int) -> None:
        """One TensorBoard image per example: its `rows` (images in [0, 1], masks as grey) side by side."""
        logger = self.logger
        if logger is None or not hasattr(logger.experiment, "add_images") or self.global_rank != 0:
            return
        strip = torch.cat([r.expand(-1, 3, -1, -1) for r in rows], dim=-1)
        name = self.stream.task_names[task_id]
        logger.experiment.add_images(f"removals/{name}", strip.float().cpu(), global_step=self.global_step)
