"""dxg.compute: arrays on a virtual GPU, with NumPy's interface (what CuPy is to CUDA).

::

    import numpy as np
    import dxg.compute as dc

    with dc.device(0) as dev:                      # a virtual GPU: an index or a LUID
        x = dev.asarray(np.random.rand(64, 784).astype(np.float32))
        w = dev.asarray(np.random.rand(784, 10).astype(np.float32))
        y = dc.softmax(dc.relu(x @ w), axis=1)     # encoded, not run yet
        print(y.get().sum(axis=1))                 # reading waits for the work

Operations are asynchronous: they are encoded into the current stream's command buffer and
submitted in batches; reading an array (``get()``, ``numpy.asarray``, ``float``, ``print``)
waits for the work that writes it. Streams (``dev.stream()``, ``with stream:``) are hardware
queues that run side by side; events (``stream.record()``, ``other.wait_event(ev)``,
``ev.synchronize()``) order them. A fault in the device's work raises
:class:`DeviceFault` at the next wait. See docs/compute.md.
"""

import numpy as _np

from dxg.client.execution import DeviceFault
from dxg.compute.array import ndarray
from dxg.compute.device import Device, device, device_count
from dxg.compute.ops import (
    abs,
    absolute,
    add,
    amax,
    amin,
    asnumpy,
    clip,
    conv2d,
    divide,
    exp,
    log,
    matmul,
    max,
    maximum,
    mean,
    min,
    minimum,
    multiply,
    negative,
    power,
    relu,
    sigmoid,
    softmax,
    sqrt,
    subtract,
    sum,
    tanh,
)
from dxg.compute.stream import Event, Stream

float16, float32, float64, int32, uint8 = (_np.float16, _np.float32, _np.float64, _np.int32,
                                           _np.uint8)

__all__ = [
    "Device",
    "DeviceFault",
    "Event",
    "Stream",
    "abs",
    "absolute",
    "add",
    "amax",
    "amin",
    "asnumpy",
    "clip",
    "conv2d",
    "device",
    "device_count",
    "divide",
    "exp",
    "float16",
    "float32",
    "float64",
    "int32",
    "log",
    "matmul",
    "max",
    "maximum",
    "mean",
    "min",
    "minimum",
    "multiply",
    "ndarray",
    "negative",
    "power",
    "relu",
    "sigmoid",
    "softmax",
    "sqrt",
    "subtract",
    "sum",
    "tanh",
    "uint8",
]
