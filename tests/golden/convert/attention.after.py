class FooAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        self.attn = Attention(
            config.num_attention_heads,
            self.head_dim,
            scale=self.scaling,
            num_kv_heads=config.num_key_value_heads,
            sliding_window=self.sliding_window,
            logits_soft_cap=self.config.attn_logit_softcapping,
        )

    def forward(self, hidden_states) -> torch.Tensor:
        q, k, v = self.project(hidden_states)
        attn_output = self.attn(q, k, v)
        return self.o_proj(attn_output)


class FooDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = FooAttention(config, layer_idx)

    def forward(self, hidden_states):
        hidden_states = self.self_attn(hidden_states)
        return hidden_states
