//! TextSpan (Gandelsman, Efros and Steinhardt, ICLR 2024, Algorithm 1) from a head's
//! statistics.
//!
//! The published algorithm, for head outputs X [N, D] and unit text embeddings T [M, D]:
//! project every text onto the span of the top-`rank` right singular vectors of X, centre
//! X, then `n_texts` times choose the text whose projection `X t` has the largest variance
//! over the images and remove that text's direction from X and from every text.
//!
//! Everything it needs is a function of the count, mean μ and covariance C of the outputs:
//! the right singular vectors of X are the eigenvectors of `C + μμᵀ`, and the variance of
//! `X t` for a text `t` in that span is `tᵀ C t`. Working in an orthonormal basis V of the
//! span in which `Vᵀ C V = diag(λ)` is diagonal, with `a_j = Vᵀ t_j` and the chosen unit
//! directions `u_1..u_k`, the score of text j after k steps is `q_jᵀ diag(λ) q_j` with
//! `q_j = a_j − Σ_i (a_j·u_i) u_i`. Choosing `u` changes each score by
//! `−2 c_j d_j + c_j² γ` with `c_j = a_j·u`, `d_j = a_j·w`, `w = Q diag(λ) u` (Q removes
//! the earlier directions) and `γ = uᵀ diag(λ) u`, so a step costs O(M·r) rather than
//! O(N·M·D), and the number of images never enters.
//!
//! Directions of the second moment whose eigenvalue is below a tolerance (`RANK_TOLERANCE`
//! by default) times the largest are treated as absent: they carry no variance, and the
//! published algorithm would fill them with arbitrary singular vectors of rounding noise.
//! Outputs stored in a low precision carry rounding noise of their own far above
//! `RANK_TOLERANCE`; their callers raise the tolerance to that precision's noise level.
//! `SpanParams::exact_rank` keeps `rank` directions whatever their eigenvalues, as the
//! published algorithm does (those beyond the outputs' rank are then rounding noise); the
//! tolerance then only counts the outputs' numerical rank (`Span::numerical_rank`).
//!
//! Statistics whose covariance carries a known error (`HeadMoments::covariance_error`, from
//! float32 products) are used only as far as that error cannot change which directions are
//! kept: `Span::certified` says whether it could, and the caller then recomputes them exactly.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use ndarray::{Array2, ArrayView1, ArrayView2};
use rayon::prelude::*;

use crate::certify;
use crate::error::{Error, Result};
use crate::parallel;
use crate::scalar::Real;

/// Eigenvalues of the second moment below this fraction of the largest count as zero (the
/// default of `SpanParams::rank_tolerance`).
pub const RANK_TOLERANCE: f64 = 1e-10;
/// Texts handled together in the parallel loops over the pool.
pub const TEXT_CHUNK: usize = 1024;
/// A pivoted Cholesky factor is tried first when the second moment's numerical rank is at
/// most this fraction of D; past it, a dense eigendecomposition is cheaper.
const LOW_RANK_FRACTION: usize = 4;
/// The factor stops once what it leaves has a trace below this fraction of the rank
/// tolerance times the largest diagonal entry, so no kept direction is lost.
const CHOLESKY_FRACTION: f64 = 1e-2;

/// Parameters of one TextSpan run.
#[derive(Debug, Clone, Copy)]
pub struct SpanParams {
    pub n_texts: usize,
    pub rank: usize,
    /// Exactly `rank` directions, null-space ones included (the published algorithm).
    pub exact_rank: bool,
}

impl SpanParams {
    /// `n_texts` texts in a span of at most `rank` directions.
    pub fn new(n_texts: usize, rank: usize) -> Self {
        SpanParams {
            n_texts,
            rank,
            exact_rank: false,
        }
    }

    /// The same, in exactly `rank` directions as published.
    pub fn exact(n_texts: usize, rank: usize) -> Self {
        SpanParams {
            exact_rank: true,
            ..SpanParams::new(n_texts, rank)
        }
    }
}

/// Statistics of one head's outputs: count, mean [D] and population covariance [D, D], and
/// the fraction of the second moment's largest eigenvalue below which a direction counts as
/// absent (`RANK_TOLERANCE`, or more for outputs stored in a coarse precision).
#[derive(Debug, Clone, Copy)]
pub struct HeadMoments<'a> {
    pub count: f64,
    pub mean: ArrayView1<'a, f64>,
    pub covariance: ArrayView2<'a, f64>,
    pub rank_tolerance: f64,
    /// A bound on the spectral norm of the covariance's error (0 when it is exact up to
    /// float64 rounding; see `moments::Products::Float32`).
    pub covariance_error: f64,
    /// The float32 outputs [count, D] the statistics were computed from, when the caller has
    /// them: with a covariance error, they certify a head narrower than `rank`
    /// (`certify::tail_bound`) without exact statistics.
    pub outputs: Option<ArrayView2<'a, f32>>,
}

impl<'a> HeadMoments<'a> {
    /// Statistics with the default rank tolerance.
    pub fn new(count: f64, mean: ArrayView1<'a, f64>, covariance: ArrayView2<'a, f64>) -> Self {
        HeadMoments {
            count,
            mean,
            covariance,
            rank_tolerance: RANK_TOLERANCE,
            covariance_error: 0.0,
            outputs: None,
        }
    }
}

/// The result for one head.
#[derive(Debug, Clone)]
pub struct Span {
    /// Indices into the pool, in the order chosen.
    pub indices: Vec<usize>,
    /// The variance of the outputs along each chosen direction, after the earlier ones
    /// were removed (population convention, divided by N).
    pub variance: Vec<f64>,
    /// The trace of the covariance: the total variance of the outputs.
    pub total_variance: f64,
    /// The chosen directions [k, D], orthonormal.
    pub directions: Array2<f64>,
    /// The dimension of the span the texts were projected on (`rank`, or less when the
    /// outputs have fewer non-zero directions).
    pub rank: usize,
    /// How many directions of the second moment are above the rank tolerance (the
    /// outputs' numerical rank, not capped at `rank`).
    pub numerical_rank: usize,
    /// Whether the directions kept are certainly those exact statistics would keep: always
    /// for a covariance without error; for one with an error, when every kept eigenvalue
    /// clears the rank tolerance by more than that error. Otherwise the caller should run
    /// the head again from exact statistics.
    pub certified: bool,
}

/// A text pool: rows scaled to unit norm, held once and shared by every head.
#[derive(Debug, Clone)]
pub struct TextPool<T> {
    rows: Vec<T>,
    m: usize,
    d: usize,
}

impl<T: Real> TextPool<T> {
    /// Takes row-major embeddings [M, D]. Rows are scaled to unit norm; a row of zero norm
    /// stays zero and is never chosen.
    pub fn from_rows(rows: Vec<T>, m: usize, d: usize) -> Result<Self> {
        if rows.len() != m * d {
            return Err(Error::shape(
                "text embeddings",
                format!("{} values", m * d),
                format!("{}", rows.len()),
            ));
        }
        Self::from_view(ArrayView2::from_shape((m, d), &rows).expect("checked length"))
    }

    /// Copies and scales the rows in one parallel pass (a large pool is read once).
    pub fn from_view(view: ArrayView2<T>) -> Result<Self> {
        let (m, d) = view.dim();
        if m == 0 || d == 0 {
            return Err(Error::shape(
                "text embeddings",
                "[M >= 1, D >= 1]",
                format!("[{m}, {d}]"),
            ));
        }
        let mut rows = vec![T::from_f64(0.0); m * d];
        parallel::install(|| {
            rows.par_chunks_mut(d).enumerate().try_for_each(|(i, dst)| {
                let src = view.row(i);
                match src.as_slice() {
                    Some(src) => dst.copy_from_slice(src),
                    None => dst.iter_mut().zip(src).for_each(|(y, &x)| *y = x),
                }
                // Eight partial sums, which the compiler can keep in one vector register;
                // the row is still in cache.
                let mut lanes = [0.0f64; 8];
                for chunk in dst.chunks(8) {
                    for (lane, x) in lanes.iter_mut().zip(chunk) {
                        *lane += x.to_f64() * x.to_f64();
                    }
                }
                let mut norm = lanes.iter().sum::<f64>().sqrt();
                if !norm.is_finite() {
                    // A NaN or an infinity, or float64 values whose squares overflow.
                    if let Some(j) = dst.iter().position(|x| !x.to_f64().is_finite()) {
                        return Err(Error::NonFinite {
                            what: "text embeddings".into(),
                            index: vec![i, j],
                        });
                    }
                    let scale = dst.iter().map(|x| x.to_f64().abs()).fold(0.0, f64::max);
                    let scaled: f64 = dst.iter().map(|x| (x.to_f64() / scale).powi(2)).sum();
                    norm = scale * scaled.sqrt();
                }
                if norm > 0.0 {
                    let inv = 1.0 / norm;
                    for x in dst.iter_mut() {
                        *x = T::from_f64(x.to_f64() * inv);
                    }
                }
                Ok(())
            })
        })?;
        Ok(TextPool { rows, m, d })
    }

    pub fn len(&self) -> usize {
        self.m
    }

    pub fn is_empty(&self) -> bool {
        self.m == 0
    }

    pub fn dim(&self) -> usize {
        self.d
    }

    fn chunk(&self, start: usize, len: usize) -> MatRef<'_, T> {
        MatRef::from_row_major_slice(
            &self.rows[start * self.d..(start + len) * self.d],
            len,
            self.d,
        )
    }
}

/// One head's basis: V [D, r] spanning the top eigenvectors of the second moment, rotated
/// so that `Vᵀ C V = diag(lambda)`.
struct HeadBasis {
    v: Mat<f64>,
    lambda: Vec<f64>,
    total_variance: f64,
    numerical_rank: usize,
    certified: bool,
}

fn check_params(params: SpanParams, m: usize) -> Result<()> {
    if params.rank < 1 {
        return Err(Error::value(
            "rank",
            "an integer >= 1",
            params.rank.to_string(),
        ));
    }
    if params.n_texts < 1 || params.n_texts > m {
        return Err(Error::value(
            "n_texts",
            format!("an integer between 1 and the pool size {m}"),
            params.n_texts.to_string(),
        ));
    }
    Ok(())
}

/// Checks every head's statistics for width `d` (the texts' D), in parallel; the error names
/// the first bad head by its index in `heads`. `text_span_heads` runs it too: callers that
/// feed heads in groups run it first over all of them, so that bad input is reported before
/// the long work.
pub fn check_heads(heads: &[HeadMoments], d: usize) -> Result<()> {
    parallel::install(|| {
        match heads
            .par_iter()
            .enumerate()
            .find_map_first(|(h, head)| check_head(h, head, d).err())
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })
}

fn check_head(h: usize, head: &HeadMoments, d: usize) -> Result<()> {
    let what = |s: &str| format!("head {h}: {s}");
    if head.count.is_nan() || head.count < 2.0 {
        return Err(Error::value(
            what("count"),
            "at least 2 outputs",
            head.count.to_string(),
        ));
    }
    if !(head.rank_tolerance > 0.0 && head.rank_tolerance < 1.0) {
        return Err(Error::value(
            what("rank_tolerance"),
            "a fraction between 0 and 1 (exclusive)",
            head.rank_tolerance.to_string(),
        ));
    }
    if head.mean.len() != d {
        return Err(Error::shape(
            what("mean"),
            format!("[{d}] (the texts' D)"),
            format!("[{}]", head.mean.len()),
        ));
    }
    if head.covariance.dim() != (d, d) {
        let (a, b) = head.covariance.dim();
        return Err(Error::shape(
            what("covariance"),
            format!("[{d}, {d}]"),
            format!("[{a}, {b}]"),
        ));
    }
    if let Some(rows) = head.outputs {
        if rows.ncols() != d || rows.nrows() as f64 != head.count {
            return Err(Error::shape(
                what("outputs"),
                format!("[{}, {d}] (count, D)", head.count),
                format!("[{}, {}]", rows.nrows(), rows.ncols()),
            ));
        }
    }
    if let Some(j) = head.mean.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            what: what("mean"),
            index: vec![j],
        });
    }
    if let Some(((i, j), _)) = head.covariance.indexed_iter().find(|(_, x)| !x.is_finite()) {
        return Err(Error::NonFinite {
            what: what("covariance"),
            index: vec![i, j],
        });
    }
    // What the numbers cannot show otherwise: a covariance that is not symmetric, or has a
    // negative variance, was not computed from outputs.
    let c = head.covariance;
    let scale = c.iter().fold(f64::MIN_POSITIVE, |m, x| m.max(x.abs()));
    let asymmetry = largest_asymmetry(c);
    if asymmetry > 1e-8 * scale {
        return Err(Error::value(
            what("covariance"),
            "a symmetric matrix",
            format!(
                "one whose entries differ from their transposes by up to {asymmetry:.3e} \
                 (of {scale:.3e})"
            ),
        ));
    }
    if let Some((i, v)) = c
        .diag()
        .iter()
        .enumerate()
        .find(|(_, v)| **v < -1e-12 * scale)
    {
        return Err(Error::value(
            what("covariance"),
            "a positive semi-definite matrix",
            format!("the negative variance {v} at index {i}"),
        ));
    }
    Ok(())
}

/// The largest `|c[i, j] − c[j, i]|`, read in tiles so that the transposed reads stay in
/// cache.
fn largest_asymmetry(c: ArrayView2<f64>) -> f64 {
    const TILE: usize = 64;
    let d = c.nrows();
    let mut largest = 0.0f64;
    for i0 in (0..d).step_by(TILE) {
        for j0 in (i0..d).step_by(TILE) {
            for i in i0..(i0 + TILE).min(d) {
                for j in j0.max(i + 1)..(j0 + TILE).min(d) {
                    largest = largest.max((c[[i, j]] - c[[j, i]]).abs());
                }
            }
        }
    }
    largest
}

/// A pivoted Cholesky factor L [D, k] with `G ≈ L Lᵀ`, or None when the numerical rank
/// exceeds `max_rank`. Stops once the trace of what is left is below `tolerance`.
fn pivoted_cholesky(g: MatRef<f64>, tolerance: f64, max_rank: usize) -> Option<Mat<f64>> {
    let d = g.nrows();
    let mut diag: Vec<f64> = (0..d).map(|i| g[(i, i)]).collect();
    let mut used = vec![false; d];
    // L is kept row-major, `max_rank` wide, so that the inner products run over contiguous
    // memory.
    let mut l = vec![0.0f64; d * max_rank];
    let mut k = 0;
    loop {
        let mut residual = 0.0;
        let mut pivot = None;
        for i in 0..d {
            if !used[i] {
                residual += diag[i].max(0.0);
                if pivot.is_none_or(|p: usize| diag[i] > diag[p]) {
                    pivot = Some(i);
                }
            }
        }
        let Some(p) = pivot else { break };
        if residual <= tolerance || diag[p] <= 0.0 {
            break;
        }
        if k == max_rank {
            return None;
        }
        let root = diag[p].sqrt();
        let lp: Vec<f64> = l[p * max_rank..p * max_rank + k].to_vec();
        let gp = g.col(p);
        for i in 0..d {
            if used[i] || i == p {
                continue;
            }
            let li = &mut l[i * max_rank..i * max_rank + k + 1];
            let dot: f64 = li[..k].iter().zip(&lp).map(|(a, b)| a * b).sum();
            let x = (gp[i] - dot) / root;
            li[k] = x;
            diag[i] -= x * x;
        }
        l[p * max_rank + k] = root;
        used[p] = true;
        k += 1;
    }
    Some(Mat::from_fn(d, k, |i, m| l[i * max_rank + m]))
}

/// Ritz pairs are accepted once every residual `‖G v − θ v‖` of the top `rank` is below
/// this fraction of the largest eigenvalue; the subspace is then that accurate.
const RITZ_TOLERANCE: f64 = 1e-12;
/// Block iterations tried before a dense eigendecomposition is used instead.
const MAX_SUBSPACE_ITERATIONS: usize = 24;

/// The block of subspace iteration for the top `rank` eigenpairs: half as many again, for
/// the convergence rate λ_{k+1}/λ_rank.
fn subspace_block(rank: usize, d: usize) -> usize {
    (rank + (rank / 2).max(16)).min(d)
}

/// The top eigenpairs of a symmetric PSD matrix of high numerical rank, by block subspace
/// iteration with Rayleigh–Ritz (the oversampled block of `rank` makes the top pairs converge
/// at the rate λ_{block+1}/λ_i per iteration): every Ritz pair of the block, by descending
/// value, once the top `needed(values)` (at most the block) have converged to
/// `RITZ_TOLERANCE`; None when they have not within `MAX_SUBSPACE_ITERATIONS` (or the block
/// would be most of the matrix): the caller then decomposes the whole matrix. Asking only for
/// the pairs that will be kept lets a head narrower than `rank` converge at once, where the
/// pairs past its width sit in a cluster of noise that never converges. The start block is a
/// fixed pseudo-random one, so the result does not vary between runs.
fn subspace_iteration(
    g: MatRef<f64>,
    rank: usize,
    needed: impl Fn(&[f64]) -> usize,
) -> Option<(Mat<f64>, Vec<f64>)> {
    let d = g.nrows();
    let k = subspace_block(rank, d);
    if 2 * k > d {
        return None;
    }
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut q = Mat::from_fn(d, k, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    })
    .qr()
    .compute_thin_Q();
    let mut y = Mat::<f64>::zeros(d, k);
    for iteration in 0..MAX_SUBSPACE_ITERATIONS {
        matmul(
            y.as_mut(),
            Accum::Replace,
            g,
            q.as_ref(),
            1.0,
            Par::rayon(0),
        );
        if iteration >= 2 {
            let b = q.transpose() * &y;
            let evd = b.self_adjoint_eigen(Side::Lower).ok()?;
            let s = evd.S().column_vector();
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|&a, &c| s[c].total_cmp(&s[a]));
            let w = Mat::from_fn(k, k, |i, c| evd.U()[(i, order[c])]);
            let theta: Vec<f64> = order.iter().map(|&i| s[i]).collect();
            let v = &q * &w;
            let gv = &y * &w;
            let top = theta[0].max(0.0);
            let converged = (0..needed(&theta).min(k)).all(|c| {
                let r2: f64 = (0..d)
                    .map(|i| (gv[(i, c)] - theta[c] * v[(i, c)]).powi(2))
                    .sum();
                r2.sqrt() <= RITZ_TOLERANCE * top
            });
            if converged {
                return Some((v, theta));
            }
        }
        q = y.qr().compute_thin_Q();
    }
    None
}

/// The top eigenvectors of a second moment (`dominant_eigenvectors`).
struct TopSpace {
    /// [D, r], orthonormal, by descending eigenvalue.
    vectors: Mat<f64>,
    /// How many eigenvalues are above the tolerance.
    numerical_rank: usize,
    /// Whether an error of the matrix (up to the bound given) could not change which
    /// directions are kept.
    certified: bool,
    /// For an inexact matrix of which fewer than `rank` directions certainly clear the
    /// tolerance (a head narrower than `rank`): the space is certified once no other
    /// eigenvalue of the exact matrix can exceed this, which the outputs can show
    /// (`certify::tail_bound`).
    tail_cutoff: Option<f64>,
}

/// The eigenvectors (by descending eigenvalue) of the symmetric PSD matrix `g` whose
/// eigenvalues are above `tolerance` times the largest, at most `rank` of them; with
/// `exact_rank`, exactly `rank` of them (the published algorithm's basis, null-space
/// directions included). `error` bounds the spectral norm of `g`'s error.
///
/// The ways, cheapest first: a pivoted Cholesky factor (exact `g` of low rank); block
/// subspace iteration converging only the directions that certainly clear the tolerance,
/// then, when they are fewer than `rank`, a certificate that nothing else does
/// (`certify::complement_below` for an exact `g`; for an inexact one the caller's outputs,
/// `TopSpace::tail_cutoff`); else the dense eigendecomposition.
fn dominant_eigenvectors(
    g: MatRef<f64>,
    rank: usize,
    tolerance: f64,
    exact_rank: bool,
    error: f64,
) -> Result<TopSpace> {
    let d = g.nrows();
    let space = |vectors: Mat<f64>, numerical_rank, certified, tail_cutoff| TopSpace {
        vectors,
        numerical_rank,
        certified,
        tail_cutoff,
    };
    let max_diag = (0..d).map(|i| g[(i, i)]).fold(0.0f64, f64::max);
    if max_diag <= 0.0 && !exact_rank {
        return Ok(space(Mat::zeros(d, 0), 0, error == 0.0, None));
    }
    if exact_rank {
        // The null space is wanted too: only a full decomposition has it.
        let (vectors, values) = dense_eigen(g)?;
        return Ok(select(&vectors, &values, rank, tolerance, true, error));
    }
    // Low rank (real heads write into a subspace of about the head width): factor first,
    // then decompose the small factor; past the subspace iteration's block, that is the
    // cheaper way to the top space. The factor stops once what it leaves is below the
    // tolerance's level, or for an inexact matrix (of full rank at the level of its
    // error) a thousandth of the error; the factor of an inexact matrix then only proposes
    // the space, whose Ritz values decide (`ritz_space`).
    let exact_level = CHOLESKY_FRACTION * tolerance * max_diag;
    let left = if error > 0.0 {
        exact_level.max(1e-3 * error)
    } else {
        exact_level
    };
    let max_rank = (d / LOW_RANK_FRACTION).min(subspace_block(rank, d));
    if let Some(l) = pivoted_cholesky(g, left, max_rank) {
        if l.ncols() == 0 {
            return Ok(space(Mat::zeros(d, 0), 0, error == 0.0, None));
        }
        let svd = l.thin_svd().map_err(|_| not_converged())?;
        if error == 0.0 {
            let s = svd.S().column_vector();
            let values: Vec<f64> = (0..l.ncols()).map(|i| s[i] * s[i]).collect();
            return Ok(decide(svd.U().to_owned(), values, rank, tolerance, 0.0));
        }
        return ritz_space(g, svd.U(), rank, tolerance, error);
    }
    // The Ritz values that clear the tolerance by more than the matrix's error and the
    // Ritz residuals: directions the exact matrix certainly has above it (Weyl).
    let clear = |theta: &[f64]| clear_count(theta, rank, tolerance, error);
    if let Some((v, theta)) = subspace_iteration(g, rank, clear) {
        let k = clear(&theta);
        let top = theta[0].max(0.0);
        let kept = || v.subcols(0, k).to_owned();
        if k == rank.min(d) {
            let numerical = theta.iter().filter(|&&t| t > tolerance * top).count();
            return Ok(space(kept(), numerical, true, None));
        }
        if error > 0.0 {
            // λ₁ of the exact matrix is at least θ₁ − error.
            let cutoff = tolerance * (top - error);
            return Ok(space(kept(), k, false, Some(cutoff)));
        }
        // θ₁ ≤ λ₁: below τ·θ₁ is below the tolerance.
        if certify::complement_below(g, v.subcols(0, k), tolerance * top) {
            return Ok(space(kept(), k, true, None));
        }
    }
    let (vectors, values) = dense_eigen(g)?;
    Ok(decide(vectors, values, rank, tolerance, error))
}

/// The top space of an inexact `g` (within `error` of the exact matrix) from a proposed
/// orthonormal basis `u` [D, m]: the Ritz pairs of `g` on it, of which the i-th value is at
/// most `λ_i(g)` (Cauchy's interlacing), so at most `error` above `λ_i` of the exact matrix
/// (Weyl); the exact matrix's largest eigenvalue is at most `‖g‖_F + error`. Certified when
/// `rank` directions clear the tolerance by that; otherwise those that do, with the cut-off
/// the others must be shown to be below (`TopSpace::tail_cutoff`).
fn ritz_space(
    g: MatRef<f64>,
    u: MatRef<f64>,
    rank: usize,
    tolerance: f64,
    error: f64,
) -> Result<TopSpace> {
    let d = g.nrows();
    let gu = g * u;
    let b = u.transpose() * &gu;
    let b = Mat::from_fn(b.nrows(), b.ncols(), |i, j| 0.5 * (b[(i, j)] + b[(j, i)]));
    let (w, theta) = dense_eigen(b.as_ref())?;
    let mut order: Vec<usize> = (0..theta.len()).collect();
    order.sort_by(|&a, &c| theta[c].total_cmp(&theta[a]));
    let frobenius = (0..d)
        .map(|j| g.col(j).iter().map(|x| x * x).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    let largest = frobenius * (1.0 + 1e-12) + error;
    let k = order
        .iter()
        .take_while(|&&i| theta[i] - error > tolerance * largest)
        .count()
        .min(rank);
    let rotation = Mat::from_fn(w.nrows(), k, |i, c| w[(i, order[c])]);
    let vectors = u * &rotation;
    if k == rank.min(d) {
        return Ok(TopSpace {
            vectors,
            numerical_rank: k,
            certified: true,
            tail_cutoff: None,
        });
    }
    let top = order.first().map_or(0.0, |&i| theta[i]);
    Ok(TopSpace {
        vectors,
        numerical_rank: k,
        certified: false,
        tail_cutoff: Some(tolerance * (top - error)),
    })
}

/// `select` for a matrix within `error` of the exact one, and where that leaves the space
/// uncertain only because fewer than `rank` directions clear the error, those that do,
/// with the cut-off the rest must be shown to be below (`TopSpace::tail_cutoff`).
fn decide(
    vectors: Mat<f64>,
    values: Vec<f64>,
    rank: usize,
    tolerance: f64,
    error: f64,
) -> TopSpace {
    let top = select(&vectors, &values, rank, tolerance, false, error);
    if top.certified {
        return top;
    }
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let sorted: Vec<f64> = order.iter().map(|&i| values[i]).collect();
    let k = clear_count(&sorted, rank, tolerance, error);
    TopSpace {
        vectors: Mat::from_fn(vectors.nrows(), k, |i, c| vectors[(i, order[c])]),
        numerical_rank: k,
        certified: false,
        tail_cutoff: Some(tolerance * (sorted[0] - error)),
    }
}

/// How many of the eigenvalues `values` (descending) of a matrix within `error` of the exact
/// one certainly clear the tolerance for the exact matrix too (Weyl, with the Ritz
/// residuals' slack), at most `rank`.
fn clear_count(values: &[f64], rank: usize, tolerance: f64, error: f64) -> usize {
    let top = values[0].max(0.0);
    let slack = error + RITZ_TOLERANCE * top;
    let above = values
        .iter()
        .take_while(|&&t| t - slack > tolerance * (top + slack))
        .count();
    above.min(rank)
}

fn not_converged() -> Error {
    Error::Numerical {
        what: "eigendecomposition".into(),
        detail: "the solver did not converge (the statistics may be extremely ill-conditioned)"
            .into(),
    }
}

/// Every eigenpair of a symmetric matrix: vectors [D, D] and values.
fn dense_eigen(g: MatRef<f64>) -> Result<(Mat<f64>, Vec<f64>)> {
    let evd = g
        .self_adjoint_eigen(Side::Lower)
        .map_err(|_| not_converged())?;
    let s = evd.S().column_vector();
    Ok((evd.U().to_owned(), (0..g.nrows()).map(|i| s[i]).collect()))
}

/// The top space from eigenpairs found by a direct method: those above the tolerance (or
/// exactly `rank` with `exact_rank`), at most `rank`, certified when `error` cannot change
/// which they are.
fn select(
    vectors: &Mat<f64>,
    values: &[f64],
    rank: usize,
    tolerance: f64,
    exact_rank: bool,
    error: f64,
) -> TopSpace {
    let d = vectors.nrows();
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let largest = values[order[0]];
    let numerical = order
        .iter()
        .filter(|&&i| values[i] > tolerance * largest)
        .count();
    let keep: Vec<usize> = order
        .into_iter()
        .filter(|&i| exact_rank || values[i] > tolerance * largest)
        .take(rank)
        .collect();
    // The exact matrix's eigenvalues are within `error` of `g`'s (Weyl), and those found
    // within their Ritz residuals of `g`'s: a kept direction whose eigenvalue clears the
    // tolerance by more than both is kept from the exact matrix too.
    let slack = error + RITZ_TOLERANCE * largest;
    let certified = error == 0.0
        || (!exact_rank
            && keep.len() == rank.min(d)
            && keep
                .last()
                .is_some_and(|&i| values[i] - slack > tolerance * (largest + slack)));
    TopSpace {
        vectors: Mat::from_fn(d, keep.len(), |i, c| vectors[(i, keep[c])]),
        numerical_rank: numerical,
        certified,
        tail_cutoff: None,
    }
}

fn head_basis(head: &HeadMoments, rank: usize, exact_rank: bool) -> Result<HeadBasis> {
    let d = head.mean.len();
    let cov = match head.covariance.as_slice() {
        Some(c) => MatRef::from_row_major_slice(c, d, d).to_owned(),
        None => Mat::from_fn(d, d, |i, j| head.covariance[[i, j]]),
    };
    let second = Mat::from_fn(d, d, |i, j| cov[(i, j)] + head.mean[i] * head.mean[j]);
    let mut top = dominant_eigenvectors(
        second.as_ref(),
        rank,
        head.rank_tolerance,
        exact_rank,
        head.covariance_error,
    )?;
    if let (Some(cutoff), Some(rows)) = (top.tail_cutoff, head.outputs) {
        top.certified = certify::tail_bound(rows, top.vectors.as_ref()) <= cutoff;
    }
    let v = top.vectors;
    let r = v.ncols();
    // Rotate the basis so that the covariance restricted to the span is diagonal.
    let cv = &cov * &v;
    let b0 = v.transpose() * &cv;
    let (w, lambda) = if r == 0 {
        (Mat::zeros(0, 0), Vec::new())
    } else {
        dense_eigen(b0.as_ref())?
    };
    Ok(HeadBasis {
        v: &v * &w,
        lambda,
        total_variance: (0..d).map(|i| cov[(i, i)]).sum(),
        numerical_rank: top.numerical_rank,
        certified: top.certified,
    })
}

/// Lanes of the greedy step's dot products: one AVX-512 register of float64, two of AVX2.
/// Every instruction set runs the same sums in the same order, so the selections do not
/// depend on the CPU.
const LANES: usize = 8;

/// `a · u` in `LANES` partial sums (lane l adds the products of the indices ≡ l mod
/// `LANES`, a multiply then an add), added pairwise, then the remainder: the order every
/// variant below keeps.
#[inline(always)]
fn dot(a: &[f64], u: &[f64]) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let whole = a.len() / LANES * LANES;
    for (a, u) in a[..whole].chunks_exact(LANES).zip(u.chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] += a[l] * u[l];
        }
    }
    finish_dot(lanes, &a[whole..], &u[whole..])
}

#[inline(always)]
fn finish_dot(v: [f64; LANES], a: &[f64], u: &[f64]) -> f64 {
    let mut sum = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    for (a, u) in a.iter().zip(u) {
        sum += a * u;
    }
    sum
}

/// `dot` in one AVX-512 register (the compiler does not find this form by itself).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn dot_avx512(a: &[f64], u: &[f64]) -> f64 {
    use std::arch::x86_64::*;
    let whole = a.len().min(u.len()) / LANES * LANES;
    let mut acc = _mm512_setzero_pd();
    for i in (0..whole).step_by(LANES) {
        // SAFETY: i + LANES <= whole <= both lengths.
        let (x, y) = unsafe {
            (
                _mm512_loadu_pd(a.as_ptr().add(i)),
                _mm512_loadu_pd(u.as_ptr().add(i)),
            )
        };
        acc = _mm512_add_pd(acc, _mm512_mul_pd(x, y));
    }
    let mut lanes = [0.0f64; LANES];
    // SAFETY: `lanes` holds LANES float64.
    unsafe { _mm512_storeu_pd(lanes.as_mut_ptr(), acc) };
    finish_dot(lanes, &a[whole..], &u[whole..])
}

/// `dot` in two AVX2 registers (lanes 0–3 and 4–7).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_avx2(a: &[f64], u: &[f64]) -> f64 {
    use std::arch::x86_64::*;
    let whole = a.len().min(u.len()) / LANES * LANES;
    let (mut low, mut high) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    for i in (0..whole).step_by(LANES) {
        // SAFETY: i + LANES <= whole <= both lengths.
        unsafe {
            let (pa, pu) = (a.as_ptr().add(i), u.as_ptr().add(i));
            low = _mm256_add_pd(low, _mm256_mul_pd(_mm256_loadu_pd(pa), _mm256_loadu_pd(pu)));
            high = _mm256_add_pd(
                high,
                _mm256_mul_pd(_mm256_loadu_pd(pa.add(4)), _mm256_loadu_pd(pu.add(4))),
            );
        }
    }
    let mut lanes = [0.0f64; LANES];
    // SAFETY: `lanes` holds LANES float64.
    unsafe {
        _mm256_storeu_pd(lanes.as_mut_ptr(), low);
        _mm256_storeu_pd(lanes.as_mut_ptr().add(4), high);
    }
    finish_dot(lanes, &a[whole..], &u[whole..])
}

/// One greedy step: the chosen unit direction `u` (in the basis of the span), `w = Q Λ u`
/// (Q removes the earlier directions) and `gamma = uᵀ Λ u`.
struct Step<'a> {
    u: &'a [f64],
    w: &'a [f64],
    gamma: f64,
}

/// The step's change to the scores of a chunk of texts (`a_chunk`: their coordinates, r per
/// text): `−2 c e + c² γ` with `c = a·u`, `e = a·w`.
#[inline(always)]
fn update_scores_body<T: Real>(
    s_chunk: &mut [f64],
    a_chunk: &[T],
    r: usize,
    step: &Step,
    dot: impl Fn(&[f64], &[f64]) -> f64,
) {
    // Each text's coordinates are widened into one buffer first: a plain loop the compiler
    // turns into vector conversions, where converting inside the products kept them scalar.
    let mut x = vec![0.0f64; r];
    for (i, s) in s_chunk.iter_mut().enumerate() {
        if *s == f64::NEG_INFINITY {
            continue;
        }
        for (y, a) in x.iter_mut().zip(&a_chunk[i * r..(i + 1) * r]) {
            *y = a.to_f64();
        }
        let (c, e) = (dot(&x, step.u), dot(&x, step.w));
        *s += c * (c * step.gamma - 2.0 * e);
    }
}

/// `update_scores_body` compiled for AVX2 and for AVX-512: the same operations in the same
/// order (no fused multiply-adds), `LANES` at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn update_scores_avx2<T: Real>(s_chunk: &mut [f64], a_chunk: &[T], r: usize, step: &Step) {
    update_scores_body(s_chunk, a_chunk, r, step, |a, u| dot_avx2(a, u))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn update_scores_avx512<T: Real>(s_chunk: &mut [f64], a_chunk: &[T], r: usize, step: &Step) {
    update_scores_body(s_chunk, a_chunk, r, step, |a, u| dot_avx512(a, u))
}

/// The step's hot loop, on the widest vectors the CPU has (the build targets any x86-64).
fn update_scores<T: Real>(s_chunk: &mut [f64], a_chunk: &[T], r: usize, step: &Step) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, the only feature the function is compiled for.
            return unsafe { update_scores_avx512(s_chunk, a_chunk, r, step) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, the only feature the function is compiled for.
            return unsafe { update_scores_avx2(s_chunk, a_chunk, r, step) };
        }
    }
    update_scores_body(s_chunk, a_chunk, r, step, dot)
}

/// The best unmasked score of a slice and its index; ties go to the lower index.
fn best_of(scores: &[f64], offset: usize) -> Option<(f64, usize)> {
    let mut best: Option<(f64, usize)> = None;
    for (j, &s) in scores.iter().enumerate() {
        if s > f64::NEG_INFINITY && best.is_none_or(|(b, _)| s > b) {
            best = Some((s, offset + j));
        }
    }
    best
}

fn better(a: Option<(f64, usize)>, b: Option<(f64, usize)>) -> Option<(f64, usize)> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.0 > x.0 || (y.0 == x.0 && y.1 < x.1) {
            y
        } else {
            x
        }),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Removes from `x` its components along the orthonormal vectors `basis`, twice (one
/// pass of classical Gram–Schmidt loses orthogonality when `x` is nearly in their span).
fn orthogonalise(x: &mut [f64], basis: &[Vec<f64>]) {
    for _ in 0..2 {
        for u in basis {
            let c: f64 = x.iter().zip(u).map(|(a, b)| a * b).sum();
            for (a, b) in x.iter_mut().zip(u) {
                *a -= c * b;
            }
        }
    }
}

/// The greedy selection's buffers: the texts' coordinates in a head's basis and their
/// scores, kept from one head to the next (a pool of 200,000 texts needs 64 MB of
/// coordinates per head, and fresh pages cost a tenth of a head's time).
struct Workspace<T> {
    a: Vec<T>,
    scores: Vec<f64>,
}

impl<T: Real> Workspace<T> {
    fn new() -> Self {
        Workspace {
            a: Vec::new(),
            scores: Vec::new(),
        }
    }

    /// The buffers for `m` texts of `r` coordinates; what they held is overwritten.
    fn take(&mut self, r: usize, m: usize) -> (&mut [T], &mut [f64]) {
        if self.a.len() < r * m {
            self.a.resize(r * m, T::from_f64(0.0));
        }
        if self.scores.len() < m {
            self.scores.resize(m, 0.0);
        }
        (&mut self.a[..r * m], &mut self.scores[..m])
    }
}

/// The greedy selection for one head, parallel over chunks of the pool. Each step is one
/// pass over the texts' coordinates that updates their scores and finds the next best; the
/// last pick needs no update.
fn greedy<T: Real>(
    basis: &HeadBasis,
    pool: &TextPool<T>,
    n_texts: usize,
    work: &mut Workspace<T>,
) -> Span {
    let (m, d, r) = (pool.m, pool.d, basis.v.ncols());
    let empty = |rank| Span {
        indices: Vec::new(),
        variance: Vec::new(),
        total_variance: basis.total_variance,
        directions: Array2::zeros((0, d)),
        rank,
        numerical_rank: basis.numerical_rank,
        certified: basis.certified,
    };
    if r == 0 {
        return empty(0);
    }
    // a_j = Vᵀ t_j, stored text-major (column j of an r×M column-major matrix), computed in
    // the pool's precision.
    let vt: Mat<T> = Mat::from_fn(r, d, |i, j| T::from_f64(basis.v[(j, i)]));
    let (a, scores) = work.take(r, m);
    let mut best = a
        .par_chunks_mut(r * TEXT_CHUNK)
        .zip(scores.par_chunks_mut(TEXT_CHUNK))
        .enumerate()
        .map(|(c, (a_chunk, s_chunk))| {
            let len = s_chunk.len();
            let dst = MatMut::from_column_major_slice_mut(a_chunk, r, len);
            let texts = pool.chunk(c * TEXT_CHUNK, len);
            matmul(
                dst,
                Accum::Replace,
                vt.as_ref(),
                texts.transpose(),
                T::from_f64(1.0),
                Par::Seq,
            );
            for (j, s) in s_chunk.iter_mut().enumerate() {
                let aj = &a_chunk[j * r..(j + 1) * r];
                *s = aj
                    .iter()
                    .zip(&basis.lambda)
                    .map(|(x, l)| x.to_f64() * x.to_f64() * l)
                    .sum();
            }
            best_of(s_chunk, c * TEXT_CHUNK)
        })
        .reduce(|| None, better);
    let first_best = best.map_or(0.0, |(score, _)| score.max(0.0));
    let picks = n_texts.min(r);
    let mut chosen: Vec<Vec<f64>> = Vec::new();
    let mut indices = Vec::new();
    let mut variance = Vec::new();
    while chosen.len() < picks {
        let Some((score, j)) = best else { break };
        if score <= first_best * 1e-12 {
            break; // every text left is (numerically) in the span already chosen
        }
        let mut u: Vec<f64> = a[j * r..(j + 1) * r].iter().map(|x| x.to_f64()).collect();
        let norm_a = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        orthogonalise(&mut u, &chosen);
        let norm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm <= norm_a * 1e-9 {
            break;
        }
        u.iter_mut().for_each(|x| *x /= norm);
        let lu: Vec<f64> = u.iter().zip(&basis.lambda).map(|(x, l)| x * l).collect();
        let gamma: f64 = u.iter().zip(&lu).map(|(x, y)| x * y).sum();
        let mut w = lu;
        orthogonalise(&mut w, &chosen);
        scores[j] = f64::NEG_INFINITY;
        indices.push(j);
        variance.push(gamma);
        if indices.len() < picks {
            let step = Step {
                u: &u,
                w: &w,
                gamma,
            };
            best = scores
                .par_chunks_mut(TEXT_CHUNK)
                .zip(a.par_chunks(r * TEXT_CHUNK))
                .enumerate()
                .map(|(c, (s_chunk, a_chunk))| {
                    update_scores(s_chunk, a_chunk, r, &step);
                    best_of(s_chunk, c * TEXT_CHUNK)
                })
                .reduce(|| None, better);
        }
        chosen.push(u);
    }
    let k = chosen.len();
    let mut directions = Array2::<f64>::zeros((k, d));
    for (row, u) in chosen.iter().enumerate() {
        for i in 0..d {
            directions[[row, i]] = (0..r).map(|c| basis.v[(i, c)] * u[c]).sum();
        }
    }
    Span {
        indices,
        variance,
        directions,
        ..empty(r)
    }
}

/// TextSpan for many heads sharing one pool. The heads' bases are found in parallel over
/// heads; the selections then run one head after another, each parallel over the pool.
pub fn text_span_heads<T: Real>(
    heads: &[HeadMoments],
    pool: &TextPool<T>,
    params: SpanParams,
) -> Result<Vec<Span>> {
    check_params(params, pool.len())?;
    parallel::install(|| {
        check_heads(heads, pool.dim())?;
        let bases = heads
            .par_iter()
            .map(|head| head_basis(head, params.rank, params.exact_rank))
            .collect::<Result<Vec<_>>>()?;
        let mut work = Workspace::new();
        Ok(bases
            .iter()
            .map(|b| greedy(b, pool, params.n_texts, &mut work))
            .collect())
    })
}

/// TextSpan for one head.
pub fn text_span<T: Real>(
    head: &HeadMoments,
    pool: &TextPool<T>,
    params: SpanParams,
) -> Result<Span> {
    Ok(text_span_heads(std::slice::from_ref(head), pool, params)?.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::StandardNormal;

    fn gaussian(rng: &mut StdRng, rows: usize, cols: usize) -> Array2<f64> {
        Array2::from_shape_simple_fn((rows, cols), || rng.sample(StandardNormal))
    }

    /// Covariance of `k` random directions with decaying scales, plus `noise`² · I.
    fn low_rank_covariance(rng: &mut StdRng, d: usize, k: usize, noise: f64) -> Array2<f64> {
        let b = gaussian(rng, d, k);
        let scales = Array1::from_shape_fn(k, |i| (-0.1 * i as f64).exp());
        let bs = &b * &scales;
        bs.dot(&bs.t()) + Array2::<f64>::eye(d) * noise * noise
    }

    fn projector(v: &Mat<f64>) -> Mat<f64> {
        v * v.transpose()
    }

    /// `vᵀ g v` for each column v: the eigenvalues of eigenvectors.
    fn rayleigh_quotients(g: &Mat<f64>, v: &Mat<f64>) -> Vec<f64> {
        let gv = g * v;
        (0..v.ncols())
            .map(|c| (0..v.nrows()).map(|i| v[(i, c)] * gv[(i, c)]).sum())
            .collect()
    }

    #[test]
    fn low_rank_factor_and_dense_eigendecomposition_agree() {
        let mut rng = StdRng::seed_from_u64(1);
        let (d, k) = (64, 10);
        let c = low_rank_covariance(&mut rng, d, k, 0.0);
        let g = Mat::from_fn(d, d, |i, j| c[[i, j]]);
        let max_diag = (0..d).map(|i| g[(i, i)]).fold(0.0, f64::max);
        let l = pivoted_cholesky(
            g.as_ref(),
            CHOLESKY_FRACTION * RANK_TOLERANCE * max_diag,
            d / LOW_RANK_FRACTION,
        )
        .expect("rank 10 < 16");
        assert_eq!(l.ncols(), k);
        let top = dominant_eigenvectors(g.as_ref(), 6, RANK_TOLERANCE, false, 0.0).unwrap();
        let values = rayleigh_quotients(&g, &top.vectors);
        let v = top.vectors;
        let evd = g.self_adjoint_eigen(Side::Lower).unwrap();
        let dense = Mat::from_fn(d, 6, |i, c| evd.U()[(i, d - 1 - c)]);
        let diff = projector(&v) - projector(&dense);
        assert!(
            diff.norm_max() < 1e-8,
            "projectors differ by {}",
            diff.norm_max()
        );
        let s = evd.S().column_vector();
        for (c, value) in values.iter().enumerate() {
            assert!((value - s[d - 1 - c]).abs() < 1e-9 * s[d - 1]);
        }
    }

    #[test]
    fn full_rank_falls_back_to_the_dense_path() {
        let mut rng = StdRng::seed_from_u64(2);
        let c = low_rank_covariance(&mut rng, 32, 32, 0.1);
        let g = Mat::from_fn(32, 32, |i, j| c[[i, j]]);
        let max_diag = (0..32).map(|i| g[(i, i)]).fold(0.0, f64::max);
        assert!(
            pivoted_cholesky(g.as_ref(), CHOLESKY_FRACTION * RANK_TOLERANCE * max_diag, 8)
                .is_none()
        );
        let top = dominant_eigenvectors(g.as_ref(), 40, RANK_TOLERANCE, false, 0.0).unwrap();
        assert_eq!(top.vectors.ncols(), 32, "rank is capped at D");
        let values = rayleigh_quotients(&g, &top.vectors);
        assert!(values.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn subspace_iteration_finds_the_dense_top_space_or_declines() {
        let mut rng = StdRng::seed_from_u64(3);
        let d = 200;
        // Full rank: 30 strong directions over noise in every direction.
        let g = low_rank_covariance(&mut rng, d, 30, 1e-4);
        let g = Mat::from_fn(d, d, |i, j| g[[i, j]]);
        let (v, values) =
            subspace_iteration(g.as_ref(), 20, |_| 20).expect("a clear gap converges");
        let evd = g.self_adjoint_eigen(Side::Lower).unwrap();
        let s = evd.S().column_vector();
        let dense = Mat::from_fn(d, 20, |i, c| evd.U()[(i, d - 1 - c)]);
        for c in 0..20 {
            assert!((values[c] - s[d - 1 - c]).abs() <= 1e-10 * s[d - 1]);
        }
        let top = v.subcols(0, 20).to_owned();
        let gap = (projector(&top) - projector(&dense)).norm_max();
        assert!(gap < 1e-9, "top-20 subspaces differ by {gap}");
        // A block that would be most of the matrix, or no gap at all: the caller decomposes.
        assert!(subspace_iteration(g.as_ref(), 90, |_| 90).is_none());
        let flat = Mat::from_fn(
            d,
            d,
            |i, j| if i == j { 1.0 - 1e-4 * i as f64 } else { 0.0 },
        );
        assert!(subspace_iteration(flat.as_ref(), 20, |_| 20).is_none());
    }

    #[test]
    fn a_higher_rank_tolerance_drops_the_weak_directions() {
        // Eigenvalues 1, 1e-3, 1e-6, 1e-9 on the first four axes of D = 8.
        let g = Mat::from_fn(8, 8, |i, j| {
            if i == j && i < 4 {
                10f64.powi(-3 * i as i32)
            } else {
                0.0
            }
        });
        let kept = |tolerance| {
            dominant_eigenvectors(g.as_ref(), 6, tolerance, false, 0.0)
                .unwrap()
                .vectors
                .ncols()
        };
        assert_eq!(kept(RANK_TOLERANCE), 4);
        assert_eq!(kept(1e-5), 2);
        // Exactly the rank asked for, null space included, as published; the tolerance
        // still counts the numerical rank.
        let top = dominant_eigenvectors(g.as_ref(), 6, 1e-5, true, 0.0).unwrap();
        assert_eq!((top.vectors.ncols(), top.numerical_rank), (6, 2));
        let (mean, cov) = (Array1::<f64>::zeros(8), Array2::<f64>::eye(8));
        let bad = HeadMoments {
            rank_tolerance: 0.0,
            ..HeadMoments::new(10.0, mean.view(), cov.view())
        };
        assert!(check_head(0, &bad, 8).is_err());
    }

    #[test]
    fn rows_whose_squares_overflow_are_scaled_to_unit_norm() {
        let pool = TextPool::<f64>::from_rows(vec![3e200, 4e200, 0.0, 0.0], 2, 2).unwrap();
        let rows = pool.chunk(0, 2);
        assert!((rows[(0, 0)] - 0.6).abs() < 1e-15 && (rows[(0, 1)] - 0.8).abs() < 1e-15);
        assert_eq!((rows[(1, 0)], rows[(1, 1)]), (0.0, 0.0));
    }

    #[test]
    fn an_inexact_matrix_is_certified_only_when_its_error_cannot_change_the_kept_space() {
        // Eigenvalues 1, 0.9, …: 12 clear directions over 1e-6 in every other one (D = 64).
        let d = 64;
        let g = Mat::from_fn(d, d, |i, j| match (i == j, i < 12) {
            (true, true) => 0.9f64.powi(i as i32),
            (true, false) => 1e-6,
            _ => 0.0,
        });
        let top = |rank, error| dominant_eigenvectors(g.as_ref(), rank, 1e-10, false, error);
        let exact = top(8, 0.0).unwrap();
        assert!(exact.certified);
        // An error far below the 8th eigenvalue (0.48): the same space, certified.
        let close = top(8, 1e-3).unwrap();
        assert!(close.certified);
        let gap = (projector(&close.vectors) - projector(&exact.vectors)).norm_max();
        assert!(gap < 1e-9, "{gap}");
        // An error above it, or more directions asked for than clear the error: not.
        assert!(!top(8, 0.6).unwrap().certified);
        assert!(!top(20, 1e-3).unwrap().certified);
        // Exact statistics are never in doubt, even when they are of low rank.
        assert!(top(20, 0.0).unwrap().certified);
    }

    /// Float32 rows: `k` directions of decaying scale plus a mean, and `noise` in every
    /// direction; their statistics from float32 products, as `text_span` computes them.
    fn narrow_head(rng: &mut StdRng, n: usize, d: usize, k: usize, noise: f64) -> Array2<f32> {
        let basis = gaussian(rng, d, k);
        let scales = Array1::from_shape_fn(k, |i| (-0.05 * i as f64).exp());
        let signal = (gaussian(rng, n, k) * &scales).dot(&basis.t()) / (d as f64).sqrt();
        let offset = Array1::from_shape_fn(d, |_| rng.sample::<f64, _>(StandardNormal));
        (signal + gaussian(rng, n, d) * noise + offset).mapv(|x| x as f32)
    }

    fn span_of_rows(rows: &Array2<f32>, rank: usize, with_outputs: bool) -> Span {
        let n = rows.nrows();
        let x = rows.view().insert_axis(ndarray::Axis(1));
        let m = crate::moments::batch_moments(x, crate::moments::Products::Float32)
            .unwrap()
            .remove(0);
        let d = rows.ncols();
        let cov = Array2::from_shape_fn((d, d), |(i, j)| m.scatter[(i, j)] / n as f64);
        let mean = Array1::from(m.mean.clone());
        let texts = Array2::<f64>::eye(d);
        let pool = TextPool::from_view(texts.view()).unwrap();
        let head = HeadMoments {
            covariance_error: m.scatter_error / n as f64,
            outputs: with_outputs.then(|| rows.view()),
            ..HeadMoments::new(n as f64, mean.view(), cov.view())
        };
        text_span(&head, &pool, SpanParams::new(5, rank)).unwrap()
    }

    #[test]
    fn a_head_narrower_than_rank_is_certified_from_its_outputs_or_falls_back() {
        let mut rng = StdRng::seed_from_u64(7);
        let (n, d) = (3000, 256);
        // 24 directions and a mean, 40 asked for: float32 products cannot tell whether a
        // 26th direction is above the tolerance; the outputs show that none is.
        let narrow = narrow_head(&mut rng, n, d, 24, 0.0);
        let certified = span_of_rows(&narrow, 40, true);
        assert!(certified.certified);
        assert_eq!((certified.rank, certified.numerical_rank), (25, 25));
        // Without the outputs the same statistics are not certified: exact ones are needed.
        assert!(!span_of_rows(&narrow, 40, false).certified);
        // Noise in every direction above the tolerance but below the products' error: no
        // certificate can hold, the caller must run the head from exact statistics.
        let noisy = narrow_head(&mut rng, n, d, 24, 1e-3);
        assert!(!span_of_rows(&noisy, 40, true).certified);
    }

    #[test]
    fn exact_statistics_of_a_narrow_head_skip_the_dense_decomposition_only_when_certain() {
        // 20 clear directions over noise 1e-9 in every other one, 40 asked for, at a
        // tolerance between them: the complement is certified below it. A 21st direction
        // just above the tolerance is kept (the dense path decides it), one just below is not.
        let d = 160;
        let spectrum = |extra: f64| {
            Mat::from_fn(d, d, |i, j| match (i == j, i) {
                (true, i) if i < 20 => 0.8f64.powi(i as i32),
                (true, 20) => extra,
                (true, _) => 1e-9,
                _ => 0.0,
            })
        };
        let kept = |g: &Mat<f64>| {
            let top = dominant_eigenvectors(g.as_ref(), 40, 1e-6, false, 0.0).unwrap();
            assert!(top.certified);
            (top.vectors.ncols(), top.numerical_rank)
        };
        assert_eq!(kept(&spectrum(1e-9)), (20, 20));
        assert_eq!(kept(&spectrum(1.01e-6)), (21, 21));
        assert_eq!(kept(&spectrum(0.99e-6)), (20, 20));
    }

    fn run(threads: usize, cov: &Array2<f64>, mean: &Array1<f64>, pool: &TextPool<f32>) -> Span {
        crate::parallel::set_num_threads(threads);
        let head = HeadMoments::new(1000.0, mean.view(), cov.view());
        text_span(&head, pool, SpanParams::new(12, 20)).unwrap()
    }

    #[test]
    fn selection_is_greedy_orthonormal_and_thread_independent() {
        let mut rng = StdRng::seed_from_u64(3);
        let d = 48;
        let cov = low_rank_covariance(&mut rng, d, 30, 1e-3);
        let mean = Array1::from_shape_fn(d, |_| rng.sample::<f64, _>(StandardNormal));
        let texts = gaussian(&mut rng, 3 * TEXT_CHUNK + 17, d).mapv(|x| x as f32);
        let pool = TextPool::from_view(texts.view()).unwrap();
        let one = run(1, &cov, &mean, &pool);
        let two = run(2, &cov, &mean, &pool);
        assert_eq!(one.indices, two.indices);
        assert_eq!(one.variance, two.variance);
        assert_eq!(one.directions, two.directions);
        let gram = one.directions.dot(&one.directions.t());
        assert!((gram - Array2::<f64>::eye(12))
            .iter()
            .all(|x| x.abs() < 1e-10));
        // Each direction's variance is what the covariance says along it.
        for (u, var) in one.directions.outer_iter().zip(&one.variance) {
            let direct = u.dot(&cov.dot(&u));
            assert!((direct - var).abs() < 1e-9 * var.abs().max(1e-12));
        }
        assert!(one.variance.iter().sum::<f64>() <= one.total_variance);
    }

    #[test]
    fn bad_parameters_and_inputs_are_errors_not_panics() {
        let cov = Array2::<f64>::eye(4);
        let mean = Array1::<f64>::zeros(4);
        let head = HeadMoments::new(10.0, mean.view(), cov.view());
        let pool = TextPool::from_view(Array2::<f64>::eye(4).view()).unwrap();
        let params = SpanParams::new;
        assert!(matches!(
            text_span(&head, &pool, params(5, 2)),
            Err(Error::Value { .. })
        ));
        assert!(matches!(
            text_span(&head, &pool, params(2, 0)),
            Err(Error::Value { .. })
        ));
        let wide = TextPool::from_view(Array2::<f64>::eye(5).view()).unwrap();
        assert!(matches!(
            text_span(&head, &wide, params(2, 2)),
            Err(Error::Shape { .. })
        ));
        let few = HeadMoments { count: 1.0, ..head };
        assert!(matches!(
            text_span(&few, &pool, params(2, 2)),
            Err(Error::Value { .. })
        ));
        let mut nan = Array2::<f64>::eye(4);
        nan[[1, 2]] = f64::NAN;
        assert!(matches!(
            TextPool::from_view(nan.view()),
            Err(Error::NonFinite { index, .. }) if index == vec![1, 2]
        ));
        assert!(matches!(
            TextPool::<f64>::from_rows(Vec::new(), 0, 4),
            Err(Error::Shape { .. })
        ));
    }
}
