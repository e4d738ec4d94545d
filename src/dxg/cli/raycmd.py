"""``dxg ray``: run a Ray node with its pydxg guest (``start``), say what it advertises
(``resources``) and what its agent did (``status``). docs/ray.md."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from dxg.cli import preflight
from dxg.uapi.nodepath import default_node_path

DXG = (sys.executable, "-m", "dxg.cli.main")


def default_state_dir() -> Path:
    """Next to the user's default node: ``<node dir>/ray``."""
    return default_node_path().parent / "ray"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("ray", help="pydxg adapters as Ray resources: run a Ray node with its "
                       "guest (docs/ray.md)")
    rsub = p.add_subparsers(dest="ray_command", required=True, metavar="RAYCOMMAND")

    s = rsub.add_parser("start", help="run this machine's Ray node and its pydxg guest "
                        "together, in the foreground (Ctrl-C or SIGTERM stops both)",
                        epilog="Arguments after `--` go to `ray start` (e.g. -- --num-cpus 8).")
    role = s.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start the cluster's head node")
    role.add_argument("--address", metavar="HOST:PORT", help="join the cluster at this head")
    s.add_argument("--port", type=int, default=6379, help="the head's port (default 6379)")
    guest = s.add_mutually_exclusive_group(required=True)
    guest.add_argument("--up", action="store_true",
                       help="run host and guest here (`dxg up`, CPU soft adapters)")
    guest.add_argument("--connect", action="append", metavar="ADDR", type=preflight.bus_address,
                       help="run a guest bound to the host at ADDR (repeat for several)")
    guest.add_argument("--attach", action="store_true",
                       help="use the guest already serving --node (the agent does not stop it)")
    s.add_argument("--node", metavar="PATH",
                   help="the guest's node socket (default: $DXG_NODE or the standard path, "
                        "where `dxg ls` looks)")
    s.add_argument("--state-dir", metavar="DIR", type=Path, default=None,
                   help="logs and agent.json (default: ray/ next to the user's default node)")
    s.add_argument("--adapters", type=preflight.adapter_count, default=2, metavar="N",
                   help="soft adapters with --up (default 2)")
    s.add_argument("--compute-share", type=int, default=100, metavar="N",
                   help="the guest's default compute share (default 100: a task's fraction "
                        "of an adapter becomes its share, 25 for 0.25)")
    s.add_argument("--guest-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for the guest (`dxg guest`/`dxg up`), repeatable")
    s.add_argument("--poll", type=float, default=1.0, metavar="SECONDS",
                   help="how often the guest's adapters are checked (default 1)")
    s.add_argument("--ray", metavar="PATH", help="the `ray` command (default: the one next "
                   "to this Python, else on PATH)")
    s.add_argument("ray_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_ray_start)

    r = rsub.add_parser("resources", help="the Ray resources the guest at --node advertises")
    r.add_argument("--node", metavar="PATH", help="node socket path (default: $DXG_NODE or the "
                   "standard path)")
    r.set_defaults(func=cmd_ray_resources)

    t = rsub.add_parser("status", help="what this machine's agent runs and did")
    t.add_argument("--state-dir", metavar="DIR", type=Path, default=None)
    t.set_defaults(func=cmd_ray_status)


def _ray_executable(given: str | None) -> str:
    if given:
        return given
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise RuntimeError("the `ray` command was not found: install Ray (pip install "
                           "'pydxg[ray]') or give --ray PATH")
    return found


def cmd_ray_start(args: argparse.Namespace) -> int:
    from dxg.ray.agent import AgentSpec, NodeAgent

    state_dir = args.state_dir or default_state_dir()
    node = Path(args.node) if args.node else Path(os.environ.get("DXG_NODE")
                                                  or default_node_path())
    if args.attach:
        guest_cmd = None
    else:
        common = ("--node", str(node), "--compute-share", str(args.compute_share),
                  *args.guest_arg)
        if args.up:
            guest_cmd = (*DXG, "up", "--adapters", str(args.adapters), *common)
        else:
            connects = [x for a in args.connect for x in ("--connect", str(a))]
            guest_cmd = (*DXG, "guest", *connects, "--wait", *common)
    ray_args = list(args.ray_args)
    if ray_args[:1] == ["--"]:
        ray_args = ray_args[1:]
    spec = AgentSpec(node=node, state_dir=state_dir, head=args.head, address=args.address,
                     port=args.port if args.head else None, guest_command=guest_cmd,
                     ray_args=tuple(ray_args), ray=_ray_executable(args.ray), poll=args.poll)
    agent = NodeAgent(spec)

    def stop(signum: int, frame: Any) -> None:
        if agent.stopping.is_set():  # a second signal: stop now, even inside a stuck call
            raise KeyboardInterrupt
        agent.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"dxg ray: {'head' if args.head else 'worker'} node, guest node {node}, state "
          f"{state_dir}", flush=True)
    return agent.run()


def cmd_ray_resources(args: argparse.Namespace) -> int:
    from dxg.ray.agent import read_adapters
    from dxg.ray.resources import node_resources

    node = Path(args.node) if args.node else Path(os.environ.get("DXG_NODE")
                                                  or default_node_path())
    print(json.dumps(node_resources(read_adapters(node)), indent=2, sort_keys=True))
    return 0


def cmd_ray_status(args: argparse.Namespace) -> int:
    path = (args.state_dir or default_state_dir()) / "agent.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        print(f"dxg ray status: no agent has run with state in {path.parent} (start one: dxg "
              "ray start ...)", file=sys.stderr)
        return 1
    alive = _alive(data.get("pid"))
    print(f"agent pid {data.get('pid')} ({'running' if alive else 'not running'}), "
          f"{data.get('role')} node, guest node {data.get('node')}")
    for a in data.get("adapters", []):
        print(f"  adapter {a.get('luid')}  {a.get('memory', 0) / (1 << 30):.1f} GiB")
    print(f"  Ray started {data.get('ray_starts')} time(s); resources "
          f"{json.dumps(data.get('resources'), sort_keys=True)}")
    for line in data.get("events", [])[-10:]:
        print(f"  {line}")
    return 0


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
