"""One demo client: a CUDA-style compute app, an image editor or a D3D12-style app. Each opens
the node, enumerates, opens an adapter by LUID, creates a device and a context, queries adapter
info, puts data in device memory (on the host, mapped into this process with no copy) and reads
it back, prints what it got, says READY, and holds its objects until its stdin closes.

Run as `python -m dxg.cli.demo_app KIND NODE`.
"""

import ctypes
import ctypes.util
import os
import sys
from types import MappingProxyType

KINDS = MappingProxyType({
    "cuda": ("cuda-app", "CUDA-style compute app", 0),
    "image": ("image-editor", "image editor", -1),
    "d3d12": ("d3d12-app", "D3D12-style app", 0),
})


def _set_name(name: str) -> None:
    """Set /proc/self/comm, so `dxg ps` shows what this process is (PR_SET_NAME)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)


def main(argv: list[str]) -> int:
    kind = argv[1]
    try:
        return _run(kind, argv[2])
    except Exception as e:  # one line, like every dxg command
        print(f"[{KINDS[kind][0]} pid {os.getpid()}] failed: {e}", file=sys.stderr, flush=True)
        return 1


def _run(kind: str, node_path: str) -> int:
    comm, title, pick = KINDS[kind]
    _set_name(comm)
    from dxg.cli.commands import adapter_flags
    from dxg.client import open_node

    me = f"[{comm} pid {os.getpid()}]"

    def say(text: str) -> None:
        print(f"{me} {text}", flush=True)

    with open_node(node_path) as node:
        adapters = node.adapters()
        say(f"{title}: {len(adapters)} adapter(s) on the node")
        if kind == "d3d12":
            render = node.adapters(include_compute_only=False)
            say(f"EnumAdapters3 without compute-only adapters: {len(render)}; "
                "using a compute-only adapter for compute queues")
        if not adapters:
            say("no adapter to use")
            return 2
        luid = adapters[pick].luid
        with node.open_adapter(luid) as adapter:
            say(f"opened adapter LUID 0x{luid:016x} -> handle 0x{adapter.handle:08x}: "
                f"{adapter.description!r}")
            say(f"  vendor 0x{adapter.vendor_id:04x} device 0x{adapter.device_id:04x}, "
                f"flags: {', '.join(adapter_flags(adapter)) or '-'}")
            device = adapter.create_device()
            context = device.create_context()
            say(f"  device 0x{device.handle:08x}, context 0x{context.handle:08x}, "
                f"execution state {device.execution_state()}")
            _use_memory(kind, adapter, device, say)
            print("READY", flush=True)
            sys.stdin.read()  # hold the objects until the demo releases us
            context.close()
            device.close()
        say("closed everything; exiting")
    return 0


def _use_memory(kind: str, adapter: object, device: object, say: object) -> None:
    """Device memory as each kind of app uses it; every result is checked."""
    import numpy as np

    if kind == "cuda":
        x = device.array(np.arange(1 << 20, dtype=np.float32))  # type: ignore[attr-defined]
        y = device.empty(1 << 20, np.float32)  # type: ignore[attr-defined]
        with x.map() as vx, y.map() as vy:  # both views are the host's memory itself
            np.multiply(vx, 2.0, out=vy)
        ok = np.array_equal(y.download(), np.arange(1 << 20, dtype=np.float32) * 2)
        say(f"  uploaded 4 MiB, computed through the mappings, read back: {'ok' if ok else 'BAD'}")
    elif kind == "image":
        img = device.empty((1080, 1920, 4), np.uint8)  # type: ignore[attr-defined]
        with img.map() as v:
            v[...] = np.arange(1920, dtype=np.uint8)[None, :, None]
        ok = int(img.download()[500, 300, 0]) == 300 % 256
        say(f"  a 1920x1080 RGBA image ({img.nbytes / 2**20:.1f} MiB) in device memory: "
            f"{'ok' if ok else 'BAD'}")
    else:
        queue = device.paging_queue()  # type: ignore[attr-defined]
        bufs = [device.allocate(n) for n in (1 << 16, 1 << 20, 3 << 20)]  # type: ignore[attr-defined]
        device.evict(bufs)  # type: ignore[attr-defined]
        fence = queue.make_resident(bufs)
        vas = [b.map_gpu(queue) for b in bufs]
        say(f"  3 buffers resident (paging fence {fence}), GPU VAs "
            + ", ".join(f"0x{int(va):x}" for va in vas))
    info = adapter.video_memory_info()  # type: ignore[attr-defined]
    say(f"  video memory: {info.current_usage >> 10} KiB used of a {info.budget >> 20} MiB budget")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
