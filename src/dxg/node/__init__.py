"""Front ends of the guest driver: the Unix-socket node (:mod:`dxg.node.server`), its wire
(:mod:`dxg.node.wire`) and default path (:mod:`dxg.node.paths`).

Import-light on purpose: clients import :mod:`dxg.node.wire` and :mod:`dxg.node.paths` without
pulling in the driver.
"""

from dxg.node.paths import default_node_path

__all__ = ["default_node_path"]
