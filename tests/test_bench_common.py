"""The benches' paired ratio: each round's own ratio, then their median (bench/common.py)."""
from bench.common import paired_ratio


def test_paired_ratio_is_the_median_of_each_rounds_ratio_not_the_ratio_of_medians():
    # the machine ran at half speed in round 2 for both rows and in round 3 for the base alone: the medians give
    # 90 / 50 = 1.8x, while the row ran at 0.9x of the base run beside it in two rounds of three
    row = {"rounds": [90, 45, 100]}
    base = {"rounds": [100, 50, 50]}
    # per round: 0.9, 0.9, 2.0 -> median 0.9
    assert paired_ratio(row, base) == 0.9


def test_rounds_where_either_run_failed_are_left_out_and_an_even_count_averages_the_middle_pair():
    row = {"rounds": [80, None, 120, 60, 100]}
    base = {"rounds": [100, 100, None, 100, 80]}
    # kept rounds 1, 4, 5: 0.8, 0.6, 1.25 -> 0.8
    assert paired_ratio(row, base) == 0.8
    # kept rounds 1 and 4 only: 0.8, 0.6 -> 0.7
    assert abs(paired_ratio({"rounds": [80, 60]}, {"rounds": [100, 100]}) - 0.7) < 1e-12


def test_no_common_round_gives_no_ratio():
    assert paired_ratio({"rounds": [None, 5]}, {"rounds": [3, None]}) is None
    assert paired_ratio({"runs": [1.0]}, {"runs": [1.0]}) is None
