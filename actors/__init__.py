"""Ray actors of shuffle-r1: rollout, reward and learner workers, their pools, the weight store."""
