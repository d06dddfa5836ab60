"""STCA-FF: student-teacher cross-attention feature fusion (docs/METHOD.md, "STCA-FF")."""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ATTENTION_IMPLS",
    "STCAFusion",
    "chunked_attention",
    "chunked_attention_and_column_mean",
]

_HEAD_ALIGN = 8
# MODEL.ACAMKD.ATTENTION: how the (identical) attention is computed. "auto" is "chunked" on the
# CPU and "sdpa" elsewhere (CUDA); see STCAFusion.
ATTENTION_IMPLS = ("auto", "chunked", "sdpa")
# Elements of one (B, queries, N) score buffer of the chunked attention: 2**22 is 16 MB in
# float32. Forward and backward hold at most three such buffers at once.
_CHUNK_ELEMENTS = 1 << 22
# Elements of the whole (B, N, N) probabilities up to which the chunked attention keeps them for
# its backward instead of recomputing them: 2**27 is 512 MB in float32 (RetinaNet p3 of a
# 640x640 image at batch 2 is 82M; of a 1333x800 image at batch 1, 282M, recomputed).
_SAVED_PROBS_ELEMENTS = 1 << 27


def _to_sequence(x: Tensor) -> Tensor:
    """
    Args:
        x (Tensor): (B, C, H, W) feature.

    Returns:
        Tensor: (B, N, C), contiguous. The fused SDPA kernels require stride 1 on the last axis
        and otherwise fall back, silently, to the math path that builds the N x N matrix.
    """
    return x.flatten(2).transpose(1, 2).contiguous()


def _query_chunk(batch: int, n: int, chunk_elements: int) -> int:
    """Queries per chunk so that one (batch, chunk, n) buffer holds about chunk_elements."""
    return max(1, min(n, chunk_elements // max(1, batch * n)))


class _ChunkedAttention(torch.autograd.Function):
    """
    Exact one-head attention ``softmax(q k^T * scale) v`` over query chunks, and optionally the
    mean of the attention rows over the queries: q k^T is computed once per chunk for the full
    value width. With ``keep_probs`` the chunks' probabilities are kept for the backward
    (B x N x L elements in all); otherwise the backward recomputes each chunk's (as flash
    attention does), so no N x L buffer exists in either pass.
    """

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: float,
        chunk: int,
        keep_probs: bool,
        column_mean: bool,
    ) -> Tuple[Tensor, Tensor]:
        b, n, _ = q.shape
        q = (q * scale).contiguous()
        k, v = k.contiguous(), v.contiguous()
        kt = k.transpose(1, 2)  # (B, C_q, L)
        out = v.new_empty(b, n, v.shape[-1])
        mean = q.new_zeros(b, k.shape[1] if column_mean else 0)  # (B, L) or empty
        kept = []
        for i in range(0, n, chunk):
            probs = torch.softmax(torch.bmm(q[:, i : i + chunk], kt), dim=-1)  # (B, m, L)
            torch.bmm(probs, v, out=out[:, i : i + chunk])
            if column_mean:
                mean.add_(probs.sum(dim=1))
            if keep_probs:
                kept.append(probs)
            del probs
        if column_mean:
            mean.div_(n)
        else:
            ctx.mark_non_differentiable(mean)
        ctx.save_for_backward(q, k, v, out, *kept)
        ctx.scale, ctx.chunk, ctx.column_mean = scale, chunk, column_mean
        return out, mean

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_mean: Tensor) -> Tuple[Optional[Tensor], ...]:
        q, k, v, out, *kept = ctx.saved_tensors  # q already scaled; kept: chunks' probs
        scale, chunk = ctx.scale, ctx.chunk
        n = q.shape[1]
        grad_out = grad_out.contiguous()
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        # dP = dO v^T (+ the column mean's gradient / n on every row); the softmax backward
        # subtracts the row sums of dP * P: rowsum(dO * O) (+ P g / n).
        delta = (grad_out * out).sum(-1, keepdim=True)  # (B, N, 1)
        grad_col = grad_mean.div(n).unsqueeze(1) if ctx.column_mean else None  # (B, 1, L)
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        for index, i in enumerate(range(0, n, chunk)):
            sl = slice(i, i + chunk)
            if kept:
                probs = kept[index]
            else:
                probs = torch.softmax(torch.bmm(q[:, sl], kt), dim=-1)  # (B, m, L)
            grad_v.baddbmm_(probs.transpose(1, 2), grad_out[:, sl])
            grad_scores = torch.bmm(grad_out[:, sl], vt)  # dP, (B, m, L)
            row = delta[:, sl]
            if grad_col is not None:
                grad_scores.add_(grad_col)
                row = row + torch.bmm(probs, grad_col.transpose(1, 2))
            grad_scores.sub_(row).mul_(probs)  # dS = P * (dP - rowsum(dP * P))
            del probs
            torch.bmm(grad_scores, k, out=grad_q[:, sl])
            grad_k.baddbmm_(grad_scores.transpose(1, 2), q[:, sl])
            del grad_scores
        grad_q.mul_(scale)
        return grad_q, grad_k, grad_v, None, None, None, None


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    chunk_elements: int = _CHUNK_ELEMENTS,
    saved_probs_elements: int = _SAVED_PROBS_ELEMENTS,
) -> Tensor:
    """
    Exact one-head attention, for any value width, without an N x L buffer once the
    probabilities outgrow ``saved_probs_elements``.

    Args:
        q (Tensor): (B, N, C_q) queries.
        k (Tensor): (B, L, C_q) keys.
        v (Tensor): (B, L, C) values.
        scale (float): factor of q k^T before the softmax.
        chunk_elements (int): size of one (B, queries, L) score buffer; forward and backward
            hold at most three.
        saved_probs_elements (int): when the (B, N, L) probabilities have at most this many
            elements, the forward keeps them for the backward, which then skips recomputing
            them (a third fewer multiply-adds); above, they are recomputed chunk by chunk.

    Returns:
        Tensor: (B, N, C), ``softmax(q k^T * scale) v``. Half-precision inputs are computed in
        float32 (autocast off) and returned in their dtype.
    """
    return chunked_attention_and_column_mean(
        q, k, v, scale, False, chunk_elements, saved_probs_elements
    )[0]


def chunked_attention_and_column_mean(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    column_mean: bool = True,
    chunk_elements: int = _CHUNK_ELEMENTS,
    saved_probs_elements: int = _SAVED_PROBS_ELEMENTS,
) -> Tuple[Tensor, Optional[Tensor]]:
    """
    :func:`chunked_attention`, and with ``column_mean`` the mean over the N queries of the
    attention rows, ``a = mean_i softmax(q_i k^T * scale)`` (B, L): the spatial mean of the
    output of any value is then ``a v``, without computing the output.

    Returns:
        out (Tensor): (B, N, C).
        mean (Tensor or None): (B, L) if ``column_mean``.
    """
    dtype = v.dtype
    chunk = _query_chunk(q.shape[0], k.shape[1], chunk_elements)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    keep = needs_grad and q.shape[0] * q.shape[1] * k.shape[1] <= saved_probs_elements
    if dtype in (torch.float16, torch.bfloat16):
        with torch.autocast(device_type=q.device.type, enabled=False):
            out, mean = _ChunkedAttention.apply(
                q.float(), k.float(), v.float(), scale, chunk, keep, column_mean
            )
        out, mean = out.to(dtype), mean.to(dtype)
    else:
        out, mean = _ChunkedAttention.apply(q, k, v, scale, chunk, keep, column_mean)
    return out, (mean if column_mean else None)


class STCAFusion(nn.Module):
    """
    One-head cross-attention between a teacher and an (aligned) student feature of one level.

    With ``query_source="teacher"`` (paper default) the query comes from the teacher and key and
    value from the student, ``F = V softmax_over_keys(Q^T K / sqrt(C_q))^T``; with
    ``query_source="student"`` the roles swap. No residual and no normalisation.

    The ``N x N`` attention matrix is never materialised. Two implementations compute the same
    attention (``attention``, MODEL.ACAMKD.ATTENTION):

    * ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention`, whose fused (flash)
      CPU and CUDA kernels need one head width for query, key and value. The value is therefore
      split into chunks of the query width (C_q rounded up to a multiple of 8, query and key
      zero-padded to it; the last chunk zero-padded too), run as heads that all share the same Q
      and K (expanded views, no copy), with the scale ``1/sqrt(C_q)``. The result is exactly
      one-head attention, but each head recomputes the same ``Q^T K``: with C = 256 and
      C_q = 128, forward and backward cost ``N^2 x 1792`` multiply-adds per image, against
      ``N^2 x 1280`` for one head with the full value width. Zero-padding Q and K to width C
      instead costs the same, but gives the CPU flash backward, which parallelises over
      batch x heads only, a single work item at batch 1: it then runs in one thread around a
      multithreaded BLAS on small blocks, measured 5-7x slower here. On CUDA the fused kernels
      are far ahead of anything written with separate matrix products, so this is the choice
      there.
    * ``"chunked"``: :func:`chunked_attention`, one head over chunks of queries, each chunk's
      ``(B, m, N)`` scores formed once (kept for the backward while all of them fit in 512 MB,
      recomputed beyond), as large matrix products that the CPU BLAS runs on every core. For
      ASCM, :meth:`project` never forms F (``N^2 x 402`` multiply-adds at C = 256, C_q = 128,
      M = 6). The CPU choice.

    ``"auto"`` (default) picks ``"chunked"`` for CPU tensors and ``"sdpa"`` otherwise. Odd C
    works on both: 19 Cityscapes classes give C_q = 9 (two SDPA heads of width 16).

    Its arguments and inputs are checked by :class:`~acamkd.modeling.acam.ACAMLevel`, which
    builds and calls it (``MODEL.ACAMKD.QUERY_SOURCE``, ``QUERY_CHANNEL_RATIO``, ``ATTENTION``;
    teacher and aligned student of one shape with the teacher's channels).
    """

    def __init__(
        self,
        channels: int,
        query_channel_ratio: float = 0.5,
        query_source: str = "teacher",
        attention: str = "auto",
    ) -> None:
        """
        Args:
            channels (int): C, the channel count of the teacher and the aligned student.
            query_channel_ratio (float): C_q / C; ``C_q = max(1, int(C * ratio))``.
            query_source (str): "teacher" (Q from the teacher, K and V from the student) or
                "student" (Q from the student, K and V from the teacher).
            attention (str): "auto", "chunked" or "sdpa", how the same attention is computed
                (see the class docstring).
        """
        super().__init__()
        self.channels = channels
        self.attention = attention
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
        b, c, h, w = teacher.shape
        out = self._attend(*self._qkv(teacher, student))  # (B, N, C)
        return out.transpose(1, 2).reshape(b, c, h, w)

    def project(
        self, teacher: Tensor, student: Tensor, units: Optional[Tensor], spatial_mean: bool
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """
        What a linear reader of F needs, in float32, without forming F: ``units`` applied to
        F's C-vector at every position, and F's spatial mean. F = V A^T makes
        ``units F = (units V) A^T``, an attention whose value has M columns instead of C, and
        ``mean_hw F = V mean_i A_i`` (:func:`chunked_attention_and_column_mean`), the same
        values in a fraction of the multiply-adds (M + C_q against C + C_q per key and query).
        Always the chunked attention: :class:`~acamkd.modeling.acam.ACAMLevel` calls it where
        ``attention_impl`` is "chunked" and forms F with the fused kernels elsewhere.

        Args:
            teacher, student (Tensor): as in :meth:`forward`.
            units (Tensor or None): (M, C).
            spatial_mean (bool): also return F's spatial mean.

        Returns:
            projected (Tensor or None): (B, M, H, W), ``einsum("mc,bchw->bmhw", units, F)``.
            mean (Tensor or None): (B, C), F averaged over H and W.
        """
        b, _, h, w = teacher.shape
        q, k, v = self._qkv(teacher, student)  # under the caller's autocast, if any
        with torch.autocast(device_type=teacher.device.type, enabled=False):
            dtype = torch.promote_types(v.dtype, torch.float32)  # half -> float32
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            value = v[..., :0] if units is None else v @ units.to(dtype).t()  # (B, N, M)
            out, mean = chunked_attention_and_column_mean(q, k, value, self.scale, spatial_mean)
            projected = pooled = None
            if units is not None:
                projected = out.transpose(1, 2).reshape(b, -1, h, w).float()
            if spatial_mean:
                pooled = torch.einsum("bn,bnc->bc", mean, v).float()
            return projected, pooled

    def _qkv(self, teacher: Tensor, student: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(B, N, C_q) queries, (B, N, C_q) keys and (B, N, C) values; the teacher detached."""
        teacher = teacher.detach()
        if self.query_source == "teacher":
            query_src, kv_src = teacher, student
        else:
            query_src, kv_src = student, teacher
        q = _to_sequence(self.query_proj(query_src))
        k = _to_sequence(self.key_proj(kv_src))
        v = _to_sequence(self.value_proj(kv_src))
        return q, k, v

    def attention_impl(self, device: torch.device) -> str:
        """The implementation used for tensors on ``device``: "chunked" or "sdpa"."""
        if self.attention == "auto":
            return "chunked" if device.type == "cpu" else "sdpa"
        return self.attention

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """
        Args:
            q (Tensor): (B, N, C_q) queries.
            k (Tensor): (B, N, C_q) keys.
            v (Tensor): (B, N, C) values.

        Returns:
            Tensor: (B, N, C), ``softmax(q k^T / sqrt(C_q)) v`` without an N x N buffer.
        """
        if self.attention_impl(v.device) == "chunked":
            return chunked_attention(q, k, v, self.scale)
        return self._attend_sdpa(q, k, v)

    def _attend_sdpa(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """:meth:`_attend` through the fused SDPA kernels, the value split into C_q-wide heads."""
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
