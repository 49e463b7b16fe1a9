"""A helper process for the kill tests: it imports torch, transformers and slimformer once, then
for each request forks a child that runs ``slimformer.cli.main(argv)`` as a real, separate
process, optionally SIGKILLs it after a delay, and reports how it ended. Forking skips the few
seconds of Python start-up per run, so a test can kill a job twenty times in well under a minute.

Protocol (one JSON object a line): request ``{"argv": [...], "kill_after": seconds or null,
"log": path, "slow_save": seconds, "kill_when": [glob patterns] or null}``. ``slow_save``: the
child sleeps that long right after writing the output's weights file, before the rest of the
folder (a wider window for kills to land in); ``kill_when``: the delay counts from when a file
matching one of the patterns is written. Answer ``{"killed": bool, "triggered": bool, "rc": int
or null, "seconds": float}``. Started with a
model folder as its argument, it loads that model once first, so that the lazily imported
modules of its architecture are imported before any fork (single-threaded torch: fork-safe).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
import time


def main() -> None:
    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401
    import slimformer.cli  # noqa: F401
    import slimformer.compress  # noqa: F401
    import slimformer.io.serialization  # noqa: F401
    import slimformer.methods  # noqa: F401
    import slimformer.methods.checkpoint  # noqa: F401

    if len(sys.argv) > 1:
        from slimformer.models import load_model

        load_model(sys.argv[1])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        t0 = time.perf_counter()
        started = time.time()
        triggered = False
        pid = os.fork()
        if pid == 0:  # the child: one CLI run
            rc = 3
            try:
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                if request.get("slow_save"):
                    import slimformer.io.serialization as serialization

                    write = serialization.save_file

                    def slow_save_file(*args, **kwargs):
                        write(*args, **kwargs)
                        time.sleep(request["slow_save"])

                    serialization.save_file = slow_save_file
                rc = slimformer.cli.main(request["argv"])
            except BaseException:  # noqa: BLE001 - report and leave without running the parent's cleanup
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc if isinstance(rc, int) else 3)
        killed = False
        delay = request.get("kill_after")
        if delay is not None:
            patterns = request.get("kill_when") or []  # the delay counts from when a new matching file appears
            deadline = None if patterns else t0 + delay
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if deadline is None and _new_file(patterns, started):
                    deadline = time.perf_counter() + delay
                    triggered = True
                if deadline is not None and time.perf_counter() >= deadline:
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
                    break
                time.sleep(0.002)
        else:
            _, status = os.waitpid(pid, 0)
        rc = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        print(json.dumps({"killed": killed, "triggered": triggered, "rc": rc, "seconds": time.perf_counter() - t0}), flush=True)


def _new_file(patterns: list[str], since: float) -> bool:
    """Whether a file matching one of ``patterns`` was written at or after ``since`` (epoch s)."""
    for pattern in patterns:
        for path in glob.glob(pattern):
            try:
                if os.stat(path).st_mtime >= since - 0.01:
                    return True
            except OSError:
                continue
    return False


if __name__ == "__main__":
    main()
