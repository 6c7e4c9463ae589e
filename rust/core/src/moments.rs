//! Exact per-head statistics of head outputs: count, mean and centred scatter
//! `Σ (x − μ)(x − μ)ᵀ`, accumulated in float64.
//!
//! Rows are centred on their mean before they are multiplied, which keeps the products well
//! conditioned however large the mean. Merging the moments of different batches (Chan's
//! pairwise formula) is the Python `HeadStats.merge`.

use faer::linalg::matmul::triangular::{matmul as triangular_matmul, BlockStructure};
use faer::{Accum, Mat, MatRef, Par};
use ndarray::{s, Array2, Array3, ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::parallel;
use crate::scalar::Real;

/// Rows centred and multiplied at a time: bounds the float64 copy of the rows.
pub const ROW_BLOCK: usize = 1024;
/// Columns centred together by one task.
const COLUMN_GROUP: usize = 16;

/// Count, mean and centred scatter of one set of rows.
#[derive(Debug, Clone)]
pub struct Moments {
    pub count: usize,
    pub mean: Vec<f64>,
    /// `Σ (x − μ)(x − μ)ᵀ`, a dense symmetric D×D matrix.
    pub scatter: Mat<f64>,
}

/// Moments of one head's rows [n, D]; `head` only names the head in errors.
///
/// Two passes: the mean (row blocks summed in a fixed order), then the scatter of the
/// centred rows, one symmetric product per block of `ROW_BLOCK` rows. `par` splits each
/// product's output among threads; every entry is still summed in the same order, so the
/// result does not depend on the number of threads.
fn head_moments<T: Real>(rows: ArrayView2<T>, head: usize, par: Par) -> Result<Moments> {
    let (n, d) = rows.dim();
    // Rows as slices; a view whose rows are not contiguous is copied once.
    let owned;
    let rows = if rows.strides()[1] == 1 {
        rows
    } else {
        owned = rows.as_standard_layout().into_owned();
        owned.view()
    };
    let row = |i: usize| rows.row(i).to_slice().expect("rows with unit stride");
    let blocks = n.div_ceil(ROW_BLOCK);
    let block_range = |b: usize| b * ROW_BLOCK..((b + 1) * ROW_BLOCK).min(n);
    let sums: Vec<Vec<f64>> = (0..blocks)
        .into_par_iter()
        .map(|b| {
            let mut sum = vec![0.0f64; d];
            for i in block_range(b) {
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

    let mut scatter = Mat::<f64>::zeros(d, d);
    let mut centred = vec![0.0f64; ROW_BLOCK.min(n) * d];
    for b in 0..blocks {
        let range = block_range(b);
        let len = range.len();
        // Column-major centred rows (faer multiplies this layout fastest), written in groups
        // of columns so that each row's cache line is read once per group.
        centred[..len * d]
            .par_chunks_mut(len * COLUMN_GROUP)
            .enumerate()
            .for_each(|(g, dst)| {
                let j0 = g * COLUMN_GROUP;
                let width = dst.len() / len;
                for (i, r) in range.clone().enumerate() {
                    let src = &row(r)[j0..j0 + width];
                    for (c, (&x, m)) in src.iter().zip(&mean[j0..j0 + width]).enumerate() {
                        dst[c * len + i] = x.to_f64() - m;
                    }
                }
            });
        let centred = MatRef::from_column_major_slice(&centred[..len * d], len, d);
        triangular_matmul(
            scatter.as_mut(),
            BlockStructure::TriangularLower,
            if b == 0 { Accum::Replace } else { Accum::Add },
            centred.transpose(),
            BlockStructure::Rectangular,
            centred,
            BlockStructure::Rectangular,
            1.0,
            par,
        );
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
    })
}

/// Moments of every head of `x` [n, K, D]. Many heads run in parallel, one thread each;
/// fewer heads than threads run one after another, each product split among the threads.
pub fn batch_moments<T: Real>(x: ArrayView3<T>) -> Result<Vec<Moments>> {
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
                .map(|h| head_moments(head(h), h, Par::Seq))
                .collect()
        } else {
            (0..k)
                .map(|h| head_moments(head(h), h, Par::rayon(threads)))
                .collect()
        }
    })
}

/// The same as `batch_moments`, packed as arrays: means [K, D] and scatters [K, D, D].
pub fn batch_moments_arrays<T: Real>(x: ArrayView3<T>) -> Result<(Array2<f64>, Array3<f64>)> {
    let moments = batch_moments(x)?;
    let (_, k, d) = x.dim();
    let mut means = Array2::<f64>::zeros((k, d));
    let mut scatters = Array3::<f64>::zeros((k, d, d));
    for (h, m) in moments.iter().enumerate() {
        for j in 0..d {
            means[[h, j]] = m.mean[j];
        }
        let mut s = scatters.index_axis_mut(Axis(0), h);
        for i in 0..d {
            for j in 0..d {
                s[[i, j]] = m.scatter[(i, j)];
            }
        }
    }
    Ok((means, scatters))
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
        let got = batch_moments(x.view()).unwrap();
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
    fn non_finite_rows_are_reported_with_their_index() {
        let mut x = Array3::<f32>::zeros((3, 2, 4));
        x[[2, 1, 3]] = f32::NAN;
        let err = batch_moments(x.view()).unwrap_err();
        assert_eq!(
            err,
            Error::NonFinite {
                what: "head outputs".into(),
                index: vec![2, 1, 3]
            }
        );
    }
}
