"""Parallel rollouts of one task with a batched policy: simulator envs live in worker processes (or in
this process), the main process stacks the observations of every still-running episode, calls the
policy once per step and sends the actions back.

Workers are fresh interpreters that run this file as a script (`python rollout.py CMD_FD RESULT_FD`)
and talk over two pipes with `multiprocessing.connection` framing. They load `envs.py` by path, so
they import neither this package (Lightning, torch) nor the parent's main script: a worker starts in
about a second with ~100 MB instead of several seconds and ~0.5 GB with a `spawn` context. They run in
their own session (a terminal Ctrl+C reaches only the parent) and exit when the parent goes away.

Env reuse: each worker keeps the envs of the task it ran last (one per episode slot it hosts) and
rebuilds them when the task changes, so repeated evaluations of the current task pay no build cost
and memory stays at one task's worth (~25 MB per Meta-World env).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from datamodules.robot.envs import TaskEnv
    from datamodules.robot.stream import EnvSpec

Policy = Callable[[dict[str, np.ndarray], np.ndarray, np.ndarray], Any]


@dataclass
class RolloutResult:
    """Per-episode outcome, in the order of the `episodes` handed to `run`."""

    success: np.ndarray  # (n,) bool: the task was solved within the horizon
    steps: np.ndarray  # (n,) int: policy steps taken (up to and including the solving step)
    frames: list[np.ndarray] = field(default_factory=list)  # up to `record` videos (T, H, W, 3) uint8
    #: the first `record` episodes' low-dimensional observations, (T, D) each (`media.low_dim`), rendering or not
    trajectories: list[np.ndarray] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return float(self.success.mean()) if len(self.success) else 0.0


class _EnvHost:
    """The envs of one worker (or of the main process): built per task, reset per episode, stepped on command."""

    def __init__(self, spec: Any, make_env: Callable[[Any, int, int], TaskEnv], seed: int) -> None:
        self.spec, self.make_env, self.seed = spec, make_env, seed
        self.task: int | None = None
        self.envs: list[TaskEnv] = []
        self.active: dict[int, TaskEnv] = {}
        self.frames: dict[int, list[np.ndarray]] = {}

    def start(self, task_id: int, jobs: list[tuple[int, int]], record: list[int]) -> list[tuple[int, dict]]:
        """Reset one env per (slot, episode) job; return the first observation of each slot."""
        if task_id != self.task:
            self.close()
            self.task = task_id
        while len(self.envs) < len(jobs):
            self.envs.append(self.make_env(self.spec, task_id, self.seed))
        envs = self.envs[: len(jobs)]
        self.active = {slot: env for (slot, _), env in zip(jobs, envs, strict=True)}
        self.frames = {slot: [] for slot in record}
        out = []
        for (slot, episode), env in zip(jobs, envs, strict=True):
            out.append((slot, self._select(env.reset(episode))))
            self._record(slot, env)
        return out

    def step(self, actions: list[tuple[int, np.ndarray]]) -> list[tuple[int, dict, bool]]:
        """Apply one action to each named slot; return (slot, observation, solved now)."""
        out = []
        for slot, action in actions:
            env = self.active[slot]
            obs, success = env.step(action)
            out.append((slot, self._select(obs), success))
            self._record(slot, env)
        return out

    def take_frames(self) -> dict[int, np.ndarray]:
        """The recorded videos of this run, (T, H, W, 3) per slot that rendered at least one frame."""
        videos = {slot: np.stack(frames) for slot, frames in self.frames.items() if frames}
        self.frames = {}
        return videos

    def _record(self, slot: int, env: TaskEnv) -> None:
        if slot in self.frames:
            frame = env.render()
            if frame is not None:
                self.frames[slot].append(frame)

    def _select(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = tuple(self.spec.obs_keys)
        if not keys:
            return obs
        missing = [k for k in keys if k not in obs]
        if missing:
            from cli.errors import ConfigError

            raise ConfigError(
                f"env.obs_keys: {missing} are not observed by suite {self.spec.suite} with image_size "
                f"{self.spec.image_size} (it gives {sorted(obs)}); fix obs_keys or image_size"
            )
        return {k: obs[k] for k in keys}

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs, self.active, self.task = [], {}, None


class _LocalWorker:
    """The num_workers=0 host: same request/reply interface as a process, answered synchronously."""

    def __init__(self, spec: EnvSpec, seed: int) -> None:
        from datamodules.robot.envs import make_env

        self.host = _EnvHost(spec, make_env, seed)
        self._reply: Any = None

    def send(self, op: str, *args: Any) -> None:
        self._reply = getattr(self.host, op)(*args)

    def recv(self, what: str) -> Any:
        reply, self._reply = self._reply, None
        return reply

    def shutdown(self) -> None:
        self.host.close()


class _WorkerProcess:
    """One worker interpreter running `_serve` on the far end of two pipes."""

    def __init__(self, index: int, spec: dict, seed: int, timeout: float) -> None:
        self.index, self.timeout = index, timeout
        cmd_read, cmd_write = os.pipe()
        res_read, res_write = os.pipe()
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), str(cmd_read), str(res_write)],
                pass_fds=(cmd_read, res_write),
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        finally:
            os.close(cmd_read)
            os.close(res_write)
        self.cmd = Connection(cmd_write, readable=False)
        self.res = Connection(res_read, writable=False)
        self.send("init", spec, seed)

    def send(self, op: str, *args: Any) -> None:
        try:
            self.cmd.send((op, *args))
        except OSError:
            raise self._dead(op) from None

    def recv(self, what: str) -> Any:
        deadline = time.monotonic() + self.timeout
        while not self.res.poll(0.2):
            if self.proc.poll() is not None and not self.res.poll(0):
                raise self._dead(what)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"rollout worker {self.index} (pid {self.proc.pid}) gave no answer to {what} within "
                    f"{self.timeout:.0f} s (simulator hung?); raise the runner's timeout if envs are this slow"
                )
        try:
            status, payload = self.res.recv()
        except (EOFError, OSError):
            raise self._dead(what) from None
        if status == "error":
            raise RuntimeError(f"rollout worker {self.index} failed during {what}: {payload}")
        return payload

    def _dead(self, what: str) -> RuntimeError:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        return RuntimeError(
            f"rollout worker {self.index} (pid {self.proc.pid}) died during {what} (exit code {code}); "
            "its stderr above says why (a crash in the simulator or out of memory)"
        )

    def shutdown(self) -> None:
        try:
            self.cmd.send(("close",))
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.cmd.close()
        self.res.close()


def _shutdown_all(workers: list) -> None:
    while workers:
        workers.pop().shutdown()


class RolloutRunner:
    """Plays episodes of one task at a time with a batched policy; `num_workers` env processes (0: in
    this process), started on the first `run` and kept until `close` (never pickled or deep-copied).

    `policy(obs, ids, reset)` gets the observations of the still-running episodes stacked per key
    (n, ...), their slot indices `ids` (n,) into `episodes` (ascending), and `reset` (n,) marking each
    episode's first step (clear its history); it returns actions (n, A) as numpy or torch. An episode
    ends on success or after `spec.horizon` policy steps; `settle_steps` run inside the env's reset.
    Initial states come from `seed` (default `spec.eval_seed`); results do not depend on num_workers.
    """

    def __init__(self, spec: EnvSpec, num_workers: int = 0, seed: int | None = None, timeout: float = 600.0) -> None:
        if num_workers < 0:
            from cli.errors import ConfigError

            raise ConfigError(f"rollout num_workers must be >= 0 (0 runs the envs in this process), got {num_workers}")
        self.spec, self.num_workers, self.timeout = spec, int(num_workers), float(timeout)
        self.seed = int(spec.eval_seed if seed is None else seed)
        self._workers: list = []

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_workers"] = []
        state.pop("_finalizer", None)
        return state

    def _hosts(self) -> list:
        if not self._workers:
            if self.num_workers == 0:
                self._workers.append(_LocalWorker(self.spec, self.seed))
            else:
                spec = dataclasses.asdict(self.spec) if dataclasses.is_dataclass(self.spec) else dict(vars(self.spec))
                try:
                    for i in range(self.num_workers):
                        self._workers.append(_WorkerProcess(i, spec, self.seed, self.timeout))
                except BaseException:
                    _shutdown_all(self._workers)
                    raise
            self._finalizer = weakref.finalize(self, _shutdown_all, self._workers)
        return self._workers

    def run(self, task_id: int, episodes: list[int], policy: Policy, record: int = 0) -> RolloutResult:
        """Play `episodes` (initial-state numbers) of task `task_id`; record videos of the first `record`."""
        n = len(episodes)
        if n == 0:
            return RolloutResult(np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64), [])
        try:
            return self._run(task_id, [int(e) for e in episodes], policy, record, n)
        except BaseException:
            self.close()  # a failed worker leaves the others mid-protocol: start clean next time
            raise

    def _run(self, task_id: int, episodes: list[int], policy: Policy, record: int, n: int) -> RolloutResult:
        hosts = self._hosts()
        owner = [slot % len(hosts) for slot in range(n)]  # round robin: equal shares of similar episodes
        busy = sorted(set(owner))
        for h in busy:
            jobs = [(slot, episodes[slot]) for slot in range(n) if owner[slot] == h]
            hosts[h].send("start", task_id, jobs, [slot for slot, _ in jobs if slot < record])
        obs: dict[int, dict[str, np.ndarray]] = {}
        for h in busy:
            obs.update(hosts[h].recv(f"reset of task {task_id}"))
        from datamodules.robot.media import low_dim

        tracked = {slot: [low_dim(obs[slot])] for slot in range(min(record, n))}

        success = np.zeros(n, dtype=bool)
        steps = np.zeros(n, dtype=np.int64)
        started = np.zeros(n, dtype=bool)
        active = list(range(n)) if self.spec.horizon > 0 else []
        from cli.runtime import check_stop

        while active:
            check_stop(f"the rollouts of task {task_id}")  # a stop signal does not wait for whole episodes
            ids = np.asarray(active, dtype=np.int64)
            batch = {key: np.stack([obs[i][key] for i in active]) for key in obs[active[0]]}
            reset = ~started[ids]
            started[ids] = True
            actions = _as_numpy(policy(batch, ids, reset))
            if actions.ndim != 2 or actions.shape[0] != len(ids):
                raise ValueError(f"the policy must return actions of shape ({len(ids)}, A), got {actions.shape}")
            per_host: dict[int, list] = {}
            for row, slot in enumerate(active):
                per_host.setdefault(owner[slot], []).append((slot, actions[row]))
            for h, chunk in per_host.items():
                hosts[h].send("step", chunk)
            for h in per_host:
                for slot, o, solved in hosts[h].recv(f"step of task {task_id}"):
                    obs[slot] = o
                    success[slot] |= solved
                    if slot in tracked:
                        tracked[slot].append(low_dim(o))
            steps[ids] += 1
            active = [i for i in active if not success[i] and steps[i] < self.spec.horizon]

        frames: list[np.ndarray] = []
        if record > 0:
            videos: dict[int, np.ndarray] = {}
            for h in {owner[slot] for slot in range(min(record, n))}:
                hosts[h].send("take_frames")
                videos.update(hosts[h].recv("frame collection"))
            frames = [videos[slot] for slot in sorted(videos)]
        trajectories = [np.stack(tracked[slot]) for slot in sorted(tracked)]
        return RolloutResult(success, steps, frames, trajectories)

    def close(self) -> None:
        """Stop the worker processes and close the envs (a later `run` starts new ones)."""
        _shutdown_all(self._workers)


def _as_numpy(actions: Any) -> np.ndarray:
    if hasattr(actions, "detach"):  # a torch tensor, without importing torch here
        actions = actions.detach().float().cpu().numpy()
    return np.asarray(actions, dtype=np.float32)


def _load_envs_module():
    """Load the sibling envs.py on its own (not through the package, whose __init__ imports Lightning)."""
    spec = importlib.util.spec_from_file_location("_lifelong_robot_envs", Path(__file__).with_name("envs.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _serve(cmd_fd: int, res_fd: int) -> None:
    """Worker loop: answer each command with ("ok", result) or ("error", message); stop on close or EOF.
    Stop signals are left to the parent, which closes its workers when it stops."""
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    commands = Connection(cmd_fd, writable=False)
    results = Connection(res_fd, readable=False)
    host: _EnvHost | None = None
    while True:
        try:
            op, *args = commands.recv()
        except (EOFError, OSError):
            break  # the parent is gone
        if op == "close":
            break
        try:
            if op == "init":
                spec, seed = args
                host = _EnvHost(SimpleNamespace(**spec), _load_envs_module().make_env, seed)
                continue
            if host is None:
                raise RuntimeError("worker used before init")
            results.send(("ok", getattr(host, op)(*args)))
        except Exception as err:  # noqa: BLE001 - reported to the parent, which raises
            trace = traceback.format_exc(limit=-4)
            results.send(("error", f"{type(err).__name__}: {err}\n{trace}"))
    if host is not None:
        host.close()


if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # the repository root, not this folder
    _serve(int(sys.argv[1]), int(sys.argv[2]))
