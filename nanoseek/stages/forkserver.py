"""Run a program's commands (`python -m PROGRAM ARGS`) as processes forked from one server that imported what they
use once.

A new interpreter per stage pays ~3-4 s of imports (torch ~1.4 s, reasoning_gym ~1.1 s, torch._dynamo ~1.1 s
through torch.optim) before it computes anything; the speedrun runs eight of them. The server (`python -m
nanoseek.stages.forkserver`) imports them once, then forks one child per command read from its stdin and writes
back the child's exit status. Each child is a process of its own, as a subprocess would be (its own memory,
seeds, threads and signal handling), with the command's stdout and stderr appended to files.

The server only imports and never computes: an OpenMP thread pool that has run a parallel region does not
survive a fork (the child hangs in its first parallel op), so forking the speedrun's own process, or a test
runner's, would not be safe. Where the OS cannot fork, commands run as `python -m PROGRAM` subprocesses.

The caller names the program (the speedrun: "nanoseek"), and a child runs it as `python -m` would (runpy), so
this module, a stage, never imports the command line that sits above the stages.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import traceback
from pathlib import Path

# what the stages import; importing is all the server does with them (the program's own entry, a few ms of
# argparse, is imported by each child)
PRELOAD = ("torch", "torch._dynamo", "reasoning_gym", "nanoseek.stages.pretrain",
           "nanoseek.stages.sft", "nanoseek.stages.grpo", "nanoseek.stages.sample", "nanoseek.stages.evaluate",
           "nanoseek.stages.distill")


class StageRunner:
    """`run(args, stderr, stdout)` → exit status of `python -m PROGRAM ARGS`, output appended to the files. One
    server process for the runner's lifetime (started on first use); `close()` ends it."""

    def __init__(self, program: str):
        self.program = program  # a package or module with a __main__, as `python -m` takes it
        self._server: subprocess.Popen | None = None
        self.child: int | None = None  # the pid of the stage running now (None between stages)

    def run(self, args: list[str], stderr: Path, stdout: Path | None = None) -> int:
        stdout = stdout or stderr
        if not hasattr(os, "fork"):
            with open(stderr, "a") as err, open(stdout, "a") as out:
                return subprocess.run([sys.executable, "-m", self.program, *args], stdout=out,
                                      stderr=err).returncode
        server = self._start()
        server.stdin.write(json.dumps({"args": args, "stdout": str(stdout), "stderr": str(stderr)}) + "\n")
        server.stdin.flush()
        self.child = int(self._reply(server, stderr))  # the server reports the child's pid, then its exit status
        try:
            return int(self._reply(server, stderr))
        finally:
            self.child = None

    @staticmethod
    def _reply(server: subprocess.Popen, stderr: Path) -> str:
        while True:
            try:
                line = server.stdout.readline()
                break
            except KeyboardInterrupt:  # the stage got the same Ctrl-C: it saves what it can, then exits with 130
                continue
        if not line:
            raise RuntimeError(f"the stage server exited with status {server.wait()} (its errors are in {stderr})")
        return line

    def _start(self) -> subprocess.Popen:
        if self._server is None or self._server.poll() is not None:
            self._server = subprocess.Popen([sys.executable, "-m", "nanoseek.stages.forkserver", self.program],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self._server

    def close(self) -> None:
        if self._server is not None:
            self._server.stdin.close()  # the server ends at the end of its input
            self._server.wait()
            self._server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve(program: str) -> None:
    """The server: import PRELOAD, then for each JSON line {"args", "stdout", "stderr"} fork a child that runs
    `program` with those args, print its pid, and then its exit status (128 + N when killed by signal N, as a shell
    reports it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the stage running, not for the server
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(program, job["args"], job["stdout"], job["stderr"])
        print(pid, flush=True)
        status = os.waitpid(pid, 0)[1]
        code = os.waitstatus_to_exitcode(status)
        print(code if code >= 0 else 128 - code, flush=True)


def _child(program: str, args: list[str], stdout: str, stderr: str) -> None:
    """In the forked child: stdin from /dev/null, output appended to the files, then `python -m PROGRAM ARGS`
    (its __main__ as `-m` runs it: sys.argv, __name__ == "__main__"); never returns."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, stdout, os.O_WRONLY | os.O_APPEND | os.O_CREAT),
                                (2, stderr, os.O_WRONLY | os.O_APPEND | os.O_CREAT)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        sys.argv = [program, *args]
        runpy.run_module(program, run_name="__main__", alter_sys=True)
        code = 0  # a __main__ that returns without sys.exit, as `python -m` ends
    except SystemExit as e:  # ends as the interpreter ends on it: None is 0, a message is printed and is 1
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # a bug: its traceback goes to the stage's log, as an uncaught one would
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    serve(sys.argv[1])
