class FooAttention(nn.Module):
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states):
        return self.o_proj(hidden_states)
