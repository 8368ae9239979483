"""RUN/train.log's console capture (trainer.console_log), in a process of its own: it redirects fds 1 and 2."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys, time
    from pathlib import Path

    from trainer.console_log import console_log, say_now

    def child():
        print("line of the spawned child", flush=True)

    if __name__ == "__main__":
        with console_log(Path(sys.argv[1])):
            process = multiprocessing.get_context("spawn").Process(target=child)
            process.start()
            process.join()
            print("line of the parent", flush=True)
            say_now("\\nline said now\\n")
            entered = time.monotonic()
        print(f"closed in {time.monotonic() - entered:.1f} s")
    """
)


def test_a_spawned_child_and_a_line_said_now_are_logged_and_nothing_holds_the_log_open(repo, tmp_path):
    """multiprocessing's resource tracker, started by the first spawned process, lives until the parent exits:
    started inside the block it held the capture pipes open, and closing the block waited 10 s per stream."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "train.log")], cwd=repo, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "train.log").read_text()
    assert "line of the spawned child" in log and "line of the parent" in log
    assert "\nline said now\n" in log and "line said now" in done.stderr  # not through the pumps: at once, in both
    closed = float(done.stdout.rsplit("closed in ", 1)[1].split()[0])
    assert closed < 5, f"closing the console log took {closed} s"
