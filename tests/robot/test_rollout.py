"""The rollout runner: horizon and success bookkeeping, the (obs, ids, reset) batching contract,
identical results with 0, 1 or 2 worker processes, worker failures surfacing as RuntimeError, and
pickling/deep-copying a runner whose processes are running."""

from __future__ import annotations

import copy
import os
import pickle
import signal

import numpy as np
import pytest

from datamodules.robot.rollout import RolloutRunner
from datamodules.robot.stream import EnvSpec

SPEC = EnvSpec(suite="metaworld", env_names=("reach-v3", "push-v3"), horizon=40)
EPISODES = [0, 1, 2, 7, 11]


def reach_policy(obs, ids, reset):
    """A fixed linear map of the observation: move the hand towards the goal (solves reach-v3 early)."""
    actions = np.zeros((len(ids), 4), dtype=np.float32)
    actions[:, :3] = 8.0 * (obs["goal_states"] - obs["ee_states"])
    return actions


class Recorder:
    """Wraps a policy and keeps every call's ids, reset flags and observations."""

    def __init__(self, policy):
        self.policy, self.calls = policy, []

    def __call__(self, obs, ids, reset):
        self.calls.append(({k: v.copy() for k, v in obs.items()}, ids.copy(), reset.copy()))
        return self.policy(obs, ids, reset)


def test_zero_policy_never_succeeds_and_runs_the_horizon():
    runner = RolloutRunner(SPEC, num_workers=0)
    result = runner.run(1, [0, 1, 2], lambda obs, ids, reset: np.zeros((len(ids), 4)))  # push-v3 needs motion
    assert result.success.dtype == bool and not result.success.any()
    np.testing.assert_array_equal(result.steps, [SPEC.horizon] * 3)
    assert result.frames == [] and result.success_rate == 0.0
    runner.close()


def test_ids_and_reset_bookkeeping():
    spec = EnvSpec(suite="metaworld", env_names=("reach-v3",), horizon=40, obs_keys=("ee_states", "goal_states"))
    runner = RolloutRunner(spec, num_workers=0)
    recorder = Recorder(reach_policy)
    result = runner.run(0, EPISODES, recorder)
    assert result.success.any() and len(set(result.steps)) > 1  # episodes leave the batch at different steps
    assert (result.steps[result.success] < spec.horizon).all() and (result.steps[~result.success] == spec.horizon).all()
    assert len(recorder.calls) == result.steps.max()
    for t, (obs, ids, reset) in enumerate(recorder.calls):
        expected = [slot for slot in range(len(EPISODES)) if result.steps[slot] > t]  # still running at step t
        np.testing.assert_array_equal(ids, expected)
        np.testing.assert_array_equal(reset, np.full(len(ids), t == 0))
        assert set(obs) == {"ee_states", "goal_states"}
        assert obs["ee_states"].shape == (len(ids), 3) and obs["ee_states"].dtype == np.float32
    # each episode's first observation is its own initial state, not another slot's
    first_goals = recorder.calls[0][0]["goal_states"]
    assert len({tuple(g) for g in first_goals}) == len(EPISODES)
    runner.close()


def test_same_results_with_0_1_2_workers():
    def play(num_workers):
        runner = RolloutRunner(SPEC, num_workers=num_workers)
        recorder = Recorder(reach_policy)
        first = runner.run(0, EPISODES, recorder)
        second = runner.run(0, EPISODES[::-1], reach_policy)  # envs reused for other episodes
        third = runner.run(1, EPISODES[:3], reach_policy)  # task change rebuilds the envs
        runner.close()
        return first, second, third, recorder.calls

    reference = play(0)
    assert reference[0].success.any() and not reference[2].success.any()
    np.testing.assert_array_equal(reference[1].steps, reference[0].steps[::-1])
    for workers in (1, 2):
        other = play(workers)
        for got, want in zip(other[:3], reference[:3], strict=True):
            np.testing.assert_array_equal(got.success, want.success)
            np.testing.assert_array_equal(got.steps, want.steps)
        assert len(other[3]) == len(reference[3])
        for (obs, ids, reset), (obs_ref, ids_ref, reset_ref) in zip(other[3], reference[3], strict=True):
            np.testing.assert_array_equal(ids, ids_ref)
            np.testing.assert_array_equal(reset, reset_ref)
            for key in obs_ref:
                np.testing.assert_array_equal(obs[key], obs_ref[key])


def test_failure_inside_a_worker_raises_runtime_error():
    runner = RolloutRunner(EnvSpec(suite="metaworld", env_names=("no-such-task-v3",), horizon=5), num_workers=1)
    with pytest.raises(RuntimeError, match="rollout worker 0 failed during reset of task 0: ConfigError"):
        runner.run(0, [0, 1], reach_policy)
    assert runner._workers == []  # cleaned up


def test_dead_worker_raises_runtime_error_and_runner_recovers():
    runner = RolloutRunner(EnvSpec(suite="metaworld", env_names=("reach-v3",), horizon=5), num_workers=2)
    before = runner.run(0, [0, 1, 2], reach_policy)
    victim = runner._workers[1].proc
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    with pytest.raises(RuntimeError, match="rollout worker 1 .* died during"):
        runner.run(0, [0, 1, 2], reach_policy)
    after = runner.run(0, [0, 1, 2], reach_policy)  # fresh workers
    np.testing.assert_array_equal(after.steps, before.steps)
    runner.close()
    assert runner._workers == []


def test_policy_shape_errors_and_empty_runs():
    runner = RolloutRunner(SPEC, num_workers=0)
    empty = runner.run(0, [], reach_policy)
    assert empty.success.shape == (0,) and empty.steps.shape == (0,)
    with pytest.raises(ValueError, match=r"actions of shape \(2, A\)"):
        runner.run(0, [0, 1], lambda obs, ids, reset: np.zeros((1, 4)))


def test_torch_actions_are_accepted():
    torch = pytest.importorskip("torch")
    runner = RolloutRunner(SPEC, num_workers=0)
    result = runner.run(0, [0, 1], lambda obs, ids, reset: torch.as_tensor(reach_policy(obs, ids, reset)))
    np.testing.assert_array_equal(result.steps, runner.run(0, [0, 1], reach_policy).steps)
    runner.close()


def test_pickle_and_deepcopy_leave_the_processes_behind():
    runner = RolloutRunner(EnvSpec(suite="metaworld", env_names=("reach-v3",), horizon=5), num_workers=1)
    runner.run(0, [0], reach_policy)
    assert len(runner._workers) == 1
    for clone in (pickle.loads(pickle.dumps(runner)), copy.deepcopy(runner)):
        assert clone._workers == [] and clone.spec == runner.spec and clone.num_workers == 1
    assert runner._workers[0].proc.poll() is None  # the original's worker is untouched
    runner.close()
    assert runner._workers == []


class CounterEnv:
    """A synthetic env with a camera: the state counts up by the action, success at 3; frames show the count."""

    def __init__(self, task_id: int) -> None:
        self.task_id, self.x = task_id, 0.0

    def reset(self, episode):
        self.x = float(episode)
        return self._obs()

    def step(self, action):
        self.x += float(action[0])
        return self._obs(), self.x >= 3

    def _obs(self):
        return {"count": np.array([self.x], np.float32), "cam_rgb": self.render()}

    def render(self):
        return np.full((4, 4, 3), int(self.x), dtype=np.uint8)

    def close(self):
        pass


def test_recorded_videos_and_obs_key_selection(monkeypatch):
    import datamodules.robot.envs as envs

    monkeypatch.setattr(envs, "make_env", lambda spec, task_id, seed: CounterEnv(task_id))
    spec = EnvSpec(suite="metaworld", env_names=("fake",), horizon=10, obs_keys=("count", "cam_rgb"))
    runner = RolloutRunner(spec, num_workers=0)
    seen = []

    def policy(obs, ids, reset):
        seen.append(obs["cam_rgb"].shape)
        return np.ones((len(ids), 1))

    result = runner.run(0, [0, 2, 1], policy, record=2)
    np.testing.assert_array_equal(result.steps, [3, 1, 2])  # from 0, 2, 1 up to 3 in steps of 1
    assert result.success.all() and seen == [(3, 4, 4, 3), (2, 4, 4, 3), (1, 4, 4, 3)]
    assert [video.shape for video in result.frames] == [(4, 4, 4, 3), (2, 4, 4, 3)]  # reset frame + one per step
    np.testing.assert_array_equal(result.frames[0][:, 0, 0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(result.frames[1][:, 0, 0, 0], [2, 3])

    from cli.errors import ConfigError

    bad = RolloutRunner(EnvSpec(suite="metaworld", env_names=("fake",), obs_keys=("corner_rgb",)), num_workers=0)
    with pytest.raises(ConfigError, match=r"env.obs_keys: \['corner_rgb'\] are not observed"):
        bad.run(0, [0], policy)
