//! Per-head statistics of head outputs: count, mean and centred scatter
//! `Σ (x − μ)(x − μ)ᵀ`, accumulated in float64.
//!
//! Rows are centred on their mean before they are multiplied, which keeps the products well
//! conditioned however large the mean. Merging the moments of different batches (Chan's
//! pairwise formula) is the Python `HeadStats.merge`.
//!
//! The products are float64 (exact up to float64 rounding: what stores keep), or float32
//! summed into float64 across blocks of rows (`Products::Float32`: twice the speed, with a
//! bound on the error that lets TextSpan tell when the result cannot differ from the exact
//! one, and fall back when it could).

use faer::linalg::matmul::triangular::{matmul as triangular_matmul, BlockStructure};
use faer::{Accum, Mat, MatMut, MatRef, Par};
use ndarray::{s, Array2, Array3, ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::parallel;
use crate::scalar::Real;

/// Rows centred and multiplied at a time: bounds the copy of the centred rows.
pub const ROW_BLOCK: usize = 1024;
/// Rows centred together by one task.
const ROWS_PER_TASK: usize = 64;

/// The precision of the scatter's products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    /// Float64 products: exact up to float64 rounding.
    Float64,
    /// The centred rows rounded to float32 and multiplied in float32, one block of
    /// `ROW_BLOCK` rows at a time; the blocks are summed in float64.
    Float32,
}

/// Count, mean and centred scatter of one set of rows.
#[derive(Debug, Clone)]
pub struct Moments {
    pub count: usize,
    pub mean: Vec<f64>,
    /// `Σ (x − μ)(x − μ)ᵀ`, a dense symmetric D×D matrix.
    pub scatter: Mat<f64>,
    /// A bound on the spectral norm of the difference between `scatter` and the exact
    /// scatter of the rows, from the precision of the products (0 for float64 products,
    /// whose rounding is far below anything TextSpan resolves).
    pub scatter_error: f64,
}

/// The float32 products' error bound as a multiple of the scatter's trace. Each entry
/// `Σ_i x_ij x_ik` of a block's product is a sum of at most `ROW_BLOCK` float32 products of
/// rounded values, so its error is at most `(γ_b + 2u + u²)(1 + …) Σ_i |x_ij| |x_ik|`
/// (Higham, Accuracy and Stability of Numerical Algorithms, §3.1; u = 2⁻²⁴,
/// γ_b = b·u / (1 − b·u)); summing the blocks in float64 adds nothing of that order. The
/// spectral norm of the error is at most its Frobenius norm, hence at most the factor times
/// the Frobenius norm of |X|ᵀ|X|, which is at most that matrix's trace, `Σ_i ‖x_i‖²`: the
/// exact scatter's trace. The computed diagonal is within the same factor of the exact one,
/// hence the division by `1 − factor`; the last 1% covers the float64 sums.
fn float32_error_factor(block: usize) -> f64 {
    let u = f64::from(f32::EPSILON) / 2.0;
    let gamma = block as f64 * u / (1.0 - block as f64 * u);
    let entry = (1.0 + gamma) * (1.0 + 2.0 * u + u * u) - 1.0;
    1.01 * entry / (1.0 - entry)
}

/// Moments of one head's rows [n, D]; `head` only names the head in errors.
///
/// Two passes: the mean (row blocks summed in a fixed order), then the scatter of the
/// centred rows, one symmetric product per block of `ROW_BLOCK` rows. `par` splits each
/// product's output among threads; every entry is still summed in the same order, so the
/// result does not depend on the number of threads.
fn head_moments<T: Real>(
    rows: ArrayView2<T>,
    head: usize,
    par: Par,
    products: Products,
) -> Result<Moments> {
    let (n, d) = rows.dim();
    // Rows as slices; a view whose rows are not contiguous is copied once.
    let owned;
    let rows = if rows.strides()[1] == 1 {
        rows
    } else {
        owned = rows.as_standard_layout().into_owned();
        owned.view()
    };
    let mean = column_means(rows, head)?;
    let mut scatter = Mat::<f64>::zeros(d, d);
    let mut scatter_error = 0.0;
    match products {
        Products::Float64 => {
            for_each_centred_block::<T, f64>(rows, &mean, |centred, first| {
                lower_gram(scatter.as_mut(), centred, first, par)
            });
        }
        Products::Float32 => {
            let mut part = Mat::<f32>::zeros(d, d);
            for_each_centred_block::<T, f32>(rows, &mean, |centred, _| {
                lower_gram(part.as_mut(), centred, true, par);
                add_lower(scatter.as_mut(), part.as_ref());
            });
            let trace: f64 = (0..d).map(|i| scatter[(i, i)]).sum();
            scatter_error = float32_error_factor(ROW_BLOCK.min(n)) * trace;
        }
    }
    for j in 0..d {
        for i in 0..j {
            scatter[(i, j)] = scatter[(j, i)];
        }
    }
    Ok(Moments {
        count: n,
        mean,
        scatter,
        scatter_error,
    })
}

/// The mean of each column, row blocks summed in a fixed order; a non-finite entry is an
/// error naming its index [row, head, column].
fn column_means<T: Real>(rows: ArrayView2<T>, head: usize) -> Result<Vec<f64>> {
    let (n, d) = rows.dim();
    let row = |i: usize| rows.row(i).to_slice().expect("rows with unit stride");
    let sums: Vec<Vec<f64>> = (0..n.div_ceil(ROW_BLOCK))
        .into_par_iter()
        .map(|b| {
            let mut sum = vec![0.0f64; d];
            for i in b * ROW_BLOCK..((b + 1) * ROW_BLOCK).min(n) {
                for (acc, &x) in sum.iter_mut().zip(row(i)) {
                    *acc += x.to_f64();
                }
            }
            sum
        })
        .collect();
    let mut mean = vec![0.0f64; d];
    for sum in &sums {
        for (m, s) in mean.iter_mut().zip(sum) {
            *m += s;
        }
    }
    // A NaN or an infinity anywhere makes its column's sum non-finite: only then look for it.
    if mean.iter().any(|m| !m.is_finite()) {
        for i in 0..n {
            if let Some(j) = row(i).iter().position(|x| !x.to_f64().is_finite()) {
                return Err(Error::NonFinite {
                    what: "head outputs".into(),
                    index: vec![i, head, j],
                });
            }
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    Ok(mean)
}

/// Calls `f` on each block of at most `ROW_BLOCK` rows centred on `mean` (computed in
/// float64, then rounded to `P`), and whether it is the first block.
fn for_each_centred_block<T: Real, P: Real>(
    rows: ArrayView2<T>,
    mean: &[f64],
    mut f: impl FnMut(MatRef<P>, bool),
) {
    let (n, d) = rows.dim();
    let row = |i: usize| rows.row(i).to_slice().expect("rows with unit stride");
    let mut centred = vec![P::from_f64(0.0); ROW_BLOCK.min(n) * d];
    for (b, start) in (0..n).step_by(ROW_BLOCK).enumerate() {
        let len = ROW_BLOCK.min(n - start);
        centred[..len * d]
            .par_chunks_mut(d * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(t, dst)| {
                for (i, dst) in dst.chunks_mut(d).enumerate() {
                    let src = row(start + t * ROWS_PER_TASK + i);
                    for ((y, &x), m) in dst.iter_mut().zip(src).zip(mean) {
                        *y = P::from_f64(x.to_f64() - m);
                    }
                }
            });
        f(
            MatRef::from_row_major_slice(&centred[..len * d], len, d),
            b == 0,
        );
    }
}

/// The lower triangle of `centredᵀ centred`, written (`replace`) or added into `dst`.
fn lower_gram<P: Real>(dst: MatMut<P>, centred: MatRef<P>, replace: bool, par: Par) {
    triangular_matmul(
        dst,
        BlockStructure::TriangularLower,
        if replace { Accum::Replace } else { Accum::Add },
        centred.transpose(),
        BlockStructure::Rectangular,
        centred,
        BlockStructure::Rectangular,
        P::from_f64(1.0),
        par,
    );
}

/// Adds the lower triangle of `part` into `dst`, a column slice at a time (both are
/// column-major).
fn add_lower(mut dst: MatMut<f64>, part: MatRef<f32>) {
    for j in 0..part.ncols() {
        let src = part
            .col(j)
            .try_as_col_major()
            .expect("a column-major matrix");
        let column = dst.as_mut().col_mut(j);
        let column = column
            .try_as_col_major_mut()
            .expect("a column-major matrix");
        for (y, &x) in column.as_slice_mut()[j..]
            .iter_mut()
            .zip(&src.as_slice()[j..])
        {
            *y += f64::from(x);
        }
    }
}

/// Moments of every head of `x` [n, K, D]. Many heads run in parallel, one thread each;
/// fewer heads than threads run one after another, each product split among the threads.
pub fn batch_moments<T: Real>(x: ArrayView3<T>, products: Products) -> Result<Vec<Moments>> {
    let (n, k, d) = x.dim();
    if n == 0 || d == 0 {
        return Err(Error::shape(
            "head outputs",
            "[n >= 1, heads, D >= 1]",
            format!("[{n}, {k}, {d}]"),
        ));
    }
    let head = |h: usize| x.slice(s![.., h, ..]);
    parallel::install(|| {
        let threads = rayon::current_num_threads();
        if k >= 2 * threads {
            (0..k)
                .into_par_iter()
                .map(|h| head_moments(head(h), h, Par::Seq, products))
                .collect()
        } else {
            (0..k)
                .map(|h| head_moments(head(h), h, Par::rayon(threads), products))
                .collect()
        }
    })
}

/// Means [K, D], scatters [K, D, D] and the scatters' error bounds [K].
pub type MomentArrays = (Array2<f64>, Array3<f64>, Vec<f64>);

/// The same as `batch_moments`, packed as arrays.
pub fn batch_moments_arrays<T: Real>(x: ArrayView3<T>, products: Products) -> Result<MomentArrays> {
    let moments = batch_moments(x, products)?;
    let (_, k, d) = x.dim();
    let mut means = Array2::<f64>::zeros((k, d));
    let mut scatters = Array3::<f64>::zeros((k, d, d));
    for (h, m) in moments.iter().enumerate() {
        for j in 0..d {
            means[[h, j]] = m.mean[j];
        }
        let mut s = scatters.index_axis_mut(Axis(0), h);
        for i in 0..d {
            // Symmetric: row i is faer's column i, contiguous on both sides.
            let column = m
                .scatter
                .col(i)
                .try_as_col_major()
                .expect("a column-major matrix");
            let mut row = s.row_mut(i);
            row.as_slice_mut()
                .expect("a standard-layout array")
                .copy_from_slice(column.as_slice());
        }
    }
    let errors = moments.iter().map(|m| m.scatter_error).collect();
    Ok((means, scatters, errors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    fn direct(x: &Array3<f64>, h: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
        let (n, _, d) = x.dim();
        let mean: Vec<f64> = (0..d)
            .map(|j| (0..n).map(|i| x[[i, h, j]]).sum::<f64>() / n as f64)
            .collect();
        let scatter = (0..d)
            .map(|a| {
                (0..d)
                    .map(|b| {
                        (0..n)
                            .map(|i| (x[[i, h, a]] - mean[a]) * (x[[i, h, b]] - mean[b]))
                            .sum()
                    })
                    .collect()
            })
            .collect();
        (mean, scatter)
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn blocked_moments_match_the_direct_sums() {
        // More rows than one block, so the accumulation over blocks is exercised.
        let (n, k, d) = (ROW_BLOCK + 123, 2, 5);
        let x = Array3::from_shape_fn((n, k, d), |(i, h, j)| {
            ((i * 7 + h * 13 + j * 3) % 17) as f64 * 0.1 + 3.0 + (i % 5) as f64 * j as f64 * 0.01
        });
        let got = batch_moments(x.view(), Products::Float64).unwrap();
        for (h, m) in got.iter().enumerate() {
            let (mean, scatter) = direct(&x, h);
            assert_eq!(m.count, n);
            for j in 0..d {
                assert!((m.mean[j] - mean[j]).abs() < 1e-12);
                for l in 0..d {
                    let rel =
                        (m.scatter[(j, l)] - scatter[j][l]).abs() / scatter[j][l].abs().max(1.0);
                    assert!(
                        rel < 1e-10,
                        "scatter[{j},{l}] {} vs {}",
                        m.scatter[(j, l)],
                        scatter[j][l]
                    );
                }
            }
        }
    }

    #[test]
    fn float32_products_stay_within_their_error_bound() {
        // Two blocks, a mean far larger than the spread (centring happens in float64), and
        // values that float32 cannot hold exactly.
        let (n, d) = (ROW_BLOCK + 300, 40);
        let x = Array3::from_shape_fn((n, 1, d), |(i, _, j)| {
            1e3 + ((i * 37 + j * 11) % 101) as f64 / 7.0 + (j as f64 * 0.3).sin() * i as f64 / 1e3
        });
        let exact = &batch_moments(x.view(), Products::Float64).unwrap()[0];
        let fast = &batch_moments(x.view(), Products::Float32).unwrap()[0];
        assert_eq!(exact.scatter_error, 0.0);
        assert_eq!(fast.mean, exact.mean);
        let difference = (0..d)
            .flat_map(|i| (0..d).map(move |j| (i, j)))
            .map(|(i, j)| (fast.scatter[(i, j)] - exact.scatter[(i, j)]).powi(2))
            .sum::<f64>()
            .sqrt();
        // The Frobenius norm bounds the spectral norm the bound is about.
        assert!(difference > 0.0, "float32 products were not used");
        assert!(
            difference <= fast.scatter_error,
            "{difference} > {}",
            fast.scatter_error
        );
        let trace: f64 = (0..d).map(|i| exact.scatter[(i, i)]).sum();
        assert!(fast.scatter_error < 1e-4 * trace);
    }

    #[test]
    fn non_finite_rows_are_reported_with_their_index() {
        let mut x = Array3::<f32>::zeros((3, 2, 4));
        x[[2, 1, 3]] = f32::NAN;
        let err = batch_moments(x.view(), Products::Float64).unwrap_err();
        assert_eq!(
            err,
            Error::NonFinite {
                what: "head outputs".into(),
                index: vec![2, 1, 3]
            }
        );
    }
}
