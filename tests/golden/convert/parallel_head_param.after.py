class FooAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(
            hidden_size=config.hidden_size,
            head_size=self.head_dim,
            total_num_heads=self.num_heads,
            total_num_kv_heads=config.num_key_value_heads,
            bias=False,
        )
        self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.head_scale = shard_parameter(nn.Parameter(torch.ones(config.num_attention_heads)), dim=0, name="head_scale")
        self.dim_scale = nn.Parameter(torch.ones(self.head_dim))
        self.out_gate = nn.Parameter(torch.zeros(config.num_attention_heads))

    def forward(self, hidden_states):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split(self.qkv_proj.output_partition_sizes, dim=-1)
        query = q * self.head_scale.repeat_interleave(self.head_dim)
        query_states = query.view(hidden_shape) * self.dim_scale
        key_states = k.view(hidden_shape)
        value_states = v.view(hidden_shape)
        attn_output = attention(query_states, key_states, value_states)
        return self.o_proj(attn_output)[0] * self.out_gate.mean()
