# golden: passes=ParallelLinears attention=FooAttention
class FooAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.head_scale = nn.Parameter(torch.ones(config.num_attention_heads))
        self.dim_scale = nn.Parameter(torch.ones(self.head_dim))
        self.out_gate = nn.Parameter(torch.zeros(config.num_attention_heads))

    def forward(self, hidden_states):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states) * self.head_scale.repeat_interleave(self.head_dim)
        query_states = query.view(hidden_shape) * self.dim_scale
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        value_states = self.v_proj(hidden_states).view(hidden_shape)
        attn_output = attention(query_states, key_states, value_states)
        return self.o_proj(attn_output) * self.out_gate.mean()
