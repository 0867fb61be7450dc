"""Objectives against hand computations: which positions are scored, the smoothed CE value,
the exact mask count, and which context each kind of model sees."""
import math

import pytest
import torch

from maskgil.models import build_model
from maskgil.training.objectives import masked_token_loss, next_token_loss, random_token_mask


class FixedLogits(torch.nn.Module):
    """Returns preset logits and records what it was called with."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.seen = None

    def forward(self, tokens, cond, grid, drop_cond=None, positions=None, text_mask=None):
        self.seen = (tokens.clone(), cond.clone(), drop_cond.clone())
        if positions is None:
            return self.logits
        return self.logits.reshape(-1, self.logits.shape[-1])[positions]  # the model contract: rows at positions


def hand_smoothed_ce(logits_row, target, eps):
    """-(1-eps) log p_y - eps/V sum_v log p_v, written out with math only."""
    z = [float(x) for x in logits_row]
    lse = math.log(sum(math.exp(v) for v in z))
    logp = [v - lse for v in z]
    V = len(z)
    return -(1 - eps) * logp[target] - eps / V * sum(logp)


def test_masked_loss_equals_hand_computation_on_masked_positions_only():
    V = 4  # batch 2, 3 positions
    logits = torch.tensor([[[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4], [3.0, -3.0, 0.0, 0.0]],
                           [[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [-1.0, 5.0, 0.0, 2.0]]])
    tokens = torch.tensor([[1, 3, 0], [2, 1, 1]])
    mask = torch.tensor([[True, False, True], [False, True, False]])
    model = FixedLogits(logits)
    out = masked_token_loss(model, tokens, torch.tensor([0, 1]), (1, 3), mask_id=V, class_dropout=0.0,
                            label_smoothing=0.1, mask=mask)
    expected = [hand_smoothed_ce(logits[0, 0], 1, 0.1), hand_smoothed_ce(logits[0, 2], 0, 0.1),
                hand_smoothed_ce(logits[1, 1], 1, 0.1)]
    assert out.n_scored == 3
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    # the model saw the mask id exactly at masked positions and the true tokens elsewhere
    seen = model.seen[0]
    assert seen.tolist() == [[V, 3, V], [2, V, 1]]
    # unmasked positions contribute nothing, whatever their logits
    logits2 = logits.clone()
    logits2[0, 1] = torch.tensor([50.0, -50.0, 9.0, 1.0])
    logits2[1, 0] = torch.tensor([-20.0, 20.0, 0.0, 0.0])
    out2 = masked_token_loss(FixedLogits(logits2), tokens, torch.tensor([0, 1]), (1, 3), mask_id=V,
                             class_dropout=0.0, label_smoothing=0.1, mask=mask)
    assert out2.loss.item() == pytest.approx(out.loss.item(), rel=1e-7)


def test_next_token_loss_hand_computation_without_smoothing():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]])
    out = next_token_loss(FixedLogits(logits), torch.tensor([[1, 0]]), torch.tensor([2]), (1, 2),
                          class_dropout=0.0, label_smoothing=0.0)
    expected = (hand_smoothed_ce(logits[0, 0], 1, 0.0) + hand_smoothed_ce(logits[0, 1], 0, 0.0)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.n_scored == 2


@pytest.mark.parametrize("kind,law", [("cosine", lambda r: math.cos(math.pi * r / 2)),
                                      ("arccos", lambda r: math.acos(r) / (math.pi / 2))])
def test_mask_count_is_exact_ceil_of_schedule(kind, law):
    B, N = 64, 37
    g = torch.Generator().manual_seed(3)
    mask = random_token_mask(B, N, kind, generator=g)
    g = torch.Generator().manual_seed(3)
    r = torch.rand(B, generator=g, dtype=torch.float64)  # the same draws the mask used for its ratios
    expected = [max(1, min(N, math.ceil(law(float(x)) * N))) for x in r]
    assert mask.sum(1).tolist() == expected
    # Which ones: the positions holding each row's `count` smallest uniform scores (a uniform choice).
    scores = torch.rand(B, N, generator=g)
    for b, count in enumerate(expected):
        threshold = scores[b].sort().values[count - 1]
        assert torch.equal(mask[b], scores[b] <= threshold)


def test_class_dropout_rate_and_null_class_passthrough():
    model = FixedLogits(torch.zeros(4000, 2, 5))
    g = torch.Generator().manual_seed(0)
    masked_token_loss(model, torch.zeros(4000, 2, dtype=torch.long), torch.arange(4000) % 7, (1, 2), mask_id=5,
                      class_dropout=0.1, generator=g)
    frac = model.seen[2].float().mean().item()
    assert 0.08 < frac < 0.12  # Binomial(4000, 0.1): sd 0.0047
    # the labels reach the model unchanged: drop_cond, not a rewritten label, selects the null row
    assert torch.equal(model.seen[1], torch.arange(4000) % 7)


def tiny(name):
    torch.manual_seed(0)
    return build_model(name, n_layers=2, dim=64, n_heads=2, vocab_size=32).eval()


def test_causal_training_sees_only_earlier_tokens():
    model = tiny("llamagen-tiny")
    tokens = torch.randint(0, 32, (1, 64))
    j = 20
    other = tokens.clone()
    other[0, j] = (tokens[0, j] + 1) % 32
    a = next_token_loss(model, tokens, torch.tensor([3]), (8, 8), class_dropout=0.0).per_token[0]
    b = next_token_loss(model, other, torch.tensor([3]), (8, 8), class_dropout=0.0).per_token[0]
    diff = (a - b).abs() > 1e-6
    assert not diff[:j].any(), "positions before j must not see token j"
    assert diff[j], "position j's target changed"
    assert diff[j + 1:].all(), "every later position sees token j"


def test_masked_training_sees_both_sides_and_never_the_hidden_values():
    model = tiny("maskgil-tiny")
    tokens = torch.randint(0, 32, (1, 64))
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, ::3] = True
    args = dict(mask_id=32, class_dropout=0.0, label_smoothing=0.1)
    base = masked_token_loss(model, tokens, torch.tensor([1]), (8, 8), mask=mask, **args).per_token[0]
    # a visible token in the middle influences masked positions before and after it
    vis = tokens.clone()
    vis[0, 31] = (tokens[0, 31] + 5) % 32
    assert not mask[0, 31]
    d = (masked_token_loss(model, vis, torch.tensor([1]), (8, 8), mask=mask, **args).per_token[0] - base).abs()
    assert (d[:31][mask[0, :31]] > 1e-7).all() and (d[32:][mask[0, 32:]] > 1e-7).all()
    assert (d[~mask[0]] == 0).all()
    # a hidden token's true value reaches only its own target, never the context of others
    hid = tokens.clone()
    hid[0, 30] = (tokens[0, 30] + 5) % 32
    assert mask[0, 30]
    d = (masked_token_loss(model, hid, torch.tensor([1]), (8, 8), mask=mask, **args).per_token[0] - base).abs()
    assert d[30] > 0 and (torch.cat([d[:30], d[31:]]) == 0).all()


@pytest.mark.parametrize("name", ["maskgil-tiny", "transformer-tiny"])
def test_head_at_positions_matches_full_logits_and_the_loss_over_them(name):
    """The masked loss sends only hidden positions to the head; the result must equal the rows of a
    full forward and a plain cross-entropy over them (computed here from the full logits)."""
    torch.manual_seed(0)
    model = build_model(name, vocab_size=32, num_classes=10, grid_size=(4, 4)).eval()
    tokens = torch.randint(0, 32, (3, 16))
    labels = torch.tensor([1, 4, 7])
    mask = torch.rand(3, 16) < 0.6
    mask[:, 0] = True
    inputs = tokens.masked_fill(mask, 32)
    with torch.no_grad():
        full = model(inputs, labels, (4, 4))  # (3, 16, 32)
        pos = torch.tensor([17, 0, 47, 5])  # any order, flat over batch x positions
        torch.testing.assert_close(model(inputs, labels, (4, 4), positions=pos), full.reshape(48, 32)[pos])
        out = masked_token_loss(model, tokens, labels, (4, 4), mask=mask, mask_id=32, class_dropout=0.0,
                                label_smoothing=0.1)
    expected = torch.nn.functional.cross_entropy(full[mask], tokens[mask], label_smoothing=0.1)
    torch.testing.assert_close(out.loss, expected)
    assert out.n_scored == int(mask.sum())
    assert (out.per_token[~mask] == 0).all() and (out.per_token[mask] > 0).all()


def test_masked_loss_under_bf16_autocast_upcasts_the_hidden_token_logits():
    """With positions the head returns compute-dtype (bf16) logits; the loss must still be the fp32
    cross-entropy of those logits, as computed here from the full forward's rows."""
    torch.manual_seed(0)
    model = build_model("maskgil-tiny", vocab_size=32, num_classes=10, grid_size=(4, 4)).eval()
    tokens = torch.randint(0, 32, (2, 16))
    mask = torch.rand(2, 16) < 0.5
    mask[:, 0] = True
    pos = mask.reshape(-1).nonzero().squeeze(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rows = model(tokens.masked_fill(mask, 32), torch.tensor([1, 2]), (4, 4), positions=pos)
        out = masked_token_loss(model, tokens, torch.tensor([1, 2]), (4, 4), mask=mask, mask_id=32,
                                class_dropout=0.0, label_smoothing=0.1)
    assert rows.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(rows.float(), tokens[mask], label_smoothing=0.1)
    torch.testing.assert_close(out.loss, expected)


def test_compute_loss_label_smoothing_defaults_to_0_1_masked_and_0_causal():
    """The paper's masked objective smooths its targets by 0.1; LlamaGen's next-token objective
    does not. An explicit value overrides either default."""
    from types import SimpleNamespace

    from maskgil.training.objectives import compute_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)
    tokens = torch.tensor([[1, 4, 0], [2, 2, 3]])
    masked = SimpleNamespace(causal=False, class_dropout=0.0, mask_token_id=5)
    causal = SimpleNamespace(causal=True, class_dropout=0.0)

    def hand(scored, eps):
        rows = [(b, i) for b in range(2) for i in range(3) if scored[b, i]]
        return sum(hand_smoothed_ce(logits[b, i], int(tokens[b, i]), eps) for b, i in rows) / len(rows)

    for config, eps in ((masked, 0.1), (causal, 0.0)):
        out = compute_loss(FixedLogits(logits), config, tokens, torch.tensor([0, 1]), (1, 3),
                           generator=torch.Generator().manual_seed(1))
        assert out.loss.item() == pytest.approx(hand(out.scored, eps), rel=1e-6), config
        assert out.total.item() == pytest.approx(out.loss.item() * out.n_scored, rel=1e-6)
        other = compute_loss(FixedLogits(logits), config, tokens, torch.tensor([0, 1]), (1, 3), label_smoothing=0.3,
                             generator=torch.Generator().manual_seed(1))
        assert other.loss.item() == pytest.approx(hand(other.scored, 0.3), rel=1e-6), config
    assert out.scored.all()  # the causal objective scores every position


def test_next_token_loss_drops_the_condition_at_the_class_dropout_rate():
    """CFG training for the AR model: the condition is replaced by the null class for a fraction
    class_dropout of the rows (drawn from the step's generator), and never with class_dropout 0."""
    model = FixedLogits(torch.zeros(4000, 2, 5))
    cond = torch.arange(4000) % 7
    next_token_loss(model, torch.zeros(4000, 2, dtype=torch.long), cond, (1, 2), class_dropout=0.1,
                    generator=torch.Generator().manual_seed(0))
    frac = model.seen[2].float().mean().item()
    assert 0.08 < frac < 0.12  # Binomial(4000, 0.1): sd 0.0047
    # the labels reach the model unchanged: drop_cond, not a rewritten label, selects the null row
    assert torch.equal(model.seen[1], torch.arange(4000) % 7)
    assert torch.equal(model.seen[1], cond)  # the model gets the ids; it swaps in the null class itself
    again = FixedLogits(torch.zeros(4000, 2, 5))
    next_token_loss(again, torch.zeros(4000, 2, dtype=torch.long), cond, (1, 2), class_dropout=0.1,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.seen[2], model.seen[2])  # a replayed step drops the same rows
    next_token_loss(model, torch.zeros(4000, 2, dtype=torch.long), cond, (1, 2), class_dropout=0.0,
                    generator=torch.Generator().manual_seed(0))
    assert not model.seen[2].any()


def test_a_given_mask_continues_the_generator_like_a_drawn_one():
    """The training step draws each mask before the forward (to count the step's hidden tokens) and
    passes it in: the condition dropout must then come out as when the objective draws the mask."""
    from maskgil.training.objectives import training_mask

    model = FixedLogits(torch.zeros(64, 6, 5))
    tokens, cond = torch.zeros(64, 6, dtype=torch.long), torch.arange(64) % 3
    args = dict(mask_id=5, class_dropout=0.5, schedule="cosine")
    drawn = masked_token_loss(model, tokens, cond, (2, 3), generator=torch.Generator().manual_seed(4), **args)
    drop = model.seen[2]
    g = torch.Generator().manual_seed(4)
    mask = training_mask(tiny("maskgil-tiny").config, 64, 6, "cosine", g)
    given = masked_token_loss(model, tokens, cond, (2, 3), generator=g, mask=mask, **args)
    assert torch.equal(given.scored, drawn.scored) and torch.equal(model.seen[2], drop)
    assert training_mask(tiny("llamagen-tiny").config, 64, 6, "cosine", g) is None  # causal: every position
