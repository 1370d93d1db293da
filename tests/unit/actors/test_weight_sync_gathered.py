"""The other way weights are published: the full state dict gathered on rank 0 and packed
there, as FSDP2 ranks on several hosts (or without room in /dev/shm) publish
(``learner.publish_shared_memory=false``). A module of its own: the shared-memory group of
test_weight_sync.py holds 3 of the test Ray's 4 CPUs for its whole module."""

import pytest

from tests.unit.actors.test_weight_sync import check_published, publish, tiny_other  # noqa: F401


@pytest.mark.slow
def test_three_ranks_publish_the_model_state_exactly_through_the_gather(
    ray_cluster,
    tiny_other,  # noqa: F811
):
    for published in publish(tiny_other, shared_memory=False):
        assert not published["shared"]
        check_published(published, tiny_other)
