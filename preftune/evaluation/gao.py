"""Over-optimisation: the Gao et al. (2022) scaling curves, best-of-n, and a drop monitor.

With ``d = sqrt(KL(pi || pi_init))`` the gold reward gained over the initial policy follows

* RL (PPO):    ``R(d) = d (alpha - beta log d)``
* best-of-n:   ``R(d) = d (alpha - beta d)``,  with ``KL_bon(n) = log n - (n - 1) / n``

Both are linear in (alpha, beta), so they are fitted by ordinary least squares. The curves describe
the gain over the initial policy: its gold reward ``R0`` is the point at ``d = 0`` when there is one
and otherwise a fitted intercept.

The report replays the over-optimisation rule (``preftune.training.monitor``, the one PPO runs live)
over a run's metrics: it fires when the gold gain has fallen a configurable fraction below its best
while the proxy reward is still above its value at the best gold step, the signature of a reward
model being gamed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from preftune.training.monitor import overoptimisation_alert

Curve = Literal["rl", "bon"]


def bon_kl(n: int) -> float:
    """The analytic KL of best-of-n sampling from the base policy: ``log n - (n - 1) / n``
    (an upper bound; exact for continuous rewards without ties)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    return math.log(n) - (n - 1) / n


def gao_features(d: np.ndarray, curve: Curve) -> np.ndarray:
    """The two regressors of ``R = alpha * f1 - beta * f2`` (``d log d`` is 0 at d = 0)."""
    d = np.asarray(d, dtype=np.float64)
    if curve == "rl":
        second = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    elif curve == "bon":
        second = d * d
    else:
        raise ValueError(f"unknown curve {curve!r} (rl or bon)")
    return np.stack([d, -second], axis=1)


@dataclass
class GaoFit:
    curve: Curve
    alpha: float
    beta: float
    offset: float  # the initial policy's gold reward, added back to the fitted gain
    n: int

    def predict(self, d) -> np.ndarray:
        features = gao_features(np.asarray(d, dtype=np.float64), self.curve)
        return self.offset + features @ np.array([self.alpha, self.beta])

    @property
    def d_peak(self) -> float | None:
        """Where the fitted gold reward peaks (None when it never turns down)."""
        if self.beta <= 0:
            return None
        return math.exp(self.alpha / self.beta - 1) if self.curve == "rl" else self.alpha / (2 * self.beta)

    def to_json(self) -> dict:
        return {"curve": self.curve, "alpha": self.alpha, "beta": self.beta, "offset": self.offset,
                "n": self.n, "d_peak": self.d_peak}


def fit_gao(d: Sequence[float], gold: Sequence[float], curve: Curve, offset: float | None = None) -> GaoFit:
    """Least-squares fit of ``gold = R0 + d (alpha - beta log d)`` (rl) or ``R0 + d (alpha - beta d)``
    (bon). ``R0`` is the initial policy's gold reward: ``offset`` if given, else the gold of a
    point at d = 0 if there is one (best-of-n with n = 1), else a third fitted parameter (a PPO run
    evaluates first after some steps, so no point sits at d = 0)."""
    d_arr, g = np.asarray(d, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    keep = np.isfinite(d_arr) & np.isfinite(g)
    d_arr, g = d_arr[keep], g[keep]
    if offset is None and (d_arr == 0).any():
        offset = float(g[d_arr == 0].mean())
    features = gao_features(d_arr, curve)
    # Distinct distances decide the fit: repeats, and with R0 known the points at d = 0, add no equation.
    informative = np.unique(d_arr).size if offset is None else np.unique(d_arr[d_arr > 0]).size
    if offset is None:
        if informative < 3:
            raise ValueError("need at least three distinct sqrt(KL) values to fit a Gao curve with its intercept")
        coef, *_ = np.linalg.lstsq(np.column_stack([np.ones_like(d_arr), features]), g, rcond=None)
        offset, coef = float(coef[0]), coef[1:]
    else:
        if informative < 2:
            raise ValueError("need at least two distinct sqrt(KL) values above 0 to fit a Gao curve")
        coef, *_ = np.linalg.lstsq(features, g - offset, rcond=None)
    return GaoFit(curve, float(coef[0]), float(coef[1]), float(offset), int(d_arr.size))


def best_of_n_expectation(proxy: Sequence[float], values: Sequence[float], n: int) -> float:
    """Expected ``values`` of the response best-of-n picks by ``proxy``, over all size-n subsets
    of the N samples of one prompt (the unbiased estimator of Gao et al.'s appendix, so one
    draw of max(n) samples serves every smaller n). With responses sorted by proxy ascending,
    the i-th (1-based) is the pick of C(i-1, n-1) of the C(N, n) subsets. Proxy ties are broken
    by sample order (the later sample counts as higher)."""
    p, v = np.asarray(proxy, dtype=np.float64), np.asarray(values, dtype=np.float64)
    N = p.size
    if not 1 <= n <= N:
        raise ValueError(f"n={n} needs 1..{N} samples")
    order = np.argsort(p, kind="stable")
    weights = np.array([math.comb(i, n - 1) for i in range(N)], dtype=np.float64) / math.comb(N, n)
    return float((weights * v[order]).sum())


# ---------------------------------------------------------------- plot


def plot_overoptimisation(ppo_rows: Sequence[dict] = (), bon_rows: Sequence[dict] = (), *,
                          title: str = "Gold and proxy reward against sqrt(KL)"):
    """A matplotlib figure: gold (filled) and proxy (hollow) reward against d = sqrt(KL) for PPO
    metrics rows (``eval/sqrt_kl`` or ``eval/kl``, ``eval/gold``, ``eval/proxy``) and best-of-n
    rows (``sqrt_kl``, ``gold``, ``proxy`` as ``preftune bon`` writes them), with the Gao fits of
    the gold points. Returns (figure, {"rl": fit or None, "bon": fit or None})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    fits = {"rl": None, "bon": None}
    series = [("rl", "PPO", "tab:blue", [_ppo_point(r) for r in ppo_rows]),
              ("bon", "best-of-n", "tab:orange", [(r.get("sqrt_kl"), r.get("gold"), r.get("proxy")) for r in bon_rows])]
    for curve, label, colour, pts in series:
        pts = [p for p in pts if p[0] is not None]
        if not pts:
            continue
        d = np.array([p[0] for p in pts], dtype=np.float64)
        gold = np.array([np.nan if p[1] is None else p[1] for p in pts], dtype=np.float64)
        proxy = np.array([np.nan if p[2] is None else p[2] for p in pts], dtype=np.float64)
        if np.isfinite(proxy).any():
            ax.plot(d, proxy, "o", mfc="none", color=colour, label=f"{label} proxy")
        if np.isfinite(gold).any():
            ax.plot(d, gold, "o", color=colour, label=f"{label} gold")
            try:
                fit = fits[curve] = fit_gao(d, gold, curve)
            except ValueError:  # too few points to fit: the points alone are shown
                fit = None
            if fit is not None:
                grid = np.linspace(0, d[np.isfinite(d)].max() * 1.05, 100)
                ax.plot(grid, fit.predict(grid), "-", color=colour, alpha=0.7,
                        label=f"{label} gold fit (a={fit.alpha:.3g}, b={fit.beta:.3g})")
    ax.set_xlabel("d = sqrt(KL(policy || initial)) [sqrt nats]")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, fits


def _ppo_point(row: dict) -> tuple[float | None, float | None, float | None]:
    d = row.get("eval/sqrt_kl")
    if d is None and row.get("eval/kl") is not None:
        d = math.sqrt(max(row["eval/kl"], 0.0))
    return d, row.get("eval/gold"), row.get("eval/proxy")


def overoptimisation_section(ppo_rows: Sequence[dict] = (), bon_rows: Sequence[dict] = (),
                             drop_fraction: float = 0.1) -> str:
    """The report section: the monitor's banner (if it fired), the plot with fits, the fit table."""
    from preftune.evaluation import report as R

    parts = []
    alert = overoptimisation_alert(ppo_rows, drop_fraction) if ppo_rows else None
    if alert is not None:
        parts.append(R.banner(alert.message(), "warn"))
    if not R.plots_available():
        parts.append(R.NO_PLOTS)
    elif any(_ppo_point(r)[0] is not None for r in ppo_rows) or bon_rows:
        fig, fits = plot_overoptimisation(ppo_rows, bon_rows)
        parts.append(R.figure(fig, "gold and proxy reward against sqrt(KL)"))
        fitted = [f for f in fits.values() if f is not None]
        if fitted:
            parts.append(R.table(["curve", "alpha", "beta", "gold at d=0", "points", "fitted peak d"],
                                 [[f.curve, f.alpha, f.beta, f.offset, f.n, f.d_peak] for f in fitted]))
        parts.append(R.paragraph("Fits: RL gold = R0 + d (alpha - beta log d), best-of-n gold = R0 + d (alpha - "
                                 "beta d), d = sqrt(KL) (Gao et al. 2022); best-of-n KL is the analytic bound "
                                 "log n - (n-1)/n.", note=True))
    else:
        parts.append(R.paragraph("No over-optimisation data (eval/gold, eval/proxy, eval/kl rows) yet.", note=True))
    parts += disagreement_parts(ppo_rows)
    return R.section("Over-optimisation", *parts)


def disagreement_parts(ppo_rows: Sequence[dict]) -> list[str]:
    """When the proxy is an ensemble: its members' disagreement on the held-out samples at each
    evaluation, next to proxy and gold (rising disagreement is the policy leaving the data the
    reward models agree on)."""
    from preftune.evaluation import report as R

    rows = [r for r in ppo_rows if r.get("eval/proxy_uncertainty") is not None]
    if not rows:
        return []
    parts = [R.paragraph("The proxy is an ensemble of reward models: their disagreement (standard deviation "
                         "over members, averaged over the held-out samples) as training goes.")]
    if R.plots_available():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        steps = [r["step"] for r in rows]
        for key, label, style in (("eval/proxy", "proxy", "o--"), ("eval/gold", "gold", "o-")):
            if all(r.get(key) is not None for r in rows):
                ax.plot(steps, [r[key] for r in rows], style, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("reward")
        twin = ax.twinx()
        twin.plot(steps, [r["eval/proxy_uncertainty"] for r in rows], "s:", color="tab:red", label="disagreement")
        twin.set_ylabel("members' disagreement")
        lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
        fig.tight_layout()
        parts.append(R.figure(fig, "ensemble disagreement against training steps"))
    parts.append(R.table(["step", "sqrt KL", "proxy", "gold", "disagreement"],
                         [[r["step"], _ppo_point(r)[0], r.get("eval/proxy"), r.get("eval/gold"),
                           r["eval/proxy_uncertainty"]] for r in rows]))
    return parts
