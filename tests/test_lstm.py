"""GateLSTM against nn.LSTM, against the step-by-step reference cell, and against its own invariants."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.lstm import GateLSTM, GateTrace, VanillaRNN, reference_lstm

TRACE_NAMES = ("input_gate", "forget_gate", "candidate", "output_gate", "cell", "hidden")


def twins(input_size, hidden_size, num_layers, dropout=0.0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ref = nn.LSTM(input_size, hidden_size, num_layers, dropout=dropout, batch_first=True).to(dtype)
    ours = GateLSTM(input_size, hidden_size, num_layers, dropout=dropout).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("with_state", [False, True])
def test_outputs_and_gradients_match_nn_lstm(num_layers, with_state):
    gen = torch.Generator().manual_seed(num_layers * 10 + with_state)
    B, T, I, H = (int(v) for v in torch.randint(2, 9, (4,), generator=gen))
    ref, ours = twins(I, H, num_layers, seed=num_layers)
    x = torch.randn(B, T, I, generator=gen)
    state = None
    if with_state:
        state = (torch.randn(num_layers, B, H, generator=gen), torch.randn(num_layers, B, H, generator=gen))
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()

    out_r, (h_r, c_r) = ref(x_ref, state)
    out_o, (h_o, c_o) = ours(x_ours, state)
    for a, b in ((out_r, out_o), (h_r, h_o), (c_r, c_o)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)

    weights = torch.randn_like(out_r)  # a loss that touches every output and the final state
    ((out_r * weights).sum() + h_r.sum() + c_r.pow(2).sum()).backward()
    ((out_o * weights).sum() + h_o.sum() + c_o.pow(2).sum()).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_state_dicts_load_both_ways():
    ref, ours = twins(3, 4, 2)
    assert list(ours.state_dict()) == list(ref.state_dict())
    fresh = nn.LSTM(3, 4, 2, batch_first=True)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(fresh.weight_hh_l1, ours.weight_hh_l1)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_trace_equals_reference_cell(num_layers):
    _, ours = twins(6, 5, num_layers, seed=3)
    x = torch.randn(3, 12, 6)
    state = (torch.randn(num_layers, 3, 5), torch.randn(num_layers, 3, 5))
    out, (h_n, c_n), trace = ours(x, state, return_gates=True)
    ref_out, (ref_h, ref_c), ref_trace = reference_lstm(ours, x, state)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_n, ref_c, atol=1e-5, rtol=0)
    for name in TRACE_NAMES:
        got = getattr(trace, name)
        assert got.shape == (num_layers, 3, 12, 5), name
        torch.testing.assert_close(got, getattr(ref_trace, name), atol=1e-5, rtol=0, msg=name)


def test_trace_invariants():
    _, ours = twins(4, 16, 2, seed=5)
    x = 3 * torch.randn(5, 30, 4)  # large inputs push gates towards saturation
    out, (h_n, c_n), trace = ours(x, return_gates=True)
    for name in ("input_gate", "forget_gate", "output_gate"):
        g = getattr(trace, name)
        assert bool(((g > 0) & (g < 1)).all()), name
    assert bool((trace.candidate.abs() < 1).all())
    torch.testing.assert_close(trace.hidden, trace.output_gate * torch.tanh(trace.cell), atol=1e-6, rtol=0)
    c_prev = torch.cat([torch.zeros(2, 5, 1, 16), trace.cell[:, :, :-1]], dim=2)
    torch.testing.assert_close(trace.cell, trace.forget_gate * c_prev + trace.input_gate * trace.candidate,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.hidden[-1], out, atol=0, rtol=0)
    torch.testing.assert_close(trace.cell[:, :, -1], c_n, atol=1e-6, rtol=0)
    assert trace.reconstruction_error < 1e-5
    assert not any(t.requires_grad for _, t in trace.items())


def test_variable_lengths_equal_running_each_sequence_alone():
    ref, ours = twins(3, 6, 2, seed=7)
    x = torch.randn(4, 10, 3)
    lengths = torch.tensor([10, 4, 7, 1])
    out, (h_n, c_n), trace = ours(x, lengths=lengths, return_gates=True)
    for b, n in enumerate(lengths.tolist()):
        alone, (h_b, c_b) = ref(x[b : b + 1, :n])
        torch.testing.assert_close(out[b, :n], alone[0], atol=1e-5, rtol=0)
        assert bool((out[b, n:] == 0).all())  # padded like pad_packed_sequence
        torch.testing.assert_close(h_n[:, b], h_b[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(c_n[:, b], c_b[:, 0], atol=1e-5, rtol=0)
        _, _, trace_b = ours(x[b : b + 1, :n], return_gates=True)
        for name in TRACE_NAMES:
            full = getattr(trace, name)[:, b]
            torch.testing.assert_close(full[:, :n], getattr(trace_b, name)[:, 0], atol=1e-5, rtol=0, msg=name)
            assert bool(full[:, n:].isnan().all()), f"{name} past the end must be NaN"
    assert trace.mask.sum(1).tolist() == lengths.tolist()


def test_packed_sequence_matches_nn_lstm():
    ref, ours = twins(3, 5, 2, seed=11)
    x = torch.randn(3, 8, 3)
    lengths = torch.tensor([5, 8, 2])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    state = (torch.randn(2, 3, 5), torch.randn(2, 3, 5))
    out_r, (h_r, c_r) = ref(packed, state)
    out_o, (h_o, c_o), trace = ours(packed, state, return_gates=True)
    torch.testing.assert_close(out_o.data, out_r.data, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_o, h_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(c_o, c_r, atol=1e-5, rtol=0)
    padded = pad_packed_sequence(out_o, batch_first=True)[0]
    torch.testing.assert_close(torch.nan_to_num(trace.hidden[-1]), padded, atol=1e-6, rtol=0)


def test_float64():
    ref, ours = twins(4, 3, 2, dtype=torch.float64)
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    out, _, trace = ours(x, return_gates=True)
    assert out.dtype == trace.cell.dtype == torch.float64
    torch.testing.assert_close(out, ref(x)[0], atol=1e-12, rtol=0)
    assert trace.reconstruction_error < 1e-12


def test_inter_layer_dropout_train_and_eval():
    ref, ours = twins(4, 32, 2, dropout=0.5)
    x = torch.randn(4, 9, 4)
    ref.eval()
    ours.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-5, rtol=0)  # eval: no dropout, as nn.LSTM
    ours.train()
    a, _, trace = ours(x, return_gates=True)
    b = ours(x)[0]
    assert not torch.allclose(a, b), "train mode must drop units between layers"
    # the trace used the dropped input the fused pass saw: the self-check still holds exactly
    assert trace.reconstruction_error < 1e-5
    one_layer = GateLSTM(4, 8, 1, dropout=0.5).train()
    torch.testing.assert_close(one_layer(x)[0], one_layer(x)[0])  # nothing to drop with one layer


def test_vanilla_rnn_matches_nn_rnn_and_traces_hidden():
    torch.manual_seed(0)
    ref = nn.RNN(3, 5, 2, batch_first=True)
    ours = VanillaRNN(3, 5, 2)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 7, 3)
    out, h_n, trace = ours(x, return_gates=True)
    out_r, h_r = ref(x)
    torch.testing.assert_close(out, out_r, atol=1e-6, rtol=0)
    torch.testing.assert_close(h_n, h_r, atol=1e-6, rtol=0)
    assert isinstance(trace, GateTrace) and trace.forget_gate is None
    torch.testing.assert_close(trace.hidden[-1], out)
    lengths = torch.tensor([7, 3])
    out_l, h_l = ours(x, lengths=lengths)
    torch.testing.assert_close(h_l[:, 1], ref(x[1:, :3])[1][:, 0], atol=1e-6, rtol=0)
