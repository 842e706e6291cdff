"""The robomimic / LIBERO HDF5 reader on a synthetic file in LIBERO's exact layout: windows, end padding,
image conversion, numeric demo order, metadata, pickling, DataLoader workers, errors, and every window
against robomimic's own SequenceDataset."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cli.errors import ConfigError
from datamodules.robot.hdf5 import DemoWindows, default_instruction, read_info

h5py = pytest.importorskip("h5py")

#: demo index -> length; the indices 0, 2, 10 sort differently as numbers and as strings
DEMOS = {0: 5, 2: 7, 10: 3}
SIZE = 16
INSTRUCTION = "put the bowl on the plate"
KEYS = ["agentview_rgb", "joint_states", "gripper_states", "eye_in_hand_rgb"]


def _joint(demo: int, n: int) -> np.ndarray:
    """joint_states of a demo: step t of demo d holds 100 d + t + j / 10 in joint j (readable by hand)."""
    return (100.0 * demo + np.arange(n)[:, None] + np.arange(7)[None] / 10).astype(np.float64)


def write_libero_file(path: Path, demos: dict[int, int] = DEMOS, problem_info: bool = True) -> Path:
    """A small file with every group, dataset and attribute LIBERO's create_dataset.py writes."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for d, n in demos.items():
            g = data.create_group(f"demo_{d}")
            g.attrs["num_samples"] = n
            g.attrs["model_file"] = "<mujoco model='synthetic'/>"
            g.attrs["init_state"] = rng.normal(size=20)
            obs = g.create_group("obs")
            obs.create_dataset("agentview_rgb", data=rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8))
            obs.create_dataset("eye_in_hand_rgb", data=rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8))
            obs.create_dataset("joint_states", data=_joint(d, n))
            obs.create_dataset("gripper_states", data=rng.normal(size=(n, 2)))
            obs.create_dataset("ee_states", data=rng.normal(size=(n, 6)))
            obs.create_dataset("ee_pos", data=rng.normal(size=(n, 3)))
            obs.create_dataset("ee_ori", data=rng.normal(size=(n, 3)))
            g.create_dataset("actions", data=rng.uniform(-1, 1, (n, 7)))
            g.create_dataset("states", data=rng.normal(size=(n, 20)))
            g.create_dataset("robot_states", data=rng.normal(size=(n, 9)))
            last = np.zeros(n, dtype=np.uint8)
            last[-1] = 1
            g.create_dataset("rewards", data=last)
            g.create_dataset("dones", data=last)
        data.attrs["env_name"] = "Libero_Tabletop_Manipulation"
        if problem_info:
            data.attrs["problem_info"] = json.dumps(
                {
                    "problem_name": "libero_tabletop_manipulation",
                    "domain_name": "robosuite",
                    "language_instruction": INSTRUCTION,
                }
            )
        data.attrs["macros_image_convention"] = "opengl"
        data.attrs["bddl_file_name"] = "put_the_bowl_on_the_plate.bddl"
        data.attrs["bddl_file_content"] = "(define (problem LIBERO_Tabletop_Manipulation))"
        data.attrs["env_args"] = json.dumps(
            {
                "type": 1,
                "env_name": "Libero_Tabletop_Manipulation",
                "problem_name": "libero_tabletop_manipulation",
                "bddl_file": "put_the_bowl_on_the_plate.bddl",
                "env_kwargs": {"camera_heights": SIZE, "camera_widths": SIZE},
            }
        )
        data.attrs["num_demos"] = len(demos)
        data.attrs["total"] = sum(demos.values())
    return path


@pytest.fixture
def libero_file(tmp_path) -> Path:
    return write_libero_file(tmp_path / "put_the_bowl_on_the_plate_demo.hdf5")


def _expected_rows(window: int) -> list[tuple[int, list[int]]]:
    """(demo index, steps) of every window, by hand: demos in numeric order, the last step repeated."""
    out = []
    for d, n in sorted(DEMOS.items()):
        for s in range(n):
            out.append((d, [min(s + k, n - 1) for k in range(window)]))
    return out


def test_windows_padding_and_numeric_order(libero_file):
    ds = DemoWindows(libero_file, ["joint_states", "gripper_states"], window=4)
    expected = _expected_rows(4)
    assert len(ds) == sum(DEMOS.values()) == len(expected)
    with h5py.File(libero_file) as f:
        for i, (d, steps) in enumerate(expected):
            item = ds[i]
            assert set(item) == {"obs", "actions"}
            assert item["obs"]["joint_states"].dtype == torch.float32
            assert item["obs"]["joint_states"].shape == (4, 7)
            assert item["actions"].shape == (4, 7)
            demo = f[f"data/demo_{d}"]
            np.testing.assert_allclose(item["obs"]["joint_states"], _joint(d, DEMOS[d])[steps], rtol=1e-6)
            np.testing.assert_allclose(item["obs"]["gripper_states"], demo["obs/gripper_states"][:][steps], rtol=1e-6)
            np.testing.assert_allclose(item["actions"], demo["actions"][:][steps], rtol=1e-6)
    # numeric order: windows 5..11 are demo_2's, not demo_10's; the last window of a demo repeats its last step
    assert ds[5]["obs"]["joint_states"][0, 0] == 200.0
    assert ds[len(ds) - 1]["obs"]["joint_states"][:, 0].tolist() == [1002.0] * 4
    assert ds.demo_names == ["demo_0", "demo_2", "demo_10"]


def test_images_to_float_chw(libero_file):
    ds = DemoWindows(libero_file, KEYS, window=3)
    with h5py.File(libero_file) as f:
        frames = f["data/demo_10/obs/agentview_rgb"][:]
        wrist = f["data/demo_0/obs/eye_in_hand_rgb"][:]
    item = ds[len(ds) - 2]  # demo_10, start 1: steps 1, 2, 2
    x = item["obs"]["agentview_rgb"]
    assert x.shape == (3, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    want = torch.from_numpy(frames[[1, 2, 2]]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(x, want)
    torch.testing.assert_close(ds[0]["obs"]["eye_in_hand_rgb"][1], torch.from_numpy(wrist[1]).permute(2, 0, 1) / 255)


def test_metadata_and_instruction(libero_file, tmp_path):
    info = read_info(libero_file)
    assert info.instruction == INSTRUCTION
    assert info.num_demos == 3 and info.total == 15
    assert info.demos == ("demo_0", "demo_2", "demo_10") and info.lengths == (5, 7, 3)
    assert info.obs_shapes["agentview_rgb"] == (3, SIZE, SIZE) and info.obs_shapes["joint_states"] == (7,)
    assert info.action_dim == 7 and info.env_name == "Libero_Tabletop_Manipulation"
    plain = write_libero_file(tmp_path / "open_the_top_drawer_demo.hdf5", problem_info=False)
    assert read_info(plain).instruction == "open the top drawer"
    assert default_instruction("a/b/turn_on_the_stove_demo.hdf5") == "turn on the stove"


def test_first_demos_and_task(libero_file):
    ds = DemoWindows(libero_file, ["joint_states"], window=2, demos=2, task=3)
    assert len(ds) == 5 + 7 and ds.demo_names == ["demo_0", "demo_2"]
    assert ds[0]["task"].item() == 3 and ds[0]["task"].dtype == torch.long
    with pytest.raises(ConfigError, match="data.demos=4"):
        DemoWindows(libero_file, ["joint_states"], demos=4)


def test_pickle_with_open_handle_and_workers(libero_file):
    ds = DemoWindows(libero_file, KEYS, window=4)
    first = ds[3]  # opens this process's handle
    assert ds._file is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._file is None
    for k in KEYS:
        torch.testing.assert_close(clone[3]["obs"][k], first["obs"][k])
    # workers (forked with the parent's handle already open) open their own and see the same windows
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert sum(len(b["actions"]) for b in batches) == len(ds)
    stacked = torch.cat([b["obs"]["agentview_rgb"] for b in batches])
    assert stacked.shape == (len(ds), 4, 3, SIZE, SIZE)
    for i in (0, 7, len(ds) - 1):
        torch.testing.assert_close(stacked[i], ds[i]["obs"]["agentview_rgb"])
    ds.close()


def test_errors_are_one_line(libero_file, tmp_path):
    with pytest.raises(ConfigError, match="not found") as err:
        DemoWindows(tmp_path / "nope.hdf5", ["joint_states"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"available keys: \['agentview_rgb'") as err:
        DemoWindows(libero_file, ["joint_states", "robot0_eef_pos"])
    assert "robot0_eef_pos" in str(err.value) and "\n" not in str(err.value)
    text = tmp_path / "text.hdf5"
    text.write_text("not hdf5")
    with pytest.raises(ConfigError, match="not an HDF5 file"):
        DemoWindows(text, ["joint_states"])
    other = tmp_path / "other.hdf5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ConfigError, match="robomimic / LIBERO layout"):
        read_info(other)
    with pytest.raises(ConfigError, match="window"):
        DemoWindows(libero_file, ["joint_states"], window=0)


def test_matches_robomimic_sequence_dataset(libero_file):
    ObsUtils = pytest.importorskip("robomimic.utils.obs_utils")
    dataset_module = pytest.importorskip("robomimic.utils.dataset")
    rgb, low = ["agentview_rgb", "eye_in_hand_rgb"], ["joint_states", "gripper_states"]
    ObsUtils.initialize_obs_utils_with_obs_specs({"obs": {"rgb": rgb, "low_dim": low}})
    window = 4
    reference = dataset_module.SequenceDataset(
        hdf5_path=str(libero_file),
        obs_keys=rgb + low,
        dataset_keys=["actions"],
        frame_stack=1,
        seq_length=window,
        pad_frame_stack=True,
        pad_seq_length=True,
        get_pad_mask=False,
        goal_mode=None,
        hdf5_cache_mode="low_dim",
        hdf5_use_swmr=True,
        hdf5_normalize_obs=False,
        filter_by_attribute=None,
        load_next_obs=False,
    )
    ours = DemoWindows(libero_file, rgb + low, window=window)
    assert len(ours) == len(reference)
    for i in range(len(ours)):
        want, got = reference[i], ours[i]
        np.testing.assert_allclose(got["actions"].numpy(), want["actions"], rtol=1e-6)
        # robomimic 0.3 returns raw arrays and converts them (uint8 HWC -> float CHW / 255) before the network
        want["obs"] = ObsUtils.process_obs_dict(want["obs"])
        for k in rgb + low:
            np.testing.assert_allclose(got["obs"][k].numpy(), want["obs"][k], rtol=1e-6, atol=1e-7, err_msg=k)
