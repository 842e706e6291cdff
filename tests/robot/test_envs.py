"""Simulator adapters: Meta-World observations in the dataset keys, deterministic numbered resets,
scripted experts that solve their task, MuJoCo states, and the configuration errors (unknown suite,
missing LIBERO, cameras without a renderer)."""

from __future__ import annotations

import numpy as np
import pytest

from cli.errors import ConfigError
from datamodules.robot.envs import (
    METAWORLD_LOWDIM,
    LiberoEnv,
    MetaWorldEnv,
    make_env,
    rendering_available,
)
from datamodules.robot.stream import EnvSpec

SPEC = EnvSpec(suite="metaworld", env_names=("reach-v3", "button-press-topdown-v3"), horizon=150)


@pytest.fixture(scope="module")
def reach():
    env = make_env(SPEC, 0, seed=0)
    yield env
    env.close()


def libero_importable() -> bool:
    try:
        import libero.libero  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def test_observation_keys_shapes_and_dtypes(reach):
    assert isinstance(reach, MetaWorldEnv) and reach.action_dim == 4
    obs = reach.reset(0)
    assert set(obs) == set(METAWORLD_LOWDIM)
    for key, shape in METAWORLD_LOWDIM.items():
        assert obs[key].shape == shape and obs[key].dtype == np.float32
    raw = reach._raw  # the 39-d Meta-World vector the keys are sliced from
    np.testing.assert_array_equal(obs["object_states"], raw[4:18].astype(np.float32))
    np.testing.assert_array_equal(obs["goal_states"], raw[36:39].astype(np.float32))
    assert np.abs(obs["goal_states"]).sum() > 0  # the goal is observable, not zeroed
    obs, success = reach.step(np.array([0.0, 0.0, 1.0, 0.0]))
    assert isinstance(success, bool) and set(obs) == set(METAWORLD_LOWDIM)
    assert obs["ee_states"][2] > reach.reset(0)["ee_states"][2]  # moved up


def test_reset_is_deterministic_per_episode_and_seed(reach):
    first = reach.reset(3)
    for _ in range(10):
        reach.step(np.ones(4))
    again = reach.reset(3)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    other = reach.reset(4)
    assert not np.allclose(first["goal_states"], other["goal_states"])
    assert not np.allclose(first["object_states"][:3], other["object_states"][:3])
    np.testing.assert_array_equal(reach.reset(53)["goal_states"], first["goal_states"])  # 50 initial states
    # another instance, and evaluation's seed draws other positions
    fresh = make_env(SPEC, 0, seed=0)
    np.testing.assert_array_equal(fresh.reset(3)["goal_states"], first["goal_states"])
    evaluation = make_env(SPEC, 0, seed=SPEC.eval_seed)
    assert not np.allclose(evaluation.reset(3)["goal_states"], first["goal_states"])
    fresh.close()
    evaluation.close()


def test_trajectory_does_not_depend_on_history(reach):
    def trajectory(env):
        env.reset(7)
        return np.stack([env.step(np.array([0.5, -0.3, 0.2, 1.0]))[0]["ee_states"] for _ in range(15)])

    history_free = trajectory(make_env(SPEC, 0, seed=0))
    for _ in range(30):
        reach.step(np.array([-1.0, 1.0, -1.0, -1.0]))
    np.testing.assert_array_equal(trajectory(reach), history_free)


@pytest.mark.parametrize("task_id", [0, 1])
def test_scripted_expert_solves_the_task(task_id):
    env = make_env(SPEC, task_id, seed=SPEC.eval_seed)
    for episode in range(3):
        env.reset(episode)
        solved = False
        for _ in range(SPEC.horizon):
            action = env.expert_action()
            assert action.shape == (4,) and action.dtype == np.float32 and np.abs(action).max() <= 1.0
            _, solved = env.step(action)
            if solved:
                break
        assert solved, f"{SPEC.env_names[task_id]} episode {episode} not solved by its expert"
    env.close()


def test_no_time_limit_inside_the_env():
    env = make_env(EnvSpec(suite="metaworld", env_names=("reach-v3",)), 0, seed=0)
    env.reset(0)
    env._env.curr_path_length = 499  # Meta-World's own limit is 500 steps
    for _ in range(5):
        env.step(np.zeros(4))
    env.close()


def test_sim_state_is_flat_and_changes(reach):
    reach.reset(0)
    before = reach.sim_state()
    assert before.ndim == 1 and before.dtype == np.float64
    assert before.size == reach._env.model.nq + reach._env.model.nv
    reach.step(np.array([1.0, 1.0, 1.0, 1.0]))
    assert before.shape == reach.sim_state().shape and not np.allclose(before, reach.sim_state())


def test_settle_steps_run_inside_reset():
    spec = EnvSpec(suite="metaworld", env_names=("reach-v3",), settle_steps=3)
    settled, plain = make_env(spec, 0, seed=0), make_env(SPEC, 0, seed=0)
    obs = settled.reset(2)
    plain.reset(2)
    for _ in range(3):
        expected, _ = plain.step(np.zeros(4))
    for key in obs:
        np.testing.assert_array_equal(obs[key], expected[key])


def test_render_matches_the_renderer_availability(reach):
    reach.reset(0)
    frame = reach.render()
    if rendering_available():
        assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8
    else:
        assert frame is None


@pytest.mark.skipif(rendering_available(), reason="this machine renders; the error path is not reachable")
def test_cameras_without_renderer_are_a_config_error():
    with pytest.raises(ConfigError, match="MUJOCO_GL=egl"):
        make_env(EnvSpec(suite="metaworld", env_names=("reach-v3",), image_size=64), 0, seed=0)


@pytest.mark.skipif(not rendering_available(), reason="no OpenGL backend for MuJoCo here")
def test_camera_observation_when_rendering_works():
    env = make_env(EnvSpec(suite="metaworld", env_names=("reach-v3",), image_size=32), 0, seed=0)
    obs = env.reset(0)
    assert obs["corner_rgb"].shape == (32, 32, 3) and obs["corner_rgb"].dtype == np.uint8
    env.close()


def test_configuration_errors():
    with pytest.raises(ConfigError, match="unknown suite 'robosuite'.*metaworld, libero"):
        make_env(EnvSpec(suite="robosuite", env_names=("x",)), 0, seed=0)
    with pytest.raises(ConfigError, match="'hammer-v9' is not a Meta-World v3 task"):
        make_env(EnvSpec(suite="metaworld", env_names=("hammer-v9",)), 0, seed=0)
    with pytest.raises(ConfigError, match="task 2 does not exist"):
        make_env(SPEC, 2, seed=0)


@pytest.mark.skipif(libero_importable(), reason="LIBERO is installed here")
def test_missing_libero_is_a_config_error():
    spec = EnvSpec(suite="libero", env_names=("open_the_middle_drawer_of_the_cabinet",), settle_steps=5)
    with pytest.raises(ConfigError, match="suite libero needs the LIBERO package in its own environment"):
        make_env(spec, 0, seed=0)


@pytest.mark.skipif(not libero_importable(), reason="LIBERO is not installed in this environment")
def test_libero_task_runs():
    from libero.libero import benchmark

    name = benchmark.get_benchmark_dict()["libero_goal"]().get_task_names()[0]
    spec = EnvSpec(suite="libero", env_names=(name,), settle_steps=5, options=(("benchmark", "libero_goal"),))
    env = make_env(spec, 0, seed=0)
    assert isinstance(env, LiberoEnv)
    obs = env.reset(0)
    assert obs["gripper_states"].shape == (2,) and obs["joint_states"].shape == (7,) and obs["ee_states"].shape == (6,)
    obs, success = env.step(np.zeros(7))
    assert isinstance(success, bool) and env.sim_state().ndim == 1
    env.close()
