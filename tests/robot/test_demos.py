"""`lifelong make-demos`: scripted-expert episodes of a Meta-World task written as LIBERO-like HDF5 files,
checked by replaying them in the simulator; reruns skip complete files; bad input fails in one line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("metaworld")
h5py = pytest.importorskip("h5py")

from cli.errors import ConfigError  # noqa: E402
from cli.main import main  # noqa: E402
from datamodules.robot.demos import DemoSettings, file_status, make_task_demos  # noqa: E402
from datamodules.robot.envs import make_env  # noqa: E402
from datamodules.robot.hdf5 import DemoWindows, read_info  # noqa: E402
from datamodules.robot.suites import resolve_suite  # noqa: E402

TASK = "handle-press-side-v3"  # the shortest expert episodes of CW10 (about 45 steps)
KEYS = ("ee_states", "gripper_states", "object_states", "goal_states")


def _make(out, *extra: str) -> None:
    main(["make-demos", "--tasks", f"[{TASK}]", "--demos", "3", "--horizon", "120", "--out", str(out), *extra])


def test_demos_replay_to_success_and_rerun_skips(tmp_path, capsys):
    _make(tmp_path, "--progress", "false")
    path = tmp_path / f"{TASK}.hdf5"
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left
    with h5py.File(path) as f:
        data = f["data"]
        assert data.attrs["env_name"] == TASK and data.attrs["num_demos"] == 3
        assert json.loads(data.attrs["problem_info"])["language_instruction"] == "press the handle down from the side"
        assert json.loads(data.attrs["env_args"])["env_kwargs"]["horizon"] == 120
        assert data.attrs["macros_image_convention"] == "opencv"
        lengths = []
        spec = None
        for i in range(3):
            demo = data[f"demo_{i}"]
            n = int(demo.attrs["num_samples"])
            lengths.append(n)
            assert 1 < n <= 120
            assert set(demo["obs"]) == set(KEYS)
            assert demo["obs/object_states"].shape == (n, 14) and demo["obs/goal_states"].shape == (n, 3)
            assert demo["actions"].shape == (n, 4) and np.abs(demo["actions"][:]).max() <= 1
            assert demo["dones"][:].tolist() == [0] * (n - 1) + [1] and demo["rewards"].dtype == np.uint8
            np.testing.assert_array_equal(demo.attrs["init_state"], demo["states"][0])
            # replaying the recorded actions from the same initial state revisits the recorded states and ends solved
            if spec is None:
                from datamodules.robot.demos import env_spec

                spec = env_spec(resolve_suite(tasks=[TASK]), DemoSettings(horizon=120))
                env = make_env(spec, 0, 0)
            obs = env.reset(int(demo.attrs["episode"]))
            solved = []
            for t in range(n):
                for k in KEYS:
                    np.testing.assert_allclose(obs[k], demo["obs"][k][t], atol=1e-5)
                obs, success = env.step(demo["actions"][t])
                solved.append(success)
            assert solved[-1] and not any(solved[:-6])  # solved at the end, and at most extra_steps earlier
        assert data.attrs["total"] == sum(lengths)
        env.close()
    assert read_info(path).lengths == tuple(lengths)
    ds = DemoWindows(path, KEYS, window=10)
    assert len(ds) == sum(lengths) and ds[0]["obs"]["object_states"].shape == (10, 14)

    mtime = path.stat().st_mtime_ns
    capsys.readouterr()
    _make(tmp_path)  # same settings: skipped, file untouched
    assert "complete, skipped" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == mtime
    assert file_status(path, TASK, DemoSettings(demos=2, horizon=120)) == "complete"
    assert file_status(path, TASK, DemoSettings(demos=4, horizon=120)) == "stale"
    assert file_status(path, TASK, DemoSettings(demos=3, horizon=120, noise=0.1)) == "stale"


def test_noise_is_seeded_and_labels_stay_clean(tmp_path):
    suite = resolve_suite(tasks=[TASK])
    settings = DemoSettings(demos=2, horizon=120, noise=0.3)
    a = make_task_demos(suite, 0, tmp_path / "a", settings)
    b = make_task_demos(suite, 0, tmp_path / "b", settings)
    clean = make_task_demos(suite, 0, tmp_path / "c", DemoSettings(demos=2, horizon=120))
    with h5py.File(a.path) as fa, h5py.File(b.path) as fb, h5py.File(clean.path) as fc:
        np.testing.assert_array_equal(fa["data/demo_0/actions"][:], fb["data/demo_0/actions"][:])
        noisy, plain = fa["data/demo_0/obs/ee_states"][:], fc["data/demo_0/obs/ee_states"][:]
        assert noisy.shape != plain.shape or not np.allclose(noisy, plain)  # the noise changed the path
    assert a.demos == 2 and a.attempts >= 2


def test_runs_started_together_make_each_file_once(tmp_path):
    """Two makers of the same file wait on the folder's lock (held here until both are started); the one that
    gets it second finds the file complete and skips it, instead of recording every episode again."""
    import threading

    from cli.files import folder_lock

    suite, settings = resolve_suite(tasks=[TASK]), DemoSettings(demos=1, horizon=120)
    reports = []

    def make():
        reports.append(make_task_demos(suite, 0, tmp_path, settings))

    with folder_lock(tmp_path):
        threads = [threading.Thread(target=make) for _ in range(2)]
        for t in threads:
            t.start()
    for t in threads:
        t.join()
    assert sorted(r.skipped for r in reports) == [False, True]
    assert file_status(reports[0].path, TASK, settings) == "complete"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary or lock file left


def test_errors_are_one_line(tmp_path, capsys):
    for argv, expected in (
        (["--suite", "cw99"], "--suite: unknown suite 'cw99'; valid suites are cw10, cw3, mt10, libero_spatial"),
        (["--tasks", "[nope-v3]"], "--tasks: 'nope-v3' is not a Meta-World v3 task"),
        (["--suite", "libero_goal"], "LIBERO demonstrations are human recordings"),
        (["--tasks", "[reach]"], "did you mean reach-v3?"),
        (["--tasks", "reach"], "did you mean reach-v3?"),  # one name, no list brackets
        (["--tasks", "reach-v3", "--tasks", "nope-v3"], "--tasks: 'nope-v3' is not a Meta-World v3 task"),
        (["--suite", "cw3", "--horizon", "3"], "the scripted expert solved 0 of 4 episodes"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(["make-demos", "--out", str(tmp_path), "--demos", "1", "--progress", "false", *argv])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lifelong: error: ") and expected in err and "\n" not in err
    assert os.listdir(tmp_path) == []  # the failed task left nothing behind
    with pytest.raises(ConfigError, match="--noise"):
        DemoSettings(noise=-1)


def test_make_demos_replaces_only_its_own_stale_files_and_only_when_asked(tmp_path, capsys):
    path = tmp_path / f"{TASK}.hdf5"

    def make(demos: int, *extra: str) -> None:
        args = ["--demos", str(demos), "--horizon", "120", "--out", str(tmp_path), "--progress", "false"]
        main(["make-demos", "--tasks", f"[{TASK}]", *args, *extra])

    def refused(demos: int, *extra: str) -> str:
        before = path.read_bytes(), path.stat().st_mtime_ns
        with pytest.raises(SystemExit) as stop:
            make(demos, *extra)
        assert stop.value.code == 2
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before  # untouched
        assert os.listdir(tmp_path) == [path.name]  # and no temporary file left
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"lifelong: error: {path}: ") and "\n" not in err
        return err

    make(1)
    assert file_status(path, TASK, DemoSettings(demos=1, horizon=120)) == "complete"
    err = refused(2)  # made here with fewer demos: refused without the opt-in
    assert "holds num_demos=1, 2 asked" in err and "--replace_stale true" in err
    assert "made with horizon=120, not 100" in refused(1, "--horizon", "100")
    make(2, "--replace_stale", "true")
    with h5py.File(path) as f:
        assert f["data"].attrs["num_demos"] == 2 and "demo_1" in f["data"]

    # files this command did not make are never replaced, even with the opt-in
    path.write_bytes(b"\x89HDF\r\n\x1a\n but not really")
    assert "not a readable demonstration file (not HDF5, or truncated)" in refused(2, "--replace_stale", "true")
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_group("data/demo_0")  # a LIBERO-style file from elsewhere, without our generator attribute
    assert "not made by make-demos" in refused(2, "--replace_stale", "true")
    path.unlink()
    path.mkdir()
    with pytest.raises(SystemExit):
        make(1)
    assert "exists and is not a regular file" in capsys.readouterr().err and os.listdir(path) == []


def test_one_task_without_list_brackets(tmp_path, capsys):
    """`--tasks NAME` (repeatable) works as `--tasks '[NAME]'`."""
    main(
        ["make-demos", "--tasks", TASK, "--demos", "1", "--horizon", "120", "--out", str(tmp_path), "--progress=false"]
    )
    assert (tmp_path / f"{TASK}.hdf5").is_file()
