"""STCA-FF: student-teacher cross-attention feature fusion (docs/METHOD.md, "STCA-FF")."""

import math

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["STCAFusion"]

_QUERY_SOURCES = ("teacher", "student")
_HEAD_ALIGN = 8


def _to_sequence(x: Tensor) -> Tensor:
    """
    Args:
        x (Tensor): (B, C, H, W) feature.

    Returns:
        Tensor: (B, N, C), contiguous. The fused SDPA kernels require stride 1 on the last axis
        and otherwise fall back, silently, to the math path that builds the N x N matrix.
    """
    return x.flatten(2).transpose(1, 2).contiguous()


class STCAFusion(nn.Module):
    """
    One-head cross-attention between a teacher and an (aligned) student feature of one level.

    With ``query_source="teacher"`` (paper default) the query comes from the teacher and key and
    value from the student, ``F = V softmax_over_keys(Q^T K / sqrt(C_q))^T``; with
    ``query_source="student"`` the roles swap. No residual and no normalisation.

    The ``N x N`` attention matrix is never materialised: the attention runs through
    :func:`torch.nn.functional.scaled_dot_product_attention`, whose fused (flash) CPU and CUDA
    kernels need one head width for query, key and value. The value is therefore split into
    chunks of the query width (C_q rounded up to a multiple of 8, query and key zero-padded to
    it; the last chunk zero-padded too), run as heads that all share the same Q and K (expanded
    views, no copy), with the scale ``1/sqrt(C_q)``. The result is exactly one-head attention.
    Zero-padding Q and K to width C instead costs the same FLOPs and memory, but gives the CPU
    flash backward, which parallelises over batch x heads only, a single work item at batch 1:
    it then runs in one thread around a multithreaded BLAS on small blocks, measured 5-7x
    slower here (N=4200, C=256, 2 threads: 3.8-4.8 s against 0.7-1.0 s). Odd C works too:
    19 Cityscapes classes give C_q = 9, two heads of width 16.
    """

    def __init__(
        self, channels: int, query_channel_ratio: float = 0.5, query_source: str = "teacher"
    ) -> None:
        """
        Args:
            channels (int): C, the channel count of the teacher and the aligned student.
            query_channel_ratio (float): C_q / C; ``C_q = max(1, int(C * ratio))``.
            query_source (str): "teacher" (Q from the teacher, K and V from the student) or
                "student" (Q from the student, K and V from the teacher).
        """
        super().__init__()
        if channels < 1:
            raise ValueError(f"STCAFusion: channels must be >= 1, got {channels}")
        if query_channel_ratio <= 0:
            raise ValueError(
                f"STCAFusion: query_channel_ratio must be > 0, got {query_channel_ratio}"
            )
        if query_source not in _QUERY_SOURCES:
            raise ValueError(
                f"STCAFusion: query_source must be one of {_QUERY_SOURCES}, got {query_source!r}"
            )
        self.channels = channels
        self.query_channels = max(1, int(channels * query_channel_ratio))
        self.query_source = query_source
        self.scale = 1.0 / math.sqrt(self.query_channels)

        self.query_proj = nn.Conv2d(channels, self.query_channels, kernel_size=1)
        # A key bias adds the same q.b to every key of a query, which the softmax over keys
        # cancels: it would be a parameter that never receives a gradient.
        self.key_proj = nn.Conv2d(channels, self.query_channels, kernel_size=1, bias=False)
        self.value_proj = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, teacher: Tensor, student: Tensor) -> Tensor:
        """
        Args:
            teacher (Tensor): (B, C, H, W) teacher feature; detached here, so no gradient ever
                reaches it.
            student (Tensor): (B, C, H, W) aligned student feature on the same grid.

        Returns:
            Tensor: (B, C, H, W) fused feature F.
        """
        teacher = teacher.detach()
        if teacher.shape != student.shape or teacher.dim() != 4:
            raise ValueError(
                "STCAFusion: teacher and student must both be (B, C, H, W) of the same shape, got "
                f"{tuple(teacher.shape)} and {tuple(student.shape)}"
            )
        if teacher.shape[1] != self.channels:
            raise ValueError(
                f"STCAFusion: expected {self.channels} channels, got {teacher.shape[1]}"
            )
        if self.query_source == "teacher":
            query_src, kv_src = teacher, student
        else:
            query_src, kv_src = student, teacher
        b, c, h, w = teacher.shape
        q = _to_sequence(self.query_proj(query_src))
        k = _to_sequence(self.key_proj(kv_src))
        v = _to_sequence(self.value_proj(kv_src))
        out = self._attend(q, k, v)  # (B, N, C)
        return out.transpose(1, 2).reshape(b, c, h, w)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """
        Args:
            q (Tensor): (B, N, C_q) queries.
            k (Tensor): (B, N, C_q) keys.
            v (Tensor): (B, N, C) values.

        Returns:
            Tensor: (B, N, C), ``softmax(q k^T / sqrt(C_q)) v`` without an N x N buffer.
        """
        b, n, c = v.shape
        # A multiple of 8: the alignment the CUDA flash and memory-efficient kernels check (odd
        # C_q such as 9 would send them to the math path there). Zero query/key columns leave
        # q k^T unchanged; the scale stays 1/sqrt(C_q).
        width = -(-q.shape[-1] // _HEAD_ALIGN) * _HEAD_ALIGN
        q = F.pad(q, (0, width - q.shape[-1]))
        k = F.pad(k, (0, width - k.shape[-1]))
        heads = -(-c // width)  # ceil(C / width); 1 when width >= C
        # Zero value columns only add zero output columns, dropped below.
        v = F.pad(v, (0, heads * width - c))
        v = v.view(b, n, heads, width).transpose(1, 2)  # (B, heads, N, width), last stride 1
        q = q.unsqueeze(1).expand(b, heads, n, width)
        k = k.unsqueeze(1).expand(b, heads, n, width)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, heads, N, width)
        return out.transpose(1, 2).reshape(b, n, heads * width)[..., :c]
