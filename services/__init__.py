"""Long-lived services of shuffle-r1: the replay buffer (gRPC + Redis), the trainer, metrics."""
