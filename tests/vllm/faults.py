"""Faults planted in a run's rank (trainer.worker.FAULT_ENV) by the vLLM tests."""

import os
import signal


def kill_engine_at_second_generate() -> None:
    """SIGKILL the engine process just before the second generate call reaches it (episode 2's rollout)."""
    from trainer.rollout import process

    send, calls = process.EngineProcess.send, []  # every call, and generate's start, goes through send

    def killing_send(self, method, *args, **kwargs):
        if method == "generate":
            calls.append(method)
            if len(calls) == 2:
                os.kill(self.pid, signal.SIGKILL)
        return send(self, method, *args, **kwargs)

    process.EngineProcess.send = killing_send
