"""Direct, slow implementations of the published algorithms, used as test oracles.

Written from the paper's description of Algorithm 1 (TextSpan) and its public reference
implementation's order of operations: NumPy SVD of the raw outputs, projection of the texts
on the top-`rank` right singular vectors, centring, then greedy selection by the standard
deviation of the projections with removal of the chosen direction from outputs and texts.
Everything in float64, nothing clever.
"""

from __future__ import annotations

import numpy as np


def published_text_span(outputs: np.ndarray, texts: np.ndarray, n_texts: int, rank: int):
    """Returns (indices, variances, reconstruction of the outputs)."""
    x = np.asarray(outputs, dtype=np.float64)
    t = np.asarray(texts, dtype=np.float64)
    norms = np.linalg.norm(t, axis=1, keepdims=True)
    t = np.divide(t, norms, out=np.zeros_like(t), where=norms > 0)
    _, _, vh = np.linalg.svd(x, full_matrices=False)
    vh = vh[:rank]
    t = (vh.T @ np.linalg.inv(vh @ vh.T) @ vh @ t.T).T
    mean = x.mean(axis=0, keepdims=True)
    data = x - mean
    reconstruction = np.repeat(mean, x.shape[0], axis=0)
    indices, variances = [], []
    for _ in range(n_texts):
        projection = data @ t.T
        best = int(np.argmax(projection.std(axis=0)))
        direction = t[best]
        norm2 = direction @ direction
        along = data @ direction / norm2
        variances.append(float(np.var(along * np.sqrt(norm2))))
        reconstruction += along[:, None] * direction[None, :]
        data = data - along[:, None] * direction[None, :]
        t = t - (t @ direction / norm2)[:, None] * direction[None, :]
        indices.append(best)
    return np.array(indices), np.array(variances), reconstruction
