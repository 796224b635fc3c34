"""Gao et al. curves, the best-of-n estimator and the over-optimisation monitor, by hand."""

import math

import numpy as np
import pytest

from preftune.evaluation.gao import best_of_n_expectation, bon_kl, fit_gao, plot_overoptimisation
from preftune.training.monitor import overoptimisation_alert


def test_bon_kl_analytic_values():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(0.193147, abs=1e-6)  # log 2 - 1/2
    assert bon_kl(4) == pytest.approx(0.636294, abs=1e-6)  # log 4 - 3/4
    with pytest.raises(ValueError):
        bon_kl(0)


def test_fit_recovers_rl_curve_and_its_peak():
    d = np.array([0.0, 0.5, 1.0, 2.0, 3.0])
    gold = 1 + d * (2 - 0.5 * np.log(np.where(d > 0, d, 1)))
    assert gold[3] == pytest.approx(1 + 2 * (2 - 0.5 * math.log(2)))  # 4.306853
    fit = fit_gao(d, gold, "rl")
    assert (fit.alpha, fit.beta, fit.offset) == (pytest.approx(2.0), pytest.approx(0.5), 1.0)
    assert fit.d_peak == pytest.approx(math.exp(2 / 0.5 - 1))  # R' = a - b (log d + 1) = 0
    assert fit.predict([1.0])[0] == pytest.approx(3.0)


def test_fit_without_a_point_at_zero_fits_the_intercept():
    d = np.array([0.5, 1.0, 2.0, 3.0])
    gold = 1 + d * (2 - 0.5 * np.log(d))
    fit = fit_gao(d, gold, "rl")
    assert (fit.alpha, fit.beta, fit.offset) == (pytest.approx(2.0), pytest.approx(0.5), pytest.approx(1.0))
    with pytest.raises(ValueError):
        fit_gao(d[:2], gold[:2], "rl")


def test_fit_recovers_bon_curve():
    d = np.array([0.0, 0.4, 0.8, 1.2])
    gold = d * (1.5 - 0.75 * d)
    fit = fit_gao(d, gold, "bon")
    assert (fit.alpha, fit.beta) == (pytest.approx(1.5), pytest.approx(0.75))
    assert fit.d_peak == pytest.approx(1.0)  # a / (2 b)


def test_best_of_n_expectation_averages_all_subsets():
    proxy, gold = [3.0, 1.0, 2.0], [30.0, 10.0, 20.0]
    assert best_of_n_expectation(proxy, gold, 1) == pytest.approx(20.0)  # plain mean
    assert best_of_n_expectation(proxy, gold, 3) == pytest.approx(30.0)  # the proxy's argmax
    # Subsets of 2: {0,1} -> 30, {0,2} -> 30, {1,2} -> 20.
    assert best_of_n_expectation(proxy, gold, 2) == pytest.approx(80 / 3)
    with pytest.raises(ValueError):
        best_of_n_expectation(proxy, gold, 4)


def _rows(gold, proxy):
    return [{"step": 10 * (i + 1), "eval/gold": g, "eval/proxy": p} for i, (g, p) in enumerate(zip(gold, proxy))]


def test_monitor_fires_when_gold_falls_while_proxy_rises():
    alert = overoptimisation_alert(_rows([0, 1, 2, 1.5, 1.0], [0, 1, 2, 3, 4]), drop_fraction=0.2)
    # Best gain 2 at step 30; at step 40 the gain 1.5 <= 0.8 * 2 and proxy 3 > 2.
    assert (alert.step, alert.best_step, alert.drop) == (40, 30, pytest.approx(0.25))
    assert "step 30" in alert.message()
    # A larger threshold waits for the deeper drop at step 50.
    assert overoptimisation_alert(_rows([0, 1, 2, 1.5, 1.0], [0, 1, 2, 3, 4]), drop_fraction=0.4).step == 50
    # Gold and proxy falling together is not over-optimisation.
    assert overoptimisation_alert(_rows([0, 1, 2, 1.5, 1.0], [0, 1, 2, 1, 0])) is None
    # Rows without a gold value (no gold judge) never fire.
    assert overoptimisation_alert([{"step": 1, "eval/proxy": 1.0}, {"step": 2, "eval/proxy": 2.0}]) is None


def test_plot_fits_ppo_and_bon_points():
    d = np.array([0.0, 0.5, 1.0, 2.0])
    ppo = [{"step": i, "eval/kl": float(x * x), "eval/gold": float(x * (1 - 0.3 * math.log(x)) if x else 0.0),
            "eval/proxy": float(x)} for i, x in enumerate(d)]
    bon = [{"n": n, "sqrt_kl": math.sqrt(bon_kl(n)), "gold": math.sqrt(bon_kl(n)) * (1 - 0.2 * math.sqrt(bon_kl(n))),
            "proxy": 0.1 * n} for n in (1, 2, 4, 8)]
    fig, fits = plot_overoptimisation(ppo, bon)
    assert fits["rl"].beta == pytest.approx(0.3)
    assert fits["bon"].beta == pytest.approx(0.2)
    assert len(fig.axes[0].lines) == 6  # proxy, gold, fit for each


def test_too_few_informative_points_refuse_a_fit_and_the_plot_shows_the_points_alone():
    """Found by a reading of the code: the point at d = 0 (and a repeated d) counted towards the
    two a fit needs, so one equation gave two parameters; and a best-of-n row without gold made
    the plot call the fit on two points and raise."""
    with pytest.raises(ValueError, match="two distinct"):
        fit_gao([0.0, 1.0], [0.0, 1.0], "bon")  # alpha - beta = 1: any such pair fits
    with pytest.raises(ValueError, match="two distinct"):
        fit_gao([0.0, 1.0, 1.0], [0.0, 1.0, 1.0], "bon")
    with pytest.raises(ValueError, match="three distinct"):
        fit_gao([0.5, 1.0, 1.0], [0.5, 1.0, 1.0], "rl")
    fig, fits = plot_overoptimisation(bon_rows=[{"sqrt_kl": 0.0, "gold": None, "proxy": 0.0},
                                                {"sqrt_kl": 1.0, "gold": 1.0, "proxy": 1.0},
                                                {"sqrt_kl": 2.0, "gold": 1.5, "proxy": 2.0}])
    assert fits["bon"] is None and len(fig.axes[0].lines) == 2  # proxy and gold, no fit

