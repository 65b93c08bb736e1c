"""Start-up hook of serverless workers started by dstack (see dstack.agent.workersite).

Installs an import hook that patches runpod's JobScaler right after its module loads, then
runs the sitecustomize this one hides, if there is one further along sys.path. Stdlib only,
and cheap: nothing is imported until the worker imports the SDK itself.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_TARGET = "runpod.serverless.modules.rp_scale"


class _PatchAfterLoad(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of the SDK's scaler module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET or os.environ.get("DSTACK_RUNPOD_LOOP") == "0":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real_exec = spec.loader.exec_module

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                create = getattr(spec_loader, "create_module", None)
                return create(spec) if create else None

            def exec_module(self, module):
                real_exec(module)
                try:
                    import dstack_runpod_loop

                    dstack_runpod_loop.patch(module)
                except Exception as e:  # never break a worker over a speed-up
                    sys.stderr.write(f"dstack: runpod's stock job loops kept ({type(e).__name__}: {e})\n")

        spec_loader = spec.loader
        spec.loader = _Loader()
        return spec


def _run_hidden_sitecustomize():
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


if not any(isinstance(f, _PatchAfterLoad) for f in sys.meta_path):
    sys.meta_path.insert(0, _PatchAfterLoad())
_run_hidden_sitecustomize()
