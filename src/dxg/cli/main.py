"""`dxg` entry point. Every failure a user can hit ends in one clear line on stderr, no
traceback (set DXG_DEBUG=1 to see tracebacks)."""

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dxg.cli import commands, preflight, raycmd


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _add_node(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", help="node socket path (default: $DXG_NODE or the standard path)")


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0660") from None
    if not 0 <= mode <= 0o7777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file mode")
    return mode


def _add_serve(p: argparse.ArgumentParser) -> None:
    _add_node(p)
    p.add_argument("--mode", default=0o666, type=_octal_mode,
                   help="node permissions, octal (default 0666)")
    p.add_argument("--group", help="group owning the node (name or gid)")
    p.add_argument("--dev-node", metavar="PATH",
                   help="also serve a FUSE device file at PATH (e.g. /dev/dxg; needs FUSE)")
    p.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="client connections the node serves at once (default 1024)")
    p.add_argument("--max-per-uid", type=int, default=None, metavar="N",
                   help="connections one non-root user may hold (default a quarter of the "
                        "maximum)")


def _add_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dedicated-memory", type=int, default=1024, metavar="MIB",
                   help="each adapter's local segment (its video memory), MiB (default 1024)")
    p.add_argument("--shared-memory", type=int, default=4096, metavar="MIB",
                   help="each adapter's non-local segment, MiB (default 4096)")


def _size(text: str) -> int:
    from dxg.runtime.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _share(text: str) -> int:
    from dxg.guest.policy import parse_share

    try:
        return parse_share(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tdr(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a TDR limit (use seconds, e.g. 2 or 0.5, up to 3600; 0 turns "
            "it off)")
    return value


def _add_tdr(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tdr", type=_tdr, default=2.0, metavar="SECONDS",
                   help="stop a command buffer that has run this long on the engine and is "
                        "still running, and put its device in the HUNG state (as Windows' "
                        "TdrDelay; default 2, 0 turns it off)")


def _add_policy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", metavar="FILE",
                   help="the guest's policy (TOML: which users see which adapters, memory "
                        "quotas, compute shares; see docs/policy.md)")
    p.add_argument("--memory-per-process", type=_size, metavar="SIZE",
                   help="device memory one process may commit on each adapter (e.g. 512M; "
                        "sets the policy's default; root is exempt unless a rule names it)")
    p.add_argument("--memory-per-uid", type=_size, metavar="SIZE",
                   help="device memory the processes of one user may commit together on each "
                        "adapter (sets the policy's default)")
    p.add_argument("--compute-share", type=_share, metavar="N",
                   help="each process's weight on every adapter's engine when it is busy, "
                        "1..10000 (sets the policy's default; default 1: equal shares)")


def _add_guest_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guest-memory", type=_size, metavar="SIZE",
                   help="device memory each guest may commit on each adapter (e.g. 2G; "
                        "default: the segments alone)")


def _add_metrics(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", metavar="ADDR",
                   help="serve Prometheus metrics at http://ADDR/metrics (PORT or HOST:PORT; "
                        "host default 127.0.0.1; port 0 picks one)")


class _VersionAction(argparse.Action):
    """``--version``: pydxg's version from the installed package's metadata, looked up only
    when asked (every other command skips the lookup)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("pydxg")
        except PackageNotFoundError:
            text = "unknown (not installed: pip install -e .)"
        print(f"{parser.prog} {text}")
        parser.exit()


def _add_priority(p: argparse.ArgumentParser) -> None:
    p.add_argument("--priority", type=int, default=-10, metavar="NICE",
                   help="scheduling priority of the daemon (nice value; default -10, applied "
                        "when allowed; 0 keeps the default)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dxg", description="pydxg: dxgkrnl-style GPU "
                                 "paravirtualization in user space")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    ap.add_argument("--version", action=_VersionAction, help="print pydxg's version and exit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="host + guest + node on this machine (the embedded default)")
    _add_serve(p)
    p.add_argument("--adapters", type=preflight.adapter_count, default=2, metavar="N",
                   help="CPU soft adapters, 1 to 64 (default 2)")
    p.add_argument("--host-listen", metavar="ADDR", type=preflight.bus_address,
                   help="also let other guests connect to the embedded host at ADDR")
    _add_metrics(p)
    _add_memory(p)
    _add_guest_memory(p)
    _add_tdr(p)
    _add_policy(p)
    _add_priority(p)
    p.set_defaults(func=commands.cmd_up)

    p = sub.add_parser("host", help="run a host that guests connect to")
    p.add_argument("--listen", required=True, action="append", metavar="ADDR",
                   type=preflight.bus_address,
                   help="unix:/path, /path or tcp:HOST:PORT (repeatable)")
    p.add_argument("--adapters", type=preflight.adapter_count, default=2, metavar="N",
                   help="CPU soft adapters, 1 to 64 (default 2)")
    _add_metrics(p)
    p.add_argument("--host-id", help="stable identity: same id, same adapter LUIDs")
    p.add_argument("--offer-order", choices=("global-first", "vgpu-first"),
                   default="global-first", help="order of channel offers (for testing)")
    p.add_argument("--name", default=None, help="host name shown to guests")
    _add_memory(p)
    _add_guest_memory(p)
    _add_tdr(p)
    _add_priority(p)
    p.set_defaults(func=commands.cmd_host)

    p = sub.add_parser("guest", help="run a guest driver bound to one or more hosts")
    p.add_argument("--connect", required=True, action="append", metavar="ADDR",
                   type=preflight.bus_address,
                   help="host address (repeat to bind several hosts)")
    _add_metrics(p)
    p.add_argument("--wait", action="store_true",
                   help="start even if a host is unreachable, and keep retrying")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="a host silent this long is taken as gone: its adapters are removed "
                        "until it answers again (default 5)")
    _add_policy(p)
    _add_priority(p)
    _add_serve(p)
    p.set_defaults(func=commands.cmd_guest)

    p = sub.add_parser("ls", help="list adapters: memory, utilization, flags")
    _add_node(p)
    _add_listing(p)
    p.set_defaults(func=commands.cmd_ls)

    p = sub.add_parser("ps", help="the processes that hold objects on each adapter")
    _add_node(p)
    _add_listing(p)
    p.set_defaults(func=commands.cmd_ps)

    p = sub.add_parser("top", help="a live view of the adapters and their processes (q quits)")
    _add_node(p)
    p.add_argument("--interval", type=_interval(0.1), default=1.0, metavar="SECONDS",
                   help="refresh (and measure utilization) every SECONDS (default 1)")
    p.add_argument("--once", action="store_true",
                   help="print one frame, measured over --interval, and exit (for scripts)")
    p.set_defaults(func=commands.cmd_top)

    p = sub.add_parser("demo", help="three client processes at once against the node")
    _add_node(p)
    p.set_defaults(func=commands.cmd_demo)

    p = sub.add_parser("wait", help="wait until the node answers with at least N adapters")
    _add_node(p)
    p.add_argument("--adapters", type=int, default=1)
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=commands.cmd_wait)

    p = sub.add_parser("cdi", help="print a CDI spec that hands the node to containers")
    _add_node(p)
    p.add_argument("--dev-node", metavar="PATH",
                   help="also mount the FUSE device file served at PATH (e.g. /dev/dxg)")
    p.add_argument("--kind", default="pydxg.dev/vgpu",
                   help="the CDI kind, vendor/class (default pydxg.dev/vgpu)")
    p.add_argument("--container-node", default="/run/pydxg/dxg.sock", metavar="PATH",
                   help="where the node appears in the container (default /run/pydxg/dxg.sock)")
    p.add_argument("--output", "-o", metavar="FILE",
                   help="write the spec to FILE (e.g. /etc/cdi/pydxg.json) instead of stdout")
    p.set_defaults(func=commands.cmd_cdi)

    raycmd.add_parser(sub)

    p = sub.add_parser("uapi-header", help="print the C header generated from dxg.uapi")
    p.set_defaults(func=commands.cmd_uapi_header)

    p = sub.add_parser("ioctls", help="the ioctl table: code, name, status in pydxg")
    p.add_argument("--markdown", action="store_true")
    p.set_defaults(func=commands.cmd_ioctls)

    p = sub.add_parser("bench", help="what paravirtualization costs, beside native and Ray "
                       "(docs/performance.md)")
    from dxg.bench.runner import add_arguments as add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(func=commands.cmd_bench)
    _add_global_options_after(sub)  # keep last: every subcommand above gets them
    return ap


def _add_global_options_after(sub: Any) -> None:
    """The global options work after any subcommand too (`dxg ls -v`); counted with any
    given before it."""
    for p in sub.choices.values():
        p.add_argument("-v", "--verbose", action="count", default=0, dest="verbose_after",
                       help="more log output (-vv: debug)")


def _interval(least: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not least <= value <= 3600:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an interval (seconds, {least:g} to 3600)")
        return value

    return parse


def _add_listing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="machine-readable output (numbers as JSON numbers, LUIDs as "
                        "\"0x%%016x\" strings)")
    p.add_argument("--wide", action="store_true",
                   help="every column, not only what fits 80 columns")
    p.add_argument("--interval", type=_interval(0.0), default=0.5, metavar="SECONDS",
                   help="measure utilization over SECONDS (default 0.5; 0: do not measure)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Quiet by default, daemons too: what a person needs is printed (node, adapters); the log
    # says only what went wrong. -v: what happens (guests, adapters, connections); -vv: debug.
    verbose = args.verbose + getattr(args, "verbose_after", 0)
    level = max(logging.DEBUG, logging.WARNING - 10 * verbose)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # the one place that turns any failure into a line
        if os.environ.get("DXG_DEBUG"):
            raise
        msg = commands.describe_error(e)
        print(f"dxg {args.command}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
