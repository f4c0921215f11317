"""porter's bundled paged-attention runtime (import name `porter.engine`)."""
from porter.engine.config import EngineConfig

__all__ = ["EngineConfig", "LLM", "SamplingParams", "RequestOutput"]


def __getattr__(name):  # keep `import porter.engine` light; the runtime loads on first use
    if name == "LLM":
        from porter.engine.llm import LLM
        return LLM
    if name in ("SamplingParams",):
        from porter.engine.sampling_params import SamplingParams
        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from porter.engine import outputs
        return getattr(outputs, name)
    raise AttributeError(name)
