"""JPEG compressibility (DDPO's objective): the reward is minus the image's JPEG size in kB.

The measured value is the real size of the file PIL writes (`jpeg_size_kb`, quality 95 as DDPO). That size
has no gradient, so training uses a differentiable approximation of the same encoder
(`jpeg_size_estimate`): JPEG's colour transform and 4:2:0 chroma subsampling, the 8 x 8 block DCT, the
standard quantisation tables scaled for the quality, and log2(1 + |coefficient / step|) as the bits an
entropy coder spends on a coefficient. It ranks images like the real size (the tests check a Spearman
correlation above 0.8) and needs no weights.
"""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cli.errors import ConfigError
from lightning_modules.nn.rewards.base import Reward

# The example quantisation tables of the JPEG standard (ITU T.81, Annex K), luminance and chrominance.
LUMINANCE_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMINANCE_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)
#: bytes of a baseline JPEG's headers (quantisation and Huffman tables, frame and scan headers) as PIL writes them
HEADER_BYTES = 600.0
#: bits the estimate counts per unit of log2(1 + |c / q|), fitted against PIL's sizes of the embedded images
BITS_PER_LOG = 2.6


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """The size in kB (1000 bytes) of each image (B x 3 x H x W in [0, 1]) saved by PIL as a baseline JPEG."""
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def quantisation_table(table, quality: int) -> Tensor:
    """A standard table scaled for `quality` the way libjpeg does (50 keeps it, 100 makes every step 1)."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    t = torch.tensor(table, dtype=torch.float32)
    return ((t * scale + 50) / 100).floor().clamp(1, 255)


def dct_matrix(n: int = 8) -> Tensor:
    """The orthonormal DCT-II matrix C (C @ x transforms a column)."""
    k = torch.arange(n, dtype=torch.float32).view(-1, 1)
    i = torch.arange(n, dtype=torch.float32).view(1, -1)
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    c[0] /= math.sqrt(2)
    return c


def _blocks(channel: Tensor) -> Tensor:
    """B x H x W -> B x N x 8 x 8 blocks (edges padded by replication, as encoders do)."""
    h, w = channel.shape[-2:]
    pad = (0, (-w) % 8, 0, (-h) % 8)
    x = F.pad(channel.unsqueeze(1), pad, mode="replicate") if any(pad) else channel.unsqueeze(1)
    return F.unfold(x, 8, stride=8).transpose(1, 2).reshape(channel.shape[0], -1, 8, 8)


def jpeg_size_estimate(images: Tensor, quality: int = 95) -> Tensor:
    """A differentiable estimate of `jpeg_size_kb` (see the module docstring)."""
    x = images.float().clamp(0, 1) * 255
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b - 128
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    cb, cr = (F.avg_pool2d(c.unsqueeze(1), 2, ceil_mode=True).squeeze(1) for c in (cb, cr))
    d = dct_matrix().to(x.device)
    bits = x.new_zeros(x.shape[0])
    for channel, table in ((y, LUMINANCE_TABLE), (cb, CHROMINANCE_TABLE), (cr, CHROMINANCE_TABLE)):
        coefficients = d @ _blocks(channel) @ d.T
        steps = quantisation_table(table, quality).to(x.device)
        bits = bits + torch.log2(1 + (coefficients / steps).abs()).flatten(1).sum(1) * BITS_PER_LOG
    return (HEADER_BYTES + bits / 8) / 1000


class Compressibility(Reward):
    """Minus the JPEG size in kB: trained on `jpeg_size_estimate`, measured with the real encoder."""

    unit = "-kB (JPEG)"
    default_loss_scale = 1.0

    def __init__(self, quality: int = 95):
        super().__init__()
        if not 1 <= quality <= 100:
            raise ConfigError(f"compressibility.options.quality must be in 1..100, got {quality}")
        self.quality = quality

    def forward(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        return -jpeg_size_estimate(images, self.quality)

    def measure(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        return -jpeg_size_kb(images, self.quality)
