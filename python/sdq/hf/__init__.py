"""sdq as a transformers quantization method: `import sdq` makes from_pretrained load sdq folders.

    import sdq
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("smollm2-sdq-t2")   # SDQLinear layers, packed

register() adds quant_method "sdq" (SDQQuantizationConfig, SDQHfQuantizer: sdq.hf.quantizer) to
transformers' registry. `import sdq` calls it, but importing that registry takes seconds, so when
transformers' quantizers are not imported yet, registration waits for them: a one-shot import hook
registers right after `transformers.quantizers.auto` is first imported. Registering again (a
second import, importlib.reload) replaces sdq's own earlier entries; a method "sdq" registered by
someone else is left alone, with a warning.

Without `import sdq`, transformers 5 does not know quant_method "sdq": it logs "Unknown
quantization type, got sdq ... we will skip the quantization", builds plain nn.Linear layers with
random weights, and its load report lists the packed tensors as UNEXPECTED and the linear
weights as MISSING. sdq cannot speak before it is imported; docs/format.md says so.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_REGISTRY = "transformers.quantizers.auto"


def register() -> bool:
    """Register quant_method "sdq" with transformers now (imports transformers' quantizers).
    False when transformers is not installed or another package owns the name."""
    try:
        from transformers.quantizers import auto
    except ImportError:
        return False
    from . import quantizer
    entries = ((auto.AUTO_QUANTIZATION_CONFIG_MAPPING, quantizer.SDQQuantizationConfig,
                auto.register_quantization_config),
               (auto.AUTO_QUANTIZER_MAPPING, quantizer.SDQHfQuantizer, auto.register_quantizer))
    name = quantizer.QUANT_METHOD
    for mapping, cls, _ in entries:
        current = mapping.get(name)
        if current is not None and current is not cls and not current.__module__.startswith("sdq."):
            warnings.warn(f"transformers already has a quantization method {name!r} "
                          f"({current.__module__}.{current.__qualname__}); sdq did not replace "
                          f"it, so from_pretrained will not load sdq folders (use sdq.load)",
                          RuntimeWarning, stacklevel=2)
            return False
    for mapping, cls, register_fn in entries:
        if mapping.get(name) is not cls:
            mapping.pop(name, None)  # sdq's own entry from an earlier import of this module
            register_fn(name)(cls)
    return True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers.quantizers.auto through the other finders and wraps its loader so that
    register() runs right after the module has executed; removes itself then."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding us
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_source, is_package, ...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            register()
        except Exception as e:  # noqa: BLE001 -- never break transformers' own import
            warnings.warn(f"sdq could not register quant_method 'sdq' with transformers: "
                          f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)


def register_when_transformers_loads() -> None:
    """register() now if transformers' quantizers are imported, else right after they are."""
    if _REGISTRY in sys.modules:
        register()
    elif not any(type(f).__name__ == "_RegisterAfterImport" for f in sys.meta_path):  # reloads
        if importlib.util.find_spec("transformers") is not None:
            sys.meta_path.insert(0, _RegisterAfterImport())


register_when_transformers_loads()
