"""A run submitted to an existing Ray cluster, as README "Submitting to an existing Ray
cluster" shows: a real Ray head started with ``ray start`` (token authentication, its
dashboard's job server on loopback), ``ray job submit --working-dir <repo>`` of a tiny
``shuffle-r1 train`` that joins it with ``cluster.ray_address=auto``; and a driver outside the
cluster joining the same head by ``cluster.ray_address=host:port``."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shuffle_r1.net import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's ray and shuffle-r1
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
# the tiny recipe: a random 2-layer Llama, the transformers engine, 2 learner ranks
TINY = ["--config", "configs/tiny_cpu.yaml", "trainer.total_steps=1", "trainer.save_every=0",
        "reward.function=tests.e2e.reward_fns:distinct_char_share"]  # fmt: skip
# the README's upload: the repository less what .gitignore names (Ray leaves that out) and
# the multimodal images; the generated gRPC code (ignored by git) goes as a py_module
RUNTIME_ENV = {"py_modules": ["protos"], "excludes": ["data/k12"]}


@dataclass(frozen=True)
class Head:
    gcs: str  # host:port, what cluster.ray_address takes
    dashboard: str  # http://host:port, what ray job submit --address takes
    env: dict[str, str]  # the token every client presents


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """A Ray head of its own: every port it listens on is a free one (Redis has 6379, other
    Rays on this machine their defaults), token authentication with a token of its own, its
    own temporary folder (so ``ray_address=auto`` elsewhere on this machine never finds it).
    ``ray start --block`` keeps it in this process's hands: ending it stops the Ray processes
    it started, and what is left of its session is killed (never ``ray stop``, which stops
    every Ray of this user on the machine)."""
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTHONPATH"))}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    # the cluster runs the project installed in this venv (its shuffle-r1 on PATH); a job
    # brings its own code (--working-dir) and generated gRPC code (py_modules)
    cluster_env = env | {"PATH": f"{BIN}:{env.get('PATH', '')}"}
    gcs_port, dashboard_port = free_port(), free_port()
    temp = Path(f"/tmp/rjs-{os.getpid()}")  # short: Ray's socket paths live under it
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=6",
         "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        env=cluster_env, cwd=tmp_path_factory.mktemp("head"), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_job_server(dashboard, head, token)
        yield Head(f"127.0.0.1:{gcs_port}", dashboard, env)
    finally:
        head.terminate()  # ray start --block stops what it started, but takes ~30 s
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        with contextlib.suppress(ProcessLookupError):  # what is left of its session, if any
            os.killpg(head.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def _wait_for_job_server(dashboard: str, head: subprocess.Popen[str], token: str) -> None:
    """Until the head's job server lists jobs (the dashboard starts after the GCS), or the
    head has exited (its stderr is the failure)."""
    request = urllib.request.Request(
        f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    for _ in range(240):
        if head.poll() is not None:
            pytest.fail(f"ray start exited {head.returncode}: {head.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the job server at {dashboard} did not answer in 120 s")


def _job_status(head: Head, job_id: str) -> str:
    """The job's status from the job server's REST API (what ``ray job status`` prints)."""
    token = head.env["RAY_AUTH_TOKEN"]
    request = urllib.request.Request(
        f"{head.dashboard}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return str(json.load(answer)["status"])


def _ray(head: Head, *args: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=head.env, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


def test_ray_job_submit_runs_a_tiny_training_run(ray_head: Head, tmp_path: Path) -> None:
    out = tmp_path / "run"
    job_id = f"shuffle-r1-test-{secrets.token_hex(4)}"
    submitted = _ray(
        ray_head, "job", "submit", "--address", ray_head.dashboard, "--working-dir", ".",
        "--runtime-env-json", json.dumps(RUNTIME_ENV), "--submission-id", job_id, "--no-wait",
        "--", "shuffle-r1", "train", *TINY, "cluster.ray_address=auto",
        f"trainer.output_dir={out}", "trainer.run_name=job-submit",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr

    status = _job_status(ray_head, job_id)
    for _ in range(240):  # a bounded wait: at most ~4 min (the run takes about 1.5)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
        status = _job_status(ray_head, job_id)
    logs = _ray(ray_head, "job", "logs", "--address", ray_head.dashboard, job_id).stdout
    assert status == "SUCCEEDED", f"{status}: {logs[-4000:]}"
    assert "trained 1 steps" in logs, logs[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0]
    assert rows[0]["buffer/pairs_kept"] > 0


JOIN = """
import sys
import ray
from services.trainer.bootstrap import init_ray
from shuffle_r1.config import load_config
init_ray(load_config("configs/tiny_cpu.yaml", [f"cluster.ray_address={sys.argv[1]}"]))
print(ray.get_runtime_context().gcs_address, int(ray.cluster_resources()["CPU"]),
      ray.get(ray.remote(lambda: 42).remote()), flush=True)
"""


def test_a_driver_outside_the_cluster_joins_it_by_host_and_port(ray_head: Head) -> None:
    """``cluster.ray_address=host:port`` (what ``shuffle-r1 train`` does with it, through
    ``init_ray``) joins the head started above, with its token, and runs a task there; and
    ``shuffle-r1 scale --address host:port`` joins it too (no run is alive there to scale)."""
    joined = subprocess.run([sys.executable, "-c", JOIN, ray_head.gcs], cwd=ROOT,
                            env=ray_head.env | {"PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=120, check=False)  # fmt: skip
    assert joined.returncode == 0, joined.stderr[-3000:]
    gcs, cpus, answer = joined.stdout.split()
    assert gcs.rsplit(":", 1)[1] == ray_head.gcs.rsplit(":", 1)[1]
    assert (cpus, answer) == ("6", "42")  # the head's --num-cpus, not a local Ray's 4
    scale = [str(BIN / "shuffle-r1"), "scale", "rollout", "2", "--address", ray_head.gcs]
    scaled = subprocess.run(scale, cwd=ROOT, env=ray_head.env | {"PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert scaled.returncode == 2 and "0 runs in namespace" in scaled.stderr, scaled.stderr
