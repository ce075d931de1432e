"""The summed cross-entropy of a vocabulary head's logits, with its gradients computed in the same pass.

The head's (N, V) logits are the largest activation of a small model's step, and an ordinary loss
touches them four times: written by the matmul, copied to fp32, read by log-softmax, and read again
by its backward, while autograd keeps them from forward to backward (or, chunked, recomputes the
head's matmul in backward). Here each chunk of targets has its logits computed, reduced to the loss
and turned into the gradients w.r.t. its hidden states and the head weight at once, then dropped:
backward only scales the stored gradients by the loss's. At most one chunk's (chunk, V) logits
exist at a time, and no matmul is repeated (Liger Kernel's fused linear cross-entropy; Wijmans et
al. 2024, "Cut Your Losses in Large-Vocabulary Language Models").

It is a custom op, so FLOP counting sees one head matmul's worth of forward FLOPs (its gradients
are backward work done early) and `torch.compile` treats it as one opaque call.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils import flop_counter

IGNORE = -100  # F.cross_entropy's ignore_index: targets that add nothing to the loss


def linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
    """sum(cross_entropy(h @ weight.T, labels)) in fp32, `chunk` rows of h at a time; h (N, D),
    weight (V, D), labels (N,). The matmuls run in the autocast dtype when autocast is on."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    grad = torch.is_grad_enabled()
    loss, _, _ = torch.ops.kosmo.linear_cross_entropy(h, weight, labels, chunk, dtype,
                                                      grad and h.requires_grad, grad and weight.requires_grad)
    return loss


@torch.library.custom_op("kosmo::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, chunk: int, dtype: torch.dtype,
                          grad_h: bool, grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(summed loss, its gradient w.r.t. h or an empty tensor, w.r.t. weight or an empty tensor)."""
    with torch.autocast(h.device.type, enabled=False):  # the casts are explicit
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if grad_h else h.new_empty(0)
        dw = torch.zeros_like(weight, dtype=torch.float32) if grad_weight else weight.new_empty(0)
        for s in range(0, h.shape[0], chunk):
            x, y = h[s:s + chunk].to(dtype), labels[s:s + chunk]
            log_probs = (x @ w.T).float().log_softmax(-1)
            kept = y != IGNORE
            target = y.clamp(min=0)[:, None]
            loss -= (log_probs.gather(1, target)[:, 0] * kept).sum()
            if not (grad_h or grad_weight):
                continue
            # d loss / d logits = softmax - one_hot(target), zero on ignored rows; built in the same memory
            d = log_probs.exp_()
            d.scatter_add_(1, target, torch.full_like(target, -1, dtype=d.dtype))
            d = d.mul_(kept[:, None]).to(dtype)
            if grad_h:
                dh[s:s + chunk] = d @ w
            if grad_weight:
                dw += (d.T @ x).float()
        return loss, dh, dw.to(weight.dtype)


@_linear_cross_entropy.register_fake
def _(h, weight, labels, chunk, dtype, grad_h, grad_weight):
    return (h.new_empty((), dtype=torch.float32), torch.empty_like(h) if grad_h else h.new_empty(0),
            torch.empty_like(weight) if grad_weight else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    _, dh, dw = output
    ctx.mark_non_differentiable(dh, dw)
    ctx.save_for_backward(dh, dw)


def _backward(ctx, d_loss, _dh, _dw):
    dh, dw = ctx.saved_tensors
    return (d_loss * dh if ctx.needs_input_grad[0] else None, d_loss * dw if ctx.needs_input_grad[1] else None,
            None, None, None, None, None)


_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


@flop_counter.register_flop_formula(torch.ops.kosmo.linear_cross_entropy)
def _flops(h_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * h_shape[0] * h_shape[1] * weight_shape[0]
