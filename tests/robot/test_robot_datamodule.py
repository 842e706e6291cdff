"""Task suites and `RobotDataModule`: Meta-World demos made on first use, loaders of dict batches, the robot
stream, LIBERO files read from `root`, and one-line errors."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("metaworld")
pytest.importorskip("h5py")

from cli.errors import ConfigError  # noqa: E402
from datamodules.robot.datamodule import RobotDataModule, default_cache  # noqa: E402
from datamodules.robot.envs import METAWORLD_LOWDIM  # noqa: E402
from datamodules.robot.stream import RobotTaskStream  # noqa: E402
from datamodules.robot.suites import (  # noqa: E402
    LIBERO_SUITES,
    METAWORLD_INSTRUCTIONS,
    SUITE_NAMES,
    libero_instruction,
    resolve_suite,
)
from tests.robot.test_hdf5 import write_libero_file  # noqa: E402

TASKS = ["handle-press-side-v3", "faucet-close-v3"]


# -- suites ---------------------------------------------------------------------------------------------
def test_suites():
    from metaworld.env_dict import MT10_V3
    from metaworld.policies import ENV_POLICY_MAP

    cw10 = resolve_suite("cw10")
    assert cw10.kind == "metaworld" and cw10.env_names[:3] == ("hammer-v3", "push-wall-v3", "faucet-close-v3")
    assert cw10.env_names[-1] == "peg-unplug-side-v3" and cw10.num_tasks == 10
    assert set(resolve_suite("cw3").env_names) <= set(cw10.env_names)
    assert resolve_suite("mt10").env_names == tuple(MT10_V3)
    assert resolve_suite("cw3").instructions[0] == "close the window"
    # every Meta-World task has an instruction, and no two share one
    assert {f"{k}-v3" for k in METAWORLD_INSTRUCTIONS} == set(ENV_POLICY_MAP)
    assert len(set(METAWORLD_INSTRUCTIONS.values())) == len(METAWORLD_INSTRUCTIONS)
    custom = resolve_suite(tasks=["reach-v3", "push-v3"])
    assert custom.name == "custom" and custom.instructions == ("reach the goal", "push the puck to the goal")
    for name in LIBERO_SUITES:
        suite = resolve_suite(name)
        assert suite.kind == "libero" and suite.num_tasks == 10 and len(set(suite.instructions)) == 10
    assert resolve_suite("libero_10").instructions[2] == "turn on the stove and put the moka pot on it"
    assert libero_instruction("put_the_bowl_on_the_plate") == "put the bowl on the plate"
    assert str(resolve_suite("libero_goal").demo_file("R", 7)) == os.path.join(
        "R", "libero_goal", "turn_on_the_stove_demo.hdf5"
    )
    assert str(cw10.demo_file("R", 0)) == os.path.join("R", "hammer-v3.hdf5")


def test_suite_errors():
    with pytest.raises(ConfigError, match="valid suites are " + ", ".join(SUITE_NAMES)):
        resolve_suite("cw11")
    with pytest.raises(ConfigError, match="exactly one of data.suite"):
        resolve_suite("cw3", ["reach-v3"])
    with pytest.raises(ConfigError, match="'reach-v2' is not a Meta-World v3 task"):
        resolve_suite(tasks=["reach-v2"])
    with pytest.raises(ConfigError, match="twice"):
        resolve_suite(tasks=["reach-v3", "reach-v3"])


# -- Meta-World ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def metaworld_dm(tmp_path_factory):
    root = tmp_path_factory.mktemp("mw")
    dm = RobotDataModule(
        tasks=TASKS, root=str(root), demos=2, horizon=120, window=5, batch_size=4, eval_episodes=3, seed=0
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_metaworld_stream(metaworld_dm):
    s = metaworld_dm.stream
    assert isinstance(s, RobotTaskStream)
    assert s.task_names == tuple(TASKS) and s.num_tasks == 2
    assert s.instructions == ("press the handle down from the side", "turn the faucet off")
    assert s.obs_shapes == tuple(METAWORLD_LOWDIM.items()) and s.action_dim == 4 and s.window == 5
    assert s.image_keys == [] and s.lowdim_keys == list(METAWORLD_LOWDIM)
    assert s.env.suite == "metaworld" and s.env.env_names == tuple(TASKS)
    assert (s.env.horizon, s.env.settle_steps, s.env.eval_seed, s.env.image_size) == (120, 0, 1000, 0)
    assert s.env.obs_keys == tuple(METAWORLD_LOWDIM)


def test_metaworld_loaders(metaworld_dm):
    dm = metaworld_dm
    files = sorted(os.listdir(dm.root))
    assert files == sorted(f"{t}.hdf5" for t in TASKS)
    mtimes = [os.stat(dm.demo_file(t)).st_mtime_ns for t in range(2)]
    dm.prepare_data()  # complete files: nothing is made again
    assert [os.stat(dm.demo_file(t)).st_mtime_ns for t in range(2)] == mtimes
    for t in range(2):
        dm.set_task(t)
        ds = dm.train_dataset(t)
        assert len(ds) == sum(ds.lengths) and len(ds.demo_names) == 2
        batch = next(iter(dm.train_dataloader()))
        assert set(batch) == {"obs", "actions", "task"}
        assert batch["actions"].shape == (4, 5, 4) and batch["actions"].dtype == torch.float32
        for key, shape in METAWORLD_LOWDIM.items():
            assert batch["obs"][key].shape == (4, 5, *shape)
        assert batch["task"].tolist() == [t] * 4
    loaders = dm.eval_dataloaders()
    assert len(loaders) == 2 and dm.eval_batch_size == 3
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == 1 and batches[0]["episode"].tolist() == [0, 1, 2]
    for loader in dm.eval_dataloaders(held_out=True):  # as many other initial states, for curve points
        assert [b["episode"].tolist() for b in loader] == [[3, 4, 5]]
    dm.eval_episodes = 26  # 52 initial states are more than a task has
    with pytest.raises(
        ConfigError, match=r"data.eval_episodes=26: held-out curve episodes need 2 x eval_episodes <= 50"
    ):
        dm.held_out_dataset(0)


def test_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dm = RobotDataModule(suite="cw3", demos=7, demo_noise=0.1)
    assert default_cache() == tmp_path / "lifelong" / "metaworld"
    assert dm.root == default_cache() / "seed0_h150_noise0.1_extra5_img0"
    assert dm.demo_file(0) == dm.root / "window-close-v3.hdf5"


def test_metaworld_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.suite: unknown suite 'cw4'; valid suites are cw10, cw3"):
        RobotDataModule(suite="cw4")
    with pytest.raises(ConfigError, match=r"\['joint_states'\] are not Meta-World keys"):
        RobotDataModule(suite="cw3", obs_keys=["ee_states", "joint_states"])
    with pytest.raises(ConfigError, match="set data.image_size"):
        RobotDataModule(suite="cw3", obs_keys=["ee_states", "corner_rgb"])
    with pytest.raises(ConfigError, match="data.demo_noise=-0.5: must be at least 0"):
        RobotDataModule(suite="cw3", demo_noise=-0.5)
    with pytest.raises(ConfigError, match="data.demos=0: must be at least 1"):
        RobotDataModule(suite="cw3", demos=0)
    dm = RobotDataModule(suite="cw3", root=str(tmp_path))
    with pytest.raises(ConfigError, match="window-close-v3.hdf5: demonstration file not found"):
        dm.setup("fit")  # prepare_data has not run


def _bytes_and_mtime(path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def _plant(path, content: bytes) -> tuple[bytes, int]:
    """Writes `content` at `path` with an old mtime, so that any rewrite would show; returns what to compare."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    return _bytes_and_mtime(path)


def test_unreadable_demo_files_are_named_and_left_alone(metaworld_dm, tmp_path, monkeypatch):
    import h5py

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = metaworld_dm.demo_file(0).read_bytes()
    with h5py.File(tmp_path / "nodata.h5", "w") as f:
        f.create_group("something_else")
    contents = {
        "garbage": b"these are not the demonstrations you are looking for\n" * 20,
        "truncated": real[: len(real) // 2],
        "no data group": (tmp_path / "nodata.h5").read_bytes(),
    }
    for root in (str(tmp_path / "mine"), None):  # a folder the user named, and the suite's own cache
        for why, content in contents.items():
            dm = RobotDataModule(tasks=TASKS[:1], root=root, demos=2, horizon=120, eval_episodes=1)
            path = dm.demo_file(0)
            before = _plant(path, content)
            with pytest.raises(ConfigError) as err:
                dm.prepare_data()
            message = str(err.value)
            assert message.startswith(f"{path}: not a readable demonstration file"), (why, message)
            assert "left as it is" in message and "\n" not in message
            assert _bytes_and_mtime(path) == before, why
            assert os.listdir(path.parent) == [path.name], why  # no temporary file either


def test_stale_demo_file_refused_in_root_and_remade_in_cache(metaworld_dm, tmp_path, monkeypatch):
    from datamodules.robot.demos import file_status

    real = metaworld_dm.demo_file(0).read_bytes()  # 2 demos, horizon 120, no noise
    # in a folder the user named: refused, naming the file and the setting that differs
    for extra, differs in (({"demos": 3}, "holds num_demos=2, 3 asked"), ({"demo_noise": 0.1}, "noise=0.0, not 0.1")):
        dm = RobotDataModule(tasks=TASKS[:1], root=str(tmp_path / "mine"), horizon=120, eval_episodes=1, **extra)
        path = dm.demo_file(0)
        before = _plant(path, real)
        with pytest.raises(ConfigError) as err:
            dm.prepare_data()
        message = str(err.value)
        assert message.startswith(f"{path}: ") and differs in message and "data.root" in message
        assert "\n" not in message
        assert _bytes_and_mtime(path) == before and os.listdir(path.parent) == [path.name]
    # in the suite's own cache: made again with the asked settings
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dm = RobotDataModule(tasks=TASKS[:1], demos=3, horizon=120, eval_episodes=1)
    path = dm.demo_file(0)
    assert path.parent == tmp_path / "cache" / "lifelong" / "metaworld" / "seed0_h120_noise0_extra5_img0"
    before = _plant(path, real)
    assert file_status(path, TASKS[0], dm.settings) == "stale"
    dm.prepare_data()
    assert _bytes_and_mtime(path) != before and os.listdir(path.parent) == [path.name]
    assert file_status(path, TASKS[0], dm.settings) == "complete"
    dm.setup("fit")
    assert len(dm.train_dataset(0).demo_names) == 3


# -- LIBERO ----------------------------------------------------------------------------------------------
def test_libero_files(tmp_path):
    suite = resolve_suite("libero_goal")
    folder = tmp_path / "libero_goal"
    folder.mkdir()
    for name in suite.env_names[:2]:
        write_libero_file(folder / f"{name}_demo.hdf5")
    dm = RobotDataModule(suite="libero_goal", root=str(tmp_path), demos=3, window=4, batch_size=2)
    s = dm.stream
    assert s.obs_shapes == (("joint_states", (7,)), ("gripper_states", (2,))) and s.action_dim == 7
    assert (s.env.suite, s.env.horizon, s.env.settle_steps) == ("libero", 600, 5)
    assert dict(s.env.options) == {"benchmark": "libero_goal"}
    assert s.instructions[1] == "put the bowl on the stove" and s.task_names == suite.env_names
    with pytest.raises(ConfigError, match="put_the_wine_bottle_on_top_of_the_cabinet_demo.hdf5: LIBERO demonstration"):
        dm.prepare_data()
    dm.set_task(1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["obs"]["joint_states"].shape == (2, 4, 7) and batch["actions"].shape == (2, 4, 7)
    cams = RobotDataModule(suite="libero_goal", root=str(tmp_path), image_size=16, demos=2)
    assert cams.stream.shapes["agentview_rgb"] == (3, 16, 16) and cams.stream.image_keys == [
        "agentview_rgb",
        "eye_in_hand_rgb",
    ]
    item = cams.train_dataset(0)[0]
    assert item["obs"]["eye_in_hand_rgb"].shape == (10, 3, 16, 16)
    with pytest.raises(ConfigError, match="data.image_size=128: .* frames of shape \\(3, 16, 16\\)"):
        _ = RobotDataModule(suite="libero_goal", root=str(tmp_path), image_size=128).stream
    with pytest.raises(ConfigError, match="data.root: suite libero_10"):
        RobotDataModule(suite="libero_10")
    with pytest.raises(ConfigError, match="libero_spatial/pick_up_the_black_bowl.*not found"):
        _ = RobotDataModule(suite="libero_spatial", root=str(tmp_path)).stream
