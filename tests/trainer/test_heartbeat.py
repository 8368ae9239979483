"""A one-process run watches itself (trainer.heartbeat.ProcessWatch): no beat for the stall timeout while it runs
is one line naming where its main thread is; the time it spent stopped (SIGSTOP, Ctrl-Z) does not count."""

import signal
import subprocess
import sys
import textwrap
import time

from trainer import heartbeat


def test_a_main_thread_that_stops_beating_is_named_where_it_waits():
    lines = []
    with heartbeat.ProcessWatch(0.5, on_stall=lines.append, poll_s=0.05):
        heartbeat.beat()
        time.sleep(1.5)  # the main thread waits here, beyond the timeout
    (line,) = lines
    assert line.startswith(
        "no progress for 0.5 s (run.stall_timeout_s); stuck: the run's one process, its main "
        f"thread at {__file__}:"
    )
    assert line.endswith("(test_a_main_thread_that_stops_beating_is_named_where_it_waits)")


def test_a_beating_main_thread_is_left_alone():
    lines = []
    with heartbeat.ProcessWatch(0.5, on_stall=lines.append, poll_s=0.05):
        for _ in range(30):
            heartbeat.beat()
            time.sleep(0.05)
    assert lines == []


def test_time_stopped_by_a_signal_does_not_count(tmp_path):
    """A stopped one-process run is paused, not stuck: continued after longer than its timeout, it goes on."""
    script = textwrap.dedent("""
        import time
        from trainer import heartbeat

        def work(seconds):  # CPU time: it stands still while the process is stopped, as a real episode's does
            start = time.process_time()
            while time.process_time() - start < seconds:
                pass

        with heartbeat.ProcessWatch(3.0, poll_s=0.1):
            for _ in range(3):
                heartbeat.beat()
                print("beat", flush=True)
                work(0.2)
        print("finished", flush=True)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "beat\n"
    proc.send_signal(signal.SIGSTOP)  # in the first episode's work
    time.sleep(5)  # beyond the timeout
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out == "beat\nbeat\nfinished\n", err


def test_a_second_run_in_the_same_process_is_not_watched_before_its_first_beat():
    """Beats of an earlier run in this process (tests run several) do not make a starting run look stuck."""
    heartbeat.beat()
    lines = []
    with heartbeat.ProcessWatch(0.3, on_stall=lines.append, poll_s=0.05):
        time.sleep(1.0)  # starting: building models, loading weights
    assert lines == []
