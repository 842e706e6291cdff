"""Weight-free image statistics as rewards: brightness (and its opposite), RMS contrast, colourfulness.
All are differentiable and ignore the prompt."""

from __future__ import annotations

from torch import Tensor

from lightning_modules.nn.rewards.base import Reward

#: ITU-R BT.601 luma weights (JPEG's Y)
LUMA = (0.299, 0.587, 0.114)


def luma(images: Tensor) -> Tensor:
    """B x 3 x H x W in [0, 1] -> B x H x W luma."""
    r, g, b = images.float().unbind(1)
    return LUMA[0] * r + LUMA[1] * g + LUMA[2] * b


class Brightness(Reward):
    """Mean luma of the image, in [0, 1]."""

    unit = "mean luma"
    default_loss_scale = 1.0

    def forward(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        return luma(images).flatten(1).mean(1)


class Darkness(Brightness):
    """One minus the mean luma: the opposite objective to `brightness` (a conflicting pair for a stream)."""

    unit = "1 - mean luma"

    def forward(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        return 1 - super().forward(images, prompts)


class Contrast(Reward):
    """RMS contrast: the standard deviation of the luma over the image, in [0, 0.5]."""

    unit = "luma std"
    default_loss_scale = 2.0

    def forward(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        return luma(images).flatten(1).std(1)


class Colourfulness(Reward):
    """Hasler and Suesstrunk's (2003) colourfulness M = sqrt(s_rg^2 + s_yb^2) + 0.3 sqrt(m_rg^2 + m_yb^2) with
    rg = R - G and yb = (R + G) / 2 - B, on [0, 1] channels (their 0-255 values divided by 255: grey is 0,
    saturated photos about 0.4)."""

    unit = "M / 255"
    default_loss_scale = 2.0

    def forward(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        r, g, b = images.float().flatten(2).unbind(1)
        rg, yb = r - g, 0.5 * (r + g) - b
        spread = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False) + 1e-8).sqrt()
        level = (rg.mean(1).square() + yb.mean(1).square() + 1e-8).sqrt()
        return spread + 0.3 * level
