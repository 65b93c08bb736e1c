"""The heartbeat ends with its worker, in serverless workers that dstack starts.

runpod 1.12 sends heartbeats from a child process that knows nothing of its parent. When the
worker's main process is killed and the child is not (a kill of one pid, not of the group), the
orphan keeps pinging with the job list it last saw, and the server, told the worker still holds
those jobs, never runs them elsewhere. Here each heartbeat first checks that the process that
started it is still its parent, and ends quietly when it is not.

Applied by `dstack_runpod_loop.patch` to `runpod.serverless.modules.rp_ping` (stdlib only).
"""

import os


def patch(rp_ping):
    """Wrap Heartbeat._send_ping with the orphan check; False where left alone."""
    heartbeat = getattr(rp_ping, "Heartbeat", None)
    original = getattr(heartbeat, "_send_ping", None)
    if original is None or getattr(original, "dstack_orphan_check", False):
        return False
    parents = {}  # this process's pid -> its parent when it first pinged (works under fork and spawn)

    def _send_ping(self):
        parent = os.getppid()
        if parent == 1 or parents.setdefault(os.getpid(), parent) != parent:
            os._exit(0)  # the worker is gone; its jobs are not this process's to vouch for
        return original(self)

    _send_ping.dstack_orphan_check = True
    heartbeat._send_ping = _send_ping
    return True
