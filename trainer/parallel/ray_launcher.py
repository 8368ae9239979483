"""The Ray launcher: one placement group with a bundle per node over the nodes of a Ray cluster.

It joins the cluster at ``--ray-address`` / ``RAY_ADDRESS``, or starts a local one for the run. The placement group
holds one bundle per node of ``gpus_per_node`` ranks, each bundle on a node of its own (STRICT_SPREAD; STRICT_PACK
for one node), a GPU and a core per rank when the cluster has the GPUs, else a core (``trainer.platform.
rank_resources``); ranks are numbered node by node, so that consecutive ranks (megatron's TP, then ETP·EP, groups)
share a node. Each rank is a Ray actor that runs the same entry point the local launcher runs,
with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, and MASTER_ADDR / MASTER_PORT set to rank 0's node address and
the port of the rendezvous store rank 0's process hosts (every rank joins it as a client, as under torchrun). Its
output reaches the driver with a ``rank N`` prefix (the actor's ``__repr__``).

Run files: rank 0 writes them into the run directory the driver names, and every rank writes its checkpoint shard
there, so the nodes must share that filesystem (the same path on every node).

The first failure ends the run: a rank that raises, a rank's process that dies, a node that is lost. Every actor
is killed and the placement group removed whatever happened, and the line names the rank. A rank whose collective
broke because a peer vanished is not the cause: for a few seconds the launcher waits for the peer's death to be
reported and names that rank instead.

As under the local launcher, a stuck rank ends the run within ``run.stall_timeout_s`` (``trainer.heartbeat``): the
ranks' beats go to a small actor on the driver's node (one clock for every host), and the process state of a rank
(stopped by a signal, waiting on the kernel) is read on its own node. Ctrl-C or SIGTERM to the driver is passed on
to every rank's process, wherever it runs, so that all checkpoint after the same episode and stop; a second Ctrl-C
stops every rank at once, without a checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.parallel.ranks import RankFailed
from trainer.platform import RankResources, rank_resources

ROOT = Path(__file__).resolve().parent.parent.parent
# Environment the driver passes on to every rank (on other nodes a rank sees only its raylet's): the project's own
# switches (tests' planted faults), the collectives' and torch's tuning, the Hugging Face cache and offline
# switches, and where the code is (the nodes share the filesystem). Never devices (Ray assigns them, per node) and
# no secrets (a runtime environment is stored in the cluster's metadata).
PASSED_ON = ("GRPO_STACK_", "NCCL_", "TORCH_NCCL_", "GLOO_", "PYTORCH_", "OMP_NUM_THREADS")
PASSED_NAMES = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# Seconds the launcher waits, after a rank's collective broke, for the death of the rank that broke it to be
# reported (a lost node is declared dead after Ray's health checks: health_check_period_ms × failure_threshold).
PEER_DEATH_WAIT_S = 20.0
PLACEMENT_TIMEOUT_S = 120.0
# How often the driver reads the ranks' beats and passes on a signal it got; how long it waits for such a reading.
POLL_S, QUERY_TIMEOUT_S = 1.0, 10.0
# How a collective fails when its peer went away (gloo, NCCL): a consequence, not the cause.
BROKEN_COLLECTIVE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "DistBackendError",
                     "NCCL communicator was aborted", "Socket Timeout", "Connection refused")


def _interface_of(address: str) -> str | None:
    """The network interface that holds ``address`` on this node (what gloo and NCCL should bind)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None


class Beats:
    """The run's heartbeat board, an actor on the driver's node: each rank's last beat on this one clock."""

    def __init__(self):
        self.last: dict[int, float] = {}

    def beat(self, rank: int) -> None:
        self.last[rank] = time.monotonic()

    def ages(self) -> dict[int, float]:
        """rank → seconds since its last beat, for the ranks that have beaten."""
        now = time.monotonic()
        return {rank: now - at for rank, at in self.last.items()}


class NodeAgent:
    """An actor on each node of the run, started with the ranks (a task would first wait for a new worker process):
    signals the ranks' processes there and reads their states."""

    def send_signal(self, pids: list[int], signum: int) -> None:
        from trainer.interrupts import send_signal

        send_signal(pids, signum)

    def ready(self) -> None:
        """Answered once the agent's process runs: the launcher waits for every agent before the ranks start."""

    def state(self, pid: int) -> str:
        from trainer.heartbeat import process_state

        return process_state(pid)


def _agents(nodes: list[str]) -> dict[str, Any]:
    """A ``NodeAgent`` on each of ``nodes`` (needing no CPU: the ranks hold them)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0)(NodeAgent)
    return {node: remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote()
            for node in dict.fromkeys(nodes)}


class RankActor:
    """One rank: a process on the node of its bundle that runs the entry point once."""

    def __init__(self, rank: int):
        self.rank = rank

    def __repr__(self) -> str:  # Ray prefixes the actor's output with it
        return f"rank {self.rank}"

    def pid(self) -> int:
        return os.getpid()

    def gpu_ids(self) -> list[str]:
        """The GPUs Ray assigned this actor (its CUDA_VISIBLE_DEVICES holds only these)."""
        import ray

        return [str(gpu) for gpu in ray.get_gpu_ids()]

    def node_address(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def host_store(self, address: str, world_size: int) -> int:
        """Start the run's rendezvous store in this (rank 0's) process on a port the kernel picks; its port. Every
        rank, this one too, joins it as a client (torch's agent-store mode, as under torchrun): a port found free
        and handed to rank 0 to bind later could be taken in between by another process."""
        from torch.distributed import TCPStore

        self._store = TCPStore(address, 0, world_size, is_master=True, wait_for_workers=False)
        return self._store.port

    def run(self, env: dict[str, str], fn: Callable[..., Any], args: tuple, beats) -> Any:
        import ray

        from trainer import heartbeat

        rank = self.rank
        heartbeat.report_beats_to(lambda: beats.beat.remote(rank))  # not waited for
        # Ray's workers block SIGINT in their main thread, where the rank's handler (trainer.interrupts) must see it
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.environ.update(env)
        interface = _interface_of(ray.util.get_node_ip_address())
        if interface:  # the node's address, not whatever the host name resolves to
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
        try:
            return fn(*args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def _first_line(exc: BaseException) -> str:
    """The error a rank raised, as one line (its type and message)."""
    import ray

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
    text = " ".join(str(cause).split()) if cause is not None else ""
    if isinstance(exc, ray.exceptions.RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {text}" if text else type(cause).__name__
    return text or type(exc).__name__


def _is_death(exc: BaseException) -> bool:
    import ray

    return isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.WorkerCrashedError |
                      ray.exceptions.NodeDiedError)


def _broken_collective(exc: BaseException) -> bool:
    text = _first_line(exc)
    return any(marker in text for marker in BROKEN_COLLECTIVE)


class RayLauncher:
    def __init__(self, address: str | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS") or None

    def _connect(self, world_size: int) -> None:
        """Join the cluster, or start a local one for this run."""
        import ray

        env = {"env_vars": self._passed_env()}
        if self.address:
            from ray._private.services import get_node_ip_address

            # the driver's own address, as routed to the head: nodes that share a filesystem (and so Ray's session
            # directory) share its cached node address too, and the driver would otherwise take another node's
            head = self.address.removeprefix("ray://").split(",")[0]
            ray.init(address=self.address, runtime_env=env, log_to_driver=True, logging_level="ERROR",
                     _node_ip_address=get_node_ip_address(head if ":" in head else f"{head}:6379"))
            return
        # a local cluster: CPU ranks share the cores as the local launcher's do
        ray.init(address="local", num_cpus=max(world_size, os.cpu_count() or 1), include_dashboard=False,
                 runtime_env=env, log_to_driver=True, logging_level="ERROR")

    @staticmethod
    def _passed_env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ON) or k in PASSED_NAMES}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        return env

    def launch(self, fn: Callable[..., Any], world_size: int, *args: Any, ranks_per_node: int | None = None,
               stall_timeout_s: float | None = None) -> Any:
        # every rank's lines under its own prefix (Ray would fold lines repeated across ranks into one); read when
        # ray is first imported
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        import ray

        if ray.is_initialized():
            raise RuntimeError("the Ray launcher connects by itself: call it with no Ray connection open")
        from trainer.interrupts import forwarding

        self._connect(world_size)
        group, actors, helpers = None, [], []
        try:
            group, order, per_rank = self._placement(world_size, ranks_per_node or world_size)
            actors = self._actors(group, order, per_rank)
            env = self._rendezvous(actors, group, order)
            beats = ray.remote(num_cpus=0)(Beats).remote()
            nodes = [node for _, node in order]
            agents = _agents(nodes)
            helpers = [beats, *agents.values()]
            ray.get([agent.ready.remote() for agent in agents.values()])  # a stall's verdict must not wait for one
            watch = _Watch(nodes, ray.get([a.pid.remote() for a in actors]), beats, agents, stall_timeout_s)
            refs = [actor.run.remote(env[rank], fn, args, beats) for rank, actor in enumerate(actors)]
            address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}

            with forwarding(deliver=watch.signals.append, at_once=watch.signals_at_once.append):
                return self._wait(refs, [address.get(node, node) for _, node in order], watch)
        finally:
            for actor in [*actors, *helpers]:
                ray.kill(actor, no_restart=True)
            if group is not None:
                ray.util.remove_placement_group(group)
            ray.shutdown()

    def _placement(self, world_size: int, ranks_per_node: int):
        """The placement group, ready: one bundle per node of ``ranks_per_node`` ranks (a device and a CPU each),
        every bundle on its own node; and each rank's (bundle, node), rank by rank."""
        import ray
        from ray.util.placement_group import placement_group, placement_group_table

        nodes = -(-world_size // ranks_per_node)
        sizes = [min(ranks_per_node, world_size - i * ranks_per_node) for i in range(nodes)]
        per_rank = rank_resources(ray.cluster_resources(), world_size)
        bundles = [per_rank.bundle(n) for n in sizes]
        group = placement_group(bundles, strategy="STRICT_SPREAD" if nodes > 1 else "STRICT_PACK")
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(group)
            alive = sum(n["Alive"] for n in ray.nodes())
            raise RankFailed(f"the Ray cluster ({alive} node(s) alive) had no room after {PLACEMENT_TIMEOUT_S:g} s for "
                             f"{nodes} node(s) of {bundles[0]} ({world_size} ranks, {ranks_per_node} per node: "
                             f"gpus_per_node); join nodes with `ray start --address ...`") from None
        node_of = placement_group_table(group)["bundles_to_node_id"]
        return group, [(i, node_of[i]) for i, n in enumerate(sizes) for _ in range(n)], per_rank

    @staticmethod
    def _actors(group, order, per_rank: RankResources) -> list:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote = ray.remote(RankActor)
        actors = []
        for rank, (bundle, _) in enumerate(order):
            strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=bundle)
            actors.append(remote.options(num_cpus=per_rank.cpus, num_gpus=per_rank.gpus, scheduling_strategy=strategy,
                                         max_restarts=0).remote(rank))
        return actors

    @staticmethod
    def _rendezvous(actors, group, order) -> list[dict[str, str]]:
        """Each rank's launcher variables: rank 0's node address and the port of the store rank 0's process hosts."""
        import ray

        address = ray.get(actors[0].node_address.remote())
        port = ray.get(actors[0].host_store.remote(address, len(actors)))
        gpus = ray.get([actor.gpu_ids.remote() for actor in actors])
        return rank_environments([node for _, node in order], gpus, address, port)

    @staticmethod
    def _wait(refs: list, hosts: list[str], watch: _Watch) -> Any:
        """Rank 0's result once every rank finished, or ``RankFailed`` naming the rank that failed first (or the
        one that stalled the others)."""
        import ray

        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending, result = list(refs), None
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            watch.check()
            if not ready:
                continue
            try:
                value = ray.get(ready[0])
            except (ray.exceptions.RayError, Exception) as exc:  # noqa: BLE001 - any failure of a rank ends the run
                rank, cause = rank_of[ready[0]], exc
                if not _is_death(exc) and _broken_collective(exc):
                    rank, cause = _peer_death(pending, rank_of) or (rank, exc)
                raise RankFailed(_describe(rank, hosts[rank], cause)) from None
            if rank_of[ready[0]] == 0:
                result = value
        return result


def rank_environments(nodes: list[str], gpus: list[list[str]], address: str, port: int) -> list[dict[str, str]]:
    """Each rank's launcher variables, from each rank's node and the GPU ids Ray gave it ([] for a CPU rank).

    Ray shows an actor only its own GPU, as ``cuda:0``; torch's launcher shows every rank of a node all of the
    node's GPUs and each binds ``cuda:LOCAL_RANK`` (what ``CudaPlatform`` does), and NCCL within a node and an
    engine with TP > 1 need to see the node's other GPUs. So a GPU rank sees its node's GPUs (those of the run's
    ranks there), and its LOCAL_RANK is its own GPU's place among them."""
    world, node_order = len(nodes), list(dict.fromkeys(nodes))
    envs = []
    for rank, node in enumerate(nodes):
        on_node = [r for r, n in enumerate(nodes) if n == node]
        env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(on_node.index(rank)),
               "LOCAL_WORLD_SIZE": str(len(on_node)), "GROUP_RANK": str(node_order.index(node)),
               "MASTER_ADDR": address, "MASTER_PORT": str(port),
               "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"}
        if gpus[rank]:
            node_gpus = sorted({gpu for r in on_node for gpu in gpus[r]}, key=_gpu_order)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
            env["LOCAL_RANK"] = str(node_gpus.index(gpus[rank][0]))
        envs.append(env)
    return envs


def _gpu_order(gpu: str) -> tuple[int, str]:
    """Indices in numeric order (Ray gives "10" as well as "2"); UUIDs after them, by name."""
    return (int(gpu), "") if gpu.isdigit() else (1 << 30, gpu)


class _Watch:
    """The driver's view of its ranks while they run: signals to pass on, and their beats against the stall
    timeout (None: not watched)."""

    def __init__(self, nodes: list[str], pids: list[int], beats, agents: dict[str, Any], stall_timeout_s: float | None):
        self.nodes, self.pids, self.beats, self.agents = nodes, pids, beats, agents
        self.stall_timeout_s = stall_timeout_s
        self.pids_on = {node: [pid for n, pid in zip(nodes, pids, strict=True) if n == node] for node in agents}
        # filled by the signal handler (which must not raise inside Ray's wait); acted on in the driver's loop
        self.signals: list[int] = []
        self.signals_at_once: list[int] = []

    def _signal(self, signum: int) -> list:
        return [agent.send_signal.remote(self.pids_on[node], signum) for node, agent in self.agents.items()]

    def _kill_ranks(self) -> None:
        """SIGKILL every rank's process: ``ray.kill`` cannot end one that a signal stopped."""
        import contextlib

        import ray

        with contextlib.suppress(ray.exceptions.RayError):  # the actors are killed anyway
            ray.get(self._signal(signal.SIGKILL), timeout=QUERY_TIMEOUT_S)

    def check(self) -> None:
        """Pass on the signals received (a second Ctrl-C: ``StoppedAtOnce``); raise ``RankFailed`` once no rank
        made progress for the stall timeout. Either way every rank's process is killed first."""
        from trainer.interrupts import StoppedAtOnce

        if self.signals_at_once:
            self._kill_ranks()
            raise StoppedAtOnce(self.signals_at_once[0])
        while self.signals:
            self._signal(self.signals.pop(0))
        if self.stall_timeout_s is None:
            return
        import ray

        from trainer.heartbeat import stall_verdict

        try:
            ages = ray.get(self.beats.ages.remote(), timeout=QUERY_TIMEOUT_S)
        except ray.exceptions.RayError:  # no reading this time: the next poll tries again
            return
        beats = {rank: (age, self.pids[rank]) for rank, age in ages.items()}
        verdict = stall_verdict(len(self.nodes), self.stall_timeout_s, beats, self._state)
        if verdict is not None:
            self._kill_ranks()
            raise RankFailed(verdict)

    def _state(self, rank: int, pid: int) -> str:
        import ray

        try:
            return ray.get(self.agents[self.nodes[rank]].state.remote(pid), timeout=QUERY_TIMEOUT_S)
        except ray.exceptions.RayError:
            return "?"


def _peer_death(pending: list, rank_of: dict) -> tuple[int, BaseException] | None:
    """The rank, among ``pending``, whose death is reported within ``PEER_DEATH_WAIT_S`` (None: none died)."""
    import ray

    deadline = time.monotonic() + PEER_DEATH_WAIT_S
    while pending and time.monotonic() < deadline:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001
                if _is_death(exc):
                    return rank_of[ref], exc
    return None


def _describe(rank: int, host: str, exc: BaseException) -> str:
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        return f"rank {rank} (node {host}) failed: {_first_line(exc)}"
    return f"rank {rank} (node {host}) was lost: its process or its node died (Ray: {_death_reason(exc)})"


def _death_reason(exc: BaseException) -> str:
    """The short reason Ray gives for an actor's death (its first sentence)."""
    text = " ".join(str(exc).split())
    for marker in ("The actor died because ", "The actor is dead because "):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    return text.split(". ")[0][:300]
