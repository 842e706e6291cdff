"""R2MoE's layer-wise mixture of LoRA experts on the cross-attention key and value projections.

Each wrapped layer keeps its frozen base (`base_layer`) and a pool allocated up front from the number
of tasks: expert 0 is the permanent null expert (no weights: "use W0 here"), expert e = t + 1 belongs
to task t (A: d_in x r, Kaiming-uniform; B: r x d_out, zero). Task t trains a router increment R_t
(d_in x (N+1), zero at the start); at the task's end it is added into the frozen sum of the finished
tasks' routers, the only router inference needs, so a layer stores two router matrices whatever N is
(the released code keeps all N). The layer output is W0 x + x (sum_{j in S} g_j A_j B_j), the gate g
a softmax over the selected logits of u G, with u the token- and batch-mean of the text context. A
`GateContext` shared by all layers says, per UNet call, how to route (set by the method around the call).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from cli.errors import ConfigError


@dataclass
class GateContext:
    """Routing for the next UNet call(s).

    mode: "off" (base model), "train" (task `task` trains: its new expert and router increment), or
    "infer" (all routers of tasks 0..`task`). gate: the router input u (d_in), or None to use the
    mean of the layer's own input (the text context of the whole batch, as the released code does).
    delta_mask: per-sample 0/1 (B), where the expert delta applies (the conditional CFG half only).
    """

    mode: Literal["off", "train", "infer"] = "off"
    task: int = 0
    gate: Tensor | None = None
    delta_mask: Tensor | None = None


class MoELoRALinear(nn.Module):
    """A frozen `nn.Linear` plus R2MoE's gated pool of rank-`rank` experts.

    expert_init: the scale of A's Kaiming-uniform init: `released` (bound 1/sqrt(d_in r), as the released
        code initialises its stacked P x d_in x r tensor, whose fan-in is d_in r) or `per_expert`
        (1/sqrt(d_in), as nn.Linear / peft initialise one d_in -> r matrix: twice the released scale at r=4).
    removed_experts / removed_experts_training: whether a removed expert can still take a top-k slot (and
        add zero: `faithful`, the released code) or is skipped (`masked`), at inference / in training and
        at removal time. Masking in training changes what a new expert competes with (in a layer with a
        dead expert its initial gate is 1/2 instead of 1/3, above the removal threshold).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_tasks: int,
        rank: int,
        top_k: int,
        context: GateContext,
        removed_experts: Literal["masked", "faithful"] = "masked",
        removed_experts_training: Literal["masked", "faithful"] = "faithful",
        expert_init: Literal["released", "per_expert"] = "released",
    ):
        super().__init__()
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        bound = 1 / math.sqrt(d_in * rank if expert_init == "released" else d_in)  # Kaiming-uniform, a = sqrt(5)
        self.lora_down = nn.ParameterList(
            [nn.Parameter(torch.empty(d_in, rank).uniform_(-bound, bound)) for _ in range(num_tasks)]
        )
        self.lora_up = nn.ParameterList([nn.Parameter(torch.zeros(rank, d_out)) for _ in range(num_tasks)])
        self.route = nn.Parameter(torch.zeros(d_in, num_tasks + 1))  # R_t of the task in training
        self.register_buffer("route_frozen", torch.zeros(d_in, num_tasks + 1))  # sum of the finished tasks' R_s
        self.register_buffer("alive", torch.ones(num_tasks + 1, dtype=torch.bool))
        self.top_k = top_k
        self.removed_experts = removed_experts
        self.removed_experts_training = removed_experts_training
        self.__dict__["context"] = context  # shared, not a submodule

    @property
    def num_tasks(self) -> int:
        return len(self.lora_up)

    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        """Task t's expert and the router increment (one matrix every task trains in turn)."""
        return [self.lora_down[task_id], self.lora_up[task_id], self.route]

    def router(self, task_id: int, training: bool) -> Tensor:
        """G: the finished tasks' routers (all of them at inference) plus, in training, task t's increment
        on its columns 1..t+1 (the others, column 0 included, carry no gradient and stay zero)."""
        if not training:
            return self.route_frozen
        learn = torch.zeros(self.route.shape[1], dtype=self.route.dtype, device=self.route.device)
        learn[1 : task_id + 2] = 1
        return self.route_frozen + (self.route * learn + (self.route * (1 - learn)).detach())

    @torch.no_grad()
    def fold_router(self) -> None:
        """At a task's end: its router increment joins the frozen sum; the next task starts from zero."""
        self.route_frozen += self.route
        self.route.zero_()

    def select(self, logits: Tensor, task_id: int, training: bool) -> tuple[list[int], Tensor]:
        """Experts S and gates g = softmax(logits[S]): null + top-(K-1) old + the new one (training),
        or null + top-K learned (inference); removed experts as `removed_experts(_training)` says."""
        newest = task_id + 1
        old = range(1, newest) if training else range(1, newest + 1)
        masking = self.removed_experts_training if training else self.removed_experts
        candidates = [e for e in old if masking == "faithful" or bool(self.alive[e])]
        k = min(len(candidates), self.top_k - 1 if training else self.top_k)
        chosen: list[int] = []
        if k:
            idx = torch.tensor(candidates, device=logits.device)
            chosen = idx[logits[idx].topk(k).indices].tolist()
        selected = [0, *chosen] + ([newest] if training else [])
        return selected, torch.softmax(logits[selected], dim=0)

    def gates(self, u: Tensor, task_id: int, training: bool) -> tuple[list[int], Tensor]:
        logits = u.to(self.route.dtype) @ self.router(task_id, training)
        return self.select(logits, task_id, training)

    def mixed_delta(self, u: Tensor, task_id: int, training: bool) -> Tensor:
        """Delta W = sum_{j in S, j > 0} g_j A_j B_j (d_in x d_out); the null expert adds nothing."""
        selected, g = self.gates(u, task_id, training)
        delta = torch.zeros_like(self.base_layer.weight).T
        for j, gj in zip(selected, g, strict=True):
            if j == 0:
                continue
            down, up = self.lora_down[j - 1], self.lora_up[j - 1]
            if not (training and j - 1 == task_id):
                down, up = down.detach(), up.detach()  # old experts: stop-gradient
            delta = delta + gj * (down @ up)
        return delta

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        ctx = self.context
        if ctx.mode == "off":
            return y
        u = ctx.gate if ctx.gate is not None else x.mean(dim=tuple(range(x.dim() - 1)))
        delta = x @ self.mixed_delta(u, ctx.task, ctx.mode == "train").to(x.dtype)
        if ctx.delta_mask is not None:
            delta = delta * ctx.delta_mask.to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
        return y + delta

    @torch.no_grad()
    def remove_expert(self, task_id: int) -> None:
        """Deletes task t's expert in this layer: zero weights, marked dead."""
        self.lora_down[task_id].zero_()
        self.lora_up[task_id].zero_()
        self.alive[task_id + 1] = False


CROSS_ATTENTION_KV = re.compile(r".*attn2\.(to_k|to_v)$")


class ExpertBank(nn.Module):
    """All wrapped K/V layers of a UNet and the operations R2MoE runs over them."""

    def __init__(
        self,
        unet: nn.Module,
        num_tasks: int,
        rank: int = 4,
        top_k: int = 3,
        removed_experts: str = "masked",
        removed_experts_training: str = "faithful",
        expert_init: str = "released",
    ):
        super().__init__()
        for option, value, choices in (
            ("removed_experts", removed_experts, ("masked", "faithful")),
            ("removed_experts_training", removed_experts_training, ("masked", "faithful")),
            ("expert_init", expert_init, ("released", "per_expert")),
        ):
            if value not in choices:
                raise ConfigError(f"model.{option} must be one of {list(choices)}, got {value!r}")
        for option, value in (("rank", rank), ("top_k", top_k)):
            if value < 1:
                raise ConfigError(f"model.{option} must be at least 1, got {value}")
        self.context = GateContext()
        d_text = unet.config.cross_attention_dim
        names = [n for n, m in unet.named_modules() if CROSS_ATTENTION_KV.match(n) and m.in_features == d_text]
        if not names:
            raise ValueError("found no cross-attention to_k/to_v layers to wrap in the UNet")
        layers = []
        for name in names:
            parent_name, child = name.rsplit(".", 1)
            parent = unet.get_submodule(parent_name)
            layer = MoELoRALinear(
                getattr(parent, child),
                num_tasks,
                rank,
                top_k,
                self.context,
                removed_experts,
                removed_experts_training,
                expert_init,
            )
            setattr(parent, child, layer)
            layers.append(layer)
        self.__dict__["layers"] = layers  # registered (and saved) inside the UNet
        self.__dict__["names"] = names

    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.task_parameters(task_id)]

    def expert_parameters(self, task_id: int) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in (layer.lora_down[task_id], layer.lora_up[task_id])]

    def router_parameters(self, task_id: int) -> list[nn.Parameter]:
        return [layer.route for layer in self.layers]

    def fold_routers(self) -> None:
        """Each layer's router increment joins its frozen sum (at the end of a task)."""
        for layer in self.layers:
            layer.fold_router()

    def routing(self, mode: str, task: int, gate: Tensor | None = None, delta_mask: Tensor | None = None):
        """Context manager: route the UNet calls inside it this way, then back to the base model."""
        return _Routing(self.context, GateContext(mode, task, gate, delta_mask))

    def routing_distillation(self, old_inputs: Tensor, task_id: int) -> Tensor:
        """sum over layers of ||U_old R_t||_F: how much task t's router increment moves the logits of the
        earlier concepts' prompts (U_old: (t) x d_in, detached)."""
        return sum(torch.linalg.matrix_norm(old_inputs.to(layer.route.dtype) @ layer.route) for layer in self.layers)

    def new_expert_gates(self, u: Tensor, task_id: int) -> Tensor:
        """Per layer, the training-time gate of task t's expert for router input u."""
        out = []
        for layer in self.layers:
            selected, g = layer.gates(u, task_id, training=True)
            out.append(g[selected.index(task_id + 1)])
        return torch.stack(out)

    @torch.no_grad()
    def remove_redundant(self, u: Tensor, task_id: int, threshold: float) -> list[bool]:
        """R2MoE's redundancy removal: where the new expert's gate on its own concept's prompt is below
        `threshold`, the router prefers null + old experts, so the expert is deleted. Returns kept flags."""
        keep = (self.new_expert_gates(u, task_id) >= threshold).tolist()
        for layer, k in zip(self.layers, keep, strict=True):
            if not k:
                layer.remove_expert(task_id)
        return keep


class _Routing:
    def __init__(self, context: GateContext, new: GateContext):
        self.context, self.new = context, new

    def __enter__(self) -> GateContext:
        self.saved = GateContext(**vars(self.context))
        vars(self.context).update(vars(self.new))
        return self.context

    def __exit__(self, *exc) -> None:
        vars(self.context).update(vars(self.saved))


def detach_start_token(unet: nn.Module) -> int:
    """Custom Diffusion's trick: in training, the cross-attention key and value of the first (start-of-
    text) token carry no gradient. Hooks every K/V projection; returns how many."""

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        if not (module.training and torch.is_grad_enabled()):
            return output
        return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)

    modules = [m for n, m in unet.named_modules() if CROSS_ATTENTION_KV.match(n)]
    for m in modules:
        m.register_forward_hook(hook)
    return len(modules)
