# golden: passes=ParallelLinears attention=FooAttention mlp=FooMLP
class FooAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.num_key_value_heads = config.num_key_value_heads
        op_size = config.num_attention_heads * self.head_dim + 2 * (config.num_key_value_heads * self.head_dim)
        self.qkv_proj = nn.Linear(config.hidden_size, op_size, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        qkv = self.qkv_proj(hidden_states)
        query_pos = self.config.num_attention_heads * self.head_dim
        query_states = qkv[..., :query_pos].view(hidden_shape)
        key_states = qkv[..., query_pos : query_pos + self.num_key_value_heads * self.head_dim].view(hidden_shape)
        value_states = qkv[..., query_pos + self.num_key_value_heads * self.head_dim :].view(hidden_shape)
        attn_output = attention(query_states, key_states, value_states)
        return self.o_proj(attn_output)


class FooMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))
