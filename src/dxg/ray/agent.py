"""``dxg ray start``: one Ray node and its pydxg guest, run and stopped together.

The agent starts the node's guest (or uses one already running), reads its adapters, and runs
``ray start --block`` with them as custom resources (dxg.ray.resources). Then it watches:

- the guest's adapters change (a host lost, or back): on a worker node Ray is restarted with
  the new resources. Ray cannot resize a unit-instance resource in place; a restart is how a
  node's hardware changes in Ray (its running tasks fail over and Ray retries them elsewhere).
  On the head node a restart would end the cluster, so the head keeps the resources it started
  with and says so (docs/ray.md: put adapters that may come and go on worker nodes);
- Ray's node goes (``ray stop``, killed, removed): the agent stops the guest cleanly (its
  processes' objects are released on the hosts) and exits;
- SIGTERM or SIGINT: Ray's node first (it drains), then the guest.

What the agent did is kept in ``STATE_DIR/agent.json`` (``dxg ray status``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dxg.ray.resources import (
    ADAPTERS_ENV,
    UNIT_INSTANCE_ENV,
    VGPU,
    NodeAdapter,
    encode_adapters,
    node_resources,
)

__all__ = ["AgentSpec", "NodeAgent", "read_adapters", "read_luids"]

log = logging.getLogger(__name__)

RAY_STOP_TIMEOUT = 60.0  # Ray drains for up to 30 s on SIGTERM
GUEST_STOP_TIMEOUT = 30.0
NODE_TIMEOUT = 60.0  # for the guest's node to answer at start


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """How to run one node. ``guest_command``: the command that runs the guest (None: a guest
    already serves ``node``; the agent then does not stop it)."""

    node: Path
    state_dir: Path
    head: bool = False
    address: str | None = None  # a worker's head (HOST:PORT)
    port: int | None = None  # the head's GCS port
    guest_command: tuple[str, ...] | None = None
    ray_args: tuple[str, ...] = ()
    ray: str = "ray"
    poll: float = 1.0
    settle: int = 2  # polls a changed set of adapters must hold before Ray is restarted


def read_luids(node: Path) -> tuple[int, ...]:
    """The LUIDs the guest at ``node`` enumerates, in its order (a cheap local call)."""
    from dxg.client import open_node

    with open_node(str(node)) as n:
        adapters = n.adapters()
        try:
            return tuple(int(a.luid) for a in adapters)
        finally:
            for a in adapters:
                a.close()


def read_adapters(node: Path) -> tuple[NodeAdapter, ...]:
    """The guest's adapters with their memory (local + non-local totals, from its hosts'
    census; needs the node's owner or root, as ``dxg ls`` does). An adapter whose host does
    not say is left out: Ray must not be offered memory nobody can vouch for."""
    from dxg.cli.views import build_view, take_sample
    from dxg.client import open_node

    with open_node(str(node)) as n:
        view, _ = build_view(take_sample(n, strict=True))
    out = []
    for a in view.adapters:
        if a.state != "ACTIVE":  # (removed ones stay in the snapshot until their handles go)
            continue
        local, nonlocal_ = a.local.total, a.nonlocal_.total
        if local is None or nonlocal_ is None:
            log.warning("adapter 0x%016x: its host did not report its memory; not offered to "
                        "Ray", a.luid)
            continue
        out.append(NodeAdapter(int(a.luid), int(local) + int(nonlocal_)))
    return tuple(out)


@dataclass
class _State:
    adapters: tuple[NodeAdapter, ...] = ()
    ray_starts: int = 0
    events: list[str] = field(default_factory=list)


class NodeAgent:
    """Runs one node until it is stopped or its Ray node goes; ``run()`` returns the exit
    status."""

    def __init__(self, spec: AgentSpec) -> None:
        self.spec = spec
        self.stopping = threading.Event()
        self.guest: subprocess.Popen[bytes] | None = None
        self.ray: subprocess.Popen[bytes] | None = None
        self.state = _State()

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        self.spec.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._start_guest()
            self._wait_node()
            seen = self._poll_luids() or frozenset()
            try:
                adapters = read_adapters(self.spec.node)
            except Exception as e:
                raise _AgentError(f"cannot read the guest's adapters at {self.spec.node}: {e} "
                                  "(the agent needs the node's owner or root, as `dxg ls`)"
                                  ) from None
            self._start_ray(adapters)
            return self._watch(seen)
        except _AgentError as e:
            print(f"dxg ray: {e}", file=sys.stderr)
            return 1
        finally:
            self._stop_ray()
            self._stop_guest()
            self._event("stopped")

    def stop(self) -> None:
        self.stopping.set()

    def _watch(self, seen: frozenset[int]) -> int:
        """``seen``: the adapters as the poll read them just before Ray was started (one list
        compared with itself: an adapter left out of Ray's resources, its memory unknown, must
        not look like a change at every poll)."""
        changed_for = 0
        warned: frozenset[int] | None = None
        while not self.stopping.wait(self.spec.poll):
            if self.guest is not None and self.guest.poll() is not None:
                raise _AgentError(f"the pydxg guest exited ({self.guest.returncode}); see "
                                  f"{self.spec.state_dir / 'guest.log'}")
            assert self.ray is not None
            if self.ray.poll() is not None:
                self._event(f"the Ray node exited ({self.ray.returncode}): stopping the guest")
                return 0
            luids = self._poll_luids()
            if luids is None:  # the guest is restarting or overloaded: try again
                continue
            if luids == seen:
                changed_for = 0
                continue
            changed_for += 1
            if changed_for < self.spec.settle:
                continue
            if self.spec.head:
                if warned != luids:
                    self._event(f"the guest's adapters changed ({len(seen)} -> {len(luids)}); "
                                "the head keeps its Ray resources (a restart would end the "
                                "cluster)")
                    warned = luids
                continue
            try:
                adapters = read_adapters(self.spec.node)
            except Exception as e:  # a census that failed now may work at the next poll
                log.warning("reading the guest's adapters (census): %s", e)
                continue
            self._event(f"adapters changed ({len(seen)} -> {len(luids)}): restarting Ray with "
                        f"{len(adapters)}")
            self._stop_ray()
            if self.stopping.is_set():
                break
            self._start_ray(adapters)
            seen = luids
            changed_for = 0
        return 0

    def _poll_luids(self) -> frozenset[int] | None:
        try:
            return frozenset(read_luids(self.spec.node))
        except Exception as e:
            log.info("reading the guest's adapters: %s", e)
            return None

    # ---- the guest -----------------------------------------------------------------------------

    def _start_guest(self) -> None:
        if self.spec.guest_command is None:
            return
        logf = open(self.spec.state_dir / "guest.log", "ab")
        try:
            self.guest = subprocess.Popen(self.spec.guest_command, stdin=subprocess.DEVNULL,
                                          stdout=logf, stderr=logf, start_new_session=True)
        finally:
            logf.close()
        self._event(f"guest started (pid {self.guest.pid})")

    def _wait_node(self) -> None:
        deadline = time.monotonic() + NODE_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline and not self.stopping.is_set():
            if self.guest is not None and self.guest.poll() is not None:
                raise _AgentError(f"the pydxg guest exited ({self.guest.returncode}) before its "
                                  f"node answered; see {self.spec.state_dir / 'guest.log'}")
            try:
                read_luids(self.spec.node)
                return
            except Exception as e:
                last = e
            self.stopping.wait(0.1)
        if self.stopping.is_set():
            raise _AgentError("stopped before the guest's node answered")
        raise _AgentError(f"the guest's node {self.spec.node} did not answer in "
                          f"{NODE_TIMEOUT:.0f} s ({last}); check the guest (`dxg guest`) and its "
                          "hosts")

    def _stop_guest(self) -> None:
        g, self.guest = self.guest, None
        if g is None or g.poll() is not None:
            return
        g.send_signal(signal.SIGTERM)
        try:
            g.wait(GUEST_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._event("the guest did not stop in time: killed")
            g.kill()
            g.wait()
        self._event(f"guest stopped ({g.returncode})")

    # ---- Ray -----------------------------------------------------------------------------------

    def ray_command(self, adapters: Sequence[NodeAdapter]) -> list[str]:
        cmd = [self.spec.ray, "start", "--block", "--disable-usage-stats"]
        if self.spec.head:
            cmd.append("--head")
            if self.spec.port is not None:
                cmd.append(f"--port={self.spec.port}")
        else:
            if not self.spec.address:
                raise _AgentError("a worker node needs --address HOST:PORT of the Ray head")
            cmd.append(f"--address={self.spec.address}")
        resources = node_resources(adapters)
        if resources:
            cmd.append("--resources=" + json.dumps(resources, sort_keys=True))
        return [*cmd, *self.spec.ray_args]

    def ray_env(self, adapters: Sequence[NodeAdapter]) -> dict[str, str]:
        env = dict(os.environ)
        units = [u for u in env.get(UNIT_INSTANCE_ENV, "").split(",") if u]
        if VGPU not in units:
            units.append(VGPU)
        env[UNIT_INSTANCE_ENV] = ",".join(units)
        env[ADAPTERS_ENV] = encode_adapters(adapters)
        env["DXG_NODE"] = str(self.spec.node)
        return env

    def _start_ray(self, adapters: tuple[NodeAdapter, ...]) -> None:
        cmd = self.ray_command(adapters)
        logf = open(self.spec.state_dir / "ray.log", "ab")
        try:
            self.ray = subprocess.Popen(cmd, env=self.ray_env(adapters), stdin=subprocess.DEVNULL,
                                        stdout=logf, stderr=logf, start_new_session=True)
        except OSError as e:
            raise _AgentError(f"cannot run {self.spec.ray!r} ({e}); install Ray: pip install "
                              "'pydxg[ray]'") from None
        finally:
            logf.close()
        self.state.adapters = adapters
        self.state.ray_starts += 1
        self._event(f"Ray node started (pid {self.ray.pid}) with {len(adapters)} adapter(s): "
                    f"{json.dumps(node_resources(adapters), sort_keys=True)}")

    def _stop_ray(self) -> None:
        r, self.ray = self.ray, None
        if r is None:
            return
        if r.poll() is None:
            r.send_signal(signal.SIGTERM)
            try:
                r.wait(RAY_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._event("the Ray node did not stop in time: killed")
        # whatever `ray start` left in its session (it started the raylet and its workers)
        try:
            os.killpg(r.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        r.wait()
        self._event(f"Ray node stopped ({r.returncode})")

    # ---- state ---------------------------------------------------------------------------------

    def _event(self, text: str) -> None:
        log.warning("%s", text)
        self.state.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.state.events[:-50]
        self._write_state()

    def _write_state(self) -> None:
        data: dict[str, Any] = {
            "pid": os.getpid(), "node": str(self.spec.node),
            "role": "head" if self.spec.head else "worker",
            "adapters": [{"luid": f"0x{a.luid:016x}", "memory": a.memory}
                         for a in self.state.adapters],
            "resources": node_resources(self.state.adapters),
            "ray_pid": None if self.ray is None else self.ray.pid,
            "guest_pid": None if self.guest is None else self.guest.pid,
            "ray_starts": self.state.ray_starts, "events": self.state.events,
        }
        path = self.spec.state_dir / "agent.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            tmp.replace(path)
        except OSError as e:
            log.info("cannot write %s: %s", path, e)


class _AgentError(Exception):
    pass
