"""Simulated annotators (``preftune label``): a gold scorer's preferences with human-like noise,
standing in for people in dry runs, tests and research."""
