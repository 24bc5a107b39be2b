"""The one statistic every comparison here reports: a paired difference over seeds with its 95 % t-interval.

Two variants run with the same seed share the labeled split, the initial student and the sample order, so the
difference of their two figures cancels what the seed alone decides; its mean over n seeds, with the interval
mean +- t_{0.975, n-1} * sd / sqrt(n), says whether a gain is larger than the seed-to-seed noise (an interval
that spans 0 says it is not). Standard library only: bench/report.py uses it too.
"""
import math
import statistics

# t_{0.975} with n - 1 degrees of freedom, for the 95 % interval of a mean over n seeds
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired(reference, other):
    """Mean and 95 % t-interval of reference - other over the seeds both have ({seed: figure} each): {"n", "mean",
    "ci95"}, ci95 None for one seed; None when they share no seed."""
    diffs = [reference[seed] - other[seed] for seed in sorted(set(reference) & set(other))]
    if not diffs:
        return None
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return {"n": 1, "mean": round(mean, 2), "ci95": None}
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"n": len(diffs), "mean": round(mean, 2), "ci95": [round(mean - half, 2), round(mean + half, 2)]}


def interval_text(difference):
    """'+1.23 [-0.50, +2.96]', or '+1.23 (1 seed)'."""
    text = f"{difference['mean']:+.2f}"
    ci = difference["ci95"]
    return text + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " (1 seed)")
