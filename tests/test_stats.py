"""coup_fast.stats: the intervals cover the true accuracy at their nominal rate in simulation, and the sign test is
the binomial tail."""
import math

import numpy as np
import pytest

from coup_fast import stats

# Coverage of a 95 % interval over S simulated evaluations has Monte-Carlo standard error sqrt(.95 .05 / S):
# 0.005 at S = 2000, so a true rate of 0.95 lands in [0.935, 0.965] with probability > 0.997.
S = 2000
LOW, HIGH = 0.935, 0.965


def _coverage_wilson(n: int, p: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for k in rng.binomial(n, p, S):
        lo, hi = stats.wilson_interval(int(k), n)
        hits += lo <= p <= hi
    return hits / S


@pytest.mark.parametrize("n,p", [(32, 0.5), (32, 0.8), (100, 0.6), (300, 0.3)])
def test_wilson_covers_a_known_accuracy_at_the_nominal_rate(n, p):
    # Worst-of-R: each image robust (1) or not (0) with the defense's true robust accuracy p
    assert LOW <= _coverage_wilson(n, p, seed=n) <= HIGH


def test_wilson_does_not_collapse_near_100_percent():
    # the normal interval p +- 1.96 sqrt(p (1 - p) / n) is [1, 1] for 32 of 32 and covers p = 0.97 rarely;
    # Wilson's discreteness makes its coverage oscillate, but it stays near the nominal level
    assert _coverage_wilson(32, 0.97, seed=1) >= 0.90
    lo, hi = stats.wilson_interval(32, 32)
    assert hi == 1.0 and lo == pytest.approx(32 / (32 + 1.959964**2), abs=1e-6)  # the closed form at k = n


def _simulated_avg(rng, n, runs, a, b):
    """n images with accuracies p_i ~ Beta(a, b) (mean a / (a + b)), each purified `runs` times."""
    p = rng.beta(a, b, n)
    return rng.binomial(runs, p) / runs


@pytest.mark.parametrize("n,runs,a,b", [(32, 10, 0.3, 0.1), (64, 10, 0.5, 0.3), (300, 10, 0.2, 0.2), (32, 4, 2.0, 2.0),
                                        (100, 10, 3.0, 0.2)])
def test_mean_interval_covers_a_known_accuracy_at_the_nominal_rate(n, runs, a, b):
    # Avg: per-image accuracies k_i / R from heterogeneous images, most near 0 or 1 as on real defenses
    rng = np.random.default_rng(n * runs)
    true = a / (a + b)
    hits = 0
    for _ in range(S):
        lo, hi = stats.mean_interval(_simulated_avg(rng, n, runs, a, b).tolist(), runs)
        hits += lo <= true <= hi
    assert LOW <= hits / S <= HIGH


def test_mean_interval_keeps_its_coverage_where_a_percentile_bootstrap_does_not():
    # 32 images almost all correct (true mean 0.976): the percentile bootstrap over images, the independent
    # reference, is too narrow there; the effective-size Wilson interval is not
    rng = np.random.default_rng(7)
    true, boot_hits, hits = 20 / 20.5, 0, 0
    for _ in range(S):
        values = _simulated_avg(rng, 32, 10, 20.0, 0.5)
        means = values[rng.integers(0, 32, (500, 32))].mean(1)
        boot_hits += np.quantile(means, 0.025) <= true <= np.quantile(means, 0.975)
        lo, hi = stats.mean_interval(values.tolist(), 10)
        hits += lo <= true <= hi
    assert hits / S >= 0.92 and boot_hits / S < hits / S


def test_mean_interval_matches_the_bootstrap_in_the_interior():
    rng = np.random.default_rng(3)
    values = _simulated_avg(rng, 200, 10, 2.0, 1.0)
    means = values[rng.integers(0, 200, (4000, 200))].mean(1)
    lo, hi = stats.mean_interval(values.tolist(), 10)
    assert lo == pytest.approx(np.quantile(means, 0.025), abs=0.01)
    assert hi == pytest.approx(np.quantile(means, 0.975), abs=0.01)


def test_mean_interval_with_one_run_is_wilsons_and_without_spread_uses_all_draws():
    values = [1, 0, 1, 1, 0, 1, 1, 1]
    assert stats.mean_interval(values, 1) == pytest.approx(stats.wilson_interval(6, 8))
    # every image 10 of 10: no spread to estimate, n_eff = n R = 80 draws
    assert stats.mean_interval([1.0] * 8, 10) == pytest.approx(stats.wilson_interval(80, 80))
    assert stats.mean_interval([0.5] * 8, 10)[0] > stats.wilson_interval(4, 8)[0]  # tighter than 8 coin flips


def test_sign_test_is_the_binomial_tail():
    assert stats.sign_test(0, 0) == 1.0
    assert stats.sign_test(5, 0) == pytest.approx(1 / 32)
    assert stats.sign_test(3, 2) == pytest.approx(sum(math.comb(5, k) for k in range(3, 6)) / 32)
    assert stats.sign_test(2, 9) > 0.9


@pytest.mark.parametrize("call,name", [
    (lambda: stats.wilson_interval(5, 0), "n"),
    (lambda: stats.wilson_interval(7, 5), "successes"),
    (lambda: stats.wilson_interval(1.5, 5), "successes"),
    (lambda: stats.mean_interval([], 4), "values"),
    (lambda: stats.mean_interval([0.5, 1.2], 4), "values"),
    (lambda: stats.mean_interval([0.5], 0), "runs"),
    (lambda: stats.wilson_interval(1, 2, level=1.5), "level"),
    (lambda: stats.sign_test(-1, 2), "wins"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        call()


@pytest.mark.parametrize("n,runs,a,b", [(32, 10, 4.0, 1.5), (64, 10, 1.0, 1.0), (128, 9, 8.0, 2.0)])
def test_majority_vote_interval_covers_the_known_mv_accuracy(n, runs, a, b):
    """MV through the table's own code path: images with accuracies p_i ~ Beta(a, b), each purified R times; the
    deployment that votes over R purifications classifies an image correctly with probability
    q(p) = P(Binomial(R, p) > R / 2), so the true MV accuracy is E_p[q(p)] (computed by numerical integration).  The
    95 % interval of table.cell covers it at the nominal rate."""
    import torch

    from coup_fast.table import CLEAN, Table, Verdicts

    grid = np.linspace(0.0005, 0.9995, 2000)
    k = np.arange(runs + 1)
    binom = np.array([math.comb(runs, int(j)) for j in k], dtype=float)
    q = ((binom * grid[:, None] ** k * (1 - grid[:, None]) ** (runs - k))[:, k > runs / 2]).sum(1)
    density = grid ** (a - 1) * (1 - grid) ** (b - 1)
    truth = float((q * density).sum() / density.sum())
    rng = np.random.default_rng(n + runs)
    hits, reps = 0, 600
    for _ in range(reps):
        p = rng.beta(a, b, n)
        correct = torch.from_numpy(rng.random((runs, n)) < p)
        table = Table(["d"], [], ["Linf"], {"Linf": 0.1}, samples={("d", CLEAN, "Linf"): Verdicts(correct, [""] * n)})
        cell = table.cell("d", CLEAN, "Linf")
        assert cell["mv"] == pytest.approx(100 * float((correct.sum(0) > runs / 2).double().mean()))
        hits += cell["mv_lo"] / 100 <= truth <= cell["mv_hi"] / 100
    # 600 replicates: standard error of the coverage ~0.009, so 0.92 .. 0.98 holds a true 0.95 with p > 0.999
    assert 0.92 <= hits / reps <= 0.98, hits / reps
