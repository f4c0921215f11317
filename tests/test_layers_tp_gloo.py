"""Layers over a real 2-rank gloo group: the collectives (all-reduce, all-gather) make every rank's
output equal the unsharded layer's."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from porter.engine.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from porter.engine.layers.logits_processor import LogitsProcessor
from porter.engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding


def _load(layer, w, b=None):
    layer.weight.weight_loader(layer.weight, w)
    if b is not None:
        layer.bias.weight_loader(layer.bias, b)


def _worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(0)  # every rank draws the same full tensors
        x, w, b = torch.randn(3, 16, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)

        col = ColumnParallelLinear(16, 8, gather_output=True)
        _load(col, w, b)
        assert col.weight.shape == (4, 16)
        torch.testing.assert_close(col(x)[0], F.linear(x, w, b))

        row = RowParallelLinear(16, 8, input_is_parallel=False)  # splits x itself, all-reduces, bias once
        w_row = torch.randn(8, 16, generator=gen)
        _load(row, w_row, b)
        torch.testing.assert_close(row(x)[0], F.linear(x, w_row, b))

        gate, up = torch.randn(6, 16, generator=gen), torch.randn(6, 16, generator=gen)
        merged = MergedColumnParallelLinear(16, [6, 6], bias=False, gather_output=True)
        merged.weight.weight_loader(merged.weight, gate, 0)
        merged.weight.weight_loader(merged.weight, up, 1)
        # gathered per-rank [gate_r | up_r] blocks, in rank order
        g, u = F.linear(x, gate), F.linear(x, up)
        expected = torch.cat([g[:, :3], u[:, :3], g[:, 3:], u[:, 3:]], dim=-1)
        torch.testing.assert_close(merged(x)[0], expected)

        table = torch.randn(100, 16, generator=gen)
        ids = torch.tensor([0, 63, 64, 99, 7])
        emb = VocabParallelEmbedding(100, 16)
        _load(emb, table)
        torch.testing.assert_close(emb(ids), table[ids])

        head = ParallelLMHead(100, 16)
        _load(head, table)
        logits = LogitsProcessor(100)(head, x)
        assert logits.shape == (3, 100)
        torch.testing.assert_close(logits, x @ table.T)
    finally:
        dist.destroy_process_group()


def test_layers_over_gloo(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)
