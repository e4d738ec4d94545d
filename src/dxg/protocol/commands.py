"""DXGK command codes, exactly as `enum dxgkvmb_commandtype*` in the real dxgvmbus.h."""

from enum import IntEnum


class ChannelType(IntEnum):
    VGPU_TO_HOST = 0
    VM_TO_HOST = 1
    HOST_TO_VM = 2


class GlobalCommand(IntEnum):
    """VM -> host commands on the global channel (codes >= 1000)."""

    CREATEPROCESS = 1000
    DESTROYPROCESS = 1001
    OPENSYNCOBJECT = 1002
    DESTROYSYNCOBJECT = 1003
    CREATENTSHAREDOBJECT = 1004
    DESTROYNTSHAREDOBJECT = 1005
    SIGNALFENCE = 1006
    NOTIFYPROCESSFREEZE = 1007
    NOTIFYPROCESSTHAW = 1008
    QUERYETWSESSION = 1009
    SETIOSPACEREGION = 1010
    COMPLETETRANSACTION = 1011
    SHAREOBJECTWITHHOST = 1021
    ISFEATUREENABLED_GLOBAL = 1022
    # pydxg extension (not in the real driver): the host's object census for this partition,
    # answered as UTF-8 JSON. Used by `dxg ps` and the demo to show what the host still holds.
    PYDXG_QUERYPARTITION = 2000
    # pydxg extension: the memory quotas of a host process (its account, e.g. the guest uid,
    # and the per-process and per-account limits), sent once after CREATEPROCESS (docs/policy.md).
    PYDXG_SETPROCESSQUOTA = 2100
    # pydxg extension: a CPU wait on a shared sync object held by an NT reference (a sync file's),
    # not by a process: it outlives the process that made the sync file (docs/sharing.md).
    PYDXG_WAITSHAREDSYNC = 2101


class VgpuCommand(IntEnum):
    """Per-adapter commands (vGPU channel, or the global channel with the extension header)."""

    CREATEDEVICE = 0
    DESTROYDEVICE = 1
    QUERYADAPTERINFO = 2
    DDIQUERYADAPTERINFO = 3
    CREATEALLOCATION = 4
    DESTROYALLOCATION = 5
    CREATECONTEXTVIRTUAL = 6
    DESTROYCONTEXT = 7
    CREATESYNCOBJECT = 8
    CREATEPAGINGQUEUE = 9
    DESTROYPAGINGQUEUE = 10
    MAKERESIDENT = 11
    EVICT = 12
    ESCAPE = 13
    OPENADAPTER = 14
    CLOSEADAPTER = 15
    FREEGPUVIRTUALADDRESS = 16
    MAPGPUVIRTUALADDRESS = 17
    RESERVEGPUVIRTUALADDRESS = 18
    UPDATEGPUVIRTUALADDRESS = 19
    SUBMITCOMMAND = 20
    QUERYVIDEOMEMORYINFO = 21
    WAITFORSYNCOBJECTFROMCPU = 22
    LOCK2 = 23
    UNLOCK2 = 24
    WAITFORSYNCOBJECTFROMGPU = 25
    SIGNALSYNCOBJECT = 26
    SIGNALFENCENTSHAREDBYREF = 27
    GETDEVICESTATE = 28
    MARKDEVICEASERROR = 29
    ADAPTERSTOP = 30
    SETQUEUEDLIMIT = 31
    OPENRESOURCE = 32
    SETCONTEXTSCHEDULINGPRIORITY = 33
    PRESENTHISTORYTOKEN = 34
    SETREDIRECTEDFLIPFENCEVALUE = 35
    GETINTERNALADAPTERINFO = 36
    FLUSHHEAPTRANSITIONS = 37
    BLT = 38
    DDIGETSTANDARDALLOCATIONDRIVERDATA = 39
    CDDGDICOMMAND = 40
    QUERYALLOCATIONRESIDENCY = 41
    FLUSHDEVICE = 42
    FLUSHADAPTER = 43
    DDIGETNODEMETADATA = 44
    SETEXISTINGSYSMEMSTORE = 45
    ISSYNCOBJECTSIGNALED = 46
    CDDSYNCGPUACCESS = 47
    QUERYSTATISTICS = 48
    CHANGEVIDEOMEMORYRESERVATION = 49
    CREATEHWQUEUE = 50
    DESTROYHWQUEUE = 51
    SUBMITCOMMANDTOHWQUEUE = 52
    GETDRIVERSTOREFILE = 53
    READDRIVERSTOREFILE = 54
    GETNEXTHARDLINK = 55
    UPDATEALLOCATIONPROPERTY = 56
    OFFERALLOCATIONS = 57
    RECLAIMALLOCATIONS = 58
    SETALLOCATIONPRIORITY = 59
    GETALLOCATIONPRIORITY = 60
    GETCONTEXTSCHEDULINGPRIORITY = 61
    QUERYCLOCKCALIBRATION = 62
    QUERYRESOURCEINFO = 64
    LOGEVENT = 65
    SETEXISTINGSYSMEMPAGES = 66
    INVALIDATECACHE = 67
    ISFEATUREENABLED = 68
    # pydxg extension (not in the real driver): the process closed its last handle of the
    # adapter; the host drops what the process still holds there (reservations, GPU VA space,
    # memory blocks), as the real driver's dxgprocess_adapter teardown does in one kernel.
    PYDXG_CLOSEPROCESSADAPTER = 2001


class HostToVmCommand(IntEnum):
    SIGNALGUESTEVENT = 0
    PROPAGATEPRESENTHISTORYTOKEN = 1
    SETGUESTDATA = 2
    SIGNALGUESTEVENTPASSIVE = 3
    SENDWNFNOTIFICATION = 4
    # pydxg extension (not in the real driver): a monitored fence's new value, for a guest that
    # keeps its client's copy of the fence page itself (a link without descriptors).
    PYDXG_FENCEVALUE = 2000


# The four fire-and-forget commands once the host enables async messages (patches 11 and 15).
ASYNC_COMMANDS = frozenset(
    {
        VgpuCommand.SUBMITCOMMAND,
        VgpuCommand.SUBMITCOMMANDTOHWQUEUE,
        VgpuCommand.SIGNALSYNCOBJECT,
        VgpuCommand.WAITFORSYNCOBJECTFROMGPU,
    }
)

# dxgdevice_flushschedulerreason: the reason sent when a process-adapter is torn down.
DXGDEVICE_FLUSHSCHEDULER_DEVICE_TERMINATE = 4
