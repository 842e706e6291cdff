"""Rollout throughput: episodes and env steps per second of `RolloutRunner` on one Meta-World task with
0 (envs in this process), 1 and 2 worker processes, driven by a free random-action policy and by a small
torch MLP (whose forward pass runs in the main process once per step, between the workers' steps).

    python benchmarks/rollout_speed.py [--task push-v3] [--episodes 10] [--horizon 150] [--repeats 5]

Prints a table and writes benchmarks/out/rollout_speed.json. Each runner first runs once untimed
(worker start-up and env construction included, reported as `first run (s)`), then every setting
runs the same episodes `--repeats` times, settings interleaved so drifts in machine load hit all
alike (median reported). Neither policy solves the task, so every episode runs the full horizon.
torch uses one thread (`--torch-threads`), as a policy beside env workers on few cores should.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


class RandomPolicy:
    """Uniform actions in [-1, 1]: costs next to nothing, so the run measures the simulator and the pipes."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def __call__(self, obs, ids, reset):
        return self.rng.uniform(-1.0, 1.0, size=(len(ids), 4)).astype(np.float32)


class MLPPolicy:
    """A 2x256 MLP over the concatenated low-dim observation, evaluated with torch on the batch."""

    def __init__(self, obs_dim: int) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(obs_dim, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU()
        )
        self.head = torch.nn.Linear(256, 4)

    @torch.no_grad()
    def __call__(self, obs, ids, reset):
        x = torch.from_numpy(np.concatenate([obs[k] for k in sorted(obs)], axis=1))
        return torch.tanh(self.head(self.net(x)))


class Timed:
    """Counts the seconds spent inside the policy (main-process time the workers wait for)."""

    def __init__(self, policy) -> None:
        self.policy, self.seconds, self.calls = policy, 0.0, 0

    def __call__(self, obs, ids, reset):
        start = time.perf_counter()
        out = self.policy(obs, ids, reset)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def measure(spec, workers: list[int], policies: dict, episodes: list[int], repeats: int) -> list[dict]:
    """Time every (policy, num_workers) setting, interleaved per repeat so drifts in machine load hit all alike."""
    from datamodules.robot.rollout import RolloutRunner

    runners, first = {}, {}
    for w in workers:
        runners[w] = RolloutRunner(spec, num_workers=w)
        start = time.perf_counter()
        runners[w].run(0, episodes, next(iter(policies.values())))
        first[w] = time.perf_counter() - start
    walls = {(name, w): [] for name in policies for w in workers}
    policy_ms = {key: [] for key in walls}
    steps = {}
    for _ in range(repeats):
        for name, policy in policies.items():
            for w in workers:
                timed = Timed(policy)
                start = time.perf_counter()
                result = runners[w].run(0, episodes, timed)
                walls[name, w].append(time.perf_counter() - start)
                policy_ms[name, w].append(1000 * timed.seconds / max(timed.calls, 1))
                steps[name, w] = int(result.steps.sum())
    for runner in runners.values():
        runner.close()
    results = []
    for (name, w), runs in walls.items():
        wall = statistics.median(runs)
        results.append(
            {
                "policy": name,
                "num_workers": w,
                "episodes": len(episodes),
                "env_steps": steps[name, w],
                "wall_s": wall,
                "episodes_per_s": len(episodes) / wall,
                "env_steps_per_s": steps[name, w] / wall,
                "policy_ms_per_call": statistics.median(policy_ms[name, w]),
                "first_run_s": first[w],
                "runs_s": runs,
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="push-v3")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--horizon", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/out/rollout_speed.json"))
    opts = parser.parse_args()
    torch.set_num_threads(opts.torch_threads)

    from datamodules.robot.envs import METAWORLD_LOWDIM
    from datamodules.robot.stream import EnvSpec

    spec = EnvSpec(suite="metaworld", env_names=(opts.task,), horizon=opts.horizon)
    episodes = list(range(opts.episodes))
    obs_dim = sum(shape[0] for shape in METAWORLD_LOWDIM.values())
    policies = {"random": RandomPolicy(), "torch MLP 2x256": MLPPolicy(obs_dim)}
    results = measure(spec, opts.workers, policies, episodes, opts.repeats)

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"RolloutRunner on {opts.task}: {opts.episodes} episodes x horizon {opts.horizon}, "
        f"median of {opts.repeats}, {os.cpu_count()} CPU cores"
    )
    columns = ("policy", "workers", "wall (s)", "episodes/s", "env steps/s", "policy ms/step", "first run (s)")
    for col in columns:
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in results:
        table.add_row(
            r["policy"],
            str(r["num_workers"]),
            f"{r['wall_s']:.2f}",
            f"{r['episodes_per_s']:.2f}",
            f"{r['env_steps_per_s']:.0f}",
            f"{r['policy_ms_per_call']:.3f}",
            f"{r['first_run_s']:.2f}",
        )
    Console(width=150).print(table)
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out, "w") as f:
        payload = {
            "task": opts.task,
            "horizon": opts.horizon,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "results": results,
        }
        json.dump(payload, f, indent=2)


if __name__ == "__main__":
    main()
