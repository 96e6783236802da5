"""Classifier-confidence guidance: grad_x log max_y softmax(f((x + 1) / 2))_y (Eq. 5)."""
from __future__ import annotations

import torch


def log_max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log max_y softmax(l)_y = l_{y*} - logsumexp(l), per row; (B, C) -> (B,).

    Its gradient with respect to the logits is e_{y*} - softmax(l) (docs/design.md §2).
    Pure-torch reference of the fused Triton op (coup_fast.kernels.confidence).
    """
    return logits.max(dim=-1).values - torch.logsumexp(logits, dim=-1)


def state_to_image(x: torch.Tensor) -> torch.Tensor:
    """Diffusion state x in [-1, 1] -> image u = (x + 1) / 2 in [0, 1]."""
    return (x + 1.0) * 0.5


def image_to_state(u: torch.Tensor) -> torch.Tensor:
    """Image u in [0, 1] -> diffusion state x = 2u - 1 in [-1, 1]."""
    return u * 2.0 - 1.0


def classifier_logits(classifier, x: torch.Tensor) -> torch.Tensor:
    """classifier((x + 1)/2), checked to be (B, C) logits: other shapes would make the max and
    logsumexp run over the wrong axis and couple the images of a batch, silently."""
    logits = classifier(state_to_image(x))
    if not torch.is_tensor(logits):
        raise ValueError(f"classifier: expected logits as one tensor, got {type(logits).__name__}")
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"classifier: expected logits of shape (B, C) = ({x.shape[0]}, C), got {tuple(logits.shape)}")
    return logits


def confidence_grad(classifier, x: torch.Tensor, *, create_graph: bool = False,
                    log_confidence=log_max_softmax) -> torch.Tensor:
    """grad_x log max_y p(y | (x + 1)/2) for a batch of states x in [-1, 1], same shape as x.

    The classifier takes [0, 1] images and returns logits (B, C).  With create_graph=True the
    result is itself differentiable (the Hessian-vector products of the exact adjoint).
    """
    with torch.enable_grad():
        if not (create_graph and x.requires_grad):
            x = x.detach().requires_grad_(True)
        logits = classifier_logits(classifier, x)
        if not logits.requires_grad:
            raise ValueError("classifier: its logits do not depend on its input through autograd (a detached output, "
                             "or torch.no_grad / inference_mode inside it), so the guidance has no gradient")
        (grad,) = torch.autograd.grad(log_confidence(logits).sum(), x, create_graph=create_graph)
    return grad
