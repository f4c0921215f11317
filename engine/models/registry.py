"""Architecture name -> engine model class (vLLM's ModelRegistry shape).

Sources, later ones overriding earlier: built-ins (imported lazily), the "porter.models" entry-point
group (`FooForCausalLM = "pkg.module:FooForCausalLM"`, loaded on first use), and explicit
`register_model` / `load_model_file` calls.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from torch import nn

ENTRY_POINT_GROUP = "porter.models"
_BUILTIN = {"LlamaForCausalLM": "porter.engine.models.llama:LlamaForCausalLM"}


class UnknownArchitectureError(ValueError):
    def __init__(self, architectures: list[str], supported: list[str], source: str | None = None):
        self.architectures, self.supported = list(architectures), list(supported)
        asked = ", ".join(self.architectures) if self.architectures else "(config.json lists no architectures)"
        if source is not None:
            super().__init__(f"model file {source} defines {', '.join(self.supported)}, but config.json's "
                             f"architectures are {asked}: convert the modeling file of this checkpoint")
            return
        super().__init__(
            f"no engine model is registered for {asked}. Registered: {', '.join(self.supported) or 'none'}.\n"
            "Convert the HF modeling code first: `porter convert <modeling_foo.py or model type> -o foo.py`, "
            "then pass `--model-file foo.py` (or `model_file=` in Python), or register the class with "
            "ModelRegistry.register_model(\"FooForCausalLM\", \"pkg.module:FooForCausalLM\") or the "
            f"\"{ENTRY_POINT_GROUP}\" entry-point group."
        )


def looks_like_engine_model(obj, module_name: str | None = None) -> bool:
    """An nn.Module class (defined in module_name, if given) with the engine model contract."""
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        return False
    if module_name is not None and obj.__module__ != module_name:
        return False
    if not all(callable(getattr(obj, m, None)) for m in ("forward", "compute_logits", "load_weights")):
        return False
    try:
        return "engine_config" in inspect.signature(obj.__init__).parameters
    except (TypeError, ValueError):
        return False


class _ModelRegistry:
    def __init__(self):
        self._models: dict[str, str | type] = dict(_BUILTIN)
        self._explicit: set[str] = set()
        self._entry_points_loaded = False

    def register_model(self, model_arch: str, model_cls: str | type) -> None:
        """Register `model_cls` (a class, or "module:Class" imported on first use) for `model_arch`."""
        if isinstance(model_cls, str):
            module, sep, cls = model_cls.partition(":")
            if not (module and sep and cls):
                raise ValueError(f"model class for {model_arch!r} must be 'module:Class', got {model_cls!r}")
        elif not (inspect.isclass(model_cls) and issubclass(model_cls, nn.Module)):
            raise TypeError(f"model class for {model_arch!r} must be an nn.Module subclass or 'module:Class'")
        self._models[model_arch] = model_cls
        self._explicit.add(model_arch)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name not in self._explicit:  # a plugin may replace a built-in, not a user's choice
                self._models[ep.name] = ep.value

    def get_supported_archs(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._models)

    def _import(self, arch: str) -> type:
        target = self._models[arch]
        if not isinstance(target, str):
            return target
        module_name, _, cls_name = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as e:
            raise ImportError(f"architecture {arch!r} is registered as {target!r}, which cannot be imported: {e}") from e
        self._models[arch] = cls
        return cls

    def resolve(self, architectures: list[str] | str, model_file: str | Path | None = None) -> type:
        """The class for the first architecture (in config.json order) that is registered, or, with
        `model_file`, that the file defines (the registry is left as it was)."""
        if isinstance(architectures, str):
            architectures = [architectures]
        if model_file is not None:
            classes = import_model_file(model_file)
            for arch in architectures or []:
                if arch in classes:
                    return classes[arch]
            raise UnknownArchitectureError(list(architectures or []), list(classes), source=str(model_file))
        self._load_entry_points()
        for arch in architectures or []:
            if arch in self._models:
                return self._import(arch)
        raise UnknownArchitectureError(list(architectures or []), self.get_supported_archs())

    def load_model_file(self, path: str | Path) -> list[str]:
        """Register every engine model class a converted model file defines, under its class name, for
        the rest of the process. Returns the names registered. (`resolve(..., model_file=)` uses a file
        for one lookup without registering anything.)"""
        classes = import_model_file(path)
        for name, cls in classes.items():
            self.register_model(name, cls)
        return list(classes)


_imported: dict[tuple[Path, int], dict[str, type]] = {}


def import_model_file(path: str | Path) -> dict[str, type]:
    """The engine model classes a model file defines, by class name. The file is imported once per
    modification time, under a module name of its own."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.suffix != ".py":
        raise ValueError(f"model file {path} must be a Python (.py) file")
    key = (path, path.stat().st_mtime_ns)
    if key in _imported:
        return _imported[key]
    digest = hashlib.sha1(f"{path}:{key[1]}".encode()).hexdigest()[:10]
    name = f"porter_model_file_{path.stem.replace('-', '_')}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing resolve the module by name while it executes
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ImportError(f"importing model file {path} failed: {type(e).__name__}: {e}") from e
    found = {obj.__name__: obj for obj in vars(module).values() if looks_like_engine_model(obj, name)}
    if not found:
        raise ValueError(
            f"{path} defines no engine model class (an nn.Module with forward, compute_logits, load_weights "
            "and __init__(self, *, engine_config, prefix='')); was it produced by `porter convert`?")
    _imported[key] = found
    return found


ModelRegistry = _ModelRegistry()
