# golden: passes=ResolveRelativeImports
from ...activations import ACT2FN
from ...modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from .configuration_foo import FooConfig
from torch import nn
