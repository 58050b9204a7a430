"""The posterior's parameters: as one vector, restored after sampling, digested."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


@contextmanager
def parameters_kept(params: Iterable[Tensor]) -> Iterator[None]:
    """Give ``params`` their own values back when the block ends, however it ends.

    The block may write samples into the parameters (``vector_to_parameters``);
    afterwards each parameter holds its original tensor again (the same storage,
    so nothing else aliases it).

    Args:
        params: The parameters.

    Yields:
        Nothing.
    """
    params = list(params)
    originals = [param.data for param in params]
    try:
        yield
    finally:
        for param, original in zip(params, originals):
            param.data = original


def parameters_vector(params: Iterable[Tensor]) -> Tensor:
    """The parameters flattened in row-major order and concatenated.

    ``torch.nn.utils.parameters_to_vector`` takes a ``view`` of each parameter,
    which fails for a parameter that is not contiguous (a ``channels_last``
    convolution's weight); a reshape gives the same order for any strides.

    Args:
        params: The parameters.

    Returns:
        Shape ``(P,)``.
    """
    return torch.cat([param.reshape(-1) for param in params])


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 of a tensor's bytes: equal exactly when the values are bit-equal.

    Args:
        tensor: Any tensor (copied to the host one at a time).

    Returns:
        The hex digest, with the dtype and shape prefixed.
    """
    data = tensor.detach().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{data.dtype}{tuple(tensor.shape)}".encode())
    if data.numel():
        digest.update(data.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()
