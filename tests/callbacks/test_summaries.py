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
