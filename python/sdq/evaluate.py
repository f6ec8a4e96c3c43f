"""Perplexity of a causal language model on a token stream."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def perplexity(model, tokens: torch.Tensor, seqlen: int = 512, batch_size: int = 1,
               progress: bool = True) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `tokens`.

    tokens: LongTensor[n]. It is cut into `n // seqlen` windows of `seqlen` (the ragged tail is
    dropped); each window is scored on its own, so it predicts `seqlen - 1` tokens, and the mean
    is over all predicted tokens. Runs on the model's device; the NLL is summed in float64.
    """
    n_windows = tokens.numel() // seqlen
    if seqlen < 2 or n_windows < 1 or batch_size < 1:
        raise ValueError(f"need seqlen >= 2, batch_size >= 1 and at least one window; "
                         f"got seqlen={seqlen}, batch_size={batch_size}, n={tokens.numel()}")
    device = next(model.parameters()).device
    windows = tokens.reshape(-1)[: n_windows * seqlen].view(n_windows, seqlen)
    total = torch.zeros((), dtype=torch.float64)
    bar = tqdm(total=n_windows, desc="perplexity", unit="win", disable=not progress)
    with torch.inference_mode():
        for i in range(0, n_windows, batch_size):
            batch = windows[i:i + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                  batch[:, 1:].reshape(-1), reduction="sum")
            total += nll.double().cpu()
            bar.update(batch.shape[0])
    bar.close()
    return math.exp(total.item() / (n_windows * (seqlen - 1)))
