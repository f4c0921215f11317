class FooAttention(nn.Module):
    def __init__(self, config, prefix: str = ""):
        super().__init__()
        self.o_proj = RowParallelLinear(config.hidden_size, config.hidden_size, bias=False, prefix=f"{prefix}.o_proj")
        self.attn = Attention(4, 16, scale=0.25, prefix=f"{prefix}.attn")


class FooDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx, prefix: str = ""):
        super().__init__()
        self.self_attn = FooAttention(config, prefix=f"{prefix}.self_attn")
        self.input_layernorm = FooRMSNorm(config.hidden_size)


class FooModel(nn.Module):
    def __init__(self, *, engine_config: EngineConfig, prefix: str = "") -> None:
        super().__init__()
        config = engine_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList([FooDecoderLayer(config, i, prefix=f"{prefix}.layers.{i}") for i in range(config.num_hidden_layers)])
