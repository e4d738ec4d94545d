"""Run (as root) inside a mount namespace of its own (tests/test_cli_messages.py): tmpfs over
/run and over nobody's per-user node directory, so that the machine's /run/pydxg is neither seen
nor touched (not over all of /tmp: this checkout and its virtualenv may live there). `dxg ls` as nobody
with no node running, then root's `dxg up` on the default (system) path, then `dxg ls` as
nobody again; prints {"before": ..., "after": ...} (each {"code", "out", "err"})."""

import contextlib
import ctypes.util  # noqa: F401  (nobody may not read the interpreter: imported as root)
import io
import json
import os
import subprocess
import sys

import dxg.client.nodeprobe  # noqa: F401  (nobody may not read this tree: imported as root)
from dxg.cli.main import main

os.makedirs("/tmp/pydxg-65534", exist_ok=True)
for where in ("/run", "/tmp/pydxg-65534"):
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", where], check=True)
env = {k: v for k, v in os.environ.items() if k not in ("DXG_NODE", "XDG_RUNTIME_DIR")}
os.environ.pop("DXG_NODE", None)
os.environ.pop("XDG_RUNTIME_DIR", None)


def as_nobody(argv: list[str]) -> dict:
    """``dxg argv`` in a forked child that dropped to nobody: exit code, stdout, stderr."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                code = main(argv)
            except BaseException:
                import traceback
                traceback.print_exc()
                raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r) as o, os.fdopen(err_r) as e:
        out, err = o.read(), e.read()
    _, status = os.waitpid(pid, 0)
    return {"code": os.waitstatus_to_exitcode(status), "out": out, "err": err}


with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    main(["ls", "--json", "--interval", "0"])  # as root first (no node yet): the error path's
    # modules are loaded before the child drops to nobody, who may not read this checkout
result = {"before": as_nobody(["ls", "--json", "--interval", "0"])}
up = subprocess.Popen([sys.executable, "-m", "dxg.cli.main", "up", "--adapters", "1"],
                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
try:
    ready = subprocess.run([sys.executable, "-m", "dxg.cli.main", "wait", "--adapters", "1",
                            "--timeout", "60"], env=env, capture_output=True, text=True)
    if ready.returncode != 0:
        raise SystemExit(f"dxg up did not come up: {ready.stderr}")
    with contextlib.redirect_stdout(io.StringIO()):  # as root first: everything `ls` imports
        main(["ls", "--json", "--interval", "0"])  # is loaded before the child drops to nobody
    result["after"] = as_nobody(["ls", "--json", "--interval", "0"])
finally:
    up.terminate()
    up.wait(timeout=30)
print(json.dumps(result), flush=True)
