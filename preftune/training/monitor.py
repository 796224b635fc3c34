"""The one over-optimisation rule (Gao, Schulman and Hilton 2022): the proxy reward keeps rising
while the gold reward peaks and falls.

The monitor sees one (proxy, gold) pair per evaluation. It remembers the best gold so far (online
trainers keep that policy under ``OUT/best/``) and raises an alert when the gold has given back
more than ``drop`` of its improvement since the first evaluation while the proxy is above its
value at the gold peak. Measuring the fall against the improvement makes the rule independent of
the gold's scale and sign. Trainers run it live; reports replay it over a run's metrics rows
(``overoptimisation_alert``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass
class OveroptimisationAlert:
    step: int  # the evaluation at which the rule fired
    best_step: int  # the step with the best gold reward so far (the policy worth keeping)
    best_gold: float
    gold: float
    proxy: float
    proxy_at_best: float
    drop: float  # share of the best gold gain lost

    def message(self) -> str:
        return (f"over-optimisation: gold reward {self.gold:.4g} at step {self.step}, down "
                f"{self.best_gold - self.gold:.3g} from its best ({self.best_gold:.4g} at step {self.best_step}; "
                f"{self.drop:.0%} of the gain since the first evaluation given back) while proxy reward "
                f"rose {self.proxy_at_best:.4g} -> {self.proxy:.4g}; best policy by gold: step {self.best_step}")


@dataclass
class OveroptimisationMonitor:
    drop: float = 0.1
    first_gold: float | None = None
    best_gold: float | None = None
    best_step: int | None = None
    proxy_at_best: float | None = None

    def update(self, step: int, proxy: float, gold: float) -> tuple[bool, OveroptimisationAlert | None]:
        """(is this the best gold so far, an alert or None)."""
        if self.first_gold is None:
            self.first_gold = gold
        if self.best_gold is None or gold > self.best_gold:
            self.best_gold, self.best_step, self.proxy_at_best = gold, step, proxy
            return True, None
        gained = self.best_gold - self.first_gold
        if gained > 0 and gold < self.best_gold - self.drop * gained and proxy > self.proxy_at_best:
            return False, OveroptimisationAlert(step, self.best_step, self.best_gold, gold, proxy,
                                                self.proxy_at_best, (self.best_gold - gold) / gained)
        return False, None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def overoptimisation_alert(rows: Sequence[dict], drop_fraction: float = 0.1, gold_key: str = "eval/gold",
                           proxy_key: str = "eval/proxy") -> OveroptimisationAlert | None:
    """The monitor replayed over metrics rows (``{"step", gold_key, proxy_key, ...}``, in step
    order; rows without both values are skipped): its first alert, or None."""
    monitor = OveroptimisationMonitor(drop_fraction)
    for row in rows:
        if row.get(gold_key) is not None and row.get(proxy_key) is not None:
            _, alert = monitor.update(row["step"], row[proxy_key], row[gold_key])
            if alert is not None:
                return alert
    return None
