# golden: passes=ThreadPrefix attention=FooAttention decoder=FooDecoderLayer base=FooModel
class FooAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.o_proj = RowParallelLinear(config.hidden_size, config.hidden_size, bias=False)
        self.attn = Attention(4, 16, scale=0.25)


class FooDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = FooAttention(config)
        self.input_layernorm = FooRMSNorm(config.hidden_size)


class FooModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([FooDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
