# golden: passes=ParallelLinears mlp=FooMLP
class FooMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        up_states = self.gate_up_proj(hidden_states)
        gate = up_states[..., : self.intermediate_size]
        up_states = up_states[..., -self.intermediate_size :]
        return self.down_proj(up_states * self.act(gate))
