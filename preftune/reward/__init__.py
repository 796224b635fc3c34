"""Reward models from comparisons, rankings and ratings (``preftune reward``)."""
