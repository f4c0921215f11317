# golden: passes=AttentionCall attention=FooAttention decoder=FooDecoderLayer
class FooAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None

    def forward(self, hidden_states):
        q, k, v = self.project(hidden_states)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            q,
            k,
            v,
            None,
            dropout=0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            softcap=self.config.attn_logit_softcapping,
        )
        return self.o_proj(attn_output), attn_weights


class FooDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = FooAttention(config, layer_idx)

    def forward(self, hidden_states):
        hidden_states, _ = self.self_attn(hidden_states)
        return hidden_states
