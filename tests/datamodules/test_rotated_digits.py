"""Rotated-Digits: the domain-incremental stream (one rotation per task, all classes and images in every task)."""

from __future__ import annotations

import pytest
import torch

from cli.errors import ConfigError
from datamodules import RotatedDigits, SplitDigits
from datamodules.rotated_digits import rotate
from tests.conftest import read_reports


def test_angles_are_reproducible_in_range_and_differ_between_tasks():
    angles = RotatedDigits(rotation_seed=3).angles
    assert angles == RotatedDigits(rotation_seed=3).angles  # fixed by rotation_seed alone
    assert len(angles) == 20 and len(set(angles)) == 20
    assert all(0 <= a < 180 for a in angles)
    assert RotatedDigits(rotation_seed=4).angles != angles
    # Task t's angle does not depend on the stream's length.
    assert RotatedDigits(num_tasks=3, rotation_seed=3).angles == angles[:3]
    assert RotatedDigits(num_tasks=2, angles=[0, 45.5]).task_names == ["rotation 0.0 deg", "rotation 45.5 deg"]


def test_a_90_degree_rotation_is_rot90_counter_clockwise():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 0, 7] = 1.0  # top right
    image[0, 0, 2, 5] = 0.5
    turned = rotate(image, 90.0)
    torch.testing.assert_close(turned, torch.rot90(image, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    assert turned[0, 0, 0, 0] == pytest.approx(1.0, abs=1e-5)  # top right -> top left
    assert rotate(image, 0.0) is image


def test_angle_zero_is_the_plain_digits_and_90_is_rot90_of_them():
    dm = RotatedDigits(num_tasks=2, angles=[0.0, 90.0])
    dm.setup()
    plain = SplitDigits(num_tasks=1)  # the same split, every class in one task, labels unchanged
    plain.setup()
    for ours, theirs in ((dm.train_dataset, plain.train_dataset), (dm.eval_dataset, plain.eval_dataset)):
        t0, t1, ref = ours(0).tensors, ours(1).tensors, theirs(0).tensors
        assert torch.equal(t0["x"], ref["x"]) and torch.equal(t0["y"], ref["y"])
        assert torch.equal(t1["y"], ref["y"]) and t1["task"].eq(1).all()
        torch.testing.assert_close(t1["x"], torch.rot90(ref["x"], 1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_every_task_holds_all_classes_and_all_images():
    dm = RotatedDigits(num_tasks=4)
    dm.setup()
    for datasets, n in ((dm.train_dataset, 1437), (dm.eval_dataset, 360)):
        for t in range(4):
            items = datasets(t).tensors
            assert len(items["x"]) == n and items["task"].eq(t).all()
            assert items["y"].unique().tolist() == list(range(10))
        assert not torch.allclose(datasets(0).tensors["x"], datasets(1).tensors["x"])
    stream = dm.stream
    assert stream.setting == "domain" and stream.num_classes == 10 and stream.num_tasks == 4
    assert stream.class_offsets == (0, 10, 10, 10, 10) and stream.input_shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"num_tasks": 0}, "data.num_tasks must be at least 1"),
        ({"num_tasks": 3, "angles": [0.0, 90.0]}, "data.angles has 2 angles for data.num_tasks=3"),
        ({"num_tasks": 1, "angles": [float("nan")]}, "data.angles must be finite"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        RotatedDigits(**kwargs)


def test_er_fits_three_rotations_and_reports_domain_il_accuracy_only(run_fit, tmp_path):
    run_fit(
        "classification/er_rotdigits.yaml",
        tmp_path,
        "--data.init_args.num_tasks=3",
        "--data.init_args.angles=[0, 10, 90]",
        "--task_switch.steps_per_task=40",
        "--trainer.log_every_n_steps=40",
    )
    (report,) = read_reports(tmp_path)
    assert report["metric"] == "accuracy" and set(report["metrics"]) == {"accuracy"}
    assert report["tasks"] == ["rotation 0.0 deg", "rotation 10.0 deg", "rotation 90.0 deg"]
    matrix = report["matrix"]
    assert len(matrix) == 3 and all(v is not None for row in matrix for v in row)
    assert len(report["untrained"]) == 3
    # No class is masked: the model of task 0 already scores the next, barely rotated task well (FWT's R[0][1]).
    assert matrix[0][0] > 50 and matrix[0][1] > 30
    assert set(report["summary"]) >= {"average_accuracy", "forgetting", "bwt", "fwt"}
