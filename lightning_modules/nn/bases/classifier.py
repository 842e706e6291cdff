"""The digit classifier: a small CNN over 32 x 32 RGB images, the structure judge of the small world ("does
the image still show the digit the prompt asked for"). Saved and loaded as a Hugging Face folder
(config.json + model.safetensors) through huggingface_hub's mixin."""

from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn


def ink_map(images: Tensor) -> Tensor:
    """B x 3 x H x W in [0, 1] -> B x 1 x H x W: how far each pixel's brightness is from the background's
    (the median of a 2-pixel border), scaled to a maximum of 1. The same map for any ink and background
    colour, so the classifier judges the shape only."""
    luma = (images * torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    border = torch.cat(
        [
            luma[..., :2, :].flatten(1),
            luma[..., -2:, :].flatten(1),
            luma[..., :, :2].flatten(1),
            luma[..., :, -2:].flatten(1),
        ],
        dim=1,
    )
    ink = (luma - border.median(dim=1).values.view(-1, 1, 1, 1)).abs()
    return ink / ink.flatten(1).amax(dim=1).clamp(min=0.1).view(-1, 1, 1, 1)


class DigitClassifier(nn.Module, PyTorchModelHubMixin):
    """The ink map (`ink_map`), three conv blocks (32, 64, 64 channels) and a linear head over 10 digits.
    Input: B x 3 x H x W in [0, 1] (resized to 32 x 32 if needed)."""

    def __init__(self, width: int = 32, num_classes: int = 10, resolution: int = 32):
        super().__init__()
        self.resolution = resolution

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, width), block(width, 2 * width), block(2 * width, 2 * width))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """Logits, B x 10."""
        x = images.float()
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = nn.functional.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True)
        x = self.features(ink_map(x) * 2 - 1)
        return self.head(x.mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """The digit each image shows (B,), in eval mode."""
        was = self.training
        self.eval()
        out = self(images).argmax(dim=1)
        self.train(was)
        return out
