class FooAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.num_key_value_heads = config.num_key_value_heads
        op_size = config.num_attention_heads * self.head_dim + 2 * (config.num_key_value_heads * self.head_dim)
        self.qkv_proj = QKVParallelLinear(
            hidden_size=config.hidden_size,
            head_size=self.head_dim,
            total_num_heads=config.num_attention_heads,
            total_num_kv_heads=config.num_key_value_heads,
            bias=False,
        )
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split(self.qkv_proj.output_partition_sizes, dim=-1)
        query_pos = self.config.num_attention_heads * self.head_dim
        query_states = q.view(hidden_shape)
        key_states = k.view(hidden_shape)
        value_states = v.view(hidden_shape)
        attn_output = attention(query_states, key_states, value_states)
        return self.o_proj(attn_output)[0]


class FooMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [config.intermediate_size, config.intermediate_size],
            bias=False,
        )
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        gate, up = self.gate_up_proj(hidden_states)[0].split(self.gate_up_proj.output_partition_sizes, dim=-1)
        return self.down_proj(up * self.act(gate))[0]
