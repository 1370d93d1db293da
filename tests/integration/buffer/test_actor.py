"""The buffer hosted in a real Ray actor: reachable by its address, restarted by Ray after
it dies, and serving the same data afterwards (the state is in Redis)."""

import psutil
import pytest
from buffer_helpers import metric_samples, random_groups, scrape

from services.replay_buffer.actor import start_replay_buffer_actor
from services.replay_buffer.client import ReplayBufferClient
from shuffle_r1.config import AlgorithmConfig, BufferConfig
from shuffle_r1.net import free_port


@pytest.mark.slow
def test_actor_serves_and_is_restarted(ray_cluster, redis_url, run_id):
    import ray

    port = free_port()  # fixed, so the restarted actor listens where clients already look
    cfg = BufferConfig(redis_url=redis_url, port=port, metrics_port=free_port())
    actor = start_replay_buffer_actor(cfg, AlgorithmConfig())
    try:
        address = ray.get(actor.address.remote(), timeout=120)
        assert address == f"127.0.0.1:{port}"
        with ReplayBufferClient(address, retries=0) as client:
            assert client.put_groups(random_groups(run_id, 0, 4)).stored == 4
            before = client.sample(run_id, 0, policy_version=0, expected_groups=4)
        # the actor serves the same Prometheus endpoint as `buffer serve`
        stored = ("shuffle_r1_buffer_groups_stored", frozenset({("run", run_id)}))
        assert metric_samples(scrape(cfg.metrics_port))[stored] == 4
        (old,) = {c.pid for c in psutil.net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN and c.laddr.port == port}  # fmt: skip

        ray.kill(actor, no_restart=False)  # dies; Ray starts it again (max_restarts=-1)
        psutil.Process(old).wait(timeout=60)  # ray.kill returns before the process is gone
        # the client retries UNAVAILABLE while the new actor process starts
        with ReplayBufferClient(address, retries=4, backoff_s=2) as client:  # over 30 s
            assert client.sample(run_id, 0, policy_version=0, expected_groups=4) == before
            assert client.stats(run_id).cursor.samples_served == 2  # the cursor survived
        scraped = metric_samples(scrape(cfg.metrics_port))  # the new process's, same port
        requests = {dict(labels)["method"]: v for (name, labels), v in scraped.items()
                    if name == "shuffle_r1_buffer_requests_total"}  # fmt: skip
        assert requests == {"Sample": 1, "Stats": 1}  # the put was the old process's
        assert scraped[stored] == 4
    finally:
        ray.kill(actor)
