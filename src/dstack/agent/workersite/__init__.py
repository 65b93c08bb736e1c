"""Python start-up hooks for serverless workers that dstack starts (the agent's side).

The agent puts this folder first on PYTHONPATH of a serverless worker job. Its
`sitecustomize.py` runs at interpreter start, in the job venv's own Python (stdlib only:
dstack is not installed there), and arranges for `dstack_runpod_loop` to replace the runpod
SDK's polling loops with event-driven ones once the SDK is imported. The handler and the SDK
on disk are left as they are; `DSTACK_RUNPOD_LOOP=0` in the configuration's env turns it off.
"""

from pathlib import Path

SITE_DIR = Path(__file__).resolve().parent


def with_worker_site(env: dict[str, str]) -> dict[str, str]:
    """The job's env with this folder ahead of any PYTHONPATH it already has."""
    env = dict(env)
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(SITE_DIR) + (":" + rest if rest else "")
    return env


__all__ = ["SITE_DIR", "with_worker_site"]
