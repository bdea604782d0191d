import re
from pathlib import Path

import pytest
import torch
from torch import nn

from alterrec_dist.common.config import ModelConfig
from alterrec_dist.model.networks import MOE_EXPERTS, Network, SessionEncoder, build_networks, text_init_rows
from alterrec_dist.parallel.table import init_id_rows

D_TEXT = 12
ROOT = Path(__file__).resolve().parents[2]


def left_aligned(lengths, L, dim, seed=0):
    """Random rows (b, L, dim) with garbage in the padding, and the matching left-aligned mask."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(len(lengths), L, dim, generator=g)
    mask = torch.arange(L) < torch.tensor(lengths).unsqueeze(1)
    return rows, mask


def test_model_never_imports_distributed():
    # The model layer must stay sharding-agnostic: all collectives live in the sharding layer.
    for name in ("model/networks.py", "eval/metrics.py", "training/schedule.py"):
        src = (ROOT / "alterrec_dist" / name).read_text()
        assert "torch.distributed" not in src, name
        assert not re.search(r"\bdist\.", src), name


@pytest.mark.parametrize("kind", ["mean", "transformer"])
def test_encoder_shape_and_padding_invariance(kind):
    torch.manual_seed(0)
    enc = SessionEncoder(8, kind, max_len=10, layers=2, heads=2, dropout=0.1).eval()
    rows, mask = left_aligned([1, 3, 5], L=5, dim=8)
    out = enc(rows, mask)
    assert out.shape == (3, 8)
    # the same sessions padded further (with different garbage in the padding) give the same output
    longer, longer_mask = left_aligned([1, 3, 5], L=9, dim=8, seed=1)
    longer[:, :5] = rows
    longer[~longer_mask] = 1e3
    torch.testing.assert_close(enc(longer, longer_mask), out)


def test_mean_encoder_is_masked_mean():
    enc = SessionEncoder(4, "mean", max_len=5, layers=0, heads=1, dropout=0.5).eval()
    rows, mask = left_aligned([2, 4], L=4, dim=4)
    torch.testing.assert_close(enc(rows, mask), torch.stack([rows[0, :2].mean(0), rows[1].mean(0)]))


def test_transformer_is_causal_and_reads_last_real_position():
    torch.manual_seed(0)
    enc = SessionEncoder(8, "transformer", max_len=6, layers=2, heads=2, dropout=0.1).eval()
    rows, mask = left_aligned([6, 4], L=6, dim=8)
    h = enc.hidden(rows, mask)
    changed = rows.clone()
    changed[:, 3] = torch.randn(2, 8)  # a new item 3: positions 0..2 must not notice, 3.. must
    h2 = enc.hidden(changed, mask)
    torch.testing.assert_close(h2[:, :3], h[:, :3])
    assert not torch.allclose(h2[:, 3], h[:, 3])
    torch.testing.assert_close(enc(rows, mask), torch.stack([h[0, 5], h[1, 3]]))


def test_packed_transformer_computes_what_the_stock_padded_layers_do():
    """The encoder runs nn.TransformerEncoderLayer's weights on the real positions only; on those it must
    give the stock padded forward's outputs and the same gradients for every parameter."""
    torch.manual_seed(0)
    enc = SessionEncoder(12, "transformer", max_len=9, layers=2, heads=3, dropout=0.1).eval()
    rows, mask = left_aligned([1, 9, 4, 2, 3, 7, 9, 5, 1], L=9, dim=12)  # every length group, most with several
    rows.requires_grad_(True)
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)
    stock = enc.layers(enc.drop(enc.norm(rows + enc.pos.weight)), mask=causal, src_key_padding_mask=~mask,
                       is_causal=True)
    packed = enc.hidden(rows, mask)
    torch.testing.assert_close(packed[mask], stock[mask])
    assert (packed[~mask] == 0).all()
    weights = torch.randn(stock[mask].shape)
    grads = [torch.autograd.grad((out[mask] * weights).sum(), [rows, *enc.parameters()])
             for out in (stock, enc.hidden(rows, mask))]
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want)


def test_transformer_uses_positions():
    torch.manual_seed(0)
    enc = SessionEncoder(8, "transformer", max_len=6, layers=1, heads=2, dropout=0.0).eval()
    rows, mask = left_aligned([3], L=3, dim=8)
    assert not torch.allclose(enc(rows, mask), enc(rows[:, [1, 0, 2]], mask))


@pytest.mark.parametrize("kind,out_dim,uses_id,uses_text", [
    ("id", 8, True, False), ("text", 8, False, True), ("sum", 8, True, True), ("concat", 16, True, True)])
@pytest.mark.parametrize("encoder", ["mean", "transformer"])
def test_network_shapes(kind, out_dim, uses_id, uses_text, encoder):
    cfg = ModelConfig(dim=8, encoder=encoder, heads=2, text_hidden=6)
    net = Network(kind, cfg, text_dim=D_TEXT, max_len=5)
    assert (net.out_dim, net.uses_id, net.uses_text) == (out_dim, uses_id, uses_text)
    x = torch.randn(7, 8) if uses_id else None
    f = torch.randn(7, D_TEXT) if uses_text else None
    items = net.item_rows(x, f)
    assert items.shape == (7, out_dim)
    rows, mask = left_aligned([2, 5], L=5, dim=out_dim)
    q = net.encode(rows, mask)
    assert q.shape == (2, out_dim)
    assert net.logits(q, items).shape == (2, 7)


@pytest.mark.parametrize("kind", ["sum", "concat"])
@pytest.mark.parametrize("layernorm", [False, True])
def test_nfrec_decomposes_into_id_and_text_scores(kind, layernorm):
    # paper App. B: the fused score is exactly y_id + y_text; float64 so only rounding of the
    # last bits can differ between the two summation orders
    torch.manual_seed(0)
    cfg = ModelConfig(dim=8, text_hidden=6, item_layernorm=layernorm)
    net = Network(kind, cfg, text_dim=D_TEXT, max_len=5).double().eval()
    x, f = torch.randn(9, 8, dtype=torch.float64), torch.randn(9, D_TEXT, dtype=torch.float64)
    q = torch.randn(3, net.out_dim, dtype=torch.float64)
    (q_id, q_text), (r_id, r_text) = net.part_queries(q), net.part_rows(x, f)
    y = net.logits(q, net.item_rows(x, f))
    torch.testing.assert_close(y, q_id @ r_id.T + q_text @ r_text.T, rtol=1e-12, atol=1e-12)


def test_text_mlp_shape_knob():
    one = Network("text", ModelConfig(dim=8, text_hidden=0), text_dim=D_TEXT, max_len=5)
    assert isinstance(one.text_mlp, torch.nn.Linear) and one.text_mlp.in_features == D_TEXT
    two = Network("text", ModelConfig(dim=8, text_hidden=6), text_dim=D_TEXT, max_len=5)
    assert [type(m).__name__ for m in two.text_mlp] == ["Linear", "GELU", "Dropout", "Linear"]
    assert (two.text_mlp[0].out_features, two.text_mlp[3].out_features) == (6, 8)


def test_item_layernorm_knob():
    x, f = torch.randn(5, 8) * 3 + 1, torch.randn(5, D_TEXT)
    plain = Network("id", ModelConfig(dim=8, item_layernorm=False), text_dim=D_TEXT, max_len=5)
    assert plain.id_norm is None and torch.equal(plain.item_rows(x, None), x)
    for kind, args in (("id", (x, None)), ("text", (None, f))):
        rows = Network(kind, ModelConfig(dim=8, item_layernorm=True), text_dim=D_TEXT, max_len=5).item_rows(*args)
        torch.testing.assert_close(rows.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
        torch.testing.assert_close(rows.var(1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    # NFRec normalises each table before combining
    net = Network("concat", ModelConfig(dim=8, item_layernorm=True), text_dim=D_TEXT, max_len=5)
    torch.testing.assert_close(net.item_rows(x, f)[:, :8].mean(1), torch.zeros(5), atol=1e-5, rtol=0)


def test_text_temperature_scales_text_logits_only():
    cfg = ModelConfig(dim=8, text_temperature=0.07)
    q, rows = torch.randn(2, 8), torch.randn(4, 8)
    text = Network("text", cfg, text_dim=D_TEXT, max_len=5)
    assert text.logit_scale == pytest.approx(1 / 0.07)
    torch.testing.assert_close(text.logits(q, rows), (q @ rows.T) / 0.07)
    for kind in ("id", "sum"):
        assert Network(kind, cfg, text_dim=D_TEXT, max_len=5).logit_scale == 1.0
    assert Network("id", ModelConfig(dim=8, id_temperature=0.5), text_dim=D_TEXT, max_len=5).logit_scale == 2.0


@pytest.mark.parametrize("encoder", ["mean", "transformer"])
def test_cosine_logits_are_cosines_over_the_temperature(encoder):
    cfg = ModelConfig(dim=8, encoder=encoder, dropout=0.0, id_logits="cosine", id_temperature=0.1,
                      item_layernorm=False)
    net = Network("id", cfg, text_dim=D_TEXT, max_len=5).eval()
    x = torch.randn(6, 8) * 3
    rows = net.item_rows(x, None)
    torch.testing.assert_close(rows, x / x.norm(dim=1, keepdim=True))
    q = net.encode(rows[torch.tensor([[0, 1, 2], [3, 4, 0]])], torch.tensor([[True, True, True], [True, True, False]]))
    torch.testing.assert_close(q.norm(dim=1), torch.ones(2))
    scores = net.logits(q, rows)
    assert scores.abs().max() <= 10.0 + 1e-5  # |cos| <= 1, over 0.1
    # the text network keeps its dot product unless asked: the switch is per network
    text = Network("text", cfg, text_dim=D_TEXT, max_len=5)
    f = torch.randn(6, D_TEXT)
    torch.testing.assert_close(text.item_rows(None, f), text.text_mlp(f))


@pytest.mark.parametrize("adapter", ["mlp", "whitening", "moe"])
def test_a_zero_text_row_under_cosine_logits_stays_zero_with_a_bounded_gradient(adapter):
    """An item without text has a zero feature row; through a whitening (no bias, shift 0) its row is zero, and
    `F.normalize` gave it a gradient of about 1e10 on the shift, which froze the shift under AdamW."""
    cfg = ModelConfig(dim=8, text_adapter=adapter, dropout=0.0, item_layernorm=False, text_logits="cosine")
    net = Network("text", cfg, text_dim=D_TEXT, max_len=5)
    f = torch.randn(4, D_TEXT)
    f[1] = 0
    rows = net.item_rows(None, f)
    other = [0, 2, 3]
    expected = nn.functional.normalize(net._text_part(f[other]), dim=-1)
    torch.testing.assert_close(rows[other], expected, rtol=0, atol=0)  # other rows: as F.normalize makes them
    if adapter != "mlp":  # the whitenings map a zero row to zero; the mlp's bias does not
        assert torch.equal(rows[1], torch.zeros(8))
    (rows * torch.randn_like(rows)).sum().backward()
    largest = max(p.grad.abs().max().item() for p in net.text_mlp.parameters())
    assert largest < 100, f"gradient {largest:.3g}"
    tiny = torch.randn(3, 8) * 1e-5  # only an exact zero is kept: a small row is still made unit length
    torch.testing.assert_close(net._unit(tiny).norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("encoder", ["mean", "transformer"])
def test_an_encoder_runs_under_the_ddp_engine_s_bf16_autocast(encoder):
    """trainer.precision=bf16 with the ddp engine and the transformer died on its first step: the attention's
    buffers were made fp32 from its input, its projections came out bf16 ("Index put requires the source and
    destination dtypes match")."""
    from alterrec_dist.common.device import trained_autocast

    net = Network("id", ModelConfig(dim=8, encoder=encoder, heads=2), text_dim=D_TEXT, max_len=5)
    rows = net.item_rows(torch.randn(6, 8), None)
    with trained_autocast(torch.device("cpu"), "ddp", "bf16"):
        q = net.encode(rows[torch.tensor([[0, 1, 2], [3, 4, 0]])], torch.tensor([[True, True, True],
                                                                                  [True, True, False]]))
    q.float().sum().backward()
    assert torch.isfinite(q.float()).all()


@pytest.mark.parametrize("adapter", ["whitening", "moe"])
def test_whitening_adapters(adapter):
    cfg = ModelConfig(dim=8, text_adapter=adapter, dropout=0.0, item_layernorm=False)
    net = Network("text", cfg, text_dim=D_TEXT, max_len=5)
    f = torch.randn(5, D_TEXT)
    experts = net.text_mlp.experts if adapter == "moe" else [net.text_mlp]
    assert len(experts) == (MOE_EXPERTS if adapter == "moe" else 1)
    with torch.no_grad():
        for e in experts:
            e.shift.copy_(f[0])  # a whitening removes its shift before projecting: item 0 maps to 0
    rows = net.item_rows(None, f)
    assert rows.shape == (5, 8)
    torch.testing.assert_close(rows[0], torch.zeros(8))
    w = experts[0].proj.weight
    if adapter == "whitening":
        torch.testing.assert_close(rows, (f - f[0]) @ w.T)
    rows.sum().backward()
    assert all(p.grad is not None for p in net.text_mlp.parameters())  # shift, projections (and the gate) learn


def test_id_rows_from_text():
    x = init_id_rows(6, 8, 0.02, torch.Generator().manual_seed(1))
    f = torch.randn(6, D_TEXT)
    f[4] = 0  # an item without text
    mean = f[f.any(1)].mean(0)
    rows = text_init_rows(x, f, mean, std=0.02, seed=3)
    torch.testing.assert_close(rows[4], x[4])  # keeps its random row
    torch.testing.assert_close(rows.norm(dim=1)[[0, 1, 2, 3, 5]], torch.full((5,), 0.02 * 8 ** 0.5))
    # a row is a function of its own item's features: any subset (a shard) gives the same rows
    part = [5, 1, 3]
    torch.testing.assert_close(text_init_rows(x[part], f[part], mean, 0.02, 3), rows[part])
    # similar text, similar rows (a projection keeps the geometry roughly)
    g = f.clone()
    g[1] = f[0] + 0.01 * torch.randn(D_TEXT)
    near = text_init_rows(x, g, mean, 0.02, 3)
    assert torch.cosine_similarity(near[0], near[1], dim=0) > 0.99
    assert not torch.equal(rows, text_init_rows(x, f, mean, 0.02, 4))  # the seed picks the projection


def test_build_networks_and_deterministic_init():
    cfg = ModelConfig(dim=8, encoder="transformer", heads=2, text_hidden=6, item_layernorm=True)

    def build(method, seed):
        torch.manual_seed(seed)
        return build_networks(method, cfg, text_dim=D_TEXT, max_len=5)

    for method in ("alterrec", "alterrec_aug", "alterrec_random", "id_only", "text_only"):
        nets = build(method, 0)
        assert list(nets) == ["id", "text"] and (nets["id"].kind, nets["text"].kind) == ("id", "text")
    assert build("nfrec_sum", 0)["fused"].kind == "sum"
    assert build("nfrec_concat", 0)["fused"].kind == "concat"

    a, b, c = build("alterrec", 3), build("alterrec", 3), build("alterrec", 4)
    for name in ("id", "text"):
        pa, pb, pc = a[name].dense_parameters(), b[name].dense_parameters(), c[name].dense_parameters()
        assert len(pa) == len(list(a[name].parameters())) > 0
        assert all(torch.equal(u, v) for u, v in zip(pa, pb))
        assert not all(torch.equal(u, v) for u, v in zip(pa, pc))
    with pytest.raises(ValueError):
        build_networks("nope", cfg, text_dim=D_TEXT, max_len=5)


def test_init_id_rows_follows_generator():
    rows = init_id_rows(1000, 16, 0.02, torch.Generator().manual_seed(7))
    assert rows.shape == (1000, 16)
    assert torch.equal(rows, init_id_rows(1000, 16, 0.02, torch.Generator().manual_seed(7)))
    assert rows.std().item() == pytest.approx(0.02, rel=0.05)
    assert abs(rows.mean().item()) < 1e-3
