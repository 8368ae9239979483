"""An engine in a process of its own: started, called, watched and stopped from the driver.

``EngineProcess(name, server_class, *args)`` spawns a child that builds ``server_class(*args)`` (vLLM's or SGLang's
engine object, with their global state, threads and process groups kept out of the trainer's process) and then
answers calls ``(method, args, kwargs)`` over a pipe, one at a time. Tensors cross through ``torch.multiprocessing``
(shared memory), so a weight bucket is not copied through the pipe.

Failure is one line: a server that raises while starting gives ``EngineError("<name> engine failed to start:
...")``; a call that raises gives ``EngineError("<name> engine: <method> failed: ...")``; a child that dies (killed,
out of memory, a crash in native code) is noticed within ``POLL_SECONDS`` of any call and gives ``EngineError("<name>
engine process <pid> died (...) during <method>")``. The child dies with the driver (``PR_SET_PDEATHSIG``) and
``shutdown`` (also run at interpreter exit) stops it and any process it started, so none outlives the run.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import traceback
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from trainer.rollout.base import EngineError, Generation
from trainer.rollout.buckets import MB

POLL_SECONDS = 0.5
# Set by torch's elastic launcher in every trainer rank; an engine that inherits them joins the trainer's rendezvous
# (vLLM's distributed init waits there for WORLD_SIZE ranks and never starts).
LAUNCHER_ENV = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
}
STOP_SECONDS = 10.0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _serve(conn, server_class, args: tuple, env: dict[str, str]) -> None:
    """The child: build the server, then answer calls until "shutdown" or the driver goes away."""
    from trainer.parallel.ranks import die_with_parent

    die_with_parent()
    os.setpgid(0, 0)  # its own process group: shutdown stops whatever the engine started with it
    for name in list(
        os.environ
    ):  # the trainer's launcher variables describe the trainer's job, not the engine's
        if name in LAUNCHER_ENV or name.startswith("TORCHELASTIC_"):
            del os.environ[name]
    os.environ.update(env)  # the platform's choice of devices, before anything in this process touches one
    try:
        server = server_class(*args)
    except BaseException as exc:  # noqa: BLE001 - any failure to start is reported, in one line
        conn.send(("error", _one_line(exc), traceback.format_exc()))
        return
    conn.send(("ok", server.describe(), None))
    while True:
        try:
            method, call_args, kwargs = conn.recv()
        except EOFError:  # the driver closed the pipe (or died)
            break
        if method == "shutdown":
            server.close()
            conn.send(("ok", None, None))
            break
        try:
            conn.send(("ok", getattr(server, method)(*call_args, **kwargs), None))
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which stops the run
            conn.send(("error", _one_line(exc), traceback.format_exc()))


class EngineProcess:
    """A server object living in a child process; ``call`` runs one of its methods there."""

    def __init__(self, name: str, server_class: type, *args: Any, env: dict[str, str] | None = None,
                 wait: bool = True):
        self.name = name
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, server_class, args, env or {}), name=f"{name}-engine"
        )
        self._process.start()
        child.close()
        self.pid = self._process.pid
        self._stopped = False
        self._in_flight: str | None = None  # the method sent and not yet received
        atexit.register(self.shutdown)
        self.info = None
        if wait:
            self.wait_started()

    def wait_started(self) -> dict:
        """The server's ``describe()`` once it has started (``wait=False`` lets several start at once); a server
        that failed to start is stopped and raises ``EngineError``."""
        try:
            self.info = self._reply("start", failed=f"{self.name} engine failed to start")
        except EngineError:
            self.shutdown()
            raise
        return self.info

    def _died(self, during: str) -> EngineError:
        self._process.join(timeout=1)
        code = self._process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
        self._stopped = True
        return EngineError(f"{self.name} engine process {self.pid} died ({how}) during {during}")

    def _reply(self, during: str, failed: str | None = None) -> Any:
        while not self._conn.poll(POLL_SECONDS):
            if not self._process.is_alive():
                raise self._died(during)
        try:
            status, value, details = self._conn.recv()
        except (EOFError, ConnectionError):
            raise self._died(during) from None
        if status == "error":
            error = EngineError(f"{failed or f'{self.name} engine: {during} failed'}: {value}")
            error.details = details  # the server's traceback, for --debug
            raise error
        return value

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.send(method, *args, **kwargs)
        return self.receive()

    def send(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Start ``method`` in the server without waiting (one call in flight at a time); ``receive`` answers it."""
        if self._in_flight is not None:
            raise EngineError(f"{self.name} engine: {method} called while {self._in_flight} is in flight")
        self.check_health(method)
        try:
            self._conn.send((method, args, kwargs))
        except (BrokenPipeError, ConnectionError):
            raise self._died(method) from None
        self._in_flight = method

    def receive(self) -> Any:
        """The answer of the call in flight (waits for it)."""
        method, self._in_flight = self._in_flight, None
        return self._reply(method)

    def check_health(self, during: str = "a health check") -> None:
        if self._stopped:
            raise EngineError(f"{self.name} engine was shut down (pid {self.pid})")
        if not self._process.is_alive():
            raise self._died(during)

    def shutdown(self) -> None:
        """Ask the server to close, then stop its process group (SIGTERM, then SIGKILL); idempotent."""
        if self._stopped and not self._process.is_alive():
            return
        self._stopped = True
        atexit.unregister(self.shutdown)
        if self._process.is_alive():
            try:
                self._conn.send(("shutdown", (), {}))
                if self._conn.poll(STOP_SECONDS):
                    self._conn.recv()
            except (OSError, EOFError):
                pass
        for sig, wait in ((signal.SIGTERM, STOP_SECONDS), (signal.SIGKILL, STOP_SECONDS)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)  # the engine and anything it started
            self._process.join(timeout=wait)
            if not self._process.is_alive():
                break
        self._conn.close()


def write_config(hf_config, directory: str) -> None:
    """config.json of ``hf_config`` with its causal-LM architecture, dtypes as names: transformers before 4.56
    (vLLM 0.8.5's 4.51) keeps the newer ``dtype`` argument as a plain attribute, which its own
    ``save_pretrained`` cannot serialise."""
    import json

    import torch

    config = {
        k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
        for k, v in hf_config.to_dict().items()
    }
    config["torch_dtype"] = config.get("torch_dtype") or config.get("dtype") or "float32"
    if not config.get("architectures"):  # engines pick their model class by it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
    (Path(directory) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


MODEL_DTYPES = ("float32", "bfloat16", "float16")


def model_dtype(config_dir: str) -> str:
    """The dtype an engine serves the model in: the one ``write_config`` recorded (float32 when none)."""
    import json

    dtype = json.loads((Path(config_dir) / "config.json").read_text()).get("torch_dtype") or "float32"
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"model dtype {dtype}: engines serve {', '.join(MODEL_DTYPES)}")
    return dtype


class ProcessEngine:
    """The ``RolloutEngine`` of a server in its own process (vLLM, SGLang): the driver-side half of an adapter.

    The server (built in the child by ``server_class(config_dir, settings, seed)``) answers ``describe() ->
    {"logprob_kind": ...}``, ``generate(prompts, params) -> [(token_ids, logprobs, finish_reason)]`` (n per prompt,
    prompt-major), ``load_bucket(FlatBucket)``, ``weights_loaded(version)`` (drops cached prefixes), ``sleep(level)``,
    ``wake(tags)`` and ``close()``. This half writes the model's HF config for it, turns token ids into text,
    cuts weight syncs into buckets of ``rollout.sync_bucket_mb`` and calls sleep/wake only when the recipe
    colocates the engine with a sleep level.
    """

    name = "engine"

    def __init__(self, server_class: type, hf_config, rollout, *, decode, seed: int, settings: dict | None = None,
                 env: dict[str, str] | None = None, wait: bool = True):
        import shutil
        import tempfile

        self.decode = decode
        self.bucket_bytes = int(rollout.sync_bucket_mb * MB)
        self.sleep_level = rollout.sleep_level if rollout.colocate else 0
        self.weight_version = 0
        self.asleep: set[str] = set()  # what sleep released and wake has not taken back yet
        self.bucket_sizes: list[int] = []  # bytes of each bucket of the last sync
        self._config_dir = tempfile.mkdtemp(prefix=f"grpo-{self.name}-")
        self._remove_config = lambda: shutil.rmtree(self._config_dir, ignore_errors=True)
        write_config(hf_config, self._config_dir)  # the engine builds the model from it (dummy weights)
        settings = rollout.model_dump() | (settings or {})  # settings: what a server needs beyond rollout's
        self._process = EngineProcess(self.name, server_class, self._config_dir, settings, seed, env=env, wait=False)
        if wait:
            self.wait_started()

    def wait_started(self) -> None:
        """Wait for the server to start (constructed with ``wait=False``: spawned, not waited for)."""
        try:
            self.info = self._process.wait_started()
        except EngineError:
            self._remove_config()
            raise
        self.logprob_kind = self.info["logprob_kind"]

    def generate(self, prompts, params) -> list:
        return self.start_generate(prompts, params).result()

    def start_generate(self, prompts, params) -> Generation:
        """The server generates while the driver goes on; no other call until ``result()`` is taken."""
        if not prompts:
            return Generation(lambda: [])
        self._process.send("generate", [list(p) for p in prompts], params)
        return Generation(lambda: self._outputs(prompts, params, self._process.receive()))

    def _outputs(self, prompts, params, results) -> list:
        from trainer.rollout.base import RolloutOutput

        outputs = []
        for i, (token_ids, logprobs, finish) in enumerate(results):
            prompt = list(prompts[i // params.n])
            outputs.append(
                RolloutOutput(
                    prompt_token_ids=prompt,
                    token_ids=token_ids,
                    logprobs=logprobs,
                    text=self.decode(token_ids),
                    finish_reason=finish,
                )
            )
        return outputs

    def update_weights(self, named_tensors) -> None:
        load_weights([self], named_tensors)

    def sleep(self) -> None:
        if self.sleep_level and not self.asleep:
            self._process.call("sleep", self.sleep_level)
            self.asleep = {"weights", "kv_cache"}

    def wake(self, tags=("weights", "kv_cache")) -> None:
        tags = [t for t in tags if t in self.asleep]
        if tags:
            self._process.call("wake", tags)
            self.asleep -= set(tags)

    def check_health(self) -> None:
        self._process.check_health()

    def shutdown(self) -> None:
        self._process.shutdown()
        self._remove_config()


def load_weights(engines: list[ProcessEngine], named_tensors) -> None:
    """``update_weights`` of every engine in ``engines`` (replicas of one model) from one stream: each bucket is
    packed once, in shared memory, and loaded by all of them at once; then each drops its cached prefixes."""
    from trainer.rollout.buckets import BucketTooSmall, flat_buckets

    sizes: list[int] = []
    try:
        for bucket in flat_buckets(named_tensors, engines[0].bucket_bytes):
            sizes.append(bucket.nbytes)
            for engine in engines:
                engine._process.send("load_bucket", bucket)
            for engine in engines:
                engine._process.receive()
            del bucket  # its shared memory is freed once the servers have dropped their views too
    except BucketTooSmall as exc:
        raise EngineError(str(exc)) from None
    for engine in engines:
        engine.bucket_sizes = sizes
        engine.weight_version += 1
        engine._process.send("weights_loaded", engine.weight_version)
    for engine in engines:
        engine._process.receive()
