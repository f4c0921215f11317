# golden: passes=FlattenForward attention=FooAttention base=FooModel
from transformers.modeling_outputs import BaseModelOutputWithPast


class FooAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.q_norm = FooRMSNorm(config.head_dim)

    def forward(self, hidden_states):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        return query_states, value_states


class FooModel(nn.Module):
    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1]).unsqueeze(0)
        cos_sin = self.rotary_emb(inputs_embeds, position_ids)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(inputs_embeds), past_key_values=None)
