# golden: passes=InferenceFacts attention=FooAttention
class FooAttention(nn.Module):
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        # transformers >= 5.24 names the KV cache `cache`
        if cache is not None:
            hidden_states = cache.update(hidden_states, self.layer_idx)
        return self.o_proj(hidden_states, **kwargs)
