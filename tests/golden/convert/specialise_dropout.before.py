# golden: passes=DropDropout decoder=FooDecoderLayer
class FooDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.mlp = FooMLP(config)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.resid_dropout(hidden_states)
        hidden_states = nn.functional.dropout(hidden_states, p=0.1, training=False)
        return residual + self.resid_dropout(hidden_states)
