class FooAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query_key_value = ColumnParallelLinear(config.hidden_size, 3 * config.hidden_size)
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size)
        self.attn = Attention(
            divide(config.num_attention_heads, get_tp_world_size()),
            self.head_size,
            scale=self.head_size**-0.5,
        )

    def forward(self, hidden_states) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, 3 * self.head_size)
        qkv = self.query_key_value(hidden_states)[0].view(hidden_shape)
        query_states, key_states, value_states = qkv.chunk(3, dim=-1)
        attn_output = self.attn(query_states, key_states, value_states)
        attn_output = attn_output.reshape(*input_shape, -1)
        return self.dense(attn_output)[0]
