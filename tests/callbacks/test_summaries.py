import numpy as np
import pytest

from callbacks.continual_metrics import summarize

# R[i][j]: accuracy on task j after training task i (3 tasks); unseen entries measured too.
R = [
    [90.0, 10.0, 20.0],
    [70.0, 80.0, 30.0],
    [60.0, 75.0, 85.0],
]
B = [50.0, 5.0, 25.0]  # untrained model


def test_summaries_against_hand_computation():
    s = summarize(R, B)
    assert s["average_accuracy"] == pytest.approx((60 + 75 + 85) / 3)
    assert s["average_incremental_accuracy"] == pytest.approx((90 + (70 + 80) / 2 + (60 + 75 + 85) / 3) / 3)
    # forgetting: task 0: max(90, 70, 60) - 60 = 30; task 1: max(80, 75) - 75 = 5
    assert s["forgetting"] == pytest.approx((30 + 5) / 2)
    # Chaudhry et al. leave the final row out of the maximum: task 0: max(90, 70) - 60; task 1: 80 - 75
    assert s["forgetting_chaudhry"] == pytest.approx((30 + 5) / 2)
    # bwt: (60 - 90 + 75 - 80) / 2
    assert s["bwt"] == pytest.approx((-30 - 5) / 2)
    # fwt: (R[0][1] - b1 + R[1][2] - b2) / 2 = (10 - 5 + 30 - 25) / 2
    assert s["fwt"] == pytest.approx(5.0)


def test_forgetting_uses_the_best_earlier_score_not_only_the_diagonal():
    m = [[50.0, 0.0], [0.0, 0.0]]
    m2 = [[50.0, 0.0, 0.0], [80.0, 60.0, 0.0], [40.0, 60.0, 70.0]]
    assert summarize(m2)["forgetting"] == pytest.approx((80 - 40 + 0) / 2)
    assert summarize(m2)["bwt"] == pytest.approx((40 - 50 + 0) / 2)
    assert summarize(m)["forgetting"] == pytest.approx(50.0)


def test_the_two_forgettings_differ_where_a_task_improves_at_the_end():
    # task 0 rises in the final row: Mammoth's maximum includes that row (forgetting 0), Chaudhry's does not
    m = [[50.0, 0.0, 0.0], [40.0, 60.0, 0.0], [70.0, 45.0, 80.0]]
    s = summarize(m)
    assert s["forgetting"] == pytest.approx((0 + 15) / 2)  # max(50, 40, 70) - 70; max(60, 45) - 45
    assert s["forgetting_chaudhry"] == pytest.approx((-20 + 15) / 2)  # max(50, 40) - 70; 60 - 45


def test_mammoths_fwt_is_the_change_a_task_start_makes_to_that_task():
    from callbacks.continual_metrics import task_start_transfer

    before, after = [None, 10.0, 20.0], [None, 30.0, 20.0]  # task 1's start lifts it by 20, task 2's by 0
    assert task_start_transfer(R, before, after) == pytest.approx((20 + 0) / 2)
    assert task_start_transfer([R[0], R[1], [None] * 3], before, after) == pytest.approx(20.0)  # tasks 1..L
    assert task_start_transfer([R[0], [None] * 3, [None] * 3], before, after) is None  # needs a task 1
    assert task_start_transfer(R, [None, 10.0, None], after) is None  # a missing point


def test_partial_matrix_uses_last_trained_row():
    partial = [R[0], R[1], [None, None, None]]
    s = summarize(partial, B)
    assert s["average_accuracy"] == pytest.approx(75.0)
    assert s["forgetting"] == pytest.approx(20.0)
    assert s["fwt"] == pytest.approx(5.0)  # R[0][1] - b1


def test_single_task_has_no_transfer_figures():
    s = summarize([[88.0]], [40.0])
    assert s["average_accuracy"] == 88.0
    assert s["forgetting"] is None and s["bwt"] is None and s["fwt"] is None


def test_one_task_by_hand():
    # one task: both averages are its only score; forgetting, bwt and fwt need an older task, so they do not exist
    expected = {
        "average_accuracy": 50.0,
        "average_incremental_accuracy": 50.0,
        "forgetting": None,
        "forgetting_chaudhry": None,
        "bwt": None,
    }
    assert summarize([[50.0]]) == {**expected, "fwt": None}
    assert summarize([[50.0]], [10.0]) == {**expected, "fwt": None}
    assert summarize([[None]]) == dict.fromkeys((*expected, "fwt"))  # not trained yet: nothing exists


def test_libero_summary_of_one_task():
    from callbacks.continual_metrics import libero_summary

    # curve 20, 70, 60: held at its peak -> 20, 70, 70; FWT = 160 / 3; NBT needs a later task: None;
    # AUC = (FWT + no later scores) / (K - k) = FWT / 1
    s = libero_summary([[60.0]], {0: [[0, 20.0], [2, 70.0], [4, 60.0]]})
    assert s["fwt"] == pytest.approx(160 / 3) and s["auc"] == pytest.approx(160 / 3) and s["nbt"] is None


def test_one_task_scores_tables_and_heatmap():
    import io

    import torch
    from rich.console import Console

    from callbacks.continual_metrics import PerTaskMean, heatmap, matrix_table, per_task_scores, summary_table

    metric = PerTaskMean(1)
    metric.update(torch.tensor([1.0, 0.0, 1.0, 1.0]), 0)
    assert per_task_scores(metric, 100.0) == [75.0]  # a list of one, not the bare float torchmetrics returns
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(matrix_table([[75.0]], ["digits"], "R"))
    console.print(summary_table({"run": summarize([[75.0]])}, "summary"))
    lines = [line.strip("│┃ ").split() for line in console.export_text().splitlines()]
    assert ["after", "T1", "│", "75.00"] in lines
    assert ["run", "│", "75.00", "│", "75.00", "│", "-", "│", "-", "│", "-", "│", "-"] in lines
    image = heatmap([[75.0]], "accuracy")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    # the value is written in its cell: the same colour (the largest value) with other digits differs
    assert not np.array_equal(image, heatmap([[76.0]], "accuracy"))


def test_heatmap_colours_each_cell_by_its_value_and_leaves_unscored_cells_grey():
    from collections import Counter

    from matplotlib import colormaps

    from callbacks.continual_metrics import EMPTY_CELL, heatmap

    def colour(x):
        return tuple(round(255 * c) for c in colormaps["viridis"](x)[:3])

    image = heatmap([[100.0, None], [50.0, 100.0]], "accuracy")  # viridis from 0 to the largest value
    counts = Counter(map(tuple, image.reshape(-1, 3).tolist()))
    top, half, empty = counts[colour(1.0)], counts[colour(0.5)], counts[EMPTY_CELL]
    assert half > 400 and 1.6 < top / half < 2.4  # two cells at 100, one at 50 (less their digits)
    assert empty > half  # one cell not scored, with no digits in it
    assert counts[colour(0.0)] == 0
    # a value that is not finite is a grey cell and leaves the others' scale as it was
    spoiled = heatmap([[float("nan"), None], [50.0, 100.0]], "accuracy")
    spoiled_counts = Counter(map(tuple, spoiled.reshape(-1, 3).tolist()))
    assert spoiled_counts[colour(0.5)] == half and spoiled_counts[EMPTY_CELL] > empty


def test_multitask_training_counts_every_task_as_seen():
    """`train_on: all` (a policy's pretraining, stopped after one span): every task was trained from the
    start, so the average is over the whole row, not only over task 0."""
    partial = [[0.0, 40.0, 60.0], [None, None, None], [None, None, None]]
    assert summarize(partial)["average_accuracy"] == 0.0  # the incremental reading: task 0 alone
    s = summarize(partial, seen_all=True)
    assert s["average_accuracy"] == pytest.approx((0 + 40 + 60) / 3)
    assert s["average_incremental_accuracy"] == pytest.approx((0 + 40 + 60) / 3)
    assert summarize(R, seen_all=True)["average_incremental_accuracy"] == pytest.approx((40 + 60 + 73.333333) / 3)
