"""engine_rotary: HF's rotate-half apply (judged by its math) becomes the engine apply_rotary_cos_sin at its
call sites; look-alikes (casts, partial slicing, interleaved rotate_half, other unsqueeze dims) are kept and
noted; converted dev-set files use the engine function and still match HF."""
import pytest

from porter.convert.engine_rotary import engine_rotary

from convert_pass_helpers import run_pass

HEAD = "import torch\nfrom torch import nn\n\nfrom porter.engine.layers.linear import RowParallelLinear\n\n\n"

ROTATE_HALF = '''def rotate_half(x):
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
'''

APPLY = '''def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Applies Rotary Position Embedding to the query and key tensors."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
'''

ATTN = '''class Attn(nn.Module):
    def forward(self, q, k, position_embeddings):
        cos, sin = position_embeddings
        q, k = CALL
        return q + k
'''
CALL = "apply_rotary_pos_emb(q, k, cos, sin)"


def run(source: str):
    return run_pass(engine_rotary, source)


def source(rotate=ROTATE_HALF, apply=APPLY, call=CALL) -> str:
    return HEAD + rotate + "\n\n" + apply + "\n\n" + ATTN.replace("CALL", call)


IMPORTED = HEAD.replace("from porter.engine.layers.linear import RowParallelLinear\n",
                        "from porter.engine.layers.linear import RowParallelLinear\n"
                        "from porter.engine.layers.rotary import apply_rotary_cos_sin\n")


def test_hf_apply_becomes_the_engine_function_and_both_helpers_go():
    out, notes = run(source())
    assert out == IMPORTED + ATTN.replace("CALL", "apply_rotary_cos_sin(q, k, cos, sin)")
    assert notes == ["apply_rotary_pos_emb -> engine apply_rotary_cos_sin at 1 call site(s); "
                     "dropped apply_rotary_pos_emb, rotate_half"]


@pytest.mark.parametrize("call", ["apply_rotary_pos_emb(q, k, cos, sin, 1)",
                                  "apply_rotary_pos_emb(q, k, sin=sin, cos=cos, unsqueeze_dim=1)"])
def test_explicit_unsqueeze_one_and_keywords_bind(call):
    out, _ = run(source(call=call))
    assert "apply_rotary_cos_sin(q, k, cos, sin)" in out and "def apply_rotary_pos_emb" not in out


def test_other_names_and_operand_orders_are_the_same_math():
    rotate = ROTATE_HALF.replace("rotate_half", "swap").replace("x1", "a").replace("x2", "b")
    apply = APPLY.replace("rotate_half", "swap").replace("(q * cos) + (swap(q) * sin)", "swap(q) * sin + cos * q") \
        .replace("apply_rotary_pos_emb", "rope").replace("q_embed, k_embed", "q_embed, (k * cos) + (swap(k) * sin)")
    out, notes = run(source(rotate, apply, "rope(q, k, cos, sin)"))
    assert "apply_rotary_cos_sin(q, k, cos, sin)" in out and "def rope" not in out and "def swap" not in out


@pytest.mark.parametrize("rotate, apply, why", [
    (ROTATE_HALF, APPLY.replace("return q_embed, k_embed", "return q_embed.to(q.dtype), k_embed.to(k.dtype)"),
     "`q.dtype`"),  # olmo's cast
    (ROTATE_HALF, APPLY.replace('"""\n', '"""\n    q = q.float()\n', 1), "q.float()"),  # cohere's upcast
    (ROTATE_HALF, APPLY.replace(
        "    q_embed = (q * cos) + (rotate_half(q) * sin)\n    k_embed = (k * cos) + (rotate_half(k) * sin)\n",
        "    rotary_dim = cos.shape[-1]\n    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]\n"
        "    q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)\n"
        "    k_embed = (k * cos) + (rotate_half(k) * sin)\n"), "cos.shape[-1]"),  # partial: slices q itself
    (ROTATE_HALF.replace("torch.cat((-x2, x1), dim=-1)", "torch.cat((x2, -x1), dim=-1)"), APPLY,
     "rotate_half(q)"),  # the opposite rotation
    ('def rotate_half(x):\n    x1 = x[..., ::2]\n    x2 = x[..., 1::2]\n'
     '    return torch.stack((-x2, x1), dim=-1).flatten(-2)\n', APPLY, "rotate_half(q)"),  # interleaved
    (ROTATE_HALF, APPLY.replace("unsqueeze_dim=1", "unsqueeze_dim=2"), "does not default to 1"),
    (ROTATE_HALF, APPLY.replace("cos.unsqueeze(unsqueeze_dim)", "cos.unsqueeze(2)"), "unsqueezes at 2"),
    (ROTATE_HALF, APPLY.replace("(q * cos) + (rotate_half(q) * sin)", "(q * cos) + (rotate_half(q) * cos)"),
     "does not return"),
], ids=["cast", "fp32-upcast", "partial-slicing", "reversed-rotation", "interleaved", "default-2", "literal-2",
        "cos-twice"])
def test_look_alikes_are_kept_and_noted(rotate, apply, why):
    src = source(rotate, apply)
    out, notes = run(src)
    assert out == src
    assert len(notes) == 1 and notes[0].startswith("apply_rotary_pos_emb kept: not the plain rotate-half apply")
    assert why in notes[0]


def test_a_call_with_another_unsqueeze_dim_keeps_the_function_for_it():
    src = source(call="apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)")
    out, notes = run(src)
    assert out == src
    assert notes == ["`apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)` kept: unsqueeze_dim=2 "
                     "(only 1 fits flat [T, H, D] q/k)"]
    both = src.replace("        return q + k", "        q2, k2 = apply_rotary_pos_emb(q, k, cos, sin)\n"
                                               "        return q + k + q2 + k2")
    out, notes = run(both)
    assert "q2, k2 = apply_rotary_cos_sin(q, k, cos, sin)" in out
    assert "def apply_rotary_pos_emb" in out and "def rotate_half" in out  # still used by the kept call


def test_rotate_half_used_elsewhere_stays():
    src = source() + "\n\ndef other(x):\n    return rotate_half(x)\n"
    out, notes = run(src)
    assert "def rotate_half" in out and "def apply_rotary_pos_emb" not in out
    assert notes[0].endswith("dropped apply_rotary_pos_emb")


def test_a_module_level_name_clash_gets_an_aliased_import():
    src = source() + "\n\ndef apply_rotary_cos_sin():\n    pass\n"
    out, _ = run(src)
    assert "from porter.engine.layers.rotary import apply_rotary_cos_sin as engine_apply_rotary_cos_sin" in out
    assert "q, k = engine_apply_rotary_cos_sin(q, k, cos, sin)" in out


@pytest.mark.parametrize("model_type, swapped", [("qwen3", True), ("gemma2", True), ("phi3", False),
                                                 ("gpt_neox", False)])
def test_converted_files(model_type, swapped):
    """The dev-set parity tests (test_convert_models.py) run these files against HF; here: which use it."""
    from porter.convert import convert_file
    from porter.convert.source import resolve_source

    result = convert_file(resolve_source(model_type)[0], model_type=model_type)
    notes = [c.message for c in result.report.changes if c.pass_name == "engine_rotary"]
    assert ("apply_rotary_cos_sin(" in result.code) == swapped
    assert ("def rotate_half" in result.code) != swapped
    if not swapped:  # partial rotary that slices q itself: kept, with the reason
        assert notes and "kept" in notes[0] and "cos.shape[-1]" in notes[0]
