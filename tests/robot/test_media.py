"""Rollout media: GIFs of camera frames and state-trajectory figures reach TensorBoard and files, and a robot
fit writes one per task and evaluation (a figure here, where MuJoCo cannot render; a GIF where it can)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cli.errors import ConfigError
from datamodules.robot.media import gif_bytes, log_rollout, low_dim, write_rollout
from tests.conftest import config, fit_args

TASKS = "[reach-v3, handle-press-side-v3]"


def frames(t: int = 5, size: int = 8) -> np.ndarray:
    """Flat-coloured frames (exact in a GIF palette): frame i is grey level 40 * i."""
    return np.stack([np.full((size, size, 3), 40 * i, dtype=np.uint8) for i in range(t)])


def images_of(log_dir) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    return {tag: events.Images(tag) for tag in events.Tags()["images"]}


def test_a_gif_holds_every_frame_in_order():
    gif = Image.open(io.BytesIO(gif_bytes(frames())))
    assert gif.format == "GIF" and gif.n_frames == 5 and gif.info["loop"] == 0
    for i in range(5):
        gif.seek(i)
        assert np.array_equal(np.asarray(gif.convert("RGB")), frames()[i])


def test_low_dim_leaves_images_out():
    obs = {"agentview_rgb": np.zeros((3, 4, 4)), "state": np.arange(3.0), "gripper": np.array([7.0])}
    assert low_dim(obs).tolist() == [7.0, 0.0, 1.0, 2.0]  # key order: gripper, state


def test_tensorboard_gets_a_gif_with_frames_and_a_figure_without(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    states = np.cumsum(np.ones((6, 5)), axis=0)
    assert log_rollout(writer, "rollout/reach-v3", frames(), states, True, step=3) == "video"
    assert log_rollout(writer, "rollout/push-v3", None, states, False, step=3) == "figure"
    writer.close()
    images = images_of(tmp_path)
    (gif,) = images["rollout/reach-v3"]
    assert gif.step == 3 and (gif.width, gif.height) == (8, 8) and gif.encoded_image_string.startswith(b"GIF89a")
    (figure,) = images["rollout/push-v3"]
    assert figure.encoded_image_string.startswith(b"\x89PNG")


def test_files_are_a_gif_or_a_png_and_bad_requests_are_one_line(tmp_path):
    states = np.zeros((4, 3))
    assert Image.open(write_rollout(str(tmp_path / "a.gif"), frames(), states, True, "t")).n_frames == 5
    assert Image.open(write_rollout(str(tmp_path / "a.png"), None, states, True, "t")).format == "PNG"
    for name, words in [("b.gif", "cannot render"), ("b.mp4", ".gif")]:
        with pytest.raises(ConfigError, match=words) as err:
            write_rollout(str(tmp_path / name), None, states, True, "t")
        assert "\n" not in str(err.value) and name in str(err.value)
        assert not (tmp_path / name).exists()


@pytest.mark.slow
def test_a_robot_fit_sends_each_task_s_episode_0_to_tensorboard_and_rollout_replays_it(tmp_path, capsys):
    from cli.main import LifelongCLI, main

    demos = tmp_path / "demos"
    main(["make-demos", "--tasks", TASKS, "--demos", "2", "--horizon", "60", "--out", str(demos), "--progress=false"])
    args = [
        "--data.init_args.suite=null",
        f"--data.init_args.tasks={TASKS}",
        f"--data.init_args.root={demos}",
        "--data.init_args.demos=2",
        "--data.init_args.horizon=60",
        "--data.init_args.eval_episodes=2",
        "--model.init_args.policy_checkpoint=null",
        "--model.init_args.rollout_workers=0",
        "--model.init_args.language_encoder=tiny",
        "--task_switch.epochs_per_task=1",
        "--continual_metrics.curve_every=null",
        "--continual_metrics.keep_best=false",
    ]
    cli = LifelongCLI(args=fit_args("robot/sequential_cw3.yaml", tmp_path / "run", *args))
    images = {tag: v for tag, v in images_of(cli.trainer.log_dir).items() if tag.startswith("rollout/")}
    assert set(images) == {"rollout/reach-v3", "rollout/handle-press-side-v3"}, set(images)
    # Every task is evaluated untrained, after task 0 and after task 1 (no curves; rollouts take no extra
    # FWT points).
    assert [e.step for e in images["rollout/reach-v3"]] == sorted(e.step for e in images["rollout/reach-v3"])
    counts = {tag: len(v) for tag, v in images.items()}
    assert counts == {"rollout/reach-v3": 3, "rollout/handle-press-side-v3": 3}, counts

    # `lifelong rollout` of the checkpoint: episode 0 (the initial state the evaluation records), a PNG here.
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    rollout = ["rollout", "-c", config("robot/sequential_cw3.yaml"), *(f"--set={a}" for a in args)]
    rollout += ["--ckpt_path", str(ckpt), "--task", "handle-press-side-v3"]
    main([*rollout, "--out", str(tmp_path / "episode.png")])
    printed = capsys.readouterr().out
    assert "handle-press-side-v3 episode 0: " in printed and Image.open(tmp_path / "episode.png").format == "PNG"
    for bad, words in [(["--out", str(tmp_path / "e.gif")], "cannot render"), (["--task", "push-v3"], "--task")]:
        with pytest.raises(SystemExit) as exit_info:
            main([*rollout, "--out", str(tmp_path / "e.png"), *bad])
        assert exit_info.value.code == 2
        (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert line.startswith("lifelong: error: ") and words in line
