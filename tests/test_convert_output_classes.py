"""The base model's output object: transformers' model-output classes (imported, or subclassed in the file as
cwm does) become a plain `return hidden_states`; an object of any other class of the file is refused."""
from __future__ import annotations

import pytest

from porter.convert.pipeline import convert_source
from porter.convert.report import ConversionError
from porter.convert.source import resolve_source

RETURN = "        return BaseModelOutputWithPast(\n"


def _llama(edit=None) -> str:
    src = resolve_source("llama")[0].read_text()
    assert src.count(RETURN) == 1
    return edit(src) if edit else src


def _with_own_class(base: str, name: str = "LlamaModelOutputWithPast"):
    def edit(src: str) -> str:
        src = src.replace("class LlamaModel(LlamaPreTrainedModel):",
                          f"class {name}({base}):\n    pass\n\n\nclass LlamaModel(LlamaPreTrainedModel):", 1)
        return src.replace(RETURN, f"        return {name}(\n", 1)
    return edit


def _convert(src: str) -> str:
    return convert_source(src, "modeling_llama.py", package="transformers.models.llama").code


def test_a_model_output_subclass_of_the_file_is_returned_as_hidden_states():
    code = _convert(_llama(_with_own_class("BaseModelOutputWithPast")))
    assert "LlamaModelOutputWithPast" not in code
    assert code == _convert(_llama())  # the same engine model as with transformers' own class


def test_an_object_of_another_class_of_the_file_is_refused():
    with pytest.raises(ConversionError, match=r"modeling_llama.py:\d+: cannot convert return of `LlamaOut\(...\)`"):
        _convert(_llama(_with_own_class("dict", name="LlamaOut")))


def test_leftover_cache_names_are_caught_but_prose_is_not():
    from porter.convert.pipeline import leftover_names

    code = 'def f(x):\n    """works with a KV-cache"""  # cache\n    return Out(x, cache=None), k_cache\n'
    assert leftover_names(code) == [("cache", 3)]
