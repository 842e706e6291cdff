"""R2MoE (Redundancy-Removal Mixture of Experts, arXiv 2507.13107), after its released code.

Each concept t gets a token, a rank-4 LoRA expert in every cross-attention K and V, and a router
increment R_t over the frozen routers of earlier concepts. A step selects the null expert, the two
best old experts and the new one, and mixes them with a softmax gate on the batch's text context:

    L = L_diffusion + lambda * sum_layers || U_old R_t ||_F

where U_old holds the token-mean text embeddings of the earlier concepts' gate prompts (the routing
distillation: adding a concept must not move how earlier ones are routed; the released code never
fills this cache, we do). At the end of a task, layers whose new expert gets a gate below tau on its
own concept's prompt delete it (redundancy removal). At inference the gate prompt names the concept
and the delta applies to the conditional half of the CFG batch only (`cfg_delta`). Choices the spec leaves open:
`removed_experts` ("masked": a deleted expert cannot take a top-k slot; "faithful": it can and adds
zero; at inference only: `removed_experts_training` says the same for training and removal) and the
distillation prompts (each concept's gate prompt, as the released code's task prompt).

Under DDP the training gate is per rank: u is the mean context of the rank's own batch. The spec defines u
per forward call, and the released code (Lightning DDP, learning rate scaled by the GPU count) would route
each GPU's batch by its own mean; u is not all-reduced. So W ranks with per-device batch B are not one
process with batch W*B: they match it only where every rank's batch has the same mean context. Removal,
the router fold and the distillation memory read the gate prompts alone, so every rank ends a task with the
same experts and routers.

Storage: a layer keeps the sum of the finished concepts' routers (all that inference needs) and the
router increment of the concept in training, instead of one full router per concept; `lifelong export`
writes the inference state only (finished experts without the removed ones, the summed routers, the
tokens), optionally in float16.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.diffusion.base import ConceptDiffusionModule
from lightning_modules.nn.diffusion.experts import ExpertBank
from lightning_modules.nn.diffusion.experts import detach_start_token as detach_start_token_kv


class R2MoE(ConceptDiffusionModule):
    """Args (the spec's values as defaults):
    rank: LoRA rank of every expert (4). top_k: K (3: null + 2 old + new in training, null + 3 at inference).
    removal_threshold: tau; a layer's new expert with gate below it is deleted at the task's end (0.4).
    distillation_weight: lambda of the routing distillation (1e-5).
    expert_lr / router_lr: 2e-4 (Custom Diffusion's scaled 1e-4 x batch 2) and 1e-4; token_lr 1e-3.
    weight_decay: AdamW's decay on the current task's expert, router and token (0.01); old ones are
        frozen and out of the optimizer, so decay never shrinks them (the spec's caveat a).
    removed_experts: at inference, "masked" (a removed expert cannot take a top-k slot) or "faithful" (it can
        and adds zero, as the released code).
    removed_experts_training: the same choice for training-time and removal-time selection; "faithful"
        (the released code) by default, so a new expert starts at the spec's gate whatever was removed.
    expert_init: A's init scale, "released" (Kaiming-uniform bound 1/sqrt(768 r)) or "per_expert"
        (1/sqrt(768), as peft; twice as large at r=4); see `MoELoRALinear`.
    detach_start_token: no gradient through the start-of-text token's K/V (Custom Diffusion's trick).
    cfg_delta: which half of the CFG batch the expert delta applies to when sampling: "conditional" (the
        released code: the unconditional prediction is the base model's) or "both" (as a stock diffusers
        pipeline applies a LoRA, e.g. R2MoE's `lifelong export --format diffusers`).
    """

    def __init__(
        self,
        *args: Any,
        rank: int = 4,
        top_k: int = 3,
        removal_threshold: float = 0.4,
        distillation_weight: float = 1e-5,
        expert_lr: float = 2e-4,
        router_lr: float = 1e-4,
        weight_decay: float = 0.01,
        removed_experts: Literal["masked", "faithful"] = "masked",
        removed_experts_training: Literal["masked", "faithful"] = "faithful",
        expert_init: Literal["released", "per_expert"] = "released",
        detach_start_token: bool = True,
        cfg_delta: Literal["conditional", "both"] = "conditional",
        **kwargs: Any,
    ):
        if cfg_delta not in ("conditional", "both"):
            raise ConfigError(f"model.cfg_delta must be 'conditional' or 'both', got {cfg_delta!r}")
        if not 0.0 <= removal_threshold <= 1.0:
            raise ConfigError(f"model.removal_threshold is a gate value in [0, 1], got {removal_threshold}")
        super().__init__(*args, **kwargs)
        self.experts = ExpertBank(
            self.parts.unet, self.num_tasks, rank, top_k, removed_experts, removed_experts_training, expert_init
        )
        self.experts.requires_grad_(False)
        if detach_start_token:  # Custom Diffusion's start-of-text K/V detach, kept by the released code
            detach_start_token_kv(self.parts.unet)
        self.removal_threshold = removal_threshold
        self.distillation_weight = distillation_weight
        self.expert_lr = expert_lr
        self.router_lr = router_lr
        self.weight_decay = weight_decay
        self.cfg_delta = cfg_delta
        # Router inputs u of each finished concept's gate prompt: the routing-distillation memory.
        self.register_buffer("gate_memory", torch.zeros(self.num_tasks, self.parts.cross_attention_dim))
        self.register_buffer("kept_experts", torch.full((self.num_tasks,), -1, dtype=torch.long))

    # -- parameters ---------------------------------------------------------------------------
    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        return super().task_parameters(task_id) + self.experts.task_parameters(task_id)

    def deepspeed_unsupported(self) -> str | None:
        return "R2MoE trains a new expert and router at each concept"

    def trainable_parameters(self) -> list[dict[str, Any]]:
        t, wd = self.current_task, self.weight_decay
        groups = [
            {"params": self.experts.expert_parameters(t), "lr": self.expert_lr, "weight_decay": wd},
            {"params": self.experts.router_parameters(t), "lr": self.router_lr, "weight_decay": wd},
        ]
        return groups + [{**g, "weight_decay": wd} for g in super().trainable_parameters()]

    DELTA_SUFFIXES = (".route", ".route_frozen", ".alive", "gate_memory", "kept_experts")

    def is_delta(self, name: str) -> bool:
        return (
            super().is_delta(name) or ".lora_down." in name or ".lora_up." in name or name.endswith(self.DELTA_SUFFIXES)
        )

    def delta_state_dict(self) -> dict[str, Tensor]:
        """Experts, routers and token rows, without the A/B of removed layer-experts (they are zero)."""
        dead = self._dead_expert_keys()
        return {k: v for k, v in super().delta_state_dict().items() if k not in dead}

    def training_only(self, name: str, finished: int) -> bool:
        """Whether delta entry `name` is training state inference never reads, with `finished` concepts done:
        the router increment in training, the distillation memory, experts of unfinished concepts."""
        if name.endswith(".route") or name == "gate_memory":
            return True
        for kind in (".lora_down.", ".lora_up."):
            if kind in name:
                return int(name.rsplit(".", 1)[1]) >= finished
        return False

    def export_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The inference state: finished concepts' kept experts, the summed routers, tokens, flags."""
        finished = self.finished_tasks()
        return {k: v for k, v in super().export_state_dict(dtype).items() if not self.training_only(k, finished)}

    def missing_delta(self, state: dict[str, Tensor]) -> set[str]:
        missing = super().missing_delta(state) - self._dead_expert_keys(state)
        if any(k.endswith(".route") for k in state):
            return missing  # a checkpoint: the training state too
        kept = state.get("kept_experts")
        finished = int((kept >= 0).sum()) if kept is not None else 0
        return {k for k in missing if not self.training_only(k, finished)}  # an export

    def load_delta(self, delta: dict[str, Tensor]) -> None:
        alive = {k: v for k, v in delta.items() if k.endswith(".alive")}
        self.load_state_dict(alive, strict=False)  # first: which experts exist
        for layer in self.experts.layers:
            for t in range(self.num_tasks):
                if not bool(layer.alive[t + 1]):
                    layer.remove_expert(t)
        super().load_delta(delta)

    def _dead_expert_keys(self, state: dict[str, Tensor] | None = None) -> set[str]:
        """Keys of the A/B of removed layer-experts, by the `alive` flags of `state` (default: this model's)."""
        state = self.state_dict() if state is None else state
        dead = set()
        for name in self.experts.names:
            alive = state.get(f"parts.unet.{name}.alive")
            for t in range(self.num_tasks if alive is not None else 0):
                if not bool(alive[t + 1]):
                    dead |= {f"parts.unet.{name}.lora_down.{t}", f"parts.unet.{name}.lora_up.{t}"}
        return dead

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        dead = self._dead_expert_keys()  # zero, and restored as zero from the alive flags
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in dead}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state, own = checkpoint["state_dict"], self.state_dict()
        for key in self._dead_expert_keys(state):
            state[key] = torch.zeros_like(own[key])

    # -- routing ------------------------------------------------------------------------------
    def gate_input(self, prompts: list[str]) -> Tensor:
        """u: the mean over prompts and all 77 token positions of the text-encoder output."""
        return self.encode_prompts(prompts).mean(dim=(0, 1))

    def train_routing(self):
        return self.experts.routing("train", self.current_task)

    def sample_routing(self, batch_size: int, gate_prompts: list[str] | None, guided: bool = True):
        """All finished concepts' routers, gated by the gate prompt(s) (or, without one, by the batch's
        mean context, as the released code does); the base model before the first concept ends. On a CFG
        batch the delta applies to the halves `cfg_delta` names."""
        finished = self.finished_tasks()
        if finished == 0:
            return self.experts.routing("off", 0)
        gate = self.gate_input(gate_prompts) if gate_prompts else None
        mask = None  # the delta on the whole batch: both CFG halves, or the conditional batch without CFG
        if guided and self.cfg_delta == "conditional":
            mask = torch.cat([torch.zeros(batch_size), torch.ones(batch_size)]).to(self.device)
        return self.experts.routing("infer", finished - 1, gate, mask)

    def base_routing(self):
        return self.experts.routing("off", 0)

    def finished_tasks(self) -> int:
        return int((self.kept_experts >= 0).sum())

    # -- the loss -----------------------------------------------------------------------------
    def extra_losses(self, context: Tensor) -> dict[str, Tensor]:
        t = self.current_task
        if t == 0:
            return {}
        old = self.gate_memory[:t].detach()
        return {"routing_distillation": self.distillation_weight * self.experts.routing_distillation(old, t)}

    # -- task boundary ------------------------------------------------------------------------
    def on_task_end(self, task_id: int) -> None:
        with torch.no_grad():
            u = self.gate_input([self.stream.gate_prompts[task_id]])
            keep = self.experts.remove_redundant(u, task_id, self.removal_threshold)
            self.kept_experts[task_id] = sum(keep)
            self.experts.fold_routers()  # R_t joins the frozen routers; the next concept starts from zero
            self.gate_memory[task_id] = u  # cached once: the prompt's router input, for later tasks' L_g
        if self._trainer is not None and self.logger is not None:
            self.logger.log_metrics(
                {"task/kept_experts": sum(keep), "task/removed_experts": len(keep) - sum(keep)}, task_id
            )

    def expert_parameter_count(self, task_id: int) -> int:
        """Stored expert parameters of concept t after removal (A and B of the layers that kept it)."""
        return sum(
            layer.lora_down[task_id].numel() + layer.lora_up[task_id].numel()
            for layer in self.experts.layers
            if bool(layer.alive[task_id + 1])
        )

    @torch.no_grad()
    def save_diffusers(self, folder: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Per finished concept, `<concept>.safetensors`: the routed sum of the experts its inference gate
        prompt selects, as an exactly equivalent LoRA (rank r x selected experts, per layer), and its token.
        A stock pipeline applies it to both CFG halves (`cfg_delta: both`), and its gate is fixed to the
        concept's prompt: one concept per LoRA, no routing by the sampled prompt."""
        from lightning_modules.nn.diffusion.diffusers_export import cast, lora_config, routed_lora, save_unet_lora

        finished = self.finished_tasks()
        if finished == 0:
            raise ConfigError("--format diffusers: no concept has finished training yet; nothing to export")
        concepts = self.save_diffusers_tokens(folder, range(finished), dtype)
        for k, concept in enumerate(concepts):
            u = self.gate_input([self.stream.inference_gate_prompts[k]])
            state, ranks = routed_lora(self.experts.layers, self.experts.names, u, finished - 1)
            concept["gate_prompt"] = self.stream.inference_gate_prompts[k]
            concept["lora"] = None  # routed to the null expert everywhere: the base model
            if state:
                name = f"{concept['name']}.safetensors"
                concept["lora"] = save_unet_lora(folder, name, cast(state, dtype), lora_config(ranks))
                concept["lora_ranks"] = sorted(set(ranks.values()))
        return {"concepts": concepts}
