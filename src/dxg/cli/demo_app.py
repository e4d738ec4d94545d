"""One demo client: a CUDA-style compute app, an image editor or a D3D12-style app. Each opens
the node, enumerates, opens an adapter by LUID, queries adapter info, makes a virtual GPU of it
with dxg.compute (a device, a context, hardware queues), runs real work there (an MLP forward
pass, a Gaussian blur, an elementwise simulation step on a second queue), checks the result
against NumPy in its own process, says READY, and holds its objects until its stdin closes.

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
            import dxg.compute as dc

            gpu = dc.device(luid, node=node)
            say(f"  device 0x{gpu.dxg.handle:08x}, context 0x{gpu.context.handle:08x}, "
                f"queue 0x{gpu.default_stream.queue.handle:08x}, execution state "
                f"{gpu.dxg.execution_state()}")
            ok = _compute(kind, gpu, say)
            info = adapter.video_memory_info()
            say(f"  video memory: {info.current_usage >> 10} KiB used of a "
                f"{info.budget >> 20} MiB budget")
            print("READY", flush=True)
            sys.stdin.read()  # hold the objects until the demo releases us
            gpu.close()
        say("closed everything; exiting")
    return 0 if ok else 3


def _compute(kind: str, gpu: object, say: object) -> bool:
    """Each kind of app's job, run on the virtual GPU through dxg.compute and checked against
    NumPy here."""
    import time

    import numpy as np

    import dxg.compute as dc

    rng = np.random.default_rng(7)
    started = time.perf_counter()
    if kind == "cuda":
        x = rng.random((256, 784), dtype=np.float32)
        w1 = rng.normal(0, 0.05, (784, 512)).astype(np.float32)
        b1 = rng.normal(0, 0.1, 512).astype(np.float32)
        w2 = rng.normal(0, 0.1, (512, 10)).astype(np.float32)
        b2 = rng.normal(0, 0.1, 10).astype(np.float32)
        X, W1, B1, W2, B2 = (gpu.asarray(a) for a in (x, w1, b1, w2, b2))  # type: ignore[attr-defined]
        probs = dc.softmax(dc.relu(X @ W1 + B1) @ W2 + B2, axis=1).get()
        logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        want = e / e.sum(axis=1, keepdims=True)
        err = float(np.abs(probs - want).max())
        ok = err < 1e-5
        what = (f"MLP forward pass (256x784 -> 512 relu -> 10 softmax): max error vs NumPy "
                f"{err:.1e}")
    elif kind == "image":
        img = rng.random((3, 720, 1280), dtype=np.float32)
        r = np.arange(5) - 2
        g = np.exp(-(r ** 2) / 2.0)
        k = (np.outer(g, g) / np.outer(g, g).sum()).astype(np.float32)
        weight = np.repeat(k[None, None], 3, axis=0)  # depthwise: one 5x5 kernel per channel
        out = dc.conv2d(gpu.asarray(img[None]), gpu.asarray(weight), padding=2,  # type: ignore[attr-defined]
                        groups=3).get()[0]
        padded = np.pad(img, ((0, 0), (2, 2), (2, 2)))
        want = sum(k[i, j] * padded[:, i:i + 720, j:j + 1280]
                   for i in range(5) for j in range(5))
        err = float(np.abs(out - want).max())
        ok = err < 1e-5
        what = f"Gaussian blur (5x5, conv2d) of a 1280x720 RGB image: max error vs NumPy {err:.1e}"
    else:
        pos = rng.random((1 << 18, 3), dtype=np.float32)
        vel = rng.normal(0, 1, (1 << 18, 3)).astype(np.float32)
        grav = np.array([0, 0, -9.8], np.float32)
        queue = gpu.stream("compute")  # type: ignore[attr-defined]
        with queue:  # a compute queue of its own
            p, v, gr = gpu.asarray(pos), gpu.asarray(vel), gpu.asarray(grav)  # type: ignore[attr-defined]
            for _ in range(20):
                v = v * np.float32(0.99) + gr * np.float32(0.01)
                p = p + v * np.float32(0.01)
            speed = dc.sqrt((v * v).sum(axis=1)).max()
        done = queue.record()
        done.synchronize()
        for _ in range(20):
            vel = vel * np.float32(0.99) + grav * np.float32(0.01)
            pos = pos + vel * np.float32(0.01)
        ok = (np.array_equal(p.get(), pos)
              and abs(float(speed) - float(np.sqrt((vel * vel).sum(axis=1)).max())) < 1e-4)
        what = ("elementwise job on a second hardware queue (262,144 particles x 20 steps, "
                f"{queue.commands} commands in {queue.submissions} submissions)")
    ms = (time.perf_counter() - started) * 1e3
    say(f"  {what}, {ms:.0f} ms: {'ok' if ok else 'BAD'}")  # type: ignore[operator]
    return ok


if __name__ == "__main__":
    sys.exit(main(sys.argv))
