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
    """Yields {"key": admin API key, "grpc": url, "http": url,
    "worker_metrics": [url, ...]} once the cluster serves; LLMOS_API_KEY is
    the key meanwhile."""
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
        key = re.search(r"export LLMOS_API_KEY=(\S+)", seen).group(1)
        # The llmos CLI run by the tests sends it too.
        before = os.environ.get("LLMOS_API_KEY")
        os.environ["LLMOS_API_KEY"] = key
        yield {
            # The admin API key `llmos local` made for the cluster.
            "key": key,
            "grpc": re.search(r"gRPC API \(with reflection\) at (\S+)", seen).group(1),
            "http": re.search(r"OpenAI HTTP API at (\S+)", seen).group(1),
            # Each worker's /metrics URL, in worker order.
            "worker_metrics": re.findall(r"worker local-\d+ on \S+ \(metrics (\S+)\)", seen),
        }
        if before is None:
            os.environ.pop("LLMOS_API_KEY", None)
        else:
            os.environ["LLMOS_API_KEY"] = before
    finally:
        os.killpg(p.pid, signal.SIGINT)
        p.wait(timeout=20)


def auth():
    """The Authorization header of the running cluster's key."""
    return {"authorization": "Bearer " + os.environ["LLMOS_API_KEY"]}
