"""Per-sample randomness: a sample's dropout mask and shift depend on (seed, epoch, its index) only,
not on which rank holds it, what else is in its local batch, or how long the batch was trimmed."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models import randomness
from pipeline.models.base import SampleGateLSTM


def test_a_samples_mask_does_not_depend_on_its_batch_mates():
    x = torch.ones(8, 5, 6)
    index = torch.arange(100, 108)
    with randomness.per_sample(7, 2, index):
        whole = randomness.dropout(x, 0.5)
    with randomness.per_sample(7, 2, index[[5, 1, 3]]):  # another rank's share, in another order
        part = randomness.dropout(x[[5, 1, 3]], 0.5)
    torch.testing.assert_close(part, whole[[5, 1, 3]], rtol=0, atol=0)
    with randomness.per_sample(7, 2, index):  # a shorter trimmed batch: the first 3 steps' masks agree
        short = randomness.dropout(x[:, :3], 0.5)
    torch.testing.assert_close(short, whole[:, :3], rtol=0, atol=0)
    # dropout's contract: zeros or 1/(1-p), about half kept, other epochs and seeds draw other masks
    assert set(whole.unique().tolist()) == {0.0, 2.0} and 0.4 < (whole > 0).float().mean() < 0.6
    for seed, epoch in ((7, 3), (8, 2)):
        with randomness.per_sample(seed, epoch, index):
            assert not torch.equal(randomness.dropout(x, 0.5), whole)
    # two draws in one step are independent streams
    with randomness.per_sample(7, 2, index):
        first, second = randomness.dropout(x, 0.5), randomness.dropout(x, 0.5)
    assert not torch.equal(first, second)


def test_uniforms_are_uniform_and_fall_back_to_torch_outside_a_step():
    with randomness.per_sample(1, 0, torch.arange(4000)):
        u = randomness.row_uniform(4000, 2)
    assert u.min() >= 0 and u.max() < 1 and abs(float(u.mean()) - 0.5) < 0.02
    assert abs(float(torch.corrcoef(u.T)[0, 1])) < 0.05
    assert not randomness.active()
    torch.manual_seed(0)
    a = randomness.dropout(torch.ones(3, 4), 0.5)
    torch.manual_seed(0)
    torch.testing.assert_close(a, nn.functional.dropout(torch.ones(3, 4), 0.5), rtol=0, atol=0)


def test_inter_layer_dropout_is_per_sample_packed_or_dense():
    """GateLSTM with lengths packs (and sorts) the batch: each sample still gets its own masks."""
    torch.manual_seed(0)
    lstm = SampleGateLSTM(3, 8, num_layers=2, dropout=0.5, batch_first=True).train()
    x = torch.randn(5, 7, 3)
    lengths = torch.tensor([7, 2, 5, 7, 4])
    index = torch.tensor([40, 11, 12, 13, 3])
    with randomness.per_sample(5, 1, index):
        out, (h, _) = lstm(x, lengths=lengths)
    for keep in ([1, 4], [3, 0, 2]):  # each subset alone, trimmed to its own longest, in another order
        T = int(lengths[keep].max())
        with randomness.per_sample(5, 1, index[keep]):
            sub, (h_sub, _) = lstm(x[keep, :T], lengths=lengths[keep])
        torch.testing.assert_close(sub, out[keep, :T], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h_sub, h[:, keep], rtol=1e-6, atol=1e-6)
    full = lengths == 7  # no padding: the dense path draws the same masks as the packed one
    with randomness.per_sample(5, 1, index[full]):
        dense, _ = lstm(x[full])
    torch.testing.assert_close(dense, out[full], rtol=1e-6, atol=1e-6)
    with randomness.per_sample(5, 2, index):
        assert not torch.allclose(lstm(x, lengths=lengths)[0], out)  # another epoch, other masks
