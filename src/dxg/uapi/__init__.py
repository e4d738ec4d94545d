"""``dxg.uapi``: the ``/dev/dxg`` ABI (Linux dxgkrnl UAPI) for Python.

* :mod:`.structs` (generated): one ctypes class per C struct/union of ``d3dkmthk.h`` (named
  like the C tag: ``uapi.d3dkmt_enumadapters3``) and one ``IntEnum`` per C enum;
* :mod:`.ioctls`: ``LX_DX*`` codes, the ``IOCTLS`` table, ``_IOWR``/``_IOC_*`` and the limits;
* :mod:`.ntstatus`: ``NTSTATUS`` and the driver's/libdxg's status <-> errno mappings;
* :mod:`.handles`: the ``d3dkmthandle`` bit format and ctypes handle helpers;
* :mod:`.wddm`: Windows QueryAdapterInfo payloads (``D3DKMT_ADAPTERTYPE``...);
* :mod:`.cheader`: ``render_header()`` writes the same ABI as a C header.

Everything public is re-exported here, with one exception: ``uapi.ntstatus`` is the
:mod:`.ntstatus` module; the C ``struct ntstatus`` is ``uapi.structs.ntstatus``.
"""

import sys

from . import cheader, handles, ioctls, structs, wddm
from .handles import *  # noqa: F403
from .ioctls import *  # noqa: F403
from .ntstatus import *  # noqa: F403
from .structs import *  # noqa: F403
from .wddm import *  # noqa: F403

# ``from .structs import *`` bound ``ntstatus`` to the C struct; the package attribute is the
# submodule, whatever the import order was.
ntstatus = sys.modules[__name__ + ".ntstatus"]

__all__ = (
    "cheader",
    "handles",
    "ioctls",
    "ntstatus",
    "structs",
    "wddm",
    *(name for name in structs.__all__ if name != "ntstatus"),
    *ioctls.__all__,
    *ntstatus.__all__,
    *handles.__all__,
    *wddm.__all__,
)
