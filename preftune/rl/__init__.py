"""PPO against a reward with a KL leash to the SFT model (``preftune ppo``)."""
