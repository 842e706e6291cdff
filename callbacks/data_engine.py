"""`DataEngine`: RORem's human-in-the-loop data engine, one round per task.

When round k's training ends (before its evaluation), the engine has the module remove the objects of round
k's new inputs (`datamodule.round_inputs(k)`), judges each removal, and hands the accepted ones to the
datamodule (`datamodule.accept(k, items)`), which adds them to round k+1's training set. A removal is judged
by D_phi (`module.score`: accepted at `threshold`, RORem's automatic rounds; the paper auto-accepts at 0.9,
its inference script reads 0.5) or by a "human" (`human`): here the ground truth stands in for the
annotators, a removal is good when its PSNR inside the mask reaches the module's `human_threshold_db`.
`judge` may name one judge per round (the paper alternates human and automatic rounds); after a round judged
by `human`, `retrain_discriminator_steps` retrains D_phi on that round's labelled removals
(`module.fit_scorer`), as RORem re-fine-tunes it after every human round. (The ground truth of an automatic
round's inputs, where there is one, only measures the judge: `precision`, `d_agreement`.)

Per round, `continual_metrics.json` gets a `data_engine` entry: inputs processed, accepted, the acceptance
rate, D_phi's and the ground truth's success rates on the inputs, the precision of what was accepted (the
share the ground truth calls good) and D_phi's agreement with the ground truth. Under DDP each rank removes
its shard of the inputs and the results are gathered, so every rank hands the same items to its datamodule.
A run killed during the engine redoes it on resume (the boundary restarts from the checkpoint written before
it); removals are seeded by (round, input) alone, so they come out the same.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch

from callbacks.base import ContinualCallback
from cli.errors import ConfigError

Judge = Literal["discriminator", "human"]


class DataEngine(ContinualCallback):
    """Args:
    judge: `discriminator`, `human`, or a list with one of them per round.
    threshold: the D_phi score from which a removal is accepted.
    retrain_discriminator_steps: AdamW steps on D_phi after each round judged by `human` (0: off).
    batch_size: inputs removed per call.
    seed: seeds the removals (with the round and the input's index).
    """

    def __init__(
        self,
        judge: Judge | list[Judge] = "discriminator",
        threshold: float = 0.5,
        retrain_discriminator_steps: int = 0,
        batch_size: int = 16,
        seed: int = 0,
    ):
        judges = [judge] if isinstance(judge, str) else list(judge)
        bad = [j for j in judges if j not in ("discriminator", "human")]
        if bad or not judges:
            raise ConfigError(f"data_engine.judge: {bad[0] if bad else judge!r} is not 'discriminator' or 'human'")
        if batch_size < 1 or retrain_discriminator_steps < 0:
            raise ConfigError("data_engine.batch_size must be at least 1 and retrain_discriminator_steps 0 or more")
        self.judges = judges
        self.threshold = threshold
        self.retrain_discriminator_steps = retrain_discriminator_steps
        self.batch_size = batch_size
        self.seed = seed
        #: round name -> its statistics
        self.rounds: dict[str, dict[str, Any]] = {}

    def judge_of(self, round_id: int) -> str:
        """Round `round_id`'s judge (`setup` has checked that a list names one per round)."""
        return self.judges[0] if len(self.judges) == 1 else self.judges[round_id]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for hook in ("remove", "score", "fit_scorer"):
            if not callable(getattr(pl_module, hook, None)):
                raise ConfigError(f"data_engine: {type(pl_module).__name__} has no {hook}(); the engine needs RORem")
        dm = trainer.datamodule
        for hook in ("round_inputs", "accept"):
            if not callable(getattr(dm, hook, None)):
                raise ConfigError("data_engine: the data has no rounds; use datamodules.RemovalDataModule")
        if len(self.judges) > 1 and len(self.judges) != dm.num_tasks:
            raise ConfigError(
                f"data_engine.judge lists {len(self.judges)} judges for {dm.num_tasks} rounds; give one per round"
            )
        if "discriminator" in self.judges and getattr(pl_module, "scorer", None) is None:
            raise ConfigError(
                "data_engine.judge: 'discriminator' needs model.discriminator (a RemovalDiscriminator checkpoint)"
            )

    def on_task_training_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        from datamodules.removal import human_label

        dm = trainer.datamodule
        inputs = dm.round_inputs(task_id)
        name = dm.task_names[task_id]
        judge = self.judge_of(task_id)
        rank, world = trainer.global_rank, trainer.world_size
        mine = list(range(rank, len(inputs), world))
        parts: list[dict[str, torch.Tensor]] = []
        was_training = pl_module.training
        pl_module.eval()
        device = pl_module.device
        for start in range(0, len(mine), self.batch_size):
            items = [inputs[i] for i in mine[start : start + self.batch_size]]
            batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("source", "mask", "target")}
            batch = {k: v.to(device) for k, v in batch.items()}
            has_target = torch.tensor([bool(it["has_target"]) for it in items])
            index = torch.tensor([int(it["index"]) for it in items])
            seeds = [self.seed + 1_000_003 * (task_id + 1) + int(i) for i in index]
            result = pl_module.remove(batch["source"], batch["mask"], seeds)
            out = {"source": batch["source"], "mask": batch["mask"], "result": result, "index": index}
            out["has_target"] = has_target
            out["label"] = torch.where(
                has_target.to(device),
                human_label(result, batch["target"], batch["mask"], pl_module.human_threshold_db),
                torch.full((len(items),), float("nan"), device=device),
            )
            if pl_module.scorer is not None:
                out["d_score"] = pl_module.score(batch["source"], batch["mask"], result, seeds)
            parts.append({k: v.detach().cpu() for k, v in out.items()})
        pl_module.train(was_training)
        gathered = _gather(parts, world)
        if not gathered:
            self.rounds[name] = {"processed": 0, "accepted": 0, "judge": judge}
            dm.accept(task_id, _empty_items(dm.stream.resolution))
            return
        allp = {k: torch.cat([p[k] for p in gathered]) for k in gathered[0]}
        order = torch.argsort(allp["index"])
        allp = {k: v[order] for k, v in allp.items()}
        label, has = allp["label"], allp["has_target"]
        if judge == "human":
            if not bool(has.all()):
                raise ConfigError(f"data_engine.judge: round {name!r} is judged by 'human' but some inputs have no GT")
            keep, score = label >= 0.5, label
        else:
            keep, score = allp["d_score"] >= self.threshold, allp["d_score"]
        dm.accept(
            task_id,
            {
                "source": allp["source"][keep],
                "mask": allp["mask"][keep],
                "target": allp["result"][keep],
                "score": score[keep],
            },
        )
        self.rounds[name] = stats = _statistics(allp, keep, judge, self.threshold)
        if self.retrain_discriminator_steps and judge == "human" and pl_module.scorer is not None:
            labelled = {
                "source": allp["source"][has],
                "mask": allp["mask"][has],
                "target": allp["result"][has],
                "score": label[has],
            }
            batches = [
                {k: v[i : i + self.batch_size].to(device) for k, v in labelled.items()}
                for i in range(0, int(has.sum()), self.batch_size)
            ]
            losses = pl_module.fit_scorer(batches, self.retrain_discriminator_steps, seed=self.seed + task_id)
            stats["discriminator_loss_first"], stats["discriminator_loss_last"] = losses[0], losses[-1]
        metrics = _metrics_callback(trainer)
        if metrics is not None:
            metrics.add_to_report("data_engine", name, stats)
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(
                {f"data_engine/{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))},
                step=trainer.global_step,
            )

    def state_dict(self) -> dict:
        return {"rounds": self.rounds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rounds = dict(state_dict.get("rounds", {}))


def _statistics(allp: dict[str, torch.Tensor], keep: torch.Tensor, judge: str, threshold: float) -> dict[str, Any]:
    label, has = allp["label"], allp["has_target"]
    n = int(keep.numel())
    stats: dict[str, Any] = {
        "judge": judge,
        "processed": n,
        "accepted": int(keep.sum()),
        "acceptance_rate": float(keep.float().mean()),
    }
    if bool(has.any()):
        good = label[has] >= 0.5
        stats["gt_success"] = float(good.float().mean())
        accepted_with_gt = keep & has
        if bool(accepted_with_gt.any()):
            stats["precision"] = float((label[accepted_with_gt] >= 0.5).float().mean())
    if "d_score" in allp:
        d = allp["d_score"]
        stats["d_success"] = float((d >= threshold).float().mean())
        stats["d_score"] = float(d.mean())
        if bool(has.any()):
            stats["d_agreement"] = float(((d[has] >= 0.5) == (label[has] >= 0.5)).float().mean())
    return stats


def _empty_items(r: int) -> dict[str, torch.Tensor]:
    return {
        "source": torch.zeros(0, 3, r, r),
        "mask": torch.zeros(0, 1, r, r),
        "target": torch.zeros(0, 3, r, r),
        "score": torch.zeros(0),
    }


def _gather(parts: list[dict[str, torch.Tensor]], world: int) -> list[dict[str, torch.Tensor]]:
    """Every rank's parts, on every rank (a single process gets its own back)."""
    dist = torch.distributed
    if world < 2 or not (dist.is_available() and dist.is_initialized()):
        return parts
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, parts)
    return [p for rank_parts in gathered for p in rank_parts]


def _metrics_callback(trainer: L.Trainer):
    from callbacks.continual_metrics import ContinualMetrics

    return next((cb for cb in trainer.callbacks if isinstance(cb, ContinualMetrics)), None)
