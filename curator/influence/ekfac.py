"""The influence math: EK-FAC factors, the inverse-Hessian product and scores.

Everything here is a pure function of tensors; hooks, batching and files live
elsewhere. Notation (../shared/DESIGN.md, "The math"): for a tracked linear
``s = W a`` (with a bias, ``a`` gets a trailing 1), token t of a sequence has
input ``a_t`` and output gradient ``δ_t = ∂loss/∂s_t``; the sequence's gradient
is ``G = Σ_t δ_t a_tᵀ`` (``d_out × d_in``). Losses are sums over tokens.

EK-FAC, per layer:
  A = E[a aᵀ], S = E[δ δᵀ] over tokens;  A = Q_A diag(λ_A) Q_Aᵀ, S = Q_S diag(λ_S) Q_Sᵀ
  Λ_ij = E_n[(Q_Sᵀ G_n Q_A)_ij²] over sequences n        (the eigenvalue correction)
  H⁻¹G ≈ Q_S [(Q_Sᵀ G Q_A) ⊘ (Λ + λ)] Q_Aᵀ,  λ = 0.1 × mean(Λ) by default

Influence of document d on query q:  I(q, d) = ⟨H⁻¹ ∇ℓ(q), ∇L(d)⟩ summed over
layers. Positive: training on d makes the query's completion more likely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_DAMPING_FACTOR = 0.1   # × mean(Λ), Grosse et al. (2023)


# -- per-token statistics --------------------------------------------------------

def token_covariance(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_t x_t x_tᵀ over the (masked) tokens of a (B, T, d) batch, in float64."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if mask is not None:
        x = x[mask.reshape(-1).bool()]
    return (x.T @ x).to(torch.float64)


def sequence_gradients(a: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """G_n = Σ_t δ_t a_tᵀ for each sequence of a batch: (B, d_out, d_in).

    The same multiply-adds as the weight gradient of an ordinary backward pass,
    kept per sequence instead of summed over the batch.
    """
    return torch.einsum("bto,bti->boi", delta.to(dtype), a.to(dtype))


# -- factors -------------------------------------------------------------------

@dataclass
class LayerFactors:
    """One layer's eigenbases, corrected eigenvalues and damping."""

    q_a: torch.Tensor         # (d_in, d_in) eigenvectors of A
    q_s: torch.Tensor         # (d_out, d_out) eigenvectors of S
    corrected: torch.Tensor   # (d_out, d_in) Λ
    damping: float            # λ

    def to(self, device, dtype=torch.float32) -> LayerFactors:
        return LayerFactors(self.q_a.to(device, dtype), self.q_s.to(device, dtype),
                            self.corrected.to(device, dtype), self.damping)

    @property
    def denominator(self) -> torch.Tensor:
        return self.corrected + self.damping


def eigenbasis(covariance_sum: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a covariance given as a sum over `count` tokens, in float64."""
    covariance = covariance_sum.to(torch.float64) / max(count, 1)
    covariance = (covariance + covariance.T) / 2    # remove rounding asymmetry before eigh
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    return eigenvalues, eigenvectors


def rotate(g: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """Q_Sᵀ G Q_A, batched over leading dimensions."""
    return q_s.T @ g @ q_a


def damping_value(corrected: torch.Tensor, damping: float | None) -> float:
    """λ: an absolute value, or (None) 0.1 × the layer's mean corrected eigenvalue."""
    if damping is None:
        return float(DEFAULT_DAMPING_FACTOR * corrected.double().mean())
    return float(damping)


def precondition(g: torch.Tensor, factors: LayerFactors) -> torch.Tensor:
    """H⁻¹G ≈ Q_S [(Q_Sᵀ G Q_A) ⊘ (Λ + λ)] Q_Aᵀ, batched over leading dimensions."""
    return from_eigen_frame(rotate(g, factors.q_s, factors.q_a) / factors.denominator, factors)


# Queries are short: a query's gradient Σ_t δ_t a_tᵀ has rank ≤ T, far below the layer's
# width. Rotating its tokens into the eigenbasis costs T·(d_out² + d_in²), against
# d_out·d_in·(d_out + d_in) for rotating G, so the preconditioned query is built in the
# eigen frame, M = (Q_Sᵀ G Q_A) ⊘ (Λ + λ), and rotated back only where a dense P is needed.
# Its truncated SVD is M's with the factors rotated (Q_S, Q_A are orthogonal), and
# subspaces and sketches of P are read from M the same way.

def eigen_frame_gradients(a: torch.Tensor, delta: torch.Tensor, factors: LayerFactors) -> torch.Tensor:
    """Q_Sᵀ G_n Q_A for each sequence of a batch, by whichever route costs fewer multiply-adds: (B, d_out, d_in)."""
    tokens, d_out, d_in = a.shape[1], delta.shape[-1], a.shape[-1]
    if tokens * (d_out * d_out + d_in * d_in) < d_out * d_in * (d_out + d_in):
        return sequence_gradients(a.to(factors.q_a.dtype) @ factors.q_a, delta.to(factors.q_s.dtype) @ factors.q_s)
    return rotate(sequence_gradients(a, delta), factors.q_s, factors.q_a)


def preconditioned_eigen_frame(a: torch.Tensor, delta: torch.Tensor, factors: LayerFactors) -> torch.Tensor:
    """M_n = Q_Sᵀ H⁻¹G_n Q_A = (Q_Sᵀ G_n Q_A) ⊘ (Λ + λ) for each sequence: (B, d_out, d_in)."""
    return eigen_frame_gradients(a, delta, factors).div_(factors.denominator)


def from_eigen_frame(m: torch.Tensor, factors: LayerFactors) -> torch.Tensor:
    """P = Q_S M Q_Aᵀ, batched over leading dimensions."""
    return factors.q_s @ m @ factors.q_a.T


# -- queries -------------------------------------------------------------------

@dataclass
class LowRank:
    """P ≈ Σ_k u_k v_kᵀ per query: u (Q, d_out, r) carries the singular values, v (Q, d_in, r).

    `full`, when set, is the same truncated P multiplied out (Q, d_out, d_in): more memory,
    and the cheaper way to score long windows against many queries (`scoring_path`).
    """

    u: torch.Tensor
    v: torch.Tensor
    full: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.u.shape[-1]


def low_rank(p: torch.Tensor, rank: int) -> LowRank:
    """Truncated SVD of each preconditioned query gradient (Grosse et al.: rank 32 keeps ≈ 0.995)."""
    u, s, vh = torch.linalg.svd(p.to(torch.float32), full_matrices=False)
    rank = min(rank, s.shape[-1])
    return LowRank(u[..., :rank] * s[..., None, :rank], vh[..., :rank, :].transpose(-1, -2))


def low_rank_from_eigen_frame(m: torch.Tensor, factors: LayerFactors, rank: int) -> LowRank:
    """`low_rank` of P = Q_S M Q_Aᵀ without forming P: truncate M, rotate its singular vectors."""
    u, v = truncated_svd(m, rank)
    return LowRank(factors.q_s @ u, factors.q_a @ v)


def truncated_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `rank` singular triplets of each matrix of a stack, as (U·diag(σ), V), float32.

    Read from the leading eigenvectors of the smaller Gram matrix (`top_eigenvectors`), in
    m's precision (float32 at least). Squaring loses the directions whose σ is below
    √ε·σ₁; their part of M is below M's own rounding, and the product stays exact at full
    rank, since V (or U) is then a whole orthonormal basis.
    """
    m = m.to(torch.promote_types(m.dtype, torch.float32))
    rank = min(rank, *m.shape[-2:])
    if m.shape[-2] >= m.shape[-1]:
        v = top_eigenvectors(m.transpose(-1, -2) @ m, rank)
        return (m @ v).float(), v.float()
    u = top_eigenvectors(m @ m.transpose(-1, -2), rank)
    scaled_v = m.transpose(-1, -2) @ u                      # V·diag(σ)
    sigma = scaled_v.norm(dim=-2, keepdim=True)
    return (u * sigma).float(), (scaled_v / sigma.clamp_min(torch.finfo(m.dtype).tiny)).float()


# A query's rank-32 cut needs 32 eigenvectors of a 576 × 576 Gram matrix; a full
# eigendecomposition computes all 576 and was half of a query's cost on the CPU.
# Subspace iteration on a block of 2k vectors finds the leading k in a few
# products: preconditioned queries' spectra fall off (σ₆₅/σ₃₂ ≈ 0.5 on SmolLM2, so
# each step shrinks the error ≈ 4×). A Ritz pair is accepted when its residual is
# within a few ε of the largest eigenvalue, near the Gram matrix's own rounding;
# a matrix not there after `SUBSPACE_STEPS` gets the full eigendecomposition.
# (A residual test cannot see a leading eigenvector the start block misses
# entirely; a Gaussian block misses one with probability zero.)
SUBSPACE_STEPS = 12
RESIDUAL_EPS = 16         # tolerance: this many ε × the largest eigenvalue
_SUBSPACE_SEED = 0


def top_eigenvectors(gram: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading eigenvectors of each symmetric positive semi-definite matrix of a stack,
    largest eigenvalue first: (…, n, k)."""
    n = gram.shape[-1]
    if 8 * k > n:                      # the block (2k) is not small next to n: a full eigh costs as little
        return _leading_by_eigh(gram, k)
    stack = gram.reshape(-1, n, n)
    vectors, converged = subspace_iteration(stack, k)
    if not bool(converged.all()):
        vectors[~converged] = _leading_by_eigh(stack[~converged], k)
    return vectors.reshape(*gram.shape[:-2], n, k)


def _leading_by_eigh(gram: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.eigh(gram)[1].flip(-1)[..., :k]


def subspace_iteration(stack: torch.Tensor, k: int, steps: int = SUBSPACE_STEPS
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading k Ritz vectors of each (n × n) matrix of a stack from a block of 2k, and whether each
    matrix's pairs reached the residual tolerance within `steps` products: ((S, n, k), (S,) bool).

    Deterministic: the start block is drawn on the CPU from a fixed seed. Matrices are
    dropped from the iteration as they converge.
    """
    count, n, _ = stack.shape
    start = torch.randn(n, 2 * k, generator=torch.Generator().manual_seed(_SUBSPACE_SEED), dtype=torch.float64)
    basis = torch.linalg.qr(stack @ start.to(stack.device, stack.dtype))[0]
    vectors = torch.zeros(count, n, k, dtype=stack.dtype, device=stack.device)
    converged = torch.zeros(count, dtype=torch.bool, device=stack.device)
    active, current = torch.arange(count, device=stack.device), stack
    tolerance = RESIDUAL_EPS * torch.finfo(stack.dtype).eps
    for step in range(steps):
        product = current @ basis
        ritz_values, ritz = torch.linalg.eigh(basis.transpose(-1, -2) @ product)
        ritz_values, ritz = ritz_values.flip(-1)[..., :k], ritz.flip(-1)[..., :k]
        found = basis @ ritz
        residual = (product @ ritz - found * ritz_values[..., None, :]).norm(dim=-2)
        done = (residual <= tolerance * ritz_values[..., :1].clamp_min(0)).all(dim=-1)
        vectors[active] = found                   # the latest estimate, kept even if never accepted
        converged[active[done]] = True
        if bool(done.all()) or step == steps - 1:
            break
        active, current = active[~done], current[~done]
        basis = torch.linalg.qr(product[~done])[0]
    return vectors, converged


def dense(p: LowRank) -> torch.Tensor:
    return p.u @ p.v.transpose(-1, -2)


# -- scores --------------------------------------------------------------------

def scores_from_gradients(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """⟨P_q, G_n⟩ for every sequence n and query q: (B, Q)."""
    return g.reshape(g.shape[0], -1) @ p.reshape(p.shape[0], -1).T


def scores_from_tokens(a: torch.Tensor, delta: torch.Tensor, p: LowRank) -> torch.Tensor:
    """⟨Σ_k u_k v_kᵀ, Σ_t δ_t a_tᵀ⟩ = Σ_t Σ_k (δ_tᵀ u_k)(v_kᵀ a_t), without building G: (B, Q)."""
    n_queries, _, rank = p.u.shape
    u = p.u.permute(1, 0, 2).reshape(p.u.shape[1], -1)      # (d_out, Q·r)
    v = p.v.permute(1, 0, 2).reshape(p.v.shape[1], -1)      # (d_in, Q·r)
    left = delta.to(torch.float32) @ u                       # (B, T, Q·r)
    right = a.to(torch.float32) @ v
    return (left * right).sum(dim=1).reshape(-1, n_queries, rank).sum(dim=-1)


def scoring_costs(windows: int, tokens: int, d_out: int, d_in: int, n_queries: int, rank: int
                  ) -> dict[str, int]:
    """Multiply-adds for one layer and a batch of `windows` windows of `tokens` tokens, by each route:

    - "tokens": project every token on the rank-r factors, T·(d_in + d_out)·Q·r per window;
    - "dense": build G per window, then one inner product per query with the multiplied-out P,
      T·d_out·d_in + Q·d_out·d_in per window;
    - "factors": build G, then Σ_k u_kᵀ G v_k, T·d_out·d_in + Q·r·d_out·d_in per window.
    """
    gradient = tokens * d_out * d_in
    return {"tokens": windows * tokens * (d_in + d_out) * n_queries * rank,
            "dense": windows * (gradient + n_queries * d_out * d_in),
            "factors": windows * (gradient + n_queries * rank * d_out * d_in)}


def scoring_path(windows: int, tokens: int, d_out: int, d_in: int, n_queries: int, rank: int,
                 dense_available: bool) -> str:
    """The cheapest route of `scoring_costs` ("dense" only when the multiplied-out P is held)."""
    costs = scoring_costs(windows, tokens, d_out, d_in, n_queries, rank)
    if not dense_available:
        del costs["dense"]
    return min(costs, key=costs.__getitem__)


def scores_low_rank_from_gradients(g: torch.Tensor, p: LowRank) -> torch.Tensor:
    """Σ_k u_kᵀ G v_k for each sequence and query: (B, Q)."""
    gv = torch.einsum("boi,qir->bqor", g, p.v)
    return torch.einsum("bqor,qor->bq", gv, p.u)


# -- sketches: per-layer projections (DESIGN.md, "Sketches") ------------------------------
#
# A layer's sketch of a sequence is Uᵀ G V = Σ_t (Uᵀδ_t)(Vᵀa_t)ᵀ (k × k), streamed per
# token; a query's is Uᵀ P_q V. With orthonormal U, V: ⟨Uᵀ P V, Uᵀ G V⟩ = ⟨P, UUᵀ G VVᵀ⟩,
# which equals ⟨P, G⟩ whenever P lies in span(U) ⊗ span(V), as suite queries do at full rank.

def subspace_bases(m: torch.Tensor, factors: LayerFactors, k_out: int, k_in: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """U (d_out × k_out) and V (d_in × k_in): top singular vectors of the suite's stacked P_q.

    Read from the stacked eigen-frame M_q (Q, d_out, d_in): P_q = Q_S M_q Q_Aᵀ, so the
    singular vectors of P are those of M rotated by Q_S and Q_A.
    """
    u, v = _top_singular_vectors(m, k_out, k_in)
    return (factors.q_s.to(torch.float64) @ u).float(), (factors.q_a.to(torch.float64) @ v).float()


def _top_singular_vectors(m: torch.Tensor, k_out: int, k_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top left singular vectors of [M_1 … M_n] and top right ones of [M_1; …; M_n], in float64.

    From the eigenvectors of Σ M_i M_iᵀ and Σ M_iᵀ M_i: the same vectors as an SVD of the
    stacked matrix at a fraction of its time; only the leading ones are kept.
    """
    m = m.to(torch.float64)
    left = torch.linalg.eigh(torch.einsum("noi,npi->op", m, m))[1].flip(-1)
    right = torch.linalg.eigh(torch.einsum("noi,noj->ij", m, m))[1].flip(-1)
    return left[:, :k_out], right[:, :k_in]


def whitening_scales(factors: LayerFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive d_s (d_out) and d_a (d_in) with d_s d_aᵀ the best rank-1 fit of √(Λ + λ).

    In the eigenbasis, the symmetric split divides every cell of a gradient by
    √(Λ + λ). That is not a left and right scaling, so a sketch cannot apply it
    per token; its rank-1 part can. √(Λ + λ) is positive, so its leading
    singular vectors can be taken positive (Perron-Frobenius).
    """
    root = factors.denominator.to(torch.float64).sqrt()
    u, s, vh = torch.linalg.svd(root, full_matrices=False)
    scale = s[0].sqrt()
    return (u[:, 0].abs() * scale).clamp_min(1e-30), (vh[0].abs() * scale).clamp_min(1e-30)


def whitened_subspace_bases(m: torch.Tensor, factors: LayerFactors, k_out: int, k_in: int
                            ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Query-subspace bases chosen in whitened eigen-coordinates: (U_doc, V_doc), (U_query, V_query).

    `m` holds the suite's eigen-frame queries M_q = Q_Sᵀ P_q Q_A. With D_S, D_A from
    `whitening_scales`, a query is whitened to D_S M_q D_A and a document to
    D_S⁻¹ Q_Sᵀ G Q_A D_A⁻¹; their inner product is ⟨P_q, G⟩ exactly. The subspace
    (Ũ, Ṽ) comes from the stacked whitened queries, where no direction is large merely
    because the curvature is. Documents are sketched with U_doc = Q_S D_S⁻¹ Ũ,
    V_doc = Q_A D_A⁻¹ Ṽ and queries with U_query = Q_S D_S Ũ, V_query = Q_A D_A Ṽ.
    """
    d_s, d_a = whitening_scales(factors)
    u, v = _top_singular_vectors(d_s[:, None] * m.to(torch.float64) * d_a[None, :], k_out, k_in)
    return whitened_frame_bases(u, v, factors)


def whitened_frame_bases(u: torch.Tensor, v: torch.Tensor, factors: LayerFactors
                         ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(U_doc, V_doc), (U_query, V_query) for orthonormal Ũ (d_out × k), Ṽ (d_in × k) of the whitened
    eigen-frame: documents D_S⁻¹ Q_Sᵀ G Q_A D_A⁻¹ and queries D_S Q_Sᵀ P_q Q_A D_A are projected on the
    same Ũ, Ṽ, so the sketches' inner product is ⟨P_q, G⟩ exactly when Ũ, Ṽ are complete."""
    q_s, q_a = factors.q_s.to(torch.float64), factors.q_a.to(torch.float64)
    d_s, d_a = whitening_scales(factors)
    u, v = u.to(torch.float64), v.to(torch.float64)
    documents = (q_s @ (u / d_s[:, None]), q_a @ (v / d_a[:, None]))
    queries = (q_s @ (u * d_s[:, None]), q_a @ (v * d_a[:, None]))
    return (documents[0].float(), documents[1].float()), (queries[0].float(), queries[1].float())


def whitening_maps(factors: LayerFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q_A D_A⁻¹, Q_S D_S⁻¹) in float64: a token's a_t @ the first and δ_t @ the second are its whitened
    eigen-frame parts, and a document's whitened gradient is Σ_t δ'_t a'_tᵀ (the frame
    `whitened_frame_bases` projects). Computed once per layer: the scales take an SVD."""
    d_s, d_a = whitening_scales(factors)
    return factors.q_a.to(torch.float64) / d_a[None, :], factors.q_s.to(torch.float64) / d_s[None, :]


def eigen_bases(factors: LayerFactors, eigvals_s: torch.Tensor, eigvals_a: torch.Tensor,
                k_out: int, k_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top eigenvectors of S and A (a baseline that ignores the queries)."""
    top_s = torch.argsort(eigvals_s, descending=True)[:k_out]
    top_a = torch.argsort(eigvals_a, descending=True)[:k_in]
    return factors.q_s[:, top_s].float(), factors.q_a[:, top_a].float()


def random_bases(d_out: int, d_in: int, k_out: int, k_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormalised Gaussian projections drawn on the CPU, so every device gets the same ones.

    U and V come from separate streams, one vector per call (torch fills larger draws in
    interleaved blocks), so the first k columns do not depend on how many more are drawn:
    the bases are nested."""
    def draw(d: int, k: int, stream: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(2 * seed + stream)
        return torch.stack([torch.randn(d, generator=generator, dtype=torch.float64) for _ in range(k)], dim=1)

    u = torch.linalg.qr(draw(d_out, k_out, 0))[0]
    v = torch.linalg.qr(draw(d_in, k_in, 1))[0]
    return u.float(), v.float()


def sketch_tokens(a: torch.Tensor, delta: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_t (Uᵀδ_t)(Vᵀa_t)ᵀ for each sequence, without forming G: (B, k_out, k_in)."""
    return torch.einsum("btk,btl->bkl", delta.to(torch.float32) @ u, a.to(torch.float32) @ v)


def sketch_matrix(p: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Uᵀ P V for each of a stack of matrices: (Q, k_out, k_in)."""
    return u.T @ p.to(torch.float32) @ v


def sketch_eigen_frame(m: torch.Tensor, factors: LayerFactors, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Uᵀ P V from eigen-frame queries M (P = Q_S M Q_Aᵀ): (Q_Sᵀ U)ᵀ M (Q_Aᵀ V), (Q, k_out, k_in)."""
    return sketch_matrix(m, factors.q_s.T @ u, factors.q_a.T @ v)
