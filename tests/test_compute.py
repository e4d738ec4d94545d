"""dxg.compute end to end on the real stack (host, guest, node over Unix sockets): every operation
against NumPy (shapes, dtypes, broadcasting, edge cases), an MLP forward pass, a Gaussian blur,
batching, streams and events, device faults, and memory that goes back when arrays and devices
go."""

import gc
import os
import threading

import numpy as np
import pytest

import dxg.compute as dc
from conftest import make_stack
from dxg.backends.softcmd import CommandBuffer, Operand
from dxg.client import DxgError, open_node
from dxg.uapi.ntstatus import NTSTATUS

RNG = np.random.default_rng(1234)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with make_stack(tmp_path_factory.mktemp("compute"), adapters=2) as s:
        yield s


@pytest.fixture
def dev(stack):
    with dc.device(0, node=stack.node_path) as d:
        yield d


def rand(*shape, dtype=np.float32, low=-2.0, high=2.0):
    if np.dtype(dtype).kind in "iu":
        return RNG.integers(0 if np.dtype(dtype).kind == "u" else -50, 50, size=shape,
                            dtype=dtype)
    return RNG.uniform(low, high, size=shape).astype(dtype)


def tol(dtype):
    return {"float16": 2e-3, "float32": 1e-5, "float64": 1e-12}.get(np.dtype(dtype).name, 0)


def check(got, want, dtype=None):
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    t = tol(dtype or want.dtype)
    if t:
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=t * 4,
                                   atol=t * 4)
    else:
        np.testing.assert_array_equal(got, want)


# ---- devices ---------------------------------------------------------------------------------


def test_device_by_index_and_by_luid(stack):
    assert dc.device_count(stack.node_path) == 2
    with open_node(stack.node_path) as node:
        luids = [a.luid for a in node.adapters()]
        with dc.device(1, node=node) as d1, dc.device(luids[0], node=node) as d0:
            assert d1.luid == luids[1] and d0.luid == luids[0] and d0.index == 0
            assert "pydxg" in d0.name.lower() or d0.name
            x = d1.asarray([1.0, 2.0])
            check((x * 3).get(), np.array([3.0, 6.0]))
        with pytest.raises(ValueError):
            dc.device(7, node=node)
        with pytest.raises(ValueError):  # a string is a LUID as `dxg ls` prints it
            dc.device("0", node=node)
        with pytest.raises(TypeError):
            dc.device(1.5, node=node)
        assert not node.closed  # a node we gave is not closed by the devices


def test_arrays_of_two_devices_do_not_mix(stack):
    with dc.device(0, node=stack.node_path) as a, dc.device(1, node=stack.node_path) as b:
        x, y = a.asarray([1.0]), b.asarray([2.0])
        with pytest.raises(ValueError):
            x + y
        check((x + b.asarray(y.get()).get()).get(), np.array([3.0]))
        check(a.asarray(y).get(), np.array([2.0]))  # moved through the host


# ---- creating and reading arrays -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, np.uint8])
def test_round_trip_and_creation(dev, dtype):
    for shape in [(), (1,), (7,), (3, 5), (2, 3, 4), (2, 1, 3, 2, 2), (0,), (3, 0)]:
        a = rand(*shape, dtype=dtype)
        x = dev.asarray(a)
        assert x.shape == a.shape and x.dtype == a.dtype and x.size == a.size
        check(x.get(), a)
        check(np.asarray(x), a)
    check(dev.zeros((2, 3), dtype).get(), np.zeros((2, 3), dtype))
    check(dev.ones(4, dtype).get(), np.ones(4, dtype))
    check(dev.full((2, 2), 7, dtype).get(), np.full((2, 2), 7, dtype))
    assert dev.empty((3, 4), dtype).shape == (3, 4)


def test_large_arrays_take_their_own_allocation(dev):
    a = rand(1024, 1024)  # 4 MiB: an allocation of its own, mapped by the CPU to read
    x = dev.asarray(a)
    assert x._block.dedicated
    y = x * 2 + 1
    check(y.get(), a * 2 + 1)
    check(y[::2, 3:9].get(), (a * 2 + 1)[::2, 3:9])  # a strided view goes through staging


def test_numpy_dtypes_are_mapped(dev):
    x = dev.asarray(np.arange(5))  # int64
    assert x.dtype == np.int32
    check(x.get(), np.arange(5, dtype=np.int32))
    assert dev.asarray([True, False]).dtype == np.int32
    assert dev.asarray([1.5, 2]).dtype == np.float64
    with pytest.raises(OverflowError):
        dev.asarray(np.array([2**40]))
    with pytest.raises(TypeError):
        dev.asarray(np.array([1j]))
    with pytest.raises(TypeError):
        dev.empty(3, np.int64)
    with pytest.raises(TypeError):
        dev.asarray([1.0]).astype(np.complex64)


def test_scalars_and_python_conversions(dev):
    x = dev.asarray(np.array([[1.5, 2.0], [3.0, 4.0]], np.float32))
    s = x.sum()
    assert s.shape == () and float(s) == 10.5 and s.item() == 10.5
    assert int(dev.asarray(np.int32(3))) == 3
    assert bool(dev.asarray([1])) and not bool(dev.asarray([0]))
    with pytest.raises(ValueError):
        bool(x)
    assert len(x) == 2 and [r.get().tolist() for r in x] == [[1.5, 2.0], [3.0, 4.0]]
    assert x.tolist() == [[1.5, 2.0], [3.0, 4.0]]
    assert "1.5" in repr(x) and "1.5" in str(x) and f"{s:.2f}" == "10.50"
    with pytest.raises(TypeError):
        len(s)


# ---- views, indexing, copies -----------------------------------------------------------------


def test_views_index_and_assign(dev):
    a = rand(4, 6, 5)
    x = dev.asarray(a)
    for key in [1, -1, (slice(1, 3),), (Ellipsis, 2), (slice(None, None, 2), 1),
                (None, 0), (1, slice(0, 6, 3), slice(None)), (slice(5, 9),)]:
        check(x[key].get(), a[key])
    check(x.T.get(), a.T)
    check(x.transpose(1, 0, 2).get(), a.transpose(1, 0, 2))
    check(x.swapaxes(0, 2).get(), a.swapaxes(0, 2))
    check(x.reshape(20, 6).get(), a.reshape(20, 6))
    check(x.T.reshape(-1).get(), a.T.reshape(-1))
    check(x[None, :, :1].squeeze().get(), a[None, :, :1].squeeze())
    check(x.ravel().get(), a.ravel())
    check(x.flatten().get(), a.flatten())
    with pytest.raises(IndexError):
        x[4]
    with pytest.raises(IndexError):
        x[0, 0, 0, 0]
    with pytest.raises(IndexError):
        x[np.array([0, 1])]
    with pytest.raises(ValueError):
        x.reshape(7, -1)
    with pytest.raises(ValueError):
        x[::-1]
    b = a.copy()
    x[1] = 0
    b[1] = 0
    x[:, 2, :] = np.arange(5, dtype=np.float32)
    b[:, 2, :] = np.arange(5, dtype=np.float32)
    x[2:, ::2, 1] = dev.asarray(np.full((2, 3), 9, np.float32))
    b[2:, ::2, 1] = 9
    check(x.get(), b)
    with pytest.raises(ValueError):
        x[0] = np.ones((3, 3))
    y = dev.asarray(np.zeros(3, np.int32))
    y.set([1, 2, 3])
    check(y.get(), np.array([1, 2, 3], np.int32))


def test_astype_and_copy(dev):
    a = rand(3, 4, dtype=np.float64) * 10
    x = dev.asarray(a)
    for dt in (np.float16, np.float32, np.int32, np.uint8):
        with np.errstate(invalid="ignore"):
            want = a.astype(dt) if dt != np.uint8 else np.abs(a).astype(dt)
        got = (x.astype(dt) if dt != np.uint8 else dc.absolute(x).astype(dt)).get()
        check(got, want)
    c = x.copy()
    c += 1
    check(x.get(), a)
    check(c.get(), a + 1)
    assert x.astype(np.float64, copy=False) is x


# ---- elementwise -----------------------------------------------------------------------------


BINARY = [("add", np.add), ("subtract", np.subtract), ("multiply", np.multiply),
          ("divide", np.true_divide), ("maximum", np.maximum), ("minimum", np.minimum)]
SHAPES = [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 1), (1, 4)), ((2, 3, 4), (3, 1)),
          ((), (5,)), ((2, 1, 3, 1, 2), (4, 1, 1, 2)), ((4, 0), (4, 1))]


@pytest.mark.parametrize("name,fn", BINARY)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_binary_against_numpy(dev, name, fn, dtype):
    for sa, sb in SHAPES:
        a, b = rand(*sa, dtype=dtype), rand(*sb, dtype=dtype)
        if name == "divide":
            b = np.where(b == 0, 3, b).astype(dtype)
        got = getattr(dc, name)(dev.asarray(a), dev.asarray(b))
        check(got.get(), fn(a, b))


def test_operators_scalars_and_promotion(dev):
    a, b = rand(3, 4), rand(3, 4, dtype=np.float64)
    x, y = dev.asarray(a), dev.asarray(b)
    i = dev.asarray(np.arange(12, dtype=np.int32).reshape(3, 4))
    ai = np.arange(12, dtype=np.int32).reshape(3, 4)
    check((x + y).get(), a + b)  # f32 + f64 -> f64
    check((x * 2).get(), a * 2)  # weak Python scalar: stays f32
    check((2 - x).get(), 2 - a)
    check((1 / (x + 3)).get(), 1 / (a + 3))
    check((x ** 2).get(), a ** 2)
    check((abs(x) ** 0.5).get(), np.abs(a) ** 0.5)
    check((2.0 ** x).get(), 2.0 ** a)
    check((-x).get(), -a)
    check((+x).get(), a)
    check((i + 1).get(), ai + 1)
    check((i * 2.5).get(), ai * 2.5)  # int * float -> f64
    check((i / 4).get(), ai / 4)  # true division -> f64
    check((i ** 2).get(), ai ** 2)  # through f64, back to int32
    check((i + x).get(), ai + a)  # int32 + f32 -> f64
    check((x + np.float64(1)).get(), a + np.float64(1))  # a NumPy scalar is not weak
    check((x + a).get(), a + a)  # NumPy arrays are uploaded
    z = a + x  # NumPy's operator defers to the device array
    assert isinstance(z, dc.ndarray)
    check(z.get(), a + a)
    assert isinstance(np.exp(x), dc.ndarray)  # NumPy's ufuncs run on the device
    check(np.maximum(x, 0).get(), np.maximum(a, 0))
    check(np.sin(x), np.sin(a))  # one the device lacks: NumPy on a copy
    check(dc.clip(x, -1, 1).get(), np.clip(a, -1, 1))
    with pytest.raises(OverflowError):
        i + 2**40
    with pytest.raises(ValueError):
        x + dev.asarray(rand(4, 3))
    with pytest.raises(TypeError):
        x + "a"


def test_integer_semantics(dev):
    a = np.array([7, -7, 2**31 - 1, 0], np.int32)
    x = dev.asarray(a)
    with np.errstate(over="ignore"):
        check((x + 1).get(), a + np.int32(1))  # wraps, as NumPy's
    check(dc.absolute(x).get(), np.abs(a))
    check(dc.maximum(x, 0).get(), np.maximum(a, 0))
    u = dev.asarray(np.array([250, 3], np.uint8))
    check((u + np.uint8(10)).get(), np.array([250, 3], np.uint8) + np.uint8(10))


UNARY = [("exp", np.exp), ("log", np.log), ("sqrt", np.sqrt), ("tanh", np.tanh),
         ("negative", np.negative), ("absolute", np.absolute),
         ("sigmoid", lambda v: 1 / (1 + np.exp(-v))), ("relu", lambda v: np.maximum(v, 0))]


@pytest.mark.parametrize("name,fn", UNARY)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_unary_against_numpy(dev, name, fn, dtype):
    a = rand(5, 7, dtype=dtype)
    if name in ("log", "sqrt"):
        a = (np.abs(a) + 1).astype(dtype)
    want = fn(a)
    if name == "sigmoid" and np.dtype(dtype).kind == "i":
        want = 1 / (1 + np.exp(-a.astype(np.float64)))
    if name == "relu" and np.dtype(dtype).kind == "i":
        want = want.astype(dtype)
    x = dev.asarray(a)
    check(getattr(dc, name)(x).get(), want)
    check(getattr(dc, name)(x[:, ::2].T).get(), want[:, ::2].T.copy())  # a strided view


def test_special_values(dev):
    a = np.array([0.0, -1.0, np.inf, -np.inf, np.nan, 1e30], np.float32)
    x = dev.asarray(a)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(dc.log(x).get(), np.log(a))
        np.testing.assert_array_equal(dc.sqrt(x).get(), np.sqrt(a))
        np.testing.assert_array_equal((x / 0).get(), a / np.float32(0))
        np.testing.assert_array_equal(dc.sigmoid(x).get()[2:4], [1.0, 0.0])
        np.testing.assert_array_equal(dc.relu(x).get(), np.array([0, 0, np.inf, 0, np.nan, 1e30],
                                                                 np.float32))
        assert np.isnan(dc.max(x).get())


def test_in_place_operators(dev):
    a, b = rand(4, 5), rand(5)
    x = dev.asarray(a)
    x += dev.asarray(b)
    a += b
    x *= 2
    a *= 2
    x -= 1
    a -= 1
    x /= 3
    a /= 3
    check(x.get(), a)
    x[1:] += x[:-1]  # overlapping source: NumPy's result (as if read first)
    a[1:] += a[:-1].copy()
    check(x.get(), a)
    x[:, ::2] **= 2
    a[:, ::2] **= 2
    check(x.get(), a)
    h = dev.asarray(a.astype(np.float16))
    h += dev.asarray(a)  # f32 into f16: same kind, allowed
    check(h.get(), (a.astype(np.float16) + a).astype(np.float16))
    i = dev.asarray(np.arange(4, dtype=np.int32))
    with pytest.raises(TypeError):
        i += 1.5
    with pytest.raises(ValueError):
        x += dev.asarray(rand(3, 4, 5))
    sq = dev.asarray(rand(3, 3))
    ref = sq.get()
    sq @= dev.asarray(np.eye(3, dtype=np.float32) * 2)
    check(sq.get(), ref * 2)


def test_elementwise_with_many_dimensions(dev):
    a = rand(2, 3, 2, 3, 2, 3)
    b = rand(3, 1, 3, 1, 3)
    x, y = dev.asarray(a), dev.asarray(b)
    check((x + y).get(), a + b)  # does not merge below 4 dims: split into commands
    check((x.transpose(5, 4, 3, 2, 1, 0) * 2).get(), a.transpose(5, 4, 3, 2, 1, 0) * 2)


# ---- matmul ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_matmul_against_numpy(dev, dtype):
    cases = [((5, 7), (7, 3)), ((7,), (7, 3)), ((5, 7), (7,)), ((7,), (7,)),
             ((4, 5, 7), (7, 3)), ((5, 7), (4, 7, 3)), ((2, 1, 5, 7), (3, 7, 2)),
             ((1, 1), (1, 1)), ((5, 0), (0, 3)), ((0, 4), (4, 2))]
    for sa, sb in cases:
        a, b = rand(*sa, dtype=dtype), rand(*sb, dtype=dtype)
        want = (a.astype(np.float64) @ b.astype(np.float64)).astype(dtype)
        check((dev.asarray(a) @ dev.asarray(b)).get(), want, dtype)
    a, b = rand(6, 5, dtype=dtype), rand(3, 6, dtype=dtype)
    want = (a.T.astype(np.float64) @ b.T.astype(np.float64)).astype(dtype)
    check((dev.asarray(a).T @ dev.asarray(b).T).get(), want, dtype)  # transposed operands
    c = rand(4, 10, dtype=dtype)
    check(dc.matmul(dev.asarray(a)[::2], dev.asarray(c)[:, ::2].T).get(),
          (a[::2].astype(np.float64) @ c[:, ::2].T.astype(np.float64)).astype(dtype), dtype)


def test_matmul_types_and_errors(dev):
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    b = np.arange(12, dtype=np.int32).reshape(3, 4)
    check((dev.asarray(a) @ dev.asarray(b)).get(), a @ b)  # int32 @ int32 -> int32
    f = rand(3, 4)
    check((dev.asarray(a) @ dev.asarray(f)).get(), a @ f, np.float32)
    check((a @ dev.asarray(f)).get(), a @ f, np.float32)
    with pytest.raises(ValueError, match="mismatch"):
        dev.asarray(rand(2, 3)) @ dev.asarray(rand(4, 2))
    with pytest.raises(ValueError):
        dev.asarray(rand(2, 2, 3)) @ dev.asarray(rand(3, 3, 2))
    with pytest.raises(ValueError):
        dev.asarray(np.float32(1)) @ dev.asarray(rand(2))


# ---- reductions ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_reductions_against_numpy(dev, dtype):
    a = rand(3, 4, 5, dtype=dtype)
    x = dev.asarray(a)
    for axis in [None, 0, 1, 2, -1, (0, 2), (0, 1), (1, 2), (0, 1, 2)]:
        for keepdims in (False, True):
            for name in ("sum", "max", "min", "mean"):
                got = getattr(x, name)(axis=axis, keepdims=keepdims).get()
                want = getattr(a, name)(axis=axis, keepdims=keepdims)
                if name == "sum":
                    want = want.astype(dtype)  # the device keeps the dtype (NumPy: int64)
                if name == "mean" and np.dtype(dtype) == np.float16:
                    want = a.astype(np.float32).mean(axis=axis, keepdims=keepdims).astype(
                        np.float16)
                check(got, want, dtype if name != "mean" else want.dtype)
    check(dc.sum(x.T, axis=1).get(), a.T.sum(axis=1).astype(dtype), dtype)
    check(dc.max(x[:, ::2], axis=(0, 2)).get(), a[:, ::2].max(axis=(0, 2)))


def test_reductions_of_many_dimensions_and_edge_cases(dev):
    a = rand(2, 3, 2, 3, 2)
    x = dev.asarray(a)
    check(x.sum(axis=(0, 2, 4)).get(), a.sum(axis=(0, 2, 4)))
    check(x.max(axis=(1, 3)).get(), a.max(axis=(1, 3)))
    check(x.sum(axis=()).get(), a.sum(axis=()))
    e = dev.asarray(np.zeros((0, 3), np.float32))
    check(e.sum(axis=0).get(), np.zeros(3, np.float32))
    check(e.sum(axis=1).get(), np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="zero-size"):
        e.max(axis=0)
    with pytest.raises(np.exceptions.AxisError):
        x.sum(axis=5)
    with pytest.raises(ValueError):
        x.sum(axis=(1, 1))
    check(dc.mean(dev.asarray(np.arange(6, dtype=np.int32))).get(), np.float64(2.5))
    check(x.sum(dtype=np.float64).get(), a.astype(np.float64).sum())


# ---- softmax and conv2d ----------------------------------------------------------------------


def np_softmax(a, axis):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_softmax_against_numpy(dev, dtype):
    a = rand(3, 4, 5, dtype=dtype, low=-50, high=50)
    x = dev.asarray(a)
    for axis in (0, 1, 2, -1):
        want = np_softmax(a.astype(np.float64), axis).astype(dtype)
        check(dc.softmax(x, axis).get(), want, dtype)
    check(dc.softmax(x.T, 0).get(), np_softmax(a.T.astype(np.float64), 0).astype(dtype), dtype)
    big = dev.asarray(np.array([1000.0, 1000.0], dtype))  # no overflow
    check(dc.softmax(big).get(), np.array([0.5, 0.5], dtype))
    check(dc.softmax(dev.asarray(np.arange(3, dtype=np.int32))).get(),
          np_softmax(np.arange(3.0), 0))
    with pytest.raises(np.exceptions.AxisError):
        dc.softmax(x, 3)


def np_conv2d(x, w, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    n, _, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, o, oh, ow))
    og = o // groups
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                win = xp[:, g * cg:(g + 1) * cg,
                         i * dilation[0]: i * dilation[0] + stride[0] * (oh - 1) + 1: stride[0],
                         j * dilation[1]: j * dilation[1] + stride[1] * (ow - 1) + 1: stride[1]]
                out[:, g * og:(g + 1) * og] += np.einsum(
                    "nchw,oc->nohw", win, w[g * og:(g + 1) * og, :, i, j])
    if b is not None:
        out += b.astype(np.float64)[None, :, None, None]
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_against_numpy(dev, dtype):
    cases = [dict(), dict(stride=(2, 2)), dict(padding=(1, 2)), dict(dilation=(2, 1)),
             dict(stride=(2, 1), padding=(1, 1), dilation=(1, 2))]
    x = rand(2, 4, 9, 8, dtype=dtype)
    for kw in cases:
        for groups in (1, 2, 4):
            w = rand(4, 4 // groups, 3, 3, dtype=dtype)
            b = rand(4, dtype=dtype)
            got = dc.conv2d(dev.asarray(x), dev.asarray(w), dev.asarray(b), groups=groups,
                            **{k: v for k, v in kw.items()})
            want = np_conv2d(x, w, b, groups=groups, **kw).astype(dtype)
            check(got.get(), want, dtype)
    w = rand(3, 4, 1, 1, dtype=dtype)
    check(dc.conv2d(dev.asarray(x[0]), dev.asarray(w)).get(),
          np_conv2d(x[:1], w)[0].astype(dtype), dtype)  # unbatched (C, H, W)
    w = rand(2, 4, 3, 3, dtype=dtype)
    check(dc.conv2d(dev.asarray(x), dev.asarray(w), padding="same").get(),
          np_conv2d(x, w, padding=(1, 1)).astype(dtype), dtype)


def test_conv2d_errors(dev):
    x = dev.asarray(rand(1, 4, 5, 5))
    with pytest.raises(ValueError):
        dc.conv2d(x, dev.asarray(rand(2, 3, 3, 3)))  # channels
    with pytest.raises(ValueError):
        dc.conv2d(x, dev.asarray(rand(2, 4, 7, 7)))  # kernel larger than the input
    with pytest.raises(ValueError):
        dc.conv2d(x, dev.asarray(rand(2, 4, 3, 3)), dev.asarray(rand(3)))  # bias
    with pytest.raises(ValueError):
        dc.conv2d(x, dev.asarray(rand(3, 2, 3, 3)), groups=2)  # 3 outputs, 2 groups
    with pytest.raises(ValueError):
        dc.conv2d(dev.asarray(rand(4, 5)), dev.asarray(rand(2, 4, 3, 3)))
    with pytest.raises(ValueError):
        dc.conv2d(x, dev.asarray(rand(2, 4, 3, 3)), stride=0)


def test_shape_errors_submit_nothing(dev):
    s = dev.default_stream
    x = dev.asarray(rand(3, 4))
    dev.synchronize()
    before = (s.pending, s.submissions)
    for bad in (lambda: x + np.ones(5, np.float32),
                lambda: x @ x, lambda: dc.softmax(x, 2), lambda: x.sum(axis=3),
                lambda: dc.conv2d(x, x)):
        with pytest.raises((ValueError, TypeError)):
            bad()
    assert (s.pending, s.submissions) == before


# ---- whole programs --------------------------------------------------------------------------


def test_mlp_forward_pass(dev):
    """GEMM + bias + relu, twice, then softmax: a small classifier, as NumPy computes it."""
    x = rand(64, 784, low=0, high=1)
    w1, b1 = rand(784, 256, low=-0.05, high=0.05), rand(256, low=-0.1, high=0.1)
    w2, b2 = rand(256, 10, low=-0.1, high=0.1), rand(10, low=-0.1, high=0.1)
    want = np_softmax(np.maximum(np.maximum(x @ w1 + b1, 0) @ w2 + b2, 0), 1)
    X, W1, B1, W2, B2 = (dev.asarray(a) for a in (x, w1, b1, w2, b2))
    probs = dc.softmax(dc.relu(dc.relu(X @ W1 + B1) @ W2 + B2), axis=1)
    got = probs.get()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1, rtol=1e-5)
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


def gaussian_kernel(size, sigma):
    r = np.arange(size) - size // 2
    g = np.exp(-(r ** 2) / (2 * sigma ** 2))
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def test_gaussian_blur_with_conv2d(dev):
    """A depthwise 5x5 blur of an RGB image (groups = 3), against a NumPy reference."""
    img = rand(1, 3, 64, 96, low=0, high=1)
    k = gaussian_kernel(5, 1.2)
    weight = np.repeat(k[None, None], 3, axis=0)  # (3, 1, 5, 5)
    out = dc.conv2d(dev.asarray(img), dev.asarray(weight), padding=2, groups=3).get()
    padded = np.pad(img[0].astype(np.float64), ((0, 0), (2, 2), (2, 2)))
    want = np.zeros((3, 64, 96))
    for i in range(5):
        for j in range(5):
            want += k[i, j] * padded[:, i:i + 64, j:j + 96]
    np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-6)
    assert out.shape == img.shape
    flat = dc.conv2d(dev.asarray(np.ones((1, 3, 16, 16), np.float32)), dev.asarray(weight),
                     padding=2, groups=3).get()
    np.testing.assert_allclose(flat[0, :, 2:-2, 2:-2], 1, rtol=1e-5)  # a blur keeps flat areas


# ---- batching --------------------------------------------------------------------------------


def test_ten_thousand_small_ops_in_few_submissions(dev):
    """10,000 small operations encode into a few command buffers and give what NumPy gives (the
    same operations in the same dtype: bit for bit), and what submitting each one alone gives."""
    s = dev.default_stream
    first = s.submissions
    a0 = rand(64)
    x = dev.asarray(a0)
    ref = a0.copy()
    for i in range(5000):
        x = x * np.float32(0.999) + np.float32(i % 7)
        ref = ref * np.float32(0.999) + np.float32(i % 7)
    got = x.get()
    assert s.submissions - first < 30, s.submissions - first  # 10,000 ops, a handful of buffers
    np.testing.assert_array_equal(got, ref)
    y = dev.asarray(a0)
    for i in range(200):  # the synchronous way: one submission per operation
        y = y * np.float32(0.999) + np.float32(i % 7)
        y.get()
    z = dev.asarray(a0)
    for i in range(200):
        z = z * np.float32(0.999) + np.float32(i % 7)
    np.testing.assert_array_equal(z.get(), y.get())


def test_work_is_asynchronous_until_read(dev):
    s = dev.default_stream
    x = dev.asarray(rand(32, 32))
    dev.synchronize()
    done = s.submissions
    y = x @ x
    assert s.pending >= 1 and s.submissions == done  # encoded, not submitted
    ev = s.record()
    assert not ev.done
    y.get()
    assert s.pending == 0 and ev.done and s.done


# ---- streams and events ----------------------------------------------------------------------


def test_two_streams_with_an_event(dev):
    a = rand(512, 512, low=-0.1, high=0.1)
    s1, s2 = dev.stream(), dev.stream()
    x = dev.asarray(a)
    dev.synchronize()
    with s1:
        assert dev.current_stream is s1
        y = x
        for _ in range(6):
            y = dc.tanh(y @ x) + 1  # a long chain on stream 1
        ev = s1.record()
    assert dev.current_stream is dev.default_stream
    s2.wait_event(ev)  # stream 2's next work waits for it, on the GPU
    with s2:
        z = y * 2
    zero = s2.record()
    assert s1.pending == 0  # waiting on the event submitted stream 1's work
    want = a.astype(np.float64)
    for _ in range(6):
        want = np.tanh(want @ a) + 1
    np.testing.assert_allclose(z.get(), (want * 2).astype(np.float32), rtol=1e-4, atol=1e-4)
    zero.synchronize()
    ev.synchronize()
    assert ev.done and zero.done
    with pytest.raises(TypeError):
        s2.wait_event(3)


def test_streams_run_side_by_side(dev):
    """Work on two streams is submitted to two hardware queues; each finishes in its own
    order, and both results are right."""
    xs = [dev.asarray(rand(128, 128, low=-0.1, high=0.1)) for _ in range(2)]
    streams = [dev.stream(), dev.stream()]
    outs = []
    for s, x in zip(streams, xs, strict=True):
        with s:
            y = x
            for _ in range(20):
                y = y @ x
            outs.append(y)
        s.flush()
    assert all(s.submissions >= 1 for s in streams)
    assert streams[0].queue.handle != streams[1].queue.handle
    for y, x in zip(outs, xs, strict=True):
        a = x.get().astype(np.float64)
        want = a
        for _ in range(20):
            want = want @ a
        np.testing.assert_allclose(y.get(), want.astype(np.float32), rtol=1e-3, atol=1e-6)


def test_streams_order_themselves_by_what_arrays_need(dev):
    """No event needed where arrays show the order: a stream that reads an array another stream
    writes waits for that work on the GPU, and a write waits for other streams' reads."""
    a = rand(128, 128, low=-0.1, high=0.1)
    x = dev.asarray(a)  # its upload is a copy on the default stream
    s = dev.stream()
    with s:
        y = x @ x  # stream s waits for the upload
        for _ in range(5):
            y = y @ x
    z = y + 1  # the default stream waits for s
    want = a.astype(np.float64)
    for _ in range(6):
        want = want @ a
    np.testing.assert_allclose(z.get(), (want + 1).astype(np.float32), rtol=1e-4, atol=1e-6)
    b = rand(384, 384, low=-1, high=1)
    big = dev.asarray(b)
    dev.synchronize()
    with s:
        r = dc.tanh(big @ big) @ big  # reads big on s
    big *= 0  # the default stream's write waits for those reads
    np.testing.assert_allclose(r.get(), np.tanh(b.astype(np.float64) @ b) @ b, rtol=1e-3,
                               atol=1e-3)
    assert not big.get().any()


def test_threads_have_their_own_current_stream(dev):
    s = dev.stream()
    seen = {}

    def worker():
        seen["other"] = dev.current_stream
        with s:
            seen["inner"] = dev.current_stream

    with s:
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert dev.current_stream is s
    assert seen == {"other": dev.default_stream, "inner": s}


# ---- faults ----------------------------------------------------------------------------------


def test_a_fault_raises_device_fault_on_the_next_read(stack):
    with dc.device(0, node=stack.node_path) as dev:
        x = dev.asarray(np.ones(16, np.float32))
        y = x + 1
        cb = CommandBuffer().binary("add", x.operand(), x.operand(),
                                    Operand(0x7F0000000, np.float32, (16,)))  # nothing there
        dev.default_stream.launch(cb, reads=[x], writes=[x])
        z = y * 2
        with pytest.raises(dc.DeviceFault) as e:
            z.get()
        assert e.value.address == 0x7F0000000
        with pytest.raises(dc.DeviceFault):
            dev.synchronize()
        with pytest.raises(dc.DeviceFault):
            (x * 3).get()
    with dc.device(0, node=stack.node_path) as other:  # another device carries on
        check((other.asarray([1.0]) + 1).get(), np.array([2.0]))


def test_a_device_marked_in_error_faults_on_sync(stack):
    with dc.device(0, node=stack.node_path) as dev:
        x = dev.asarray(rand(8))
        dev.dxg.mark_error()
        with pytest.raises(dc.DeviceFault):
            (x + 1).get()


# ---- memory ----------------------------------------------------------------------------------


def test_memory_goes_back_when_arrays_go_and_on_close(stack):
    with open_node(stack.node_path) as node:
        adapter = node.adapters()[0]
        base = adapter.video_memory_info().current_usage
        dev = dc.device(0, node=node)
        big = dev.asarray(rand(1024, 1024))  # 4 MiB of its own
        small = [dev.asarray(rand(100)) + i for i in range(50)]
        y = big * 2
        y.get()
        with_big = adapter.video_memory_info().current_usage
        assert with_big >= base + 8 * 2**20
        del big, y
        gc.collect()
        dev.synchronize()
        after_free = adapter.video_memory_info().current_usage
        assert after_free <= with_big - 8 * 2**20  # DestroyAllocation once its work was done
        assert dev.memory_info()["usage"] == after_free
        del small
        dev.free_unused()
        dev.close()
        assert adapter.video_memory_info().current_usage == base
        with pytest.raises(RuntimeError):
            dev.asarray([1.0])
        dev.close()  # idempotent
        assert not node.closed


def test_temporaries_are_reused_not_accumulated(dev):
    x = dev.asarray(rand(1000))
    for _ in range(3000):
        x = dc.tanh(x * 0.5)  # every step drops the array before it
    x.get()
    info = dev.memory_info()
    assert info["slabs"] <= 4, info
    assert info["waiting_blocks"] < 100, info


def test_an_owned_node_is_closed_with_the_device(stack, monkeypatch):
    monkeypatch.setenv("DXG_NODE", stack.node_path)
    dev = dc.device(0)
    node = dev.node
    check((dev.asarray([1, 2]) * 2).get(), np.array([2, 4], np.int32))
    dev.close()
    assert node.closed


# ---- memory and fences another process shares ---------------------------------------------------


PRODUCER = r"""
import json, socket, sys
import numpy as np
import dxg.compute as dc
sock = socket.socket(fileno=int(sys.argv[2]))
with dc.device(0, node=sys.argv[1]) as dev:
    res = dev.dxg.shared_resource(64 * 64 * 4)
    fence = dev.dxg.shared_fence()
    h_res, h_fence = res.share(read_only=True), fence.share(read_only=True)
    socket.send_fds(sock, [b"shared"], [h_res.fileno(), h_fence.fileno()])
    sock.recv(1)  # the consumer's GPU wait is queued: now render
    x = dev.asarray(np.arange(64 * 64, dtype=np.float32).reshape(64, 64))
    dst = dev.from_allocation(res.allocations[0], (64, 64), np.float32)
    dst[...] = dc.sqrt(x) * 2
    dev.current_stream.signal_fence(fence, 1)
    print(json.dumps({"sum": float(dst.sum())}), flush=True)
    sock.recv(1)  # until the consumer is done with it
"""


def test_memory_and_a_fence_shared_by_another_process(stack, tmp_path):
    import json
    import socket
    import subprocess
    import sys

    ours, theirs = socket.socketpair()
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, stack.node_path,
                                 str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                stdout=subprocess.PIPE, text=True)
    theirs.close()
    try:
        with dc.device(0, node=stack.node_path) as dev:
            _, (fd_res, fd_fence), _, _ = socket.recv_fds(ours, 16, 2)
            res, fence = dev.dxg.open_resource(fd_res), dev.dxg.open_fence(fd_fence)
            os.close(fd_res)
            os.close(fd_fence)
            src = dev.from_allocation(res.allocations[0], (64, 64), np.float32)
            with pytest.raises(ValueError):
                dev.from_allocation(res.allocations[0], (65, 64), np.float32)  # too big
            stream = dev.current_stream
            stream.wait_fence(fence, 1)  # the GPU waits for the producer's work
            total = src.sum()  # queued behind that wait
            ours.send(b"g")
            want = np.sqrt(np.arange(64 * 64, dtype=np.float32).reshape(64, 64)) * 2
            check(total.get(), want.sum())
            fence.wait(1)  # the CPU reads only once the producer's GPU signalled
            check(src.get(), want)
            with pytest.raises(DxgError) as e:  # read-only: refused before the GPU would fault
                src[0] = 1
            assert e.value.status == NTSTATUS.STATUS_ACCESS_DENIED
            dev.synchronize()  # (nothing faulted)
            assert json.loads(producer.stdout.readline())["sum"] == pytest.approx(
                float(want.sum()), rel=1e-5)
            ours.send(b"d")
            res.close()
            fence.close()
        assert producer.wait(30) == 0
    finally:
        ours.close()
        if producer.poll() is None:
            producer.kill()
            producer.wait()
