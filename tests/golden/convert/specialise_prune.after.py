class FooAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        return self.o_proj(hidden_states), None


class FooDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = FooAttention(config)

    def forward(self, hidden_states):
        hidden_states, _ = self.self_attn(
            hidden_states,
        )
        return hidden_states


class FooModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([FooDecoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, input_ids, position_ids=None):
        hidden_states = self.embed(input_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states
