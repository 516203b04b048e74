"""`python -m resnet_fused.benchmark`: the main job (resnet_fused/benchmark/__init__.py)."""

import sys

from resnet_fused.benchmark import Invocation, run_main_job

if __name__ == "__main__":
    # The -m name users type (this file's own is ...benchmark.__main__), for the usage line and
    # the recorded command; run by path, there is none.
    module = __spec__.name.removesuffix(".__main__") if __spec__ and __spec__.name != "__main__" else None
    sys.exit(run_main_job(None, Invocation(run_as_main=True, module=module)))
