from transformers.modeling_outputs import BaseModelOutputWithPast


class FooAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.q_norm = FooRMSNorm(config.head_dim)

    def forward(self, hidden_states):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape))
        value_states = self.v_proj(hidden_states).view(hidden_shape)
        return query_states, value_states


class FooModel(nn.Module):
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        cos_sin = self.rotary_emb(inputs_embeds, positions)
        return self.norm(inputs_embeds)
