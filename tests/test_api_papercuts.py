"""The Python API as a new user meets it: LUIDs as ints or the strings `dxg ls` prints,
adapters by index, "no such adapter", values read as properties (the older call forms still
work), a forked child told to reopen the node, DXG_VISIBLE_ADAPTERS, and a docstring on every
public class."""

import asyncio
import importlib
import inspect
import json
import os
import pkgutil

import pytest

import dxg.client
import dxg.compute
import dxg.compute as dc
from dxg.client import (
    DeviceIds,
    DxgError,
    ExecutionState,
    NodeForked,
    NoSuchAdapter,
    open_node,
    open_node_async,
    parse_luid,
)
from dxg.client.visible import parse_visible
from dxg.uapi.ntstatus import NTSTATUS


def test_luids_as_ints_strings_and_parts():
    assert parse_luid(0x10000ABCD) == parse_luid("0x000000010000abcd") == 0x10000ABCD
    assert parse_luid((0xABCD, 0x1)) == 0x10000ABCD
    assert parse_luid(" 0X10 ") == 16
    for bad in ("10", "gpu0", "0x", "0x1" + "0" * 16):
        with pytest.raises(ValueError, match="LUID"):
            parse_luid(bad)
    with pytest.raises(TypeError):
        parse_luid(1.5)


def test_open_adapter_by_the_string_dxg_ls_prints(stack):
    with open_node(stack.node_path) as node:
        luids = [a.luid for a in node.adapters()]
        text = f"0x{luids[1]:016x}"  # as `dxg ls --json` prints it
        with node.open_adapter(text) as a, node.open_adapter(luids[1]) as b:
            assert a.luid == b.luid == luids[1]
        assert node.processes(text) == node.processes(luids[1])


def test_adapters_by_index_or_luid(stack):
    with open_node(stack.node_path) as node:
        luids = [a.luid for a in node.adapters()]
        assert node.adapter(1).luid == luids[1]
        assert node.adapter(f"0x{luids[0]:016x}").luid == luids[0]
        assert node.adapter(luids[1]).luid == luids[1]  # an int that is not an index: a LUID
        with pytest.raises(NoSuchAdapter) as e:
            node.adapter(2)
        assert str(e.value).startswith("no such adapter: index or LUID 2 (this process sees "
                                       "2: indices 0..1")


def test_an_unknown_luid_says_no_such_adapter(stack):
    with open_node(stack.node_path) as node:
        with pytest.raises(NoSuchAdapter) as e:
            node.open_adapter("0x0000000000001234")
        assert isinstance(e.value, DxgError) and isinstance(e.value, ValueError)
        assert e.value.status == NTSTATUS.STATUS_INVALID_PARAMETER
        assert str(e.value).startswith("no such adapter: LUID 0x0000000000001234")
        with pytest.raises(NoSuchAdapter, match="no such adapter"):
            dc.device(7, node=node)


def test_values_are_properties_and_the_older_calls_still_work(stack):
    with open_node(stack.node_path) as node:
        ad = node.adapter(0)
        ids = ad.device_ids
        assert isinstance(ids, DeviceIds) and (ids.vendor_id, ids.device_id) == (0x1414, 0x8C)
        assert ad.ids == ids and ad.device_ids() == ids and ad.device_ids(0) == ids
        assert ad.query_device_ids(0) == ids
        with pytest.raises(DxgError) as e:
            ad.device_ids(5)  # the method form: another physical adapter
        assert e.value.status == NTSTATUS.STATUS_INVALID_PARAMETER
        with ad.create_device() as dev:
            state = dev.execution_state
            assert state is ExecutionState.ACTIVE and state == 1
            assert dev.execution_state() == ExecutionState.ACTIVE  # the method form
        with dc.device(0, node=node) as gpu:
            assert gpu.execution_state == ExecutionState.ACTIVE
            assert gpu.device_ids.vendor_id == 0x1414
    assert ExecutionState(9).name == "STATE_9"  # a state a newer host might report


def test_the_async_side_awaits_the_same_values(stack):
    async def main() -> tuple:
        async with await open_node_async(stack.node_path) as node:
            ad = await node.adapter(0)
            dev = await ad.create_device()
            return await ad.device_ids(), await dev.execution_state()

    ids, state = asyncio.run(main())
    assert ids.vendor_id == 0x1414 and state is ExecutionState.ACTIVE


def test_a_forked_child_is_told_to_reopen_the_node(stack):
    with open_node(stack.node_path) as node:
        ad = node.adapter(0)
        dev = ad.create_device()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            report = {}
            try:
                try:
                    dev.create_context()
                except NodeForked as e:
                    report["error"] = str(e)
                node.close()  # letting go of the parent's objects is allowed, and silent
                with open_node(stack.node_path) as mine:  # what the message says to do
                    report["reopened"] = len(mine.adapters())
            finally:
                os.write(w, json.dumps(report).encode())
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            report = json.loads(f.read())
        os.waitpid(pid, 0)
        assert dev.execution_state == ExecutionState.ACTIVE  # the parent's are untouched
    assert report["reopened"] == 2
    assert f"using dxg objects of process {os.getpid()}" in report["error"]
    assert "open the node again in the child" in report["error"]


def test_dxg_visible_adapters_values():
    assert parse_visible("all") is None
    assert parse_visible("").entries == () == parse_visible("none").entries
    v = parse_visible("1, 0x00000001000000ab,1")
    assert v.entries == (("index", 1), ("luid", 0x1000000AB), ("index", 1))
    with pytest.raises(ValueError) as e:
        parse_visible("0,gpu1")
    assert "'gpu1' is not an adapter index or LUID" in str(e.value)


def test_dxg_visible_adapters_in_this_process(stack, monkeypatch):
    with open_node(stack.node_path) as node:
        luids = [a.luid for a in node.adapters()]
    monkeypatch.setenv("DXG_VISIBLE_ADAPTERS", f"0x{luids[1]:016x}")
    with open_node(stack.node_path) as node:
        assert [a.luid for a in node.adapters()] == [luids[1]]
        with pytest.raises(NoSuchAdapter, match="DXG_VISIBLE_ADAPTERS leaves it out"):
            node.open_adapter(luids[0])
        assert node.open_adapter(luids[1]).luid == luids[1]
    assert dc.device_count(stack.node_path) == 1
    with dc.device(0, node=stack.node_path) as d:
        assert d.luid == luids[1] and d.index == 0
    monkeypatch.setenv("DXG_VISIBLE_ADAPTERS", "")
    assert dc.device_count(stack.node_path) == 0
    monkeypatch.setenv("DXG_VISIBLE_ADAPTERS", "first")
    with pytest.raises(ValueError, match="DXG_VISIBLE_ADAPTERS='first'"):
        open_node(stack.node_path)


def _public_classes():
    for pkg in (dxg.client, dxg.compute):
        modules = [pkg] + [importlib.import_module(f"{pkg.__name__}.{m.name}")
                           for m in pkgutil.iter_modules(pkg.__path__)]
        for module in modules:
            for name, obj in vars(module).items():
                if (not name.startswith("_") and inspect.isclass(obj)
                        and obj.__module__ == module.__name__):
                    yield f"{module.__name__}.{name}", obj


def test_every_public_class_says_what_it_is_for():
    classes = dict(_public_classes())
    assert len(classes) > 40
    undocumented = []
    for where, cls in classes.items():
        doc = (vars(cls).get("__doc__") or "").strip()
        # (not the text dataclasses or Enum write for a class that has none)
        if not doc or doc.startswith(f"{cls.__name__}(") or doc == "An enumeration.":
            undocumented.append(where)
    assert undocumented == []
