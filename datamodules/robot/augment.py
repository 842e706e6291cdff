"""Camera augmentation of the released robot training (spec 1.2), on batches of observation dicts.

The cameras of a sample are stacked along time and augmented as one clip, so every frame and camera of a
sample gets the same draw: colour jitter (0.3 each, p 0.9, a draw per sample), a random affine
(rotation 15 degrees, translation 10%, p 0.6, one draw for the whole batch) and a random translation
(replicate-pad 4 pixels, crop back; p 0.1, a draw per sample). Low-dimensional keys pass unchanged.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import Tensor, nn


class CameraAugment(nn.Module):
    """obs {key: (B, T, ...)} -> obs with every `*_rgb` key (B, T, 3, H, W) augmented."""

    def __init__(self, image_keys: list[str], image_size: int):
        super().__init__()
        self.image_keys = list(image_keys)
        self.jitter = K.VideoSequential(
            K.ColorJitter(0.3, 0.3, 0.3, 0.3, p=0.9), data_format="BTCHW", same_on_frame=True
        )
        self.affine = K.VideoSequential(
            K.RandomAffine(degrees=15.0, translate=(0.1, 0.1), p=0.6, same_on_batch=True),
            data_format="BTCHW",
            same_on_frame=True,
        )
        self.translate = K.VideoSequential(
            K.RandomCrop((image_size, image_size), padding=4, padding_mode="replicate", p=0.1),
            data_format="BTCHW",
            same_on_frame=True,
        )

    @torch.no_grad()
    def forward(self, obs: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.image_keys:
            return obs
        clips = [obs[k] for k in self.image_keys]
        steps = clips[0].shape[1]
        x = torch.cat(clips, dim=1)  # cameras one after another along time
        x = self.translate(self.affine(self.jitter(x))).clamp_(0, 1)
        out = dict(obs)
        for i, k in enumerate(self.image_keys):
            out[k] = x[:, i * steps : (i + 1) * steps]
        return out
