"""The main job: the whole loop (SFT, feedback, reward model, PPO, evaluation) in one command."""
