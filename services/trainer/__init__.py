"""The trainer: the single controller that drives rollout, reward, buffer and learner roles."""
