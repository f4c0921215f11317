class FooDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.mlp = FooMLP(config)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states
