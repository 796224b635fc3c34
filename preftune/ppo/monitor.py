"""Watching for over-optimisation (Gao, Schulman and Hilton 2022): the proxy reward keeps
rising while the gold reward peaks and falls.

The monitor sees one (proxy, gold) pair per evaluation. It remembers the best gold so far (the
trainer keeps that policy under ``OUT/best/``) and warns once the gold has given back more than
``drop`` of its improvement since the first evaluation while the proxy is above its value at the
gold peak. Measuring the fall against the improvement makes the rule independent of the gold's
scale and sign.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class OveroptimisationMonitor:
    drop: float = 0.1
    first_gold: float | None = None
    best_gold: float | None = None
    best_step: int | None = None
    proxy_at_best: float | None = None

    def update(self, step: int, proxy: float, gold: float) -> tuple[bool, str | None]:
        """(is this the best gold so far, warning text or None)."""
        if self.first_gold is None:
            self.first_gold = gold
        if self.best_gold is None or gold > self.best_gold:
            self.best_gold, self.best_step, self.proxy_at_best = gold, step, proxy
            return True, None
        gained = self.best_gold - self.first_gold
        if gained > 0 and gold < self.best_gold - self.drop * gained and proxy > self.proxy_at_best:
            return False, (f"step {step}: over-optimisation? gold reward {gold:.4g} has fallen "
                           f"{(self.best_gold - gold) / gained:.0%} of its gain below its best {self.best_gold:.4g} "
                           f"(step {self.best_step}) while the proxy rose from {self.proxy_at_best:.4g} to {proxy:.4g}")
        return False, None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
