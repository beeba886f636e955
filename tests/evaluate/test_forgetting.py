"""R-matrix metrics on hand-computed matrices: ACC, BWT/FWT with both divisors, both forgetting variants."""

from __future__ import annotations

import pytest

from tunelab.evaluate import forgetting as M

# rows = after stage t, columns = task i; task 0 improves a little at stage 1 (0.85) before being forgotten
R = [[0.80, 0.10, 0.00],
     [0.85, 0.90, 0.20],
     [0.70, 0.50, 0.95]]
B = [0.10, 0.00, 0.10]


def test_full_matrix_by_hand():
    assert M.average_accuracy(R) == pytest.approx((0.70 + 0.50 + 0.95) / 3)
    # BWT: ((0.70 - 0.80) + (0.50 - 0.90)) / (T - 1 = 2) = -0.25; the GEM code divides by T = 3
    assert M.backward_transfer(R, "T-1") == pytest.approx(-0.25)
    assert M.backward_transfer(R, "T") == pytest.approx(-0.5 / 3)
    # FWT: ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.10 - 0.00) + (0.20 - 0.10)) / 2 = 0.10; GEM: 0.2 / 3
    assert M.forward_transfer(R, B, "T-1") == pytest.approx(0.10)
    assert M.forward_transfer(R, B, "T") == pytest.approx(0.2 / 3)
    # forgetting just after learning: 0.80 - 0.70, 0.90 - 0.50; max-based: max(0.80, 0.85) - 0.70, 0.90 - 0.50
    assert M.forgetting(R, "just_after") == pytest.approx([0.10, 0.40])
    assert M.forgetting(R, "max") == pytest.approx([0.15, 0.40])
    m = M.r_matrix_metrics({"tasks": ["a", "b", "c"], "b": B, "R": R})
    assert m["forgetting"] == pytest.approx(0.25) and m["forgetting_max"] == pytest.approx(0.275)
    assert m["BWT"] == pytest.approx(-0.25) and m["BWT_T"] == pytest.approx(-0.5 / 3)
    assert m["FWT"] == pytest.approx(0.10) and m["FWT_T"] == pytest.approx(0.2 / 3)
    # the last task has no forgetting yet: it is left out
    assert m["forgetting_max_per_task"] == {"a": pytest.approx(0.15), "b": pytest.approx(0.40)}


def test_partial_stream_uses_the_tasks_seen_so_far():
    r = R[:2]  # two of three stages done
    assert M.average_accuracy(r) == pytest.approx((0.85 + 0.90) / 2)
    assert M.backward_transfer(r) == pytest.approx(0.85 - 0.80)  # positive: task 0 improved
    assert M.forward_transfer(r, B) == pytest.approx(0.10 - 0.00)
    assert M.forgetting(r) == pytest.approx([-0.05])
    assert M.backward_transfer(R[:1]) is None and M.forward_transfer(R[:1], B) is None


def test_missing_entries_leave_their_terms_out():
    r = [[0.8, None], [0.6, 0.9]]
    assert M.backward_transfer(r) == pytest.approx(-0.2)
    assert M.forward_transfer(r, [0.0, 0.1]) is None  # R[0][1] was not measured
    assert M.forward_transfer(r, None) is None


def test_general_retention_orients_the_ratio():
    before = {"ppl:w": {"primary": "bits_per_byte", "bits_per_byte": 1.0, "higher_is_better": False},
              "mc:a": {"primary": "acc_norm", "acc_norm": 0.5, "higher_is_better": True}}
    after = {"ppl:w": {"primary": "bits_per_byte", "bits_per_byte": 1.25, "higher_is_better": False},
             "mc:a": {"primary": "acc_norm", "acc_norm": 0.4, "higher_is_better": True}}
    g = M.general_retention(before, after)
    assert g["ppl:w"]["change"] == pytest.approx(0.25) and g["ppl:w"]["retained"] == pytest.approx(0.8)
    assert g["mc:a"]["change"] == pytest.approx(-0.1) and g["mc:a"]["retained"] == pytest.approx(0.8)


def test_report_uses_this_implementation():
    import tunelab.track.report as report

    assert report.r_matrix_metrics is M.r_matrix_metrics and report.validate_r_matrix is M.validate_r_matrix
    with pytest.raises(ValueError, match="R has 3 rows for 2 tasks"):
        M.validate_r_matrix({"tasks": ["a", "b"], "R": [[0, 0]] * 3}, "x")
    with pytest.raises(ValueError, match="joint must be a list of 2"):
        M.validate_r_matrix({"tasks": ["a", "b"], "R": [[0, 0]], "joint": [1]}, "x")
