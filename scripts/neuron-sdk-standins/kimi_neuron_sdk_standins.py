"""STAND-INS for the closed half of the Neuron SDK, for NxDI's CPU mode on a machine without it.

These are not the Neuron SDK. ``torch_neuronx``, ``neuronx-cc`` (``neuronxcc``, NKI), ``libneuronxla``,
``nki`` and ``nkilib`` cannot be installed here, yet NxD 0.18 / NxDI 0.9 / vllm-neuron 0.5 import 63
of their modules at module level. This file makes exactly those names importable so the open half
runs in CPU mode; nothing here computes anything a model uses:

* every attribute of a stand-in module is an inert stand-in class: usable as a decorator (it hands
  the function back), a base class, a default value or an enum member; calling one for any other
  purpose builds an inert object that does nothing;
* the few things CPU mode really calls have an honest CPU meaning: ``get_platform_target()`` returns
  ``NEURON_PLATFORM_TARGET_OVERRIDE`` (the platform a device would report), and the
  ``torch.classes.neuron`` namespace exists for the annotations NxD evaluates at import;
* any other module name under those roots raises ImportError, so NxD's own ``try: import ...
  except ImportError`` fallbacks take their CPU paths, as on a machine without the kernels.

Installed into the Neuron-on-CPU virtualenv only (``scripts/setup-neuron-cpu-env.sh`` copies it and
a ``.pth`` line that calls :func:`install`), never into the project's package.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

ROOTS = ("torch_neuronx", "neuronxcc", "libneuronxla", "nki", "nkilib")

# The module names NxD, NxDI (with its Llama and attention modules) and vllm-neuron import at module
# level (../shared/neuron-sdk/README.md, "The 63 module names").
MODULES = frozenset((
    "torch_neuronx", "torch_neuronx.utils", "torch_neuronx.utils.utils", "torch_neuronx.proto",
    "torch_neuronx.pyhlo", "torch_neuronx.xla_impl", "torch_neuronx.xla_impl.trace",
    "torch_neuronx.xla_impl.bucket_trace", "torch_neuronx.xla_impl.torchscript",
    "torch_neuronx.xla_impl.ops", "torch_neuronx.xla_impl.base",
    "torch_neuronx.xla_impl.custom_call_targets", "torch_neuronx.experimental",
    "torch_neuronx.experimental.profiler", "torch_neuronx.experimental.profiler.v2_x",
    "torch_neuronx.experimental.profiler.v2_x.custom_op_name", "libneuronxla", "neuronxcc",
    "neuronxcc.nki", "neuronxcc.nki.kernels", "neuronxcc.nki.kernels.attention",
    "neuronxcc.nki.language", "neuronxcc.nki._pre_prod_kernels",
    "neuronxcc.nki._pre_prod_kernels.collectives", "neuronxcc.nki.compiler",
    "neuronxcc.nki.compiler.backends", "neuronxcc.nki.compiler.backends.neuron",
    "neuronxcc.nki.compiler.backends.neuron.dimensions", "nki", "nki.language", "nki.isa", "nkilib",
    "nkilib.core", "nkilib.core.moe", "nkilib.core.moe.moe_cte",
    "nkilib.core.moe.moe_cte.moe_cte_utils", "nkilib.core.utils", "nkilib.core.utils.common_types",
    "nkilib.core.utils.kernel_helpers", "nkilib.core.utils.tensor_view", "nkilib.core.subkernels",
    "nkilib.core.subkernels.find_nonzero_indices", "nkilib.core.subkernels.indexed_flatten",
    "nkilib.core.moe_block", "nkilib.core.moe_block.moe_block_tkg", "nkilib.core.cumsum",
    "nkilib.core.cumsum.cumsum", "nkilib.core.output_projection",
    "nkilib.core.output_projection.output_projection_cte", "nkilib.core.qkv", "nkilib.core.qkv.qkv",
    "nkilib.core.max", "nkilib.core.max.cascaded_max", "nkilib.core.topk", "nkilib.core.rmsnorm",
    "nkilib.core.rmsnorm.rmsnorm_quant", "nkilib.core.attention", "nkilib.core.attention.attention_cte",
    "nkilib.core.mlp", "nkilib.core.mlp.mlp", "nkilib.experimental", "nkilib.experimental.transformer",
    "nkilib.experimental.transformer.attention_block_tkg",
))

PLATFORM_ENV = "NEURON_PLATFORM_TARGET_OVERRIDE"
# NxDI 0.9 pins torch_neuronx 2.9.*.
TORCH_NEURONX_VERSION = "2.9.0+kimi.standin"
MARK = "__kimi_neuron_sdk_standin__"


class _StandInMeta(type):
    """Only classes made by :func:`_standin` answer unknown attributes; real subclasses do not."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") or MARK not in cls.__dict__:
            raise AttributeError(name)
        return _standin(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if MARK in cls.__dict__ and len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a bare decorator: the function stays as written
        return super().__call__(*args, **kwargs)

    def __getitem__(cls, _: Any) -> Any:
        return cls

    def __repr__(cls) -> str:
        return f"<Neuron SDK stand-in {cls.__qualname__}>"


class _StandInBase(metaclass=_StandInMeta):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # a decorator with arguments, e.g. @nki.jit(mode=...)
        raise RuntimeError(f"{type(self).__qualname__} is a stand-in for the closed Neuron SDK and cannot "
                           "run on CPU")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _standin(f"{type(self).__qualname__}.{name}")

    def __repr__(self) -> str:
        return f"<Neuron SDK stand-in {type(self).__qualname__} instance>"


def _standin(qualname: str) -> type:
    cls = _StandInMeta(qualname.rsplit(".", 1)[-1], (_StandInBase,), {MARK: True})
    cls.__qualname__ = qualname
    return cls


def get_platform_target() -> str:
    """What torch_neuronx reports on a device; on CPU, the override NxDI itself honours."""
    target = os.environ.get(PLATFORM_ENV)
    if not target:
        raise RuntimeError(f"Neuron SDK stand-in: no device to ask for its platform; set "
                           f"{PLATFORM_ENV}=trn2")
    return target


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _standin(f"{self.__name__}.{name}")
        setattr(self, name, value)  # the same object on every lookup
        return value


def _install_torch_classes_namespace() -> None:
    # NxD evaluates `torch.classes.neuron.SPMDModel` in annotations at import; the real
    # torch_neuronx registers those TorchScript classes when it loads.
    import torch

    torch.classes.__dict__.setdefault("neuron", _StandInModule("torch.classes.neuron"))


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__doc__ = f"Stand-in for the closed Neuron SDK module {spec.name} (import only; {__name__})"
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # a package, so the listed submodules import
        setattr(module, MARK, True)
        if module.__name__ in ("torch_neuronx.utils", "torch_neuronx.utils.utils"):
            module.get_platform_target = get_platform_target
        if module.__name__ == "torch_neuronx":
            # NxD's ModelBuilder checks the major version; the local part says what this is.
            module.__version__ = TORCH_NEURONX_VERSION
            _install_torch_classes_namespace()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        root = fullname.split(".", 1)[0]
        if root not in ROOTS:
            return None
        if fullname not in MODULES:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (not among the Neuron SDK stand-ins of {__name__}: "
                "the closed SDK is not installed)", name=fullname)
        return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once); called from the virtualenv's ``.pth``."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())

