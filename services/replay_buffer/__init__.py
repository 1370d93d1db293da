"""The replay buffer service: groups in, Shuffle-R1 training batches out (gRPC, Redis).

A trainer puts each step's groups (a prompt's n rollouts with token ids, log-probs,
rewards and weight versions); the buffer computes GRPO advantages and PTS pairs, stores
the kept pairs with their ABS weights in Redis, and serves the step's batch drawn by ABS,
each item with the probability its pair was drawn with (docs/algorithm.md §1-§3, §5).

- ``protos/replay_buffer.proto``: the API and the stored values.
- :mod:`.server`: ``serve(BufferConfig, AlgorithmConfig) -> (BufferServer, port)``, health.
- :mod:`.servicer` (the RPCs and their status codes), :mod:`.auth` (token, TLS),
  :mod:`.metrics` (Prometheus).
- :mod:`.client`: ``ReplayBufferClient(address, token=, root_cert=, client_cert=,
  client_key=)``.
- :mod:`.actor`: the server hosted in a Ray actor.
- :mod:`.cli`: ``shuffle-r1 buffer serve``.
- :mod:`.store` (Redis; its Lua scripts in ``lua/``) and :mod:`.logic` (protobuf ↔ tensors
  around ``shuffle_r1.algos``).
"""
