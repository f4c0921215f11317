# golden: passes=InferenceFacts,prune attention=FooAttention decoder=FooDecoderLayer base=FooModel
class FooAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        return self.o_proj(hidden_states), None


class FooDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = FooAttention(config)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        hidden_states, _ = self.self_attn(
            hidden_states,
            position_embeddings,
            attention_mask,
            position_ids=position_ids,
            **kwargs,
        )
        return hidden_states


class FooModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([FooDecoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        hidden_states = self.embed(input_ids)
        causal_mask = create_causal_mask(self.config, hidden_states, attention_mask)
        mask_mapping = {"full_attention": causal_mask}
        mask_mapping["sliding_attention"] = causal_mask
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask_mapping, position_ids=position_ids, **kwargs)
        return hidden_states
