import pytest
import torch

from nanoseek.losses import cross_entropy_reference, linear_cross_entropy


@pytest.mark.parametrize("n,vocab", [(37, 11), (600, 300), (2000, 4096)])
def test_linear_cross_entropy_matches_reference(n, vocab):
    torch.manual_seed(n)
    h = torch.randn(n, 24, requires_grad=True)
    w = (0.3 * torch.randn(vocab, 24)).requires_grad_()
    t = torch.randint(0, vocab, (n,))
    t[::5] = -100
    loss = linear_cross_entropy(h, w, t)
    (2 * loss).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = cross_entropy_reference(h, w, t)
    (2 * ref).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-7)


def test_all_ignored_gives_zero_loss_and_grad():
    h = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((8,), -100))
    loss.backward()
    assert loss.item() == 0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_no_grad_path():
    h, w, t = torch.randn(8, 4), torch.randn(6, 4), torch.randint(0, 6, (8,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), cross_entropy_reference(h, w, t))
