"""What the agent can do only on some hosts (network namespaces, the job sandbox), probed once.

Both need root on Linux and a few system tools, can be switched off by an environment variable,
and report *why* they are unavailable (the agent's `/api/host` and the job's message say so).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from typing import ClassVar

logger = logging.getLogger(__name__)

#: where system tools live when the agent's PATH lacks the sbin directories (a service's minimal PATH)
SYSTEM_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def find_tool(name: str) -> str | None:
    """The executable `name` on PATH or in the system directories; None if absent."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SYSTEM_PATH]))


class HostCapability:
    """A capability probed on first use: `available`, and `reason` when it is not.

    Subclasses name the switch that disables it and the log line, and implement `_try` (the real
    probe: return "" when it works here, else why not); the shared preconditions come first.
    """

    #: set (to anything) to disable the capability on a host where it would work
    disable_env: ClassVar[str]
    #: names it in the log line "<what> unavailable: <reason>"
    what: ClassVar[str]
    not_root_reason: ClassVar[str] = "the agent does not run as root"

    def __init__(self) -> None:
        self._available: bool | None = None
        self.reason = "not probed yet"

    @property
    def available(self) -> bool:
        if self._available is None:
            self.probe()
        return bool(self._available)

    def probe(self) -> bool:
        if self._available is not None:
            return self._available
        reason = self._precondition() or self._try()
        ok = not reason
        self._available, self.reason = ok, reason
        if ok:
            self._on_available()
        else:
            logger.info("%s unavailable: %s", self.what, reason)
        return ok

    def _precondition(self) -> str:
        if os.environ.get(self.disable_env):
            return f"disabled by {self.disable_env}"
        if not sys.platform.startswith("linux"):
            return f"not Linux ({sys.platform})"
        if os.geteuid() != 0:
            return self.not_root_reason
        return ""

    def _try(self) -> str:
        raise NotImplementedError

    def _on_available(self) -> None:
        """Prepare what the capability needs once it is known to work (default: nothing)."""
        return None
