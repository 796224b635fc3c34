"""Human feedback: the annotation web app (``preftune.feedback.app``) and its command line
(``preftune annotate``)."""
