"""One demo client: a CUDA-style compute app, an image editor or a D3D12-style app. Each opens
the node, enumerates, opens an adapter by LUID, queries adapter info, makes a virtual GPU of it
with dxg.compute (a device, a context, hardware queues), runs real work there (an MLP forward
pass, a Gaussian blur, an elementwise simulation step on a second queue), checks the result
against NumPy in its own process, says READY, and holds its objects until its stdin closes.

The image editor and the D3D12-style app work together, as in the scenario pydxg is for: the
editor renders its blur into a shared resource and signals a shared fence from the GPU when it
is written; it sends both share descriptors to the D3D12-style app over the socket the demo gave
them (``$DXG_DEMO_PEER``), which opens them, makes its GPU wait for the fence, reads the image
on the GPU and on the CPU, and checks it against its own NumPy blur. Both pick the same adapter.

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
    "d3d12": ("d3d12-app", "D3D12-style app", -1),
})
PEER_TIMEOUT = 60.0  # seconds the D3D12-style app waits for the editor's descriptors


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
    from dxg.cli.views import flag_names as adapter_flags
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
            keep: list[object] = []  # what must live until the demo ends (shared objects)
            ok = _compute(kind, gpu, say)
            if kind in ("image", "d3d12") and os.environ.get("DXG_DEMO_PEER"):
                ok = _shared(kind, gpu, say, keep) and ok
            info = adapter.video_memory_info()
            say(f"  video memory: {info.current_usage >> 10} KiB used of a "
                f"{info.budget >> 20} MiB budget")
            print("READY", flush=True)
            sys.stdin.read()  # hold the objects until the demo releases us
            for obj in reversed(keep):
                obj.close()  # type: ignore[attr-defined]
            gpu.close()
        say("closed everything; exiting")
    return 0 if ok else 3


def _image() -> tuple[object, object]:
    """The editor's image (3 x 720 x 1280 RGB, float32) and its 5x5 Gaussian kernel."""
    import numpy as np

    img = np.random.default_rng(7).random((3, 720, 1280), dtype=np.float32)
    r = np.arange(5) - 2
    g = np.exp(-(r ** 2) / 2.0)
    k = (np.outer(g, g) / np.outer(g, g).sum()).astype(np.float32)
    return img, k


def _blur_in_numpy(img: object, k: object) -> object:
    import numpy as np

    padded = np.pad(img, ((0, 0), (2, 2), (2, 2)))  # type: ignore[call-overload]
    return sum(k[i, j] * padded[:, i:i + 720, j:j + 1280]  # type: ignore[index]
               for i in range(5) for j in range(5))


def _shared(kind: str, gpu: object, say: object, keep: list[object]) -> bool:
    """The editor renders into a shared resource and signals a shared fence; the D3D12-style
    app opens both (descriptors over the demo's socket), waits on the GPU and reads."""
    import json
    import socket
    import time

    import numpy as np

    import dxg.compute as dc

    sock = socket.socket(fileno=int(os.environ["DXG_DEMO_PEER"]))
    keep.append(sock)
    dev = gpu.dxg  # type: ignore[attr-defined]
    started = time.perf_counter()
    if kind == "image":
        img, k = _image()
        weight = np.repeat(k[None, None], 3, axis=0)  # type: ignore[index]
        res = dev.shared_resource(img.nbytes)  # type: ignore[attr-defined]
        fence = dev.shared_fence()
        keep += [res, fence]
        handles = [res.share(read_only=True), fence.share(read_only=True)]
        socket.send_fds(sock, [json.dumps({"shape": list(img.shape), "value": 1}).encode()],  # type: ignore[attr-defined]
                        [h.fileno() for h in handles])
        for h in handles:
            h.close()  # the D3D12-style app holds its copies now
        stream = gpu.stream("render")  # type: ignore[attr-defined]
        with stream:
            out = gpu.from_allocation(res.allocations[0], img.shape, np.float32)  # type: ignore[attr-defined]
            out[...] = dc.conv2d(gpu.asarray(img[None]), gpu.asarray(weight),  # type: ignore[attr-defined, index]
                                 padding=2, groups=3)[0]
        stream.signal_fence(fence, 1)  # the GPU signals once the image is in the resource
        stream.synchronize()
        say(f"  rendered the blur into shared resource 0x{res.handle:08x} (read-only share), "  # type: ignore[operator]
            f"shared fence 0x{fence.handle:08x} signalled to 1 by the GPU; descriptors sent "
            f"to the D3D12-style app, {(time.perf_counter() - started) * 1e3:.0f} ms")
        return True
    sock.settimeout(PEER_TIMEOUT)
    msg, fds, _, _ = socket.recv_fds(sock, 4096, 2)
    if len(fds) != 2:
        raise RuntimeError("the image editor sent no shared resource and fence")
    meta = json.loads(msg)
    try:
        res, fence = dev.open_resource(fds[0]), dev.open_fence(fds[1], read_only=True)
    finally:
        for fd in fds:
            os.close(fd)
    keep += [res, fence]
    shape, value = tuple(meta["shape"]), int(meta["value"])
    src = gpu.from_allocation(res.allocations[0], shape, np.float32)  # type: ignore[attr-defined]
    stream = gpu.stream("shared")  # type: ignore[attr-defined]
    stream.wait_fence(fence, value)  # the GPU waits for the editor's work, the CPU does not
    with stream:
        means = src.reshape(shape[0], -1).mean(axis=1)
    got_means = means.get()
    fence.wait(value)  # the CPU reads the editor's memory only after its GPU signalled
    got = src.get()
    img, k = _image()
    want = _blur_in_numpy(img, k)
    err = float(np.abs(got - want).max())  # type: ignore[operator]
    err_means = float(np.abs(got_means - want.reshape(shape[0], -1).mean(axis=1)).max())  # type: ignore[attr-defined]
    ok = err < 1e-5 and err_means < 1e-5
    say(f"  opened the editor's shared resource 0x{res.handle:08x} and fence "  # type: ignore[operator]
        f"0x{fence.handle:08x} from its descriptors; GPU waited for fence value {value}, then "
        f"read the {shape[2]}x{shape[1]} image: max error vs NumPy's blur {err:.1e}, channel "
        f"means {err_means:.1e}, {(time.perf_counter() - started) * 1e3:.0f} ms: "
        f"{'ok' if ok else 'BAD'}")
    return ok


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
        img, k = _image()
        weight = np.repeat(k[None, None], 3, axis=0)  # type: ignore[index]  # depthwise: a 5x5 kernel per channel
        out = dc.conv2d(gpu.asarray(img[None]), gpu.asarray(weight), padding=2,  # type: ignore[attr-defined, index]
                        groups=3).get()[0]
        want = _blur_in_numpy(img, k)
        err = float(np.abs(out - want).max())  # type: ignore[operator]
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
