# golden: passes=InferenceFacts attention=FooAttention
class FooAttention(nn.Module):
    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        if past_key_values is not None:
            hidden_states = past_key_values.update(hidden_states, self.layer_idx)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        dropout = 0.0 if not self.training else self.attention_dropout
        if self.gradient_checkpointing and self.training:
            hidden_states = checkpoint(hidden_states)
        elif attention_mask is not None:
            hidden_states = hidden_states + attention_mask
        else:
            hidden_states = hidden_states * 2
        return self.o_proj(hidden_states, dropout=dropout, **kwargs)
