//! Certificates that a head's second moment has no direction above TextSpan's cut-off beyond
//! the ones kept, at far less cost than the exact statistics or a full eigendecomposition.
//!
//! TextSpan keeps the directions of the second moment `G` whose eigenvalue is above a
//! cut-off. Real heads write into fewer dimensions than the default `rank` (64 of 80), so
//! the question that decides the kept space is whether `λ_{k+1}(G)` is below the cut-off,
//! where k directions are certainly above it. Two ways to answer it rigorously:
//!
//! - `tail_bound`, from the raw outputs X [N, D] and any k columns V: by Eckart–Young,
//!   `σ_{k+1}(X)² ≤ ‖X − X V Vᵀ‖²_F`, so `λ_{k+1}(XᵀX / N)` is at most that residual over N.
//!   It costs one float64 product X V (N·D·k), against N·D²/2 for the statistics, and its
//!   rounding is bounded here; statistics from float32 products (whose error bound is far
//!   above the cut-off) are then as good as exact ones for the choice of directions.
//! - `complement_below`, from exact statistics: every eigenvalue of G on the orthogonal
//!   complement of V is below the cut-off iff `cut-off·I − P G P` (P = I − V Vᵀ) is positive
//!   definite, which one Cholesky factorisation shows (D³/3, against about 10·D³ for the
//!   eigendecomposition a narrow head needed before), its rounding bounded by a margin.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par, Side};
use ndarray::ArrayView2;
use rayon::prelude::*;

use crate::moments::ROW_BLOCK;
use crate::parallel;

/// float64's unit roundoff.
const U: f64 = f64::EPSILON / 2.0;

/// Higham's γ_n = n·u / (1 − n·u): a sum of n terms computed in any order (with or without
/// fused multiply-adds) is within γ_n times the sum of their absolute values.
fn gamma(n: usize) -> f64 {
    let nu = n as f64 * U;
    nu / (1.0 - nu)
}

/// `‖V‖_F` and `‖Vᵀ V − I‖_F` (how far V's columns are from orthonormal), the latter rounded
/// up by its own rounding bound.
fn column_norms(v: MatRef<f64>) -> (f64, f64) {
    let (d, k) = (v.nrows(), v.ncols());
    let gram = v.transpose() * v;
    let mut deviation = 0.0;
    let mut frobenius = 0.0;
    for j in 0..k {
        frobenius += gram[(j, j)];
        for i in 0..k {
            let target = if i == j { 1.0 } else { 0.0 };
            deviation += (gram[(i, j)] - target).powi(2);
        }
    }
    let rounding = gamma(d) * frobenius;
    (
        frobenius.sqrt() * (1.0 + 2.0 * U),
        deviation.sqrt() + rounding,
    )
}

/// A rigorous upper bound on the (k+1)-th eigenvalue of the rows' second moment `XᵀX / N`,
/// with k the number of columns of `v` (meant to span the top k eigenvectors, but any k
/// columns give a bound).
///
/// It is `‖X − X V Vᵀ‖²_F / N` computed as `Σ_i ‖x_i‖² − ‖y_i‖²` with `y_i = Vᵀ x_i` (exact for
/// orthonormal V; the deviation of `Vᵀ V` from I is added), plus bounds on every rounding:
/// the rows are float32, so their squares and products with float64 weights enter exactly
/// or within γ; each entry of `y` is a sum of D products; the per-row differences are
/// small, so their sum's rounding is negligible but counted. The product's bound (2·γ_D·√k
/// of Σ ‖x‖², 1.4e-12 for D = 768, k = 64) is what limits it: it certifies a head whose
/// largest eigenvalue is above about 1e-2 of the trace (at the default tolerance 1e-10),
/// which real heads, with their large means, are.
pub fn tail_bound(rows: ArrayView2<f32>, v: MatRef<f64>) -> f64 {
    let (n, d) = rows.dim();
    let k = v.ncols();
    if n == 0 {
        return 0.0;
    }
    let vt = v.transpose().to_owned();
    // Per block of rows: Σ (‖x‖² − ‖y‖²), Σ |‖x‖² − ‖y‖²|, Σ ‖x‖², Σ ‖y‖².
    let parts: Vec<[f64; 4]> = parallel::install(|| {
        (0..n.div_ceil(ROW_BLOCK))
            .into_par_iter()
            .map(|b| {
                let start = b * ROW_BLOCK;
                let len = ROW_BLOCK.min(n - start);
                let mut x = vec![0.0f64; len * d];
                let mut xx = vec![0.0f64; len];
                for (i, (dst, sq)) in x.chunks_mut(d).zip(xx.iter_mut()).enumerate() {
                    for (y, &s) in dst.iter_mut().zip(rows.row(start + i).iter()) {
                        *y = f64::from(s);
                    }
                    *sq = sum_of_squares(dst);
                }
                // yᵀ [k, len]: column i is y_i, in contiguous memory.
                let xm = MatRef::from_row_major_slice(&x, len, d);
                let mut y = Mat::<f64>::zeros(k, len);
                matmul(
                    y.as_mut(),
                    Accum::Replace,
                    vt.as_ref(),
                    xm.transpose(),
                    1.0,
                    Par::Seq,
                );
                let yy: Vec<f64> = (0..len)
                    .map(|i| y.col(i).iter().map(|c| c * c).sum())
                    .collect();
                let mut sums = [0.0f64; 4];
                for (a, b) in xx.iter().zip(&yy) {
                    let difference = a - b;
                    sums[0] += difference;
                    sums[1] += difference.abs();
                    sums[2] += a;
                    sums[3] += b;
                }
                sums
            })
            .collect()
    });
    let mut total = [0.0f64; 4];
    for part in &parts {
        for (t, p) in total.iter_mut().zip(part) {
            *t += p;
        }
    }
    let [residual, absolute, sx, sy] = total;
    let (v_norm, deviation) = column_norms(v);
    // The sums over rows only say how large Σ ‖x‖² and Σ ‖y‖² are: rounded up.
    let rows_up = 1.0 + gamma(ROW_BLOCK + parts.len());
    let (sx, sy) = (sx * rows_up, sy * rows_up);
    // ‖x‖²: squares exact, summed in 8 lanes of ⌈D/8⌉ terms.
    let x_error = gamma(d.div_ceil(8) + 8) * sx;
    // ‖y‖²: each y_c is within γ_y Σ_l |x_l| |v_lc| of its exact value, so ‖δy‖ ≤ γ_y ‖V‖_F
    // ‖x‖, and ‖y‖ ≤ ‖V‖₂ ‖x‖ ≤ √(1 + deviation) ‖x‖; then the k squares are summed.
    let gamma_y = gamma(d);
    let dy = gamma_y * v_norm;
    let y_error = (2.0 * (1.0 + deviation).sqrt() + dy) * dy * sx + gamma(k) * sy;
    // The differences' own rounding and their sum's, and V's columns not quite orthonormal.
    let sum_error = gamma(ROW_BLOCK + parts.len() + 2) * absolute;
    let bound = residual + x_error + y_error + sum_error + deviation * sy * (1.0 + 4.0 * U);
    // The few operations above round too: a relative margin far above them.
    bound.max(0.0) * (1.0 + 1e-9) / n as f64
}

/// The sum of the squares of a row, in 8 lanes (what `tail_bound`'s rounding bound assumes).
fn sum_of_squares(row: &[f64]) -> f64 {
    let mut lanes = [0.0f64; 8];
    for chunk in row.chunks(8) {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            *lane += x * x;
        }
    }
    lanes.iter().sum()
}

/// Whether every eigenvalue of the symmetric PSD matrix `g` on the orthogonal complement of
/// `v`'s (orthonormal) columns is certainly below `cutoff`: `cutoff·I − P g P` with
/// `P = I − V Vᵀ` has a Cholesky factor once `cutoff` is lowered by a margin that covers the
/// rounding of `P g P`, of the factorisation (Demmel's bound: a factor exists for any matrix
/// within `(D + 1)·u` of one that is positive definite by that margin, relative to its
/// diagonal) and the deviation of V's columns from orthonormal.
pub fn complement_below(g: MatRef<f64>, v: MatRef<f64>, cutoff: f64) -> bool {
    let d = g.nrows();
    let trace: f64 = (0..d).map(|i| g[(i, i)].max(0.0)).sum();
    let (_, deviation) = column_norms(v);
    let margin = 8.0 * (gamma(d + 2) * (trace + d as f64 * cutoff) + deviation * trace);
    let lowered = cutoff - margin;
    if lowered <= 0.0 {
        return false;
    }
    // P g P = g − (V Wᵀ + W Vᵀ) with W = g V − ½ V (Vᵀ g V).
    let gv = g * v;
    let vgv = v.transpose() * &gv;
    let w = &gv - v * &vgv * 0.5;
    let mut a = Mat::from_fn(d, d, |i, j| -g[(i, j)]);
    matmul(a.as_mut(), Accum::Add, v, w.transpose(), 1.0, Par::Seq);
    matmul(
        a.as_mut(),
        Accum::Add,
        w.as_ref(),
        v.transpose(),
        1.0,
        Par::Seq,
    );
    for i in 0..d {
        a[(i, i)] += lowered;
    }
    a.llt(Side::Lower).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// Rows in the span of the first `k` axes (scaled), plus `noise` on every axis.
    fn rows(n: usize, d: usize, k: usize, noise: f32) -> Array2<f32> {
        Array2::from_shape_fn((n, d), |(i, j)| {
            let signal = if j < k {
                ((i * 31 + j * 17) % 23) as f32 / 23.0 - 0.4 + 0.1 * j as f32
            } else {
                0.0
            };
            let wiggle = ((i * 7 + j * 13) % 11) as f32 / 11.0 - 0.5;
            signal + noise * wiggle
        })
    }

    fn axes(d: usize, k: usize) -> Mat<f64> {
        Mat::from_fn(d, k, |i, j| if i == j { 1.0 } else { 0.0 })
    }

    #[test]
    fn the_tail_bound_is_tiny_for_rows_in_the_span_and_bounds_the_direct_residual() {
        let (n, d, k) = (ROW_BLOCK + 200, 96, 10);
        let exact = rows(n, d, k, 0.0);
        let bound = tail_bound(exact.view(), axes(d, k).as_ref());
        let scale: f64 = exact.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n as f64;
        assert!(bound < 1e-12 * scale, "{bound} vs {scale}");
        // With noise outside the span the bound is at least the residual itself.
        let noisy = rows(n, d, k, 1e-3);
        let bound = tail_bound(noisy.view(), axes(d, k).as_ref());
        let residual: f64 = noisy
            .rows()
            .into_iter()
            .map(|r| r.iter().skip(k).map(|&x| f64::from(x).powi(2)).sum::<f64>())
            .sum::<f64>()
            / n as f64;
        assert!(bound >= residual && bound < residual * (1.0 + 1e-6) + 1e-11 * scale);
    }

    #[test]
    fn the_complement_test_sees_a_direction_just_above_the_cutoff() {
        // Eigenvalues 1, 0.5 on the first two axes, then 1e-6 on the third, 1e-9 elsewhere.
        let d = 40;
        let g = Mat::from_fn(d, d, |i, j| match (i == j, i) {
            (true, 0) => 1.0,
            (true, 1) => 0.5,
            (true, 2) => 1e-6,
            (true, _) => 1e-9,
            _ => 0.0,
        });
        let v = axes(d, 2);
        assert!(complement_below(g.as_ref(), v.as_ref(), 2e-6));
        assert!(!complement_below(g.as_ref(), v.as_ref(), 0.99e-6));
        assert!(complement_below(g.as_ref(), axes(d, 3).as_ref(), 2e-9));
    }
}
