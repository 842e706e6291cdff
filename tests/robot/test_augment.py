"""Camera augmentation: one draw per sample shared by its frames and cameras, low-dim keys untouched,
and the datamodule applies it to training batches only when the policy reads cameras."""

from __future__ import annotations

import torch

from datamodules.robot.augment import CameraAugment
from datamodules.robot.datamodule import RobotDataModule
from datamodules.robot.suites import resolve_suite
from tests.robot.test_hdf5 import write_libero_file

KEYS = ["agentview_rgb", "eye_in_hand_rgb"]


def test_frames_and_cameras_of_a_sample_share_one_draw():
    aug = CameraAugment(KEYS, 16)
    frame = torch.rand(6, 1, 3, 16, 16)
    clip = frame.expand(6, 4, 3, 16, 16).contiguous()
    obs = {"agentview_rgb": clip, "eye_in_hand_rgb": clip.clone(), "joint_states": torch.randn(6, 4, 7)}
    torch.manual_seed(0)
    out = aug(obs)
    for k in KEYS:
        assert out[k].shape == (6, 4, 3, 16, 16) and 0 <= out[k].min() and out[k].max() <= 1
        assert torch.allclose(out[k][:, 0], out[k][:, 3], atol=1e-6)  # the same draw on every frame
    assert torch.allclose(out["agentview_rgb"], out["eye_in_hand_rgb"], atol=1e-6)  # and on every camera
    assert torch.equal(out["joint_states"], obs["joint_states"])
    assert not torch.allclose(out["agentview_rgb"], clip)  # it does change the images (p 0.9 jitter)
    torch.manual_seed(0)
    again = aug(obs)
    assert torch.equal(again["agentview_rgb"], out["agentview_rgb"])  # seeded: a resumed run draws the same


def test_datamodule_augments_camera_policies_only(tmp_path):
    folder = tmp_path / "libero_goal"
    folder.mkdir()
    for name in resolve_suite("libero_goal").env_names[:1]:
        write_libero_file(folder / f"{name}_demo.hdf5")
    cams = RobotDataModule(suite="libero_goal", root=str(tmp_path), image_size=16, demos=2)
    assert isinstance(cams.stream.train_transform, CameraAugment) and cams.stream.train_transform.image_keys == KEYS
    assert RobotDataModule(suite="libero_goal", root=str(tmp_path), image_size=16, augment=False).camera_augment is None
    assert RobotDataModule(suite="libero_goal", root=str(tmp_path)).stream.train_transform is None


def test_training_batches_are_augmented_after_transfer(tmp_path):
    from types import SimpleNamespace

    folder = tmp_path / "libero_goal"
    folder.mkdir()
    write_libero_file(folder / f"{resolve_suite('libero_goal').env_names[0]}_demo.hdf5")
    dm = RobotDataModule(suite="libero_goal", root=str(tmp_path), image_size=16, demos=2, window=4, batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    dm.trainer = SimpleNamespace(training=False, global_step=0, global_rank=0)
    assert dm.on_after_batch_transfer(batch, 0) is batch  # evaluation: untouched
    dm.trainer = SimpleNamespace(training=True, global_step=5, global_rank=0)
    out = dm.on_after_batch_transfer(batch, 0)
    assert not torch.equal(out["obs"]["agentview_rgb"], batch["obs"]["agentview_rgb"])
    assert torch.equal(out["obs"]["joint_states"], batch["obs"]["joint_states"]) and out["actions"] is batch["actions"]
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)["obs"]["agentview_rgb"], out["obs"]["agentview_rgb"])
