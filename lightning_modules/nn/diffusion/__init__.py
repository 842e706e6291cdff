"""Parts every text-to-image method shares: the Stable Diffusion components (local folder or `tiny`),
concept tokens, the denoising loss and a DDIM sampler with classifier-free guidance, and CLIP scoring."""

from lightning_modules.nn.diffusion.components import StableDiffusionParts, load_stable_diffusion, save_tiny
from lightning_modules.nn.diffusion.loss import diffusion_target, masked_mse

__all__ = ["StableDiffusionParts", "diffusion_target", "load_stable_diffusion", "masked_mse", "save_tiny"]
