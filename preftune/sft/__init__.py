"""Supervised fine-tuning on demonstrations (``preftune sft``): loss on response tokens only."""
