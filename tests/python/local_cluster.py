"""`llmos local` (a coordinator and two workers, SmolLM2 over both) kept
serving for a test module: its announced endpoints, stopped with Ctrl-C."""

import contextlib
import os
import re
import signal
import subprocess

TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/llmos/target"))
LLMOS = os.path.join(TARGET, "release", "llmos")


@contextlib.contextmanager
def local_cluster(env=None):
    """Yields {"grpc": url, "http": url, "worker_metrics": [url, ...]} once
    the cluster serves."""
    p = subprocess.Popen(
        [LLMOS, "local", "--prompt", "Say hi.", "--max-tokens", "2"],
        env=dict(os.environ, **(env or {})),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen = ""
    try:
        while "OpenAI HTTP API at" not in seen:
            line = p.stderr.readline()
            assert line, f"llmos local exited: {seen}"
            seen += line
        yield {
            "grpc": re.search(r"gRPC API \(with reflection\) at (\S+)", seen).group(1),
            "http": re.search(r"OpenAI HTTP API at (\S+)", seen).group(1),
            # Each worker's /metrics URL, in worker order.
            "worker_metrics": re.findall(r"worker local-\d+ on \S+ \(metrics (\S+)\)", seen),
        }
    finally:
        os.killpg(p.pid, signal.SIGINT)
        p.wait(timeout=20)
