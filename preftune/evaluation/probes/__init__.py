"""Probes: bundled prompt sets with known failure modes, scored by documented rules."""
