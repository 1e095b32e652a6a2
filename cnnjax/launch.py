"""Multi-process training on one machine: ``python -m cnnjax.launch --num_processes=N
[--devices_per_process=K] -- [python -m cnnjax.train flags]``.

Starts N ``python -m cnnjax.train`` processes that meet at ``127.0.0.1`` on a free port
(``cnnjax.distributed``), each line of their output prefixed with ``[i]``. Ctrl-C or SIGTERM is
passed on to every process. The first process to fail ends the run: the others get SIGTERM,
then SIGKILL after ``--grace_s``, and the launcher exits with that process's status (non-zero).
A process that exits with 143 or 130 was preempted (SIGTERM / SIGINT, ``cnnjax.preemption``):
the others are stopping at the same step and writing their part of the same checkpoint, so
they are left to finish (SIGTERM and SIGKILL only after ``PREEMPTED_WAIT_S``), and the
launcher exits with that status too.
``--devices_per_process=K`` gives each process K fake CPU devices
(``--xla_force_host_platform_device_count``), to try a multi-process run on a CPU.

Example (2 processes x 2 CPU devices = the mesh of 4 devices of one 4-device process)::

    python -m cnnjax.launch --num_processes=2 --devices_per_process=2 -- \\
        --config=tiny --workdir=/tmp/tiny2x2
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

from cnnjax import cli
from cnnjax.errors import ConfigError

POLL_S = 0.2
# Exit statuses of a preempted cnnjax.train (128 + SIGTERM, 128 + SIGINT).
PREEMPTED = (128 + signal.SIGTERM, 128 + signal.SIGINT)
# How long the others may take to finish a preemption checkpoint before they are stopped.
PREEMPTED_WAIT_S = 600.0


def define_flags() -> dict:
    """The launcher's flags (defined when it runs: ``cnnjax.distributed``, imported beside it in
    one process, has its own ``--num_processes``)."""
    return {
        "num_processes": flags.DEFINE_integer("num_processes", 2, "Training processes to start."),
        "devices": flags.DEFINE_integer(
            "devices_per_process", 0, "Fake CPU devices per process (0: leave XLA_FLAGS as is)."
        ),
        "port": flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one)."),
        "grace_s": flags.DEFINE_float(
            "grace_s", 10.0, "Seconds between SIGTERM and SIGKILL when stopping the processes."
        ),
        "module": flags.DEFINE_string("module", "cnnjax.train", "The module every process runs."),
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int, environ=None) -> dict:
    """The environment of one process: ``devices`` fake CPU devices when > 0 (replacing any
    device count in ``XLA_FLAGS``), unbuffered output."""
    env = dict(os.environ if environ is None else environ)
    if devices > 0:
        name = "xla_force_host_platform_device_count"
        kept = [t for t in env.get("XLA_FLAGS", "").split() if t.lstrip("-").split("=")[0] != name]
        env["XLA_FLAGS"] = " ".join([*kept, f"--{name}={devices}"])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def commands(num_processes: int, port: int, args: list[str], module: str) -> list[list[str]]:
    """The command line of each process."""
    address = f"--coordinator_address=127.0.0.1:{port}"
    return [
        [sys.executable, "-m", module, *args, address, f"--num_processes={num_processes}"]
        + [f"--process_id={i}"]
        for i in range(num_processes)
    ]


def _pump(index: int, stream, lock: threading.Lock) -> None:
    """Copies one process's output to ours, each line prefixed with ``[index]``."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\r\n")
        with lock:
            sys.stdout.write(f"[{index}] {line}\n")
            sys.stdout.flush()
    stream.close()


def exit_status(returncode: int) -> int:
    """A child's return code as a shell exit status (killed by signal N -> 128 + N)."""
    return returncode if returncode >= 0 else 128 - returncode


class Group:
    """The started processes: forwards signals, stops them all after a failure."""

    def __init__(self, cmds: list[list[str]], env: dict, grace_s: float):
        self.grace_s, self.lock = grace_s, threading.Lock()
        self.procs, self.pumps = [], []
        for i, cmd in enumerate(cmds):
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True,  # our signals reach them only through forward()
            )  # fmt: skip
            pump = threading.Thread(target=_pump, args=(i, proc.stdout, self.lock), daemon=True)
            pump.start()
            self.procs.append(proc)
            self.pumps.append(pump)

    def forward(self, signum: int, _frame=None) -> None:
        """Passes a signal on to every running process."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def stop(self) -> None:
        """SIGTERM to the running processes, SIGKILL to those still alive after the grace."""
        self.forward(signal.SIGTERM)
        self.wait_all(self.grace_s)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()

    def wait_all(self, seconds: float) -> None:
        """Waits up to ``seconds`` for every process to exit."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(POLL_S)

    def say(self, message: str) -> None:
        with self.lock:
            print(f"launch: {message}", file=sys.stderr, flush=True)

    def wait(self) -> int:
        """Waits for every process; the first failure stops the rest. Returns the exit status."""
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                running = [j for j, c in enumerate(codes) if c is None]
                if exit_status(code) in PREEMPTED and running:
                    self.say(f"process {i} was preempted; waiting for the others to save")
                    self.wait_all(PREEMPTED_WAIT_S)
                    codes = [p.poll() for p in self.procs]
                    running = [j for j, c in enumerate(codes) if c is None]
                self.say(
                    f"process {i} exited with status {exit_status(code)}; stopping "
                    f"{'processes ' + ', '.join(map(str, running)) if running else 'nothing'}"
                )
                self.stop()
                self._drain()
                return exit_status(code)
            if all(c == 0 for c in codes):
                self._drain()
                return 0
            time.sleep(POLL_S)

    def _drain(self) -> None:
        for pump in self.pumps:
            pump.join(timeout=5)


def launch(num_processes: int, args: list[str], devices: int = 0, port: int = 0,
           grace_s: float = 10.0, module: str = "cnnjax.train") -> int:  # fmt: skip
    """Runs ``num_processes`` processes of ``python -m module args``; returns the exit status.

    Raises:
      ConfigError: ``num_processes`` < 1 or ``devices`` < 0.
    """
    if num_processes < 1 or devices < 0:
        raise ConfigError(
            f"need --num_processes >= 1 and --devices_per_process >= 0, got {num_processes} "
            f"and {devices}"
        )
    cmds = commands(num_processes, port or free_port(), args, module)
    group = Group(cmds, process_env(devices), grace_s)
    previous = {s: signal.signal(s, group.forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return group.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run() -> None:
    """The launcher's entry point: one-line errors like every cnnjax tool, but no JAX here."""
    values = define_flags()

    def main(argv):
        args = argv[1:]
        if args and args[0] == "--":
            args = args[1:]
        try:
            return launch(**{k: v.value for k, v in values.items()}, args=args)
        except ConfigError as e:
            cli.fail(str(e), e)

    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
