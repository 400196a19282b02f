import math
import mmap
from pathlib import Path

import pytest
import torch

from dqrm_mpi.model import DLRM, EmbeddingTables, PairwiseDotInteraction, model_config_from_preset
from dqrm_mpi.model.dlrm import table_memory

CARDS = [5, 7, 3] + [4] * 23


def test_preset_interaction_widths_match_reference():
    assert model_config_from_preset("kaggle", CARDS).num_interactions == 367
    assert model_config_from_preset("terabyte", CARDS).num_interactions == 415


def test_bottom_width_must_equal_embedding_dim():
    with pytest.raises(ValueError, match="bottom MLP output width 8 must equal the embedding dim 16"):
        model_config_from_preset("kaggle", CARDS, bottom_mlp=(64, 8))


def test_top_mlp_must_end_in_one_and_cardinalities_count():
    with pytest.raises(ValueError, match="top_mlp must end in 1"):
        model_config_from_preset("tiny", CARDS, top_mlp=(32, 2))
    with pytest.raises(ValueError, match="26 cardinalities"):
        model_config_from_preset("tiny", CARDS[:25])


def test_forward_shapes_and_sparse_gradients():
    torch.manual_seed(0)
    model = DLRM(model_config_from_preset("tiny", CARDS))
    dense = torch.rand(6, 13)
    sparse = torch.stack([torch.randint(0, c, (6,)) for c in CARDS], dim=1)
    logit = model(dense, sparse)
    assert logit.shape == (6,)
    logit.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.is_sparse == (name in model.embedding_parameter_names()), name


def test_interaction_is_lower_triangle_of_dots_after_bottom():
    inter = PairwiseDotInteraction(3)
    bottom = torch.tensor([[1.0, 2.0]])
    emb = torch.tensor([[[3.0, 4.0], [5.0, 6.0]]])
    out = inter(bottom, emb)
    # vectors v0=(1,2) v1=(3,4) v2=(5,6): pairs (1,0) (2,0) (2,1)
    assert out.tolist() == [[1.0, 2.0, 11.0, 17.0, 39.0]]


def test_reference_initialisation_ranges():
    torch.manual_seed(0)
    cards = [1000] * 26
    model = DLRM(model_config_from_preset("kaggle", cards))
    w = model.embeddings.table(0)
    assert w.abs().max() <= math.sqrt(1 / 1000) + 1e-7
    first = model.bottom.layers[0].weight  # 512 x 13
    assert abs(first.std().item() - math.sqrt(2 / (13 + 512))) < 0.01


def test_injected_embedding_lookup_and_linear_layers_run_the_same_forward():
    config = model_config_from_preset("tiny", CARDS)
    torch.manual_seed(0)
    fp32 = DLRM(config)
    seen = []

    class Lookup(torch.nn.Module):  # any module sparse [B, 26] -> [B, 26, d]
        def forward(self, sparse):
            seen.append(sparse.shape)
            return fp32.embeddings(sparse)

    class Traced(torch.nn.Linear):
        pass

    torch.manual_seed(0)
    injected = DLRM(config, embeddings=Lookup(), linear=Traced)
    assert all(type(m) is Traced for m in injected.modules() if isinstance(m, torch.nn.Linear))
    assert not any(n.startswith("embeddings.tables") for n, _ in injected.named_parameters())
    injected.load_state_dict(fp32.state_dict(), strict=False)
    dense, sparse = torch.rand(3, 13), torch.zeros(3, 26, dtype=torch.int64)
    assert torch.equal(injected(dense, sparse), fp32(dense, sparse)) and seen == [(3, 26)]


def test_linear_factory_keeps_the_reference_initialisation():
    """Built through a factory, the MLPs draw the same random numbers in the same order."""
    config = model_config_from_preset("tiny", CARDS)
    torch.manual_seed(4)
    a = DLRM(config)
    torch.manual_seed(4)
    b = DLRM(config, linear=lambda i, o: torch.nn.Linear(i, o))
    for (n, p), (m, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n == m and torch.equal(p, q), n


def _per_table_reference(cards, dim):
    """The earlier layout: one EmbeddingBag(sparse=True) per table, reference initialisation."""
    tables = torch.nn.ModuleList(torch.nn.EmbeddingBag(n, dim, mode="sum", sparse=True) for n in cards)
    with torch.no_grad():
        for table, n in zip(tables, cards):
            table.weight.uniform_(-math.sqrt(1 / n), math.sqrt(1 / n))
    return tables


@pytest.mark.parametrize("cards", [CARDS, [40_000] + CARDS[1:]], ids=["small", "huge-page memory"])
def test_flat_table_initialises_and_trains_as_per_table_embedding_bags_bit_for_bit(cards):
    torch.manual_seed(3)
    flat = EmbeddingTables.initialised(tuple(cards), 4)
    after_flat = torch.rand(3)  # the random stream goes on where the per-table layout left it
    torch.manual_seed(3)
    ref = _per_table_reference(cards, 4)
    assert torch.equal(torch.rand(3), after_flat)
    for t in range(len(cards)):
        assert torch.equal(flat.table(t), ref[t].weight), t
    opt_flat = torch.optim.SGD(flat.parameters(), lr=0.7)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.7)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # duplicate ids in every table but the first (cardinalities 3..7, batch 12)
        sparse = torch.stack([torch.randint(0, c, (12,), generator=gen) for c in cards], dim=1)
        upstream = torch.randn(12, len(cards), 4, generator=gen)
        out_ref = torch.stack([ref[t](sparse[:, t].unsqueeze(1)) for t in range(len(cards))], dim=1)
        out_flat = flat(sparse)
        assert torch.equal(out_flat, out_ref)
        for opt, out in ((opt_flat, out_flat), (opt_ref, out_ref)):
            opt.zero_grad()
            (out * upstream).sum().backward()
            opt.step()
    assert flat.weight.grad.is_sparse
    for t in range(len(cards)):
        assert torch.equal(flat.table(t), ref[t].weight), t


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process holding ``address`` (Linux /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE") or not Path("/proc/self/smaps").exists(),
                    reason="needs Linux's madvise(MADV_HUGEPAGE) and /proc/self/smaps")
def test_large_flat_tables_live_in_memory_advised_for_huge_pages():
    weight = table_memory(65_536, 16)  # 4 MiB
    assert weight.shape == (65_536, 16) and weight.dtype == torch.float32 and weight.is_contiguous()
    assert "hg" in _vm_flags(weight.data_ptr())  # madvise(MADV_HUGEPAGE) on its mapping
    rows = weight[10:12]
    del weight  # the view keeps the mapping alive
    rows.fill_(2.5)
    assert rows.sum().item() == 80.0
    assert table_memory(1000, 16).shape == (1000, 16)  # small tables: ordinary memory


def test_state_dict_keeps_one_entry_per_table_and_loads_the_per_table_layout():
    torch.manual_seed(0)
    model = DLRM(model_config_from_preset("tiny", CARDS))
    state = model.state_dict()
    table_keys = [k for k in state if k.startswith("embeddings.")]
    assert table_keys == [f"embeddings.tables.{t}.weight" for t in range(26)]
    assert [state[k].shape[0] for k in table_keys] == CARDS
    torch.manual_seed(0)
    old = {f"embeddings.tables.{t}.weight": w.weight.detach()  # a checkpoint of the per-table layout
           for t, w in enumerate(_per_table_reference(CARDS, model.config.embedding_dim))}
    other = DLRM(model_config_from_preset("tiny", CARDS))
    other.load_state_dict({**state, **old})
    assert all(torch.equal(other.embeddings.table(t), old[f"embeddings.tables.{t}.weight"]) for t in range(26))
    with pytest.raises(RuntimeError, match=r"size mismatch for embeddings.tables.2.weight.*\(4, 8\)"):
        other.load_state_dict({**state, "embeddings.tables.2.weight": torch.zeros(4, 8)})
    with pytest.raises(RuntimeError, match=r"Missing key.*embeddings.tables.25.weight(.|\n)*Unexpected key.*"
                                           r"embeddings.weight"):
        other.load_state_dict({**{k: v for k, v in state.items() if k != "embeddings.tables.25.weight"},
                               "embeddings.weight": model.embeddings.weight})
