"""The foundation policy shared by every robot method (spec section 1.2).

Per timestep, each observation modality becomes one token (an MLP per low-dimensional key, an image
encoder per camera), every token is modulated by the instruction's embedding (FiLM), a block-causal
temporal transformer reads the window, and the output at each step's first token parameterises a
Gaussian-mixture action head trained by negative log-likelihood. At rollout time the policy keeps a
queue of the last `window` steps' tokens per episode and samples the action of the newest step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from cli.errors import ConfigError
from datamodules.robot.stream import is_image_key
from lightning_modules.nn.robot.encoders import build_image_encoder


@dataclass
class PolicyConfig:
    """Sizes of the foundation policy. The spec's LIBERO setting: embed_size 768 (the CLIP ViT width),
    6 layers, 8 heads, mlp_dim 1024, dropout and drop_path 0.15, film_hidden 256, 5 modes, head 256."""

    embed_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 256
    dropout: float = 0.1
    drop_path: float = 0.1
    #: hidden layers of each low-dimensional key's encoder (the spec's LIBERO policy: 0, one linear)
    lowdim_hidden_layers: int = 0
    film_hidden: int = 256
    gmm_modes: int = 5
    gmm_hidden: int = 256
    min_std: float = 1e-4
    #: `cnn` (small, random init), `clip` (a transformers CLIP vision folder) or `tiny_clip`
    image_encoder: str = "cnn"
    image_encoder_path: str | None = None


def temporal_encoding(length: int, dim: int, base: float = 10.0) -> Tensor:
    """(length, dim) sinusoidal encoding of the time index: [sin(t f), cos(t f)], f_i = base^(-2i/dim)
    (the released policy uses base 10, not the usual 10000)."""
    freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angle = torch.arange(length, dtype=torch.float32)[:, None] * freq[None]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def block_causal_mask(steps: int, tokens_per_step: int, device=None) -> Tensor:
    """(S, S) bool mask, True where attention is allowed: a token sees every token of its own and of
    earlier timesteps, none later (S = steps x tokens_per_step, time-major)."""
    t = torch.arange(steps, device=device).repeat_interleave(tokens_per_step)
    return t[None, :] <= t[:, None]


class LowDimEncoder(nn.Module):
    """One low-dimensional observation key -> one token (a linear layer, or an MLP with hidden layers)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_layers: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(d, out_dim), nn.ReLU()]
            d = out_dim
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class FiLM(nn.Module):
    """token -> (1 + gamma) token + beta, with (beta, gamma) from the instruction embedding."""

    def __init__(self, lang_dim: int, embed_size: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(lang_dim, hidden)
        self.fc2 = nn.Linear(hidden, 2 * embed_size)

    def forward(self, tokens: Tensor, lang: Tensor) -> Tensor:
        beta, gamma = self.fc2(F.gelu(self.fc1(lang), approximate="tanh")).chunk(2, dim=-1)
        shape = (lang.shape[0],) + (1,) * (tokens.dim() - 2) + (tokens.shape[-1],)
        return (1 + gamma.view(shape)) * tokens + beta.view(shape)


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch for whole samples (rescaling the kept ones)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Multi-head self-attention with one fused, bias-free qkv projection (q, k, v: consecutive slices)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.policy: embed_size {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.drop(self.proj(out.transpose(1, 2).reshape(b, s, d)))


class Block(nn.Module):
    """Pre-LayerNorm decoder block: x + Attn(LN x); x + DropPath(FFN(LN x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        h = self.drop(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))
        return x + self.drop_path(self.drop(self.fc2(h)))


class GMMHead(nn.Module):
    """Per-step mixture of `modes` diagonal Gaussians over the action: tanh means, softplus scales."""

    def __init__(self, dim: int, action_dim: int, modes: int, hidden: int, min_std: float):
        super().__init__()
        self.action_dim, self.modes, self.min_std = action_dim, modes, min_std
        self.trunk = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden)
        )
        self.mean = nn.Linear(hidden, action_dim * modes)
        self.scale = nn.Linear(hidden, action_dim * modes)
        self.logits = nn.Linear(hidden, modes)

    def forward(self, h: Tensor) -> MixtureSameFamily:
        z = self.trunk(h)
        shape = z.shape[:-1] + (self.modes, self.action_dim)
        mean = torch.tanh(self.mean(z)).view(shape)
        scale = (F.softplus(self.scale(z)) + self.min_std).view(shape)
        return MixtureSameFamily(Categorical(logits=self.logits(z)), Independent(Normal(mean, scale), 1))


class FoundationPolicy(nn.Module):
    """Tokens per step -> FiLM -> temporal transformer -> GMM. Inputs: `obs` {key: (B, T, ...)} with
    images float (B, T, 3, H, W) in [0, 1], `lang` (B, D) instruction embeddings."""

    def __init__(
        self,
        config: PolicyConfig,
        obs_shapes: dict[str, tuple[int, ...]],
        action_dim: int,
        lang_dim: int,
        window: int = 10,
    ):
        super().__init__()
        self.config = config
        e = config.embed_size
        self.lowdim_keys = [k for k in obs_shapes if not is_image_key(k)]
        self.image_keys = [k for k in obs_shapes if is_image_key(k)]
        if not self.lowdim_keys:
            raise ConfigError("data.obs_keys: the policy reads its output at a low-dimensional token; add one")
        self.lowdim = nn.ModuleDict(
            {k: LowDimEncoder(obs_shapes[k][0], e, config.lowdim_hidden_layers) for k in self.lowdim_keys}
        )
        # One image encoder shared by every camera (as the released policy shares its CLIP tower).
        self.image = (
            build_image_encoder(config.image_encoder, config.image_encoder_path, e, obs_shapes[self.image_keys[0]])
            if self.image_keys
            else None
        )
        self.film = FiLM(lang_dim, e, config.film_hidden)
        self.blocks = nn.ModuleList(
            [
                Block(e, config.num_heads, config.mlp_dim, config.dropout, config.drop_path)
                for _ in range(config.num_layers)
            ]
        )
        self.norm = nn.LayerNorm(e)
        self.head = GMMHead(e, action_dim, config.gmm_modes, config.gmm_hidden, config.min_std)
        self.window = window
        self.register_buffer("time_encoding", temporal_encoding(window, e), persistent=False)

    @property
    def tokens_per_step(self) -> int:
        return len(self.lowdim_keys) + len(self.image_keys)

    def encode(self, obs: dict[str, Tensor], lang: Tensor) -> Tensor:
        """(B, T, M, E) FiLM-modulated tokens: low-dim keys in order, then cameras in order."""
        tokens = [self.lowdim[k](obs[k]) for k in self.lowdim_keys]
        for k in self.image_keys:
            x = obs[k]
            feats = self.image(x.flatten(0, 1))
            tokens.append(feats.view(*x.shape[:2], -1))
        return self.film(torch.stack(tokens, dim=2), lang)

    def temporal(self, tokens: Tensor) -> Tensor:
        """(B, T, M, E) tokens -> (B, T, E) outputs read at each step's first token."""
        b, t, m, e = tokens.shape
        if t > self.window:
            raise ConfigError(f"a window of {t} steps is longer than the policy's {self.window} (data.window)")
        x = (tokens + self.time_encoding[:t, None, :]).reshape(b, t * m, e)
        mask = block_causal_mask(t, m, tokens.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x).view(b, t, m, e)[:, :, 0]

    def forward(self, obs: dict[str, Tensor], lang: Tensor) -> MixtureSameFamily:
        """The action distribution at every step of the window: batch shape (B, T)."""
        return self.head(self.temporal(self.encode(obs, lang)))

    def lora_targets(self) -> dict[str, list[tuple[str, list[tuple[int, int]] | None]]]:
        """The linear layers adapter methods wrap, by DMPEL's module groups: {group: [(name, output
        slices or None for all outputs)]}. `tem` adapts the q and v slices of each fused qkv; `img` the
        q and v projections of the later half of a CLIP vision tower (none for the small CNN). The
        instruction encoder is frozen and precomputed, so there is no `txt` group."""
        e = self.config.embed_size
        groups: dict[str, list] = {"img": [], "extra": [], "fusion": [], "tem": [], "head": []}
        for name, m in self.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            if name.startswith("lowdim."):
                groups["extra"].append((name, None))
            elif name.startswith("film."):
                groups["fusion"].append((name, None))
            elif name.endswith("attn.qkv"):
                groups["tem"].append((name, [(0, e), (2 * e, 3 * e)]))
            elif name.startswith("head."):
                groups["head"].append((name, None))
        if isinstance(self.image, nn.Module) and hasattr(self.image, "vision"):
            layers = self.image.vision.config.num_hidden_layers
            later = tuple(
                f"encoder.layers.{i}.self_attn.{p}" for i in range(layers // 2, layers) for p in ("q_proj", "v_proj")
            )
            groups["img"] = [(n, None) for n, _ in self.image.named_modules(prefix="image") if n.endswith(later)]
        return groups

    def nll(self, obs: dict[str, Tensor], lang: Tensor, actions: Tensor) -> Tensor:
        """Mean negative log-likelihood of the demonstrated actions over batch and time."""
        return -self(obs, lang).log_prob(actions).mean()
