# golden: passes=ParallelLinears,AttentionCall attention=FooAttention
class FooAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, 3 * self.head_size)
        qkv = self.query_key_value(hidden_states).view(hidden_shape)
        query_states, key_states, value_states = qkv.chunk(3, dim=-1)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
        attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, None)
        attn_output = attn_output.reshape(*input_shape, -1)
        return self.dense(attn_output), attn_weights
