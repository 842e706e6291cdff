"""Simulator adapters behind one small protocol (`TaskEnv`): Meta-World v3 tasks with their scripted
experts (the embedded demonstrations and the default evaluation) and LIBERO tasks (an optional extra
that lives in its own environment). Observations come out in the dataset's keys, one step, no batch.

This module imports nothing heavy at load time (no torch, no Lightning, Meta-World only when an env
is built), so rollout worker processes can load it on their own; `make_env` only reads the
attributes of `EnvSpec`, so any object carrying the same fields works.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import warnings
from typing import TYPE_CHECKING

import numpy as np

from cli.errors import ConfigError

if TYPE_CHECKING:
    from datamodules.robot.stream import EnvSpec

SUITES = ("metaworld", "libero")
#: action size of each suite: Meta-World xyz delta + gripper; LIBERO OSC pose delta (6) + gripper
ACTION_DIM = {"metaworld": 4, "libero": 7}
#: per-step low-dim observation shapes of the Meta-World adapter (plus `corner_rgb` (H, W, 3) with cameras)
METAWORLD_LOWDIM = {"ee_states": (3,), "gripper_states": (1,), "object_states": (14,), "goal_states": (3,)}
METAWORLD_CAMERA = "corner"
#: frame size used for recorded videos when the spec asks for no camera observations
VIDEO_SIZE = 128
#: episodes per Meta-World task seed: MT1 draws 50 initial configurations
METAWORLD_NUM_INITS = 50
LIBERO_KEYS = {
    "agentview_image": "agentview_rgb",
    "robot0_eye_in_hand_image": "eye_in_hand_rgb",
    "robot0_gripper_qpos": "gripper_states",
    "robot0_joint_pos": "joint_states",
}
LIBERO_BENCHMARKS = ("libero_goal", "libero_spatial", "libero_object", "libero_10", "libero_90")

_PROBE = """
import mujoco
model = mujoco.MjModel.from_xml_string('<mujoco><worldbody><geom size="0.1"/></worldbody></mujoco>')
renderer = mujoco.Renderer(model, 8, 8)
renderer.update_scene(mujoco.MjData(model))
assert renderer.render().shape == (8, 8, 3)
"""


@functools.cache
def rendering_available() -> bool:
    """Whether MuJoCo can render offscreen here (probed once in a child process, since a broken OpenGL
    setup can abort the interpreter instead of raising)."""
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, timeout=60, env=os.environ.copy())
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _no_rendering_error(image_size: int) -> ConfigError:
    return ConfigError(
        f"env.image_size={image_size} needs MuJoCo offscreen rendering, which does not work here: "
        "set MUJOCO_GL=egl (GPU) or MUJOCO_GL=osmesa (CPU, needs libosmesa) or use image_size 0"
    )


def episode_seed(seed: int, episode: int) -> int:
    """A 32-bit seed derived from (base seed, episode), so every episode's reset is reproducible alone."""
    return int(np.random.SeedSequence([int(seed), int(episode)]).generate_state(1)[0])


class TaskEnv:
    """One simulator instance for one task: reset to a numbered initial state, step, and report success."""

    action_dim: int = 0

    def reset(self, episode: int) -> dict[str, np.ndarray]:
        """Go to initial state number `episode` (deterministic) and return its observation."""
        raise NotImplementedError

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
        """Apply one action; return the new observation and whether the task is solved now."""
        raise NotImplementedError

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state (suites that have one)."""
        raise ConfigError(f"{type(self).__name__} has no scripted expert; demonstrations must come from files")

    def sim_state(self) -> np.ndarray:
        """The flattened simulator state stored in the HDF5 `states` dataset."""
        raise NotImplementedError

    def render(self) -> np.ndarray | None:
        """An (H, W, 3) uint8 camera frame, or None when there is no working renderer."""
        return None

    def close(self) -> None:
        """Release the simulator (and its rendering context)."""


@functools.lru_cache(maxsize=64)
def _metaworld_tasks(env_name: str, seed: int) -> tuple:
    """The 50 randomised initial configurations MT1 draws for (task, seed); cached since MT1 builds an env."""
    import metaworld

    try:
        return tuple(metaworld.MT1(env_name, seed=seed).train_tasks)
    except ValueError:
        valid = ", ".join(metaworld.MT1.ENV_NAMES[:5])
        raise ConfigError(
            f"env.env_names: {env_name!r} is not a Meta-World v3 task (e.g. {valid}, ...; see metaworld.MT1.ENV_NAMES)"
        ) from None


class MetaWorldEnv(TaskEnv):
    """A Meta-World v3 task with its goal made observable, the gym time limit lifted (the rollout
    runner applies the horizon) and every reset starting from freshly reset MuJoCo data, so an
    episode's trajectory does not depend on what the instance ran before."""

    action_dim = ACTION_DIM["metaworld"]

    def __init__(self, env_name: str, seed: int, image_size: int = 0, settle_steps: int = 0) -> None:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        from metaworld.policies import ENV_POLICY_MAP

        if image_size > 0 and not rendering_available():
            raise _no_rendering_error(image_size)
        self.env_name, self.seed, self.image_size, self.settle_steps = env_name, int(seed), image_size, settle_steps
        self._tasks = _metaworld_tasks(env_name, int(seed))
        size = image_size or VIDEO_SIZE
        render = {"render_mode": "rgb_array", "camera_name": METAWORLD_CAMERA, "width": size, "height": size}
        self._env = ALL_V3_ENVIRONMENTS[env_name](**render)  # the renderer itself is created on first use
        self._env.max_path_length = 1 << 62
        self._expert = ENV_POLICY_MAP[env_name]() if env_name in ENV_POLICY_MAP else None
        self._raw: np.ndarray | None = None

    def reset(self, episode: int) -> dict[str, np.ndarray]:
        import mujoco

        env = self._env
        env.set_task(self._tasks[episode % METAWORLD_NUM_INITS])
        if env._partially_observable:  # make the goal position part of the observation
            env._partially_observable = False
            env.__dict__.pop("sawyer_observation_space", None)
        env.seed(episode_seed(self.seed, episode))
        mujoco.mj_resetData(env.model, env.data)
        mujoco.mj_forward(env.model, env.data)
        env._did_see_sim_exception = False
        self._raw, _ = env.reset()
        obs = self._observe()
        for _ in range(self.settle_steps):
            obs, _ = self.step(np.zeros(self.action_dim, dtype=np.float32))
        return obs

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(-1), -1.0, 1.0)
        if action.shape != (self.action_dim,):
            raise ValueError(f"Meta-World actions have {self.action_dim} entries, got shape {action.shape}")
        self._raw, _, _, _, info = self._env.step(action)
        return self._observe(), bool(info["success"])

    def _observe(self) -> dict[str, np.ndarray]:
        raw = self._raw
        obs = {
            "ee_states": raw[0:3].astype(np.float32),
            "gripper_states": raw[3:4].astype(np.float32),
            "object_states": raw[4:18].astype(np.float32),
            "goal_states": raw[36:39].astype(np.float32),
        }
        if self.image_size > 0:
            obs["corner_rgb"] = self.render()
        return obs

    def expert_action(self) -> np.ndarray:
        if self._expert is None:
            return super().expert_action()
        with warnings.catch_warnings():  # the experts warn when their gains saturate the [-1, 1] range
            warnings.simplefilter("ignore")
            action = self._expert.get_action(self._raw)
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)

    def sim_state(self) -> np.ndarray:
        return np.concatenate([self._env.data.qpos, self._env.data.qvel]).astype(np.float64)

    def render(self) -> np.ndarray | None:
        if not rendering_available():
            return None
        return np.ascontiguousarray(self._env.render(), dtype=np.uint8)

    def close(self) -> None:
        self._env.close()


def _import_libero():
    """LIBERO's benchmark table, offscreen env class and path helper, or a ConfigError saying how to get them."""
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except Exception as err:  # noqa: BLE001 - a missing package, its old pins or its first-import prompt
        raise ConfigError(
            "suite libero needs the LIBERO package in its own environment (robosuite 1.4, mujoco 3.3.2): install "
            f"it there, set LIBERO_CONFIG_PATH to a folder with config.yaml, and run from it ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    return benchmark, OffScreenRenderEnv, get_libero_path


def _axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """Axis-angle (3,) of a unit quaternion in robosuite's (x, y, z, w) order, as LIBERO's `ee_states` store."""
    x, y, z, w = (float(v) for v in quat_xyzw)
    w = min(max(w, -1.0), 1.0)
    s = math.sqrt(max(1.0 - w * w, 0.0))
    if s < 1e-8:
        return np.zeros(3, dtype=np.float32)
    return (np.array([x, y, z]) * (2.0 * math.acos(w) / s)).astype(np.float32)


class LiberoEnv(TaskEnv):
    """A LIBERO task: the benchmark's fixed initial states (episode e -> init state e), `settle_steps`
    zero actions with the gripper open after each reset, success = the env's `done` flag."""

    action_dim = ACTION_DIM["libero"]

    def __init__(self, env_name: str, seed: int, image_size: int = 0, settle_steps: int = 5, options=()) -> None:
        benchmark, offscreen_env, get_libero_path = _import_libero()
        options = dict(options)
        if image_size > 0 and not rendering_available():
            raise _no_rendering_error(image_size)
        names = [options["benchmark"]] if "benchmark" in options else list(LIBERO_BENCHMARKS)
        table = benchmark.get_benchmark_dict()
        for name in names:
            if name not in table:
                raise ConfigError(f"env.options benchmark={name!r} is not a LIBERO benchmark (one of {sorted(table)})")
            suite = table[name]()
            if env_name in suite.get_task_names():
                break
        else:
            raise ConfigError(f"env.env_names: {env_name!r} is not a task of the LIBERO benchmarks {names}")
        index = suite.get_task_names().index(env_name)
        task = suite.get_task(index)
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        size = image_size or VIDEO_SIZE
        self._env = offscreen_env(bddl_file_name=bddl, camera_heights=size, camera_widths=size)
        self._env.seed(int(seed))
        self._init_states = suite.get_task_init_states(index)
        self.image_size, self.settle_steps = image_size, settle_steps
        self._raw: dict | None = None

    def reset(self, episode: int) -> dict[str, np.ndarray]:
        self._env.reset()
        self._raw = self._env.set_init_state(self._init_states[episode % len(self._init_states)])
        settle = np.zeros(self.action_dim, dtype=np.float32)
        settle[-1] = -1.0
        for _ in range(self.settle_steps):
            self._raw, _, _, _ = self._env.step(settle)
        return self._observe()

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(-1), -1.0, 1.0)
        self._raw, _, done, _ = self._env.step(action)
        return self._observe(), bool(done)

    def _observe(self) -> dict[str, np.ndarray]:
        raw = self._raw
        obs = {}
        for env_key, key in LIBERO_KEYS.items():
            if key.endswith("_rgb"):
                if self.image_size > 0:
                    obs[key] = np.ascontiguousarray(raw[env_key], dtype=np.uint8)
            else:
                obs[key] = np.asarray(raw[env_key], dtype=np.float32)
        pos = np.asarray(raw["robot0_eef_pos"], dtype=np.float32)
        obs["ee_states"] = np.concatenate([pos, _axis_angle(raw["robot0_eef_quat"])])
        return obs

    def sim_state(self) -> np.ndarray:
        return np.asarray(self._env.get_sim_state(), dtype=np.float64).reshape(-1)

    def render(self) -> np.ndarray | None:
        if self._raw is None or "agentview_image" not in self._raw:
            return None
        return np.ascontiguousarray(self._raw["agentview_image"], dtype=np.uint8)

    def close(self) -> None:
        self._env.close()


def make_env(spec: EnvSpec, task_id: int, seed: int) -> TaskEnv:
    """Build the simulator of task `task_id` of `spec`; `seed` picks the family of initial states
    (demonstrations use 0, evaluation `spec.eval_seed`)."""
    if spec.suite not in SUITES:
        raise ConfigError(f"env.suite: unknown suite {spec.suite!r}; valid suites are {', '.join(SUITES)}")
    if not 0 <= task_id < len(spec.env_names):
        raise ConfigError(f"env.env_names has {len(spec.env_names)} tasks; task {task_id} does not exist")
    name = spec.env_names[task_id]
    if spec.suite == "metaworld":
        return MetaWorldEnv(name, seed, image_size=spec.image_size, settle_steps=spec.settle_steps)
    return LiberoEnv(name, seed, image_size=spec.image_size, settle_steps=spec.settle_steps, options=spec.options)
