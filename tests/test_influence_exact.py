"""EK-FAC fit and exact scores against brute force on a tiny Llama.

The brute force shares nothing with curator's hooks or einsums: one window at
a time, no padding, per-token activations from the test's own hooks, sequence
gradients from autograd's parameter gradients, and the inverse Hessian as an
explicit matrix built from the factors with Kronecker products.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import run_ingest, write_jsonl
from tinylm import TRAINING_TEXT, loaded_tiny

from curator.catalog.database import Catalog
from curator.influence.factors import get_factors, load_layer_factors, load_tensors
from curator.influence.fit import FitConfig, fit
from curator.influence.ekfac import (
    LayerFactors,
    LowRank,
    dense,
    eigen_frame_gradients,
    from_eigen_frame,
    low_rank,
    low_rank_from_eigen_frame,
    precondition,
    preconditioned_eigen_frame,
    rotate,
    scores_from_tokens,
    scores_low_rank_from_gradients,
    scoring_path,
    sequence_gradients,
    subspace_iteration,
    top_eigenvectors,
    truncated_svd,
)
from curator.catalog.queries import Query, store_queries
from curator.influence.score import ScoreConfig, score
from curator.influence.scoring import bytes_per_query, for_documents, layer_scores, multiply_out_within
from curator.catalog.database import create_workspace
from curator.catalog.records import score_files

MAX_LEN = 12
DOCS = [TRAINING_TEXT[0], TRAINING_TEXT[1] * 2, "x = 1", TRAINING_TEXT[2], "ab",
        TRAINING_TEXT[3] + TRAINING_TEXT[5], TRAINING_TEXT[4]]
QUERIES = [
    Query(id="q-add", task="arithmetic", prompt="Calculate the answer: (5 + 3) * 2", completion="8 * 2 = 16."),
    Query(id="q-slope", task="slope", prompt="The slope of the line through (1, 2) and (3, 6)",
          completion="is (6 - 2) / (3 - 1) = 2."),
    Query(id="q-fact", task="factual", prompt="The capital of France is", completion="Paris."),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    ws, _ = create_workspace(root / "ws")
    write_jsonl(root / "docs.jsonl", [{"text": t} for t in DOCS])
    run_ingest(ws, [root / "docs.jsonl"])
    lm = loaded_tiny(bias=True)
    # A small token budget: several padded batches of unequal windows.
    record = fit(ws, FitConfig(model="tiny", fisher="empirical", max_seq_len=MAX_LEN, batch_tokens=40),
                 loaded=lm).record
    with Catalog.open(ws, write=True) as catalog:
        store_queries(catalog, QUERIES)
    result = score(ws, ScoreConfig(batch_tokens=40, chunk_docs=3), loaded=lm)
    layers, _ = load_tensors(ws.root / record.path)
    return ws, lm, record, layers, result


# -- brute force ---------------------------------------------------------------------

def windows_of(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    return [ids[s:s + MAX_LEN] for s in range(0, max(len(ids) - 1, 0), MAX_LEN - 1)]


def brute_pass(lm, modules, ids, first_target=1):
    """One unpadded sequence: per-token a and δ of each module, and its parameter gradients."""
    model = lm.model
    inputs, outputs = {}, {}
    handles = []
    for name in modules:
        module = model.get_submodule(name)

        def hook(mod, args, out, name=name):
            inputs[name] = args[0].detach()[0]
            out.retain_grad()
            outputs[name] = out
        handles.append(module.register_forward_hook(hook))
        module.weight.requires_grad_(True)
        module.bias.requires_grad_(True)
    try:
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1]
        loss = F.cross_entropy(logits[first_target - 1:], x[0, first_target:], reduction="sum")
        model.zero_grad(set_to_none=True)
        loss.backward()
        result = {}
        for name in modules:
            module = model.get_submodule(name)
            a = torch.cat([inputs[name], torch.ones(len(ids), 1)], dim=1).double()
            delta = outputs[name].grad[0].double()
            grad = torch.cat([module.weight.grad, module.bias.grad[:, None]], dim=1).double()
            result[name] = (a, delta, grad)
        return result, float(loss.detach())
    finally:
        for handle in handles:
            handle.remove()
        for name in modules:
            model.get_submodule(name).requires_grad_(False)


def explicit_inverse_hessian(t):
    """(H + λI)⁻¹ as a matrix acting on vec(G) (column-major), from the stored factors."""
    q_a, q_s = t["a_eigvecs"].double(), t["s_eigvecs"].double()
    basis = torch.kron(q_a, q_s)                      # vec(Q_S X Q_Aᵀ) = (Q_A ⊗ Q_S) vec(X)
    eig = (t["corrected"].double() + t["damping"].double()).T.reshape(-1)   # column-major vec
    hessian = basis @ torch.diag(eig) @ basis.T
    return torch.linalg.inv(hessian)


def vec(m):
    return m.T.reshape(-1)


@pytest.fixture(scope="module")
def brute(setup):
    ws, lm, record, _, _ = setup
    sequences = []
    for doc_id, text in enumerate(DOCS, start=1):
        for ids in windows_of(lm.tokenizer, text):
            sequences.append((doc_id, brute_pass(lm, record.modules, ids)[0]))
    return sequences


# -- tests ---------------------------------------------------------------------------

def test_covariances_and_eigenbases_equal_brute_force(setup, brute):
    _, _, record, layers, _ = setup
    for name in record.modules:
        a_cov = sum(a.T @ a for _, seq in brute for a in [seq[name][0]])
        s_cov = sum(d.T @ d for _, seq in brute for d in [seq[name][1]])
        tokens = sum(seq[name][0].shape[0] for _, seq in brute)
        t = layers[name]
        torch.testing.assert_close(t["a_cov"], a_cov / tokens, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t["s_cov"], s_cov / tokens, rtol=1e-4, atol=1e-7)
        for cov, vals, vecs in ((a_cov / tokens, t["a_eigvals"], t["a_eigvecs"]),
                                (s_cov / tokens, t["s_eigvals"], t["s_eigvecs"])):
            assert vecs.dtype == torch.float64
            torch.testing.assert_close(vals, torch.linalg.eigvalsh(cov), rtol=1e-4, atol=1e-8)
            torch.testing.assert_close(cov @ vecs, vecs * vals, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(vecs.T @ vecs, torch.eye(len(vals), dtype=torch.float64), atol=1e-8, rtol=0)


def test_corrected_eigenvalues_and_damping_equal_brute_force(setup, brute):
    _, _, record, layers, _ = setup
    assert record.stats["sequences"] == len(brute)
    for name in record.modules:
        t = layers[name]
        q_a, q_s = t["a_eigvecs"], t["s_eigvecs"]
        expected = sum((q_s.T @ seq[name][2] @ q_a) ** 2 for _, seq in brute) / len(brute)
        torch.testing.assert_close(t["corrected"], expected, rtol=1e-4, atol=1e-7)
        assert float(t["damping"]) == pytest.approx(0.1 * float(expected.mean()), rel=1e-4)


def test_sequence_gradient_equals_autograd(setup, brute):
    _, _, record, _, _ = setup
    for _, seq in brute[:4]:
        for name in record.modules:
            a, delta, grad = seq[name]
            torch.testing.assert_close(sequence_gradients(a[None], delta[None])[0].double(), grad,
                                       rtol=1e-4, atol=1e-6)


def test_preconditioner_equals_explicit_inverse_hessian(setup, brute):
    _, _, record, layers, _ = setup
    from curator.influence.factors import layer_factors

    for name in record.modules[:3]:
        t = layers[name]
        grad = brute[0][1][name][2]
        got = precondition(grad, layer_factors(t))
        expected = explicit_inverse_hessian(t) @ vec(grad)
        torch.testing.assert_close(vec(got), expected, rtol=1e-6, atol=1e-9)


def test_scores_equal_explicit_formula(setup, brute):
    ws, lm, record, layers, result = setup
    inverses = {name: explicit_inverse_hessian(layers[name]) for name in record.modules}
    expected = {}
    for query in QUERIES:
        prompt_ids = lm.tokenizer(query.prompt + "\n")["input_ids"]
        ids = prompt_ids + lm.tokenizer(query.completion, add_special_tokens=False)["input_ids"]
        grads, loss = brute_pass(lm, record.modules, ids, first_target=len(prompt_ids))
        assert result.stats["query_losses"][query.id] == pytest.approx(loss, rel=1e-5)
        preconditioned = {name: inverses[name] @ vec(grads[name][2]) for name in record.modules}
        for doc_id in range(1, len(DOCS) + 1):
            total = 0.0
            for owner, seq in brute:
                if owner == doc_id:
                    total += sum(float(preconditioned[n] @ vec(seq[n][2])) for n in record.modules)
            expected[(query.id, doc_id)] = (total, total / loss)
    table = pl.read_parquet(score_files(result.out_path))
    assert table.height == len(QUERIES) * len(DOCS)
    assert table.select(["query_id", "doc_id"]).is_duplicated().sum() == 0
    got = {(r["query_id"], r["doc_id"]): (r["score"], r["score_per_nat"]) for r in table.to_dicts()}
    keys = sorted(expected)
    want = np.array([expected[k][0] for k in keys])
    have = np.array([got[k][0] for k in keys])
    scale = np.abs(want).max()
    np.testing.assert_allclose(have, want, rtol=1e-3, atol=1e-4 * scale)
    np.testing.assert_allclose([got[k][1] for k in keys], [expected[k][1] for k in keys], rtol=1e-3,
                               atol=1e-4 * scale / min(result.stats["query_losses"].values()))
    # The document "ab" is one window of two tokens; a document of one token would score 0.
    assert any(abs(v) > 0 for v in have)


def test_full_rank_queries_give_the_same_scores(setup):
    ws, lm, record, _, result = setup
    full = score(ws, ScoreConfig(batch_tokens=40, query_rank=64, factors=record.id), loaded=lm)
    assert full.run_id != result.run_id
    a = pl.read_parquet(score_files(result.out_path)).sort(["query_id", "doc_id"])
    b = pl.read_parquet(score_files(full.out_path)).sort(["query_id", "doc_id"])
    scale = float(a["score"].abs().max())
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=1e-3, atol=1e-4 * scale)


def test_low_rank_token_path_equals_gradient_path():
    torch.manual_seed(0)
    a, delta = torch.randn(3, 7, 5), torch.randn(3, 7, 4)
    p = torch.randn(6, 4, 5)
    exact = sequence_gradients(a, delta).reshape(3, -1) @ p.reshape(6, -1).T
    full = low_rank(p, 4)
    torch.testing.assert_close(dense(full), p, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores_from_tokens(a, delta, full), exact, rtol=1e-4, atol=1e-4)
    truncated = low_rank(p, 1)
    assert isinstance(truncated, LowRank) and truncated.rank == 1
    assert not torch.allclose(scores_from_tokens(a, delta, truncated), exact, atol=1e-3)
    # Every route of layer_scores gives the same scores for the same rank-1 queries.
    want = sequence_gradients(a, delta).reshape(3, -1) @ dense(truncated).reshape(6, -1).T
    routes = {"tokens": scores_from_tokens(a, delta, truncated),
              "factors": scores_low_rank_from_gradients(sequence_gradients(a, delta), truncated),
              "dense": layer_scores(a, delta, LowRank(truncated.u, truncated.v, dense(truncated)))}
    for route, got in routes.items():
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=route)


def test_scoring_takes_the_cheapest_route():
    # SmolLM2's MLP up-projection, 100 queries at rank 32.
    d_out, d_in, queries, rank = 1536, 576, 100, 32
    # Long windows: multiplying P out wins; without it, per-token projections do.
    # (Building G and contracting it with every rank-1 factor is never the cheaper way here.)
    assert scoring_path(16, 128, d_out, d_in, queries, rank, dense_available=True) == "dense"
    assert scoring_path(16, 128, d_out, d_in, queries, rank, dense_available=False) == "tokens"
    # A handful of short windows and one query: per-token projections win even when P is held.
    assert scoring_path(4, 8, d_out, d_in, 1, rank, dense_available=True) == "tokens"
    # Windows far longer than Q·r · (d_in + d_out) / (d_in · d_out) tokens: the factors route wins.
    assert scoring_path(1, 10_000, 64, 64, 1, 1, dense_available=False) == "tokens"
    assert scoring_path(1, 10_000, 8, 8, 4, 4, dense_available=False) == "factors"


def test_queries_are_multiplied_out_only_within_the_memory_budget():
    u, v = torch.randn(10, 30, 4), torch.randn(10, 20, 4)
    prepared = {"small": LowRank(u, v), "big": LowRank(torch.randn(10, 60, 4), torch.randn(10, 20, 4))}
    low_rank_bytes = 4 * sum(p.u.numel() + p.v.numel() for p in prepared.values())
    out = multiply_out_within(prepared, low_rank_bytes + 4 * 10 * 30 * 20, window_tokens=128)
    assert out["small"].full is not None and out["big"].full is None    # only one fits
    torch.testing.assert_close(out["small"].full, u @ v.transpose(-1, -2))
    everything = multiply_out_within(prepared, 2**30, window_tokens=128)
    assert all(p.full is not None for p in everything.values())
    assert all(p.full is None for p in multiply_out_within(prepared, 2**30, window_tokens=1).values())
    # Held in bfloat16 (next to a bfloat16 model), both fit where float32 fits one.
    both = low_rank_bytes + 2 * 10 * (30 + 60) * 20
    assert [p.full is not None for p in multiply_out_within(prepared, both, 128).values()].count(True) == 1
    halves = multiply_out_within(prepared, both, 128, dtype=torch.bfloat16)
    assert all(p.full is not None and p.full.dtype == torch.bfloat16 for p in halves.values())


def test_bfloat16_document_arithmetic_stays_close_to_float32():
    """Next to a bfloat16 model, G and ⟨P, G⟩ run in bfloat16 with float32 accumulation."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4, 50, 64, generator=generator).bfloat16()
    delta = torch.randn(4, 50, 96, generator=generator).bfloat16()
    p = LowRank(torch.randn(32, 96, 4, generator=generator), torch.randn(32, 64, 4, generator=generator))
    p = LowRank(p.u, p.v, dense(p))
    exact = sequence_gradients(a.double(), delta.double(), torch.float64).reshape(4, -1) @ \
        dense(p).double().reshape(32, -1).T
    halves = for_documents({"layer": p}, torch.bfloat16)["layer"]
    assert scoring_path(4, 50, 96, 64, 32, 4, dense_available=True) == "dense"
    assert halves.full.dtype == torch.bfloat16 and halves.u.dtype == torch.float32
    got = layer_scores(a, delta, halves)
    assert got.dtype == torch.float32
    error = float((got.double() - exact).abs().max() / exact.abs().max())
    # Rounded at bfloat16's 8 bits (float32 would be ~1e-7 here, so the bfloat16 route ran), and no worse.
    assert 1e-4 < error < 1e-2, error
    torch.testing.assert_close(layer_scores(a, delta, for_documents({"layer": p}, torch.float32)["layer"]).double(),
                               exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))


def random_factors(d_out: int, d_in: int, seed: int = 0) -> LayerFactors:
    generator = torch.Generator().manual_seed(seed)
    q_s = torch.linalg.qr(torch.randn(d_out, d_out, generator=generator, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator, dtype=torch.float64))[0]
    corrected = torch.rand(d_out, d_in, generator=generator, dtype=torch.float64) ** 4   # a wide spread of Λ
    return LayerFactors(q_a, q_s, corrected, 0.01).to("cpu")     # float32, as scoring uses them


@pytest.mark.parametrize("tokens", [3, 40])   # 3: rotate the tokens; 40: rotate G (cheaper for long sequences)
def test_eigen_frame_routes_equal_rotating_the_gradient(tokens):
    factors = random_factors(6, 5)
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(2, tokens, 5, generator=generator, dtype=torch.float64)
    delta = torch.randn(2, tokens, 6, generator=generator, dtype=torch.float64)
    g = sequence_gradients(a, delta)
    torch.testing.assert_close(eigen_frame_gradients(a, delta, factors), rotate(g, factors.q_s, factors.q_a),
                               rtol=1e-4, atol=1e-4)
    m = preconditioned_eigen_frame(a, delta, factors)
    want = precondition(g, factors)
    torch.testing.assert_close(from_eigen_frame(m, factors), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("shape", [(9, 4), (4, 9)])
def test_truncated_svd_matches_a_full_svd(shape):
    generator = torch.Generator().manual_seed(2)
    spectrum = torch.tensor([10.0, 5.0, 2.0, 1.0], dtype=torch.float64)          # distinct: the vectors are unique up to sign
    left = torch.linalg.qr(torch.randn(shape[0], 4, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(shape[1], 4, generator=generator, dtype=torch.float64))[0]
    m = torch.stack([left @ torch.diag(spectrum) @ right.T, left @ torch.diag(spectrum ** 3) @ right.T])
    for rank in (1, 3, 4, 20):
        u, v = truncated_svd(m, rank)
        k = min(rank, *shape)
        assert u.shape == (2, shape[0], k) and v.shape == (2, shape[1], k)
        torch.testing.assert_close(v.transpose(-1, -2) @ v, torch.eye(k).expand(2, k, k), atol=1e-5, rtol=0)
        full = torch.linalg.svd(m, full_matrices=False)
        best = (full.U[..., :k] * full.S[..., None, :k]) @ full.Vh[..., :k, :]
        torch.testing.assert_close((u @ v.transpose(-1, -2)).double(), best, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(u.norm(dim=-2).double(), full.S[..., :k], rtol=1e-5, atol=1e-5)


def gram_stack(spectra: list[torch.Tensor], n: int, seed: int) -> torch.Tensor:
    """Symmetric PSD float32 matrices with the given leading eigenvalues (the rest zero) and random
    eigenvectors: (len(spectra), n, n)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for spectrum in spectra:
        basis = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0][:, :len(spectrum)]
        out.append((basis * spectrum) @ basis.T)
    return torch.stack(out).float()


def projector_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over the stack of ‖AAᵀ − BBᵀ‖₂ for orthonormal column blocks: 0 when they span the same space."""
    difference = a.double() @ a.double().transpose(-1, -2) - b.double() @ b.double().transpose(-1, -2)
    return float(torch.linalg.matrix_norm(difference, ord=2).max())


def test_subspace_iteration_finds_the_leading_eigenvectors_of_a_decaying_spectrum():
    # Spectra falling off like preconditioned queries' (σ₆₅/σ₃₂ ≈ 0.5 on SmolLM2); one matrix is all zero.
    steps = torch.arange(40, dtype=torch.float64)
    gram = gram_stack([0.7 ** steps, 5 * 0.5 ** steps, torch.zeros(40, dtype=torch.float64)], 96, seed=5)
    vectors, converged = subspace_iteration(gram, 6)
    assert converged.tolist() == [True, True, True]
    exact = torch.linalg.eigh(gram.double())[1].flip(-1)[..., :6]
    assert projector_distance(vectors[:2], exact[:2]) < 1e-4
    # Largest first, each column a unit eigenvector with its own eigenvalue.
    values = torch.linalg.eigh(gram.double())[0].flip(-1)[:2, :6]
    rayleigh = torch.einsum("snk,snm,smk->sk", vectors[:2].double(), gram[:2].double(), vectors[:2].double())
    torch.testing.assert_close(rayleigh, values, rtol=1e-4, atol=1e-6)
    # The start block is fixed: the same stack gives the same vectors.
    assert torch.equal(subspace_iteration(gram, 6)[0], vectors)


def test_top_eigenvectors_falls_back_to_eigh_where_the_iteration_stalls():
    # A nearly flat spectrum: each step gains a factor ≈ 0.99, far too slow to converge.
    flat = 1 - 1e-3 * torch.arange(60, dtype=torch.float64)
    fast = 0.5 ** torch.arange(60, dtype=torch.float64)
    gram = gram_stack([flat, fast], 64, seed=6)
    assert subspace_iteration(gram, 4)[1].tolist() == [False, True]
    got = top_eigenvectors(gram, 4)
    exact = torch.linalg.eigh(gram)[1].flip(-1)[..., :4]
    assert torch.equal(got[0], exact[0])                        # the stalled matrix: eigh's own answer
    assert projector_distance(got[1:], exact[1:]) < 1e-4
    # Leading batch dimensions are kept; a block not small next to n goes straight to eigh.
    assert top_eigenvectors(gram.reshape(1, 2, 64, 64), 4).shape == (1, 2, 64, 4)
    assert torch.equal(top_eigenvectors(gram, 9), torch.linalg.eigh(gram)[1].flip(-1)[..., :9])


def test_truncated_svd_by_subspace_iteration_is_the_best_low_rank_fit():
    generator = torch.Generator().manual_seed(7)
    spectrum = 0.6 ** torch.arange(48, dtype=torch.float64)
    left = torch.linalg.qr(torch.randn(2, 80, 48, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(2, 72, 48, generator=generator, dtype=torch.float64))[0]
    m = (left * spectrum) @ right.transpose(-1, -2)
    for shape_m in (m, m.transpose(-1, -2)):                   # tall and wide
        u, v = truncated_svd(shape_m.float(), 5)                # 8 × 5 ≤ 72: the iterative route
        full = torch.linalg.svd(shape_m, full_matrices=False)
        best = (full.U[..., :5] * full.S[..., None, :5]) @ full.Vh[..., :5, :]
        torch.testing.assert_close((u @ v.transpose(-1, -2)).double(), best, rtol=0, atol=1e-5)
        torch.testing.assert_close(u.norm(dim=-2).double(), full.S[..., :5], rtol=1e-5, atol=1e-6)


def test_low_rank_from_eigen_frame_equals_truncating_the_dense_query():
    factors = random_factors(12, 7, seed=3)
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64)
    delta = torch.randn(3, 5, 12, generator=generator, dtype=torch.float64)
    m = preconditioned_eigen_frame(a, delta, factors)
    p = from_eigen_frame(m, factors)
    scale = float(p.abs().max())
    for rank in (2, 5, 7):
        got = low_rank_from_eigen_frame(m, factors, rank)
        want = low_rank(p, rank)
        torch.testing.assert_close(dense(got).double(), dense(want).double(), rtol=1e-4, atol=1e-5 * scale)
    # P has rank ≤ 5 tokens before preconditioning but not after: the cut must lose something.
    assert not torch.allclose(dense(low_rank_from_eigen_frame(m, factors, 2)), p, atol=1e-2 * scale)


def test_sampled_fisher_differs_from_empirical_but_shares_A(setup, tmp_path):
    ws, lm, record, layers, _ = setup
    sampled = fit(ws, FitConfig(model="tiny", fisher="sampled", max_seq_len=MAX_LEN, batch_tokens=40),
                  loaded=lm).record
    assert sampled.id != record.id
    other, _ = load_tensors(ws.root / sampled.path)
    name = record.modules[-1]
    torch.testing.assert_close(other[name]["a_cov"], layers[name]["a_cov"])
    assert not torch.allclose(other[name]["s_cov"], layers[name]["s_cov"], rtol=1e-2)
    # Fitting again with the same settings reuses the stored factors.
    again = fit(ws, FitConfig(model="tiny", fisher="sampled", max_seq_len=MAX_LEN, batch_tokens=40), loaded=lm)
    assert again.reused and again.record.id == sampled.id
    with Catalog.open(ws) as catalog:
        assert get_factors(catalog, sampled.id[:8]).id == sampled.id
    assert not list(Path(ws.root / "factors").glob("*.part"))


def test_factors_with_another_tokenizer_are_refused(setup):
    ws, lm, _, _, _ = setup
    from tinylm import tiny_llama, tiny_tokenizer

    from curator.errors import CuratorError
    from curator.model.loading import wrap_model

    same_weights = wrap_model(tiny_llama(bias=True), tiny_tokenizer(vocab_size=300), name="retokenized")
    assert same_weights.info.id == lm.info.id
    with pytest.raises(CuratorError, match="fitted with another tokenizer"):
        score(ws, ScoreConfig(), loaded=same_weights)


class StopAfter:
    """A progress sink that interrupts the run after `chunks` finished chunks."""

    def __init__(self, chunks=None):
        self.chunks, self.finished = chunks, 0

    def stage(self, description, total_docs):
        pass

    def advance(self, docs, tokens):
        if docs:
            self.finished += 1
            if self.chunks is not None and self.finished >= self.chunks:
                raise KeyboardInterrupt


class TokenCount(StopAfter):
    def __init__(self, chunks=None):
        super().__init__(chunks)
        self.tokens = 0

    def advance(self, docs, tokens):
        self.tokens += tokens
        super().advance(docs, tokens)


def test_a_killed_scoring_run_resumes_from_finished_chunks(setup, tmp_path):
    ws, lm, record, _, result = setup
    out = tmp_path / "resumed.parquet"
    # Name the fit: another test adds a later one, and the default is the latest.
    config = ScoreConfig(batch_tokens=40, chunk_docs=2, factors=record.id)
    with pytest.raises(KeyboardInterrupt):
        score(ws, config, out=out, loaded=lm, progress=StopAfter(chunks=2))
    # Readers see nothing of an unfinished run: its parts wait in pending/.
    assert not list(out.glob("*.parquet")) and len(list((out / "pending").glob("*.parquet"))) == 2
    counter = TokenCount()
    resumed = score(ws, config, out=out, loaded=lm, progress=counter)
    chunks = -(-result.stats["documents"] // 2)
    assert counter.finished == chunks
    assert not (out / "pending").exists() and len(list(out.glob("*.parquet"))) == chunks
    a = pl.read_parquet(score_files(result.out_path)).sort(["query_id", "doc_id"])
    b = pl.read_parquet(score_files(resumed.out_path)).sort(["query_id", "doc_id"])
    assert a.select(["query_id", "doc_id"]).equals(b.select(["query_id", "doc_id"]))
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=1e-4,
                               atol=1e-5 * float(a["score"].abs().max()))


def _one_query_mb(ws, record) -> float:
    shapes = [tuple(f.corrected.shape) for f in load_layer_factors(ws, record).values()]
    return bytes_per_query(shapes, None) / 2**20


def test_a_run_resumed_with_other_batching_settings_equals_an_uninterrupted_one(setup, tmp_path):
    """Query memory and chunk size do not change the scores, so a run killed under one setting and
    resumed under another must give the uninterrupted run's scores, never mix chunks of two plans.
    The resumed run keeps the batching it began with while that fits the query memory, so its
    finished parts are used; with less memory it batches anew."""
    ws, lm, record, _, result = setup
    out = tmp_path / "mixed.parquet"
    one_query = _one_query_mb(ws, record)
    per_query_batches = ScoreConfig(batch_tokens=40, chunk_docs=2, factors=record.id, query_rank="dense",
                                    query_memory_mb=1.5 * one_query)
    with pytest.raises(KeyboardInterrupt):
        score(ws, per_query_batches, out=out, loaded=lm, progress=StopAfter(chunks=5))
    assert len(list((out / "pending").glob("*.parquet"))) >= 2
    one_batch = per_query_batches.model_copy(update={"query_memory_mb": 1000 * one_query, "chunk_docs": 3})
    resumed = score(ws, one_batch, out=out, loaded=lm)
    assert resumed.run_id == result.run_id and resumed.stats["query_batches"] == len(QUERIES)
    a = pl.read_parquet(score_files(result.out_path)).sort(["query_id", "doc_id"])
    b = pl.read_parquet(score_files(resumed.out_path)).sort(["query_id", "doc_id"])
    assert a.select(["query_id", "doc_id"]).equals(b.select(["query_id", "doc_id"]))
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=1e-4,
                               atol=1e-5 * float(a["score"].abs().max()))
    # And the other way round: chunks of one batch are never taken for a run of many batches.
    out2 = tmp_path / "reverse.parquet"
    with pytest.raises(KeyboardInterrupt):
        score(ws, one_batch, out=out2, loaded=lm, progress=StopAfter(chunks=1))
    again = score(ws, per_query_batches, out=out2, loaded=lm)
    assert again.stats["query_batches"] == len(QUERIES)      # one batch of all no longer fits
    c = pl.read_parquet(score_files(again.out_path)).sort(["query_id", "doc_id"])
    np.testing.assert_allclose(c["score"].to_numpy(), a["score"].to_numpy(), rtol=1e-4,
                               atol=1e-5 * float(a["score"].abs().max()))


def test_a_run_resumed_with_another_batch_size_reuses_the_finished_chunks(setup, tmp_path):
    ws, lm, record, _, result = setup
    out = tmp_path / "reused.parquet"
    config = ScoreConfig(batch_tokens=40, chunk_docs=2, factors=record.id, query_rank="dense")
    with pytest.raises(KeyboardInterrupt):
        score(ws, config, out=out, loaded=lm, progress=StopAfter(chunks=2))
    resumed_count, fresh_count = TokenCount(), TokenCount()
    resumed = score(ws, config.model_copy(update={"batch_tokens": 64}), out=out, loaded=lm, progress=resumed_count)
    score(ws, config, out=tmp_path / "fresh.parquet", loaded=lm, progress=fresh_count)
    assert 0 < resumed_count.tokens < fresh_count.tokens      # the two finished chunks were not scored again
    a = pl.read_parquet(score_files(result.out_path)).sort(["query_id", "doc_id"])
    b = pl.read_parquet(score_files(resumed.out_path)).sort(["query_id", "doc_id"])
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=1e-4,
                               atol=1e-5 * float(a["score"].abs().max()))


def test_a_settings_change_that_changes_the_scores_starts_afresh(setup, tmp_path):
    ws, lm, record, _, _ = setup
    out = tmp_path / "ranked.parquet"
    dense = ScoreConfig(batch_tokens=40, chunk_docs=2, factors=record.id, query_rank="dense")
    with pytest.raises(KeyboardInterrupt):
        score(ws, dense, out=out, loaded=lm, progress=StopAfter(chunks=1))
    rank_one = score(ws, dense.model_copy(update={"query_rank": 1}), out=out, loaded=lm)
    fresh = score(ws, dense.model_copy(update={"query_rank": 1}), out=tmp_path / "fresh.parquet", loaded=lm)
    assert rank_one.run_id == fresh.run_id
    np.testing.assert_array_equal(pl.read_parquet(score_files(rank_one.out_path))["score"].to_numpy(),
                                  pl.read_parquet(score_files(fresh.out_path))["score"].to_numpy())
