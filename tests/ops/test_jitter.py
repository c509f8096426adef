"""GRIN's input jitter from counter-based draws: the kernel (CPU interpreter) against the torch reference, the
draws against an independent Philox reference, and the properties the model relies on (U(1-eps, 1+eps),
keyed by token and not by layout, replayable, backward = the same noise)."""

import pytest
import torch

from grin_testing import philox_python
from megatron_grin.model import routing_rng
from megatron_grin.ops import jitter as J

triton = pytest.importorskip("triton")
from grin_interpreter import in_interpreter  # noqa: E402

EPS = 0.01


def _key(token_ids, seed=11, iteration=5, layer=3, microbatch=2):
    return J.jitter_key(token_ids, seed=seed, iteration=iteration, layer_number=layer, microbatch=microbatch)




CASES = [  # (tokens, hidden, dtype)
    (1, 16, torch.float32),
    (37, 100, torch.float32),  # ragged tokens and hidden (100 = 6 blocks of 16 + 4)
    (37, 100, torch.bfloat16),
    (20, 300, torch.float32),  # two column tiles of 256
    (0, 64, torch.float32),
]


def _compare(tokens, hidden, dtype):
    g = torch.Generator().manual_seed(tokens + hidden)
    key = _key(torch.randint(0, 2**40, (tokens,), generator=g))  # ids past 2**32 wrap like routing_rng's
    x, dy = torch.randn(tokens, hidden, generator=g).to(dtype), torch.randn(tokens, hidden, generator=g).to(dtype)
    out = {}
    for backend in ("triton", "torch"):
        xb = x.clone().requires_grad_()
        y = J.input_jitter(xb, EPS, key, backend=backend)
        y.backward(dy)
        out[backend] = (y.detach(), xb.grad)
    (yk, gk), (yr, gr) = out["triton"], out["torch"]
    if dtype == torch.float32:
        return {"equal": torch.equal(yk, yr) and torch.equal(gk, gr)}
    # the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest, as torch): within one bf16 ulp
    ulp = lambda t: t.float().abs() * 2.0**-7  # noqa: E731
    return {"equal": bool(((yk.float() - yr.float()).abs() <= ulp(yr)).all() and
                          ((gk.float() - gr.float()).abs() <= ulp(gr)).all())}


def _all_checks():
    return {case: _compare(*case) for case in CASES}


@pytest.fixture(scope="module")
def interpreted():
    return in_interpreter(_all_checks)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-H{}-{}".format(c[0], c[1], str(c[2])[6:]))
def test_kernel_matches_reference(interpreted, case):
    assert interpreted[case]["equal"]


def test_codes_are_the_documented_philox_bytes():
    """Element h of token t: byte h % 4 of word (h % 16) // 4 of Philox((t, h // 16, layer*4 + 1, mb), (seed, it))."""
    token_ids = torch.tensor([0, 7, 2**32 + 5, 123456789])
    key = _key(token_ids, seed=0xDEADBEEF, iteration=2**33 + 9, layer=6, microbatch=4)
    codes = J.jitter_codes(key, 40)
    assert codes.dtype == torch.uint8 and codes.shape == (4, 40)
    for t, tok in enumerate(token_ids.tolist()):
        for h in (0, 3, 4, 15, 16, 17, 39):
            ctr = (tok & 0xFFFFFFFF, h // 16, (6 * 4 + routing_rng.STREAM_INPUT_JITTER) & 0xFFFFFFFF, 4)
            word = philox_python(ctr, (0xDEADBEEF, (2**33 + 9) & 0xFFFFFFFF))[(h % 16) // 4]
            assert int(codes[t, h]) == (word >> (8 * (h % 4))) & 0xFF, (t, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_is_uniform_around_one(dtype, eps=0.1):
    ones = torch.ones(512, 256, dtype=dtype)
    noise = J.input_jitter(ones, eps, _key(torch.arange(512))).double()
    assert noise.min() >= 1 - eps - 1e-2 and noise.max() <= 1 + eps + 1e-2  # bf16 rounds near the ends
    assert abs(noise.mean().item() - 1) < 2e-3
    assert abs(noise.std().item() - eps / 3**0.5) < 3e-3  # the std of U(1-eps, 1+eps)
    codes = J.jitter_codes(_key(torch.arange(512)), 256)
    counts = torch.bincount(codes.reshape(-1).long(), minlength=256).double()
    expected = codes.numel() / 256
    assert ((counts - expected) ** 2 / expected).sum() < 255 + 5 * (2 * 255) ** 0.5  # chi-square, ~5 sigma


def test_keyed_by_token_not_by_layout():
    """A TP shard (or another DP split) of the same tokens draws exactly its rows of the whole draw."""
    ids = torch.arange(64) * 3 + 1000
    whole = J.jitter_codes(_key(ids), 48)
    assert torch.equal(J.jitter_codes(_key(ids[16:40]), 48), whole[16:40])
    assert torch.equal(J.jitter_codes(_key(ids.flip(0)), 48), whole.flip(0))
    assert torch.equal(J.jitter_codes(_key(ids), 48), whole)  # replay
    for other in (dict(seed=12), dict(iteration=6), dict(layer=4), dict(microbatch=3)):
        assert (J.jitter_codes(_key(ids, **other), 48) != whole).float().mean() > 0.9, other


def test_backward_multiplies_by_the_same_noise():
    x = torch.randn(9, 33, dtype=torch.float64).float().requires_grad_()
    key = _key(torch.arange(9))
    y = J.input_jitter(x, EPS, key)
    dy = torch.randn(9, 33)
    y.backward(dy)
    noise = (J.jitter_codes(key, 33).double() - 127.5) * (EPS / 127.5) + 1.0
    torch.testing.assert_close(y.detach().double(), x.detach().double() * noise, rtol=2**-23, atol=0)
    torch.testing.assert_close(x.grad.double(), dy.double() * noise, rtol=2**-23, atol=0)


def test_rejects_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="tokens, hidden"):
        J.input_jitter(x.view(2, 2, 8), EPS, _key(torch.arange(4)))
    with pytest.raises(ValueError, match="token_ids"):
        J.input_jitter(x, EPS, _key(torch.arange(3)))
    with pytest.raises(ValueError, match="eps"):
        J.input_jitter(x, 1.5, _key(torch.arange(4)))
    with pytest.raises(ValueError, match="backend"):
        J.input_jitter(x, EPS, _key(torch.arange(4)), backend="cuda")
