"""Direct preference optimisation (Rafailov et al. 2023): a baseline next to PPO that learns from
comparisons directly, with no reward model and no sampling."""
