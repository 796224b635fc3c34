"""Candidate responses for people or simulated annotators to judge (``preftune sample``)."""
