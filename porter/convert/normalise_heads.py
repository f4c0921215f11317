"""Key/value head counts the attention block keeps in its own attribute (multi-query attention).

The parallel pass records an unfused attention block's kv heads from the config
(`num_key_value_heads`), else as all of its heads. A block that computes its own count, e.g.
`self.kv_heads = 1 if self.multi_query else self.num_heads`, and sizes its k/v projections with it, has
fewer kv heads than that: its `Attention(num_kv_heads=...)` must read the block's attribute.
"""
from __future__ import annotations

import re

import libcst as cst

from porter.convert.context import Context
from porter.convert.cst_util import classes, code, init_assignments

_KV_ATTR = re.compile(r"^(num_)?(kv|key_value)_heads$")


def normalise_kv_heads(module: cst.Module, ctx: Context) -> cst.Module:
    cls_map = classes(module)
    for name, (heads, kv, size) in list(ctx.attn_heads.items()):
        if not (kv == heads or kv.endswith(".num_attention_heads")) or name not in cls_map:
            continue
        attrs = [a for a, _ in init_assignments(cls_map[name]) if _KV_ATTR.match(a)]
        if len(attrs) != 1:
            continue
        ctx.attn_heads[name] = (heads, f"self.{attrs[0]}", size)
        value = dict(init_assignments(cls_map[name]))[attrs[0]]
        ctx.report.change("heads", ctx.lines.of(cls_map[name]),
                          f"{name}: kv heads from self.{attrs[0]} = {code(value)} (not the config's head count)")
    return module
