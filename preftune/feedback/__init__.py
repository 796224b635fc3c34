"""Human feedback: the annotation app (``preftune.feedback.app``) and simulated annotators
(``preftune.feedback.simulated``) that stand in for people in dry runs, tests and research."""
