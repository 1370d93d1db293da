"""Rollout overhead: shuffle-r1's rollout phase against plain vLLM on the same prompts (#7).

All sides generate the same requests with the same sampling (the benchmark recipe's
``rollout.n``, temperature, top-p, ``max_response_length``; per-request seeds from
:func:`actors.rollout.request_seed`, so all produce the same tokens, which is checked):

- ``raw``: plain ``vllm.LLM.generate`` in this process, one call, with the ``SamplingParams``
  of :func:`actors.rollout.vllm_sampling_params`. The ``LLM`` is the one
  :class:`actors.rollout.VLLMEngine` builds (in-process engine, no chunked prefill on CPU,
  processed log-probs, the same threads and KV cache as the rollout worker);
- ``engine``: ``VLLMEngine.generate`` on that same ``LLM`` in this process: the raw call
  plus our wrapper (prompt building, checks, completions with their log-probs);
- ``shuffle_r1``: :meth:`actors.rollout.RolloutPool.generate`, the trainer's rollout phase —
  a Ray Serve deployment of one rollout worker (its own process, the engine in a thread
  beside Serve's event loop), its weight-version check, the wrapper, the reply through Ray.

``engine - raw`` is the wrapper's cost, ``shuffle_r1 - engine`` the serving path's; the
worker reports its own engine seconds (``RolloutResult.engine_s``), which split the latter
into the engine running slower in the worker (``worker_engine_s`` vs ``engine_s``) and the
time outside the engine call (``outside_engine_s``: queueing, transport, thread hops). The
sides alternate, ``--rounds`` times each after one warm-up round each (vLLM's first
``generate`` is slower once), so all see the same machine. Prints one JSON line: wall
seconds per round (median) of each side, generated tokens per second, and
``overhead = shuffle_r1 / raw - 1`` (target: <= 0.10). ``{side}_roofline_share``: the
least time these requests could take at the engine's matmul peak (its dtype, its threads)
and the memory bandwidth that ``bench/roofline.py`` measured (``roofline.generation_bound``,
at the prompts' lengths and the mean response length), over the side's median round; null
without ``bench/results/roofline.json``.

``--profile FILE``: record the rollout worker's process with py-spy (collapsed stacks,
100 Hz) during the ``shuffle_r1`` rounds and print where its busy time went, seconds per
round (``profile``: :func:`profile_summary`, with the other threads' busiest stacks);
``--native`` adds native frames and one root frame per thread (``py-spy --native
--threads``), to see what Ray's and vLLM's C++ threads do. ``num_workers_s`` and
``handle_ping_s`` time the serving path's fixed costs alone: the replica count read before
each call, and a no-op call through the Serve handle.

``cpu``: where the machine's CPU time went during each side's measured rounds, from every
thread's ``utime + stime`` in ``/proc`` (no sampling, nothing paused): CPU seconds per round
for the whole machine, by process (Ray sets its workers' process titles, so the rollout
replica, the driver, raylet and GCS are told apart), and for the rollout worker's and this
process's busiest threads with the CPUs each may run on (``Cpus_allowed_list``). A side whose
engine threads get fewer CPU seconds per round, or whose CPU goes to other threads or
processes, shows it here; so does a thread that was runnable but waited for a CPU (its
run-queue wait, from ``schedstat``) against one that was blocked.

    python bench/rollout_overhead.py [--prompts 8] [--n 8] [--max-tokens 64] [--rounds 5]
        [--profile outputs/bench/overhead-profile.txt [--native]]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import bench_config, emit, stats, train_prompts
from roofline import (
    DTYPE_BYTES,
    generation_bound,
    load_model_config,
    load_roofline,
    memory_rate,
    peak_flops,
    roofline_source,
)


def profile_summary(path: Path, rounds: int, rate_hz: float = 100.0) -> dict[str, Any]:
    """Where the rollout worker's sampled time went, in seconds per ``shuffle_r1`` round, from
    py-spy's collapsed stacks (``frame;frame;... count`` lines; frames ``func (file:line)``,
    files relative to site-packages): the engine thread inside ``LLM.generate`` (split into
    the model's forward pass and the rest of vLLM's step), the engine thread outside it
    (our wrapper), and every other thread (Ray's worker loop, Serve's event loop, metrics)."""
    seconds = {"vllm_forward": 0, "vllm_other": 0, "wrapper": 0, "other_threads": 0}
    others: dict[str, int] = {}  # the other threads' busy stacks: thread, then leaf frames
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if not any("RolloutWorker._generate" in f for f in frames):
            where = "other_threads"
            key = " <- ".join([*frames[-1:-4:-1], frames[0]])
            others[key] = others.get(key, 0) + int(count)
        elif not any(f.startswith("LLM.generate ") for f in frames):
            where = "wrapper"
        elif any("_model_forward" in f for f in frames):
            where = "vllm_forward"
        else:
            where = "vllm_other"
        seconds[where] += int(count)
    out: dict[str, Any] = {k: v / rate_hz / max(rounds, 1) for k, v in seconds.items()}
    top = sorted(others.items(), key=lambda kv: -kv[1])[:12]
    out["other_threads_top"] = {k: round(v / rate_hz / max(rounds, 1), 3) for k, v in top}
    return out


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _process_label(pid_dir: Path) -> str:
    """A process's title (Ray sets ``ray::ServeReplica:...``, ``ray::IDLE``) or command, short."""
    try:
        argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    title = argv[0].decode(errors="replace")
    if title.startswith("ray::"):
        return title[:60]
    return " ".join(Path(a.decode(errors="replace")).name for a in argv[:2] if a)[:60] or "?"


def thread_cpu_ticks() -> dict[tuple[int, int], tuple[str, str, int]]:
    """Every thread on the machine: ``(pid, tid) -> (process label, thread name, utime +
    stime in clock ticks)``, read from ``/proc/<pid>/task/<tid>/stat`` (proc(5): fields 14
    and 15). Threads that exit while being read are skipped."""
    out: dict[tuple[int, int], tuple[str, str, int]] = {}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        label = _process_label(pid_dir)
        try:
            tasks = list((pid_dir / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
            ticks = int(fields[11]) + int(fields[12])
            out[(int(pid_dir.name), int(task.name))] = (label, name, ticks)
    return out


def run_queue_wait(pids: list[int]) -> dict[tuple[int, int], int]:
    """Nanoseconds each thread of ``pids`` has spent runnable but waiting for a CPU
    (``/proc/<pid>/task/<tid>/schedstat``, its second field): high when threads queue for the
    cores, low when a thread that is not running is blocked (a lock, the GIL, I/O)."""
    out: dict[tuple[int, int], int] = {}
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                out[(pid, int(task.name))] = int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def _allowed_cpus(pid: int, tid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


class CpuAccount:
    """CPU seconds by process and by thread, summed over the intervals between
    :meth:`start` and :meth:`stop` (one per measured round of a side)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids  # processes whose threads are listed one by one: name -> pid
        self.by_process: dict[str, float] = {}
        self.by_thread: dict[tuple[int, int], float] = {}
        self.names: dict[tuple[int, int], str] = {}
        self.allowed: dict[tuple[int, int], str] = {}  # read while the threads live
        self.before: dict[tuple[int, int], tuple[str, str, int]] = {}
        self.waits: dict[tuple[int, int], float] = {}  # run-queue wait, seconds
        self.waits_before: dict[tuple[int, int], int] = {}

    def start(self) -> None:
        self.before = thread_cpu_ticks()
        self.waits_before = run_queue_wait(list(self.pids.values()))

    def stop(self) -> None:
        for key, ns in run_queue_wait(list(self.pids.values())).items():
            waited = (ns - self.waits_before.get(key, 0)) / 1e9
            self.waits[key] = self.waits.get(key, 0.0) + waited
        after = thread_cpu_ticks()
        for key, (label, name, ticks) in after.items():
            used = (ticks - self.before.get(key, (label, name, 0))[2]) / CLOCK_TICKS
            if used <= 0:
                continue
            self.by_process[label] = self.by_process.get(label, 0.0) + used
            if key[0] in self.pids.values():
                self.by_thread[key] = self.by_thread.get(key, 0.0) + used
                self.names[key] = name
                self.allowed.setdefault(key, _allowed_cpus(*key))

    def summary(self, rounds: int, wall_s: float) -> dict[str, Any]:
        """Seconds per round: the machine's total, its busiest processes, and the listed
        processes' busiest threads (name, CPU seconds, seconds runnable but waiting for a
        CPU, allowed CPUs); ``busy_cores`` is the total over the side's wall time."""
        per = max(rounds, 1)
        total = sum(self.by_process.values())
        top = sorted(self.by_process.items(), key=lambda kv: -kv[1])[:8]
        threads: dict[str, list[Any]] = {}
        for who, pid in self.pids.items():
            mine = sorted(
                ((k, v) for k, v in self.by_thread.items() if k[0] == pid), key=lambda kv: -kv[1]
            )[:8]
            threads[who] = [
                [self.names[k], round(v / per, 3), round(self.waits.get(k, 0) / per, 3), cpus]
                for k, v in mine
                for cpus in [self.allowed[k]]
            ]
        return {
            "total_s": round(total / per, 3),
            "busy_cores": round(total / wall_s, 2) if wall_s else None,
            "by_process": {k: round(v / per, 3) for k, v in top},
            "threads": threads,
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", type=Path, help="py-spy the rollout worker into this file")
    p.add_argument(
        "--native", action="store_true", help="profile native frames too, thread by thread"
    )
    args = p.parse_args()

    import ray
    from vllm.inputs import TokensPrompt

    from actors.rollout import (
        GenerationRequest,
        RolloutPool,
        SamplingSpec,
        VLLMEngine,
        vllm_sampling_params,
    )
    from actors.serving import ensure_serve
    from services.trainer.bootstrap import init_ray
    from shuffle_r1.models import resolve_model_path

    cfg = bench_config([f"rollout.n={args.n}", f"rollout.max_response_length={args.max_tokens}"])
    model_path = str(resolve_model_path(cfg.learner.model_path))
    prompts = train_prompts(cfg, args.prompts)
    r = cfg.rollout

    init_ray(cfg)
    ensure_serve(http_port=0)
    pool = RolloutPool(r, model_path, "bench-overhead", cfg.cluster.namespace, seed=1)
    engine = VLLMEngine(model_path, r, seed=1)
    llm = engine.llm
    requests = [GenerationRequest(f"r/{q.example.uid}", q.token_ids) for q in prompts]

    def spec(round_: int) -> SamplingSpec:
        return SamplingSpec(
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            max_tokens=r.max_response_length,
            seed=1000 + round_,
        )

    def run_raw(round_: int) -> tuple[float, list[list[int]]]:
        params = [vllm_sampling_params(spec(round_), f"r/{q.example.uid}") for q in prompts]
        t = time.perf_counter()
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=q.token_ids) for q in prompts], params, use_tqdm=False
        )
        wall = time.perf_counter() - t
        return wall, [
            list(c.token_ids) for o in outs for c in sorted(o.outputs, key=lambda c: c.index)
        ]

    def run_engine(round_: int) -> tuple[float, list[list[int]]]:
        t = time.perf_counter()
        completions = engine.generate(requests, spec(round_))
        wall = time.perf_counter() - t
        return wall, [list(c.token_ids) for c in completions]

    def run_pool(round_: int) -> tuple[float, list[list[int]]]:
        t = time.perf_counter()
        result = pool.generate(requests, spec(round_))
        wall = time.perf_counter() - t
        if round_ > 0:
            in_engine.append(result.engine_s)
        return wall, [list(c.token_ids) for c in result.completions]

    in_engine: list[float] = []  # the worker's own engine seconds per shuffle_r1 round
    sides = {"raw": run_raw, "engine": run_engine, "shuffle_r1": run_pool}
    walls: dict[str, list[float]] = {side: [] for side in sides}
    tokens: dict[str, list[int]] = {side: [] for side in sides}
    profiler = None
    same = 0
    accounts = {
        side: CpuAccount({"this_process": os.getpid(), "rollout_worker": pool.workers()[0]["pid"]})
        for side in sides
    }
    for round_ in range(args.rounds + 1):
        if round_ == 1 and args.profile:
            pid = pool.workers()[0]["pid"]
            args.profile.parent.mkdir(parents=True, exist_ok=True)
            profiler = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    "100",
                    "--format",
                    "raw",
                    "--output",
                    str(args.profile),
                    # native stacks need the process paused while sampled
                    *(["--native", "--threads"] if args.native else ["--nonblocking"]),
                ],
                stdout=subprocess.DEVNULL,
                stderr=args.profile.with_suffix(".log").open("w"),
            )
            time.sleep(1.0)
        ids = {}
        for side, run in sides.items():
            if round_ > 0:
                accounts[side].start()
            wall, ids[side] = run(round_)
            if round_ > 0:  # round 0 is the warm-up
                accounts[side].stop()
                walls[side].append(wall)
                tokens[side].append(sum(map(len, ids[side])))
        same += ids["raw"] == ids["engine"] == ids["shuffle_r1"]
    # The serving path's fixed costs, each timed alone: the replica count the pool reads
    # before every generate call, and a no-op call (ping) through the Serve handle.
    fixed: dict[str, list[float]] = {"num_workers_s": [], "handle_ping_s": []}
    for _ in range(5):
        t = time.perf_counter()
        _ = pool.num_workers
        fixed["num_workers_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        pool.handle.ping.remote().result()
        fixed["handle_ping_s"].append(time.perf_counter() - t)
    profile = None
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(timeout=60)
        profile = profile_summary(args.profile, args.rounds)
    pool.shutdown()
    ray.shutdown()
    med = {side: stats(w)["median"] for side, w in walls.items()}
    row: dict[str, Any] = {
        "bench": "rollout_overhead",
        "prompts": args.prompts,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
    }
    for side in sides:
        row[f"{side}_s"] = stats(walls[side])
        row[f"{side}_tokens_per_s"] = sum(tokens[side]) / sum(walls[side])
    row["identical_tokens_rounds"] = f"{same}/{args.rounds + 1}"
    row["wrapper_s"] = med["engine"] - med["raw"]
    row["serving_s"] = med["shuffle_r1"] - med["engine"]
    # of that: inside the worker's engine call (the engine ran slower there than here) and
    # outside it (queueing, transport, thread hops)
    row["worker_engine_s"] = stats(in_engine)["median"]
    row["outside_engine_s"] = statistics.median(
        w - e for w, e in zip(walls["shuffle_r1"], in_engine, strict=True)
    )
    row.update({k: stats(v)["median"] for k, v in fixed.items()})
    row["cpu"] = {side: accounts[side].summary(args.rounds, sum(walls[side])) for side in sides}
    row["overhead"] = med["shuffle_r1"] / med["raw"] - 1
    row["target_overhead"] = 0.10
    roof = load_roofline()
    row["roofline"] = roofline_source(roof)
    threads = r.threads_per_worker
    peak = peak_flops(roof, engine.dtype, threads) if roof else None
    bandwidth = memory_rate(roof, threads) if roof else None
    if peak and bandwidth:
        response_mean = sum(tokens["raw"]) / len(tokens["raw"]) / (len(prompts) * r.n)
        bound = generation_bound(
            load_model_config(cfg.learner.model_path),
            [len(q.token_ids) for q in prompts],
            r.n,
            response_mean,
            peak,
            bandwidth,
            DTYPE_BYTES[engine.dtype],
        )
        row["generation_bound"] = bound
    for side in sides:
        row[f"{side}_roofline_share"] = (
            row["generation_bound"]["bound_s"] / med[side] if "generation_bound" in row else None
        )
    if profile is not None:
        row["profile"] = profile
    emit(row)


if __name__ == "__main__":
    main()
