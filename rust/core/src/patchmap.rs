//! Patch-map reductions: from per-patch scores to normalised heatmaps at image resolution.
//!
//! The paper's zero-shot segmentation turns each image's patch scores against the class
//! texts into a heatmap: the predicted class's score minus the mean over classes
//! (`class_heatmaps`), upsampled bilinearly to the image size, negatives clipped, min–max
//! normalised (`normalised_heatmap`), and thresholded at its mean (`foreground`).
//! Every image is independent, so the batch functions run in parallel over images.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::parallel;

/// The first NaN or infinity of a 3-D array, as an error naming its index.
pub fn check_finite3<T: Copy + Into<f64>>(what: &str, a: &ArrayView3<T>) -> Result<()> {
    match a.indexed_iter().find(|(_, v)| !(**v).into().is_finite()) {
        Some(((i, j, k), _)) => Err(Error::NonFinite {
            what: what.to_string(),
            index: vec![i, j, k],
        }),
        None => Ok(()),
    }
}

/// Each image's heatmap from its patch scores [N, P, C] against C class texts: the score of
/// its class `classes[n]` minus the mean score over all classes → [N, P].
pub fn class_heatmaps(scores: ArrayView3<f32>, classes: &[i64]) -> Result<Array2<f64>> {
    let (n, p, c) = scores.dim();
    if classes.len() != n {
        return Err(Error::shape(
            "classes",
            format!("[{n}] (one class per image of the scores)"),
            format!("[{}]", classes.len()),
        ));
    }
    if c == 0 {
        return Err(Error::shape(
            "scores",
            "[N, P, C] with C >= 1",
            format!("[{n}, {p}, 0]"),
        ));
    }
    if let Some((i, &k)) = classes
        .iter()
        .enumerate()
        .find(|(_, &k)| k < 0 || k as usize >= c)
    {
        return Err(Error::value(
            format!("classes[{i}]"),
            format!("a class index in 0..{c}"),
            k.to_string(),
        ));
    }
    check_finite3("scores", &scores)?;
    let mut out = Array2::<f64>::zeros((n, p));
    let rows = out.as_slice_mut().expect("a fresh array is contiguous");
    parallel::install(|| {
        rows.par_chunks_mut(p.max(1))
            .enumerate()
            .for_each(|(i, row)| {
                let image = scores.index_axis(Axis(0), i);
                let class = classes[i] as usize;
                for (j, patch) in image.outer_iter().enumerate() {
                    let mean = patch.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
                    row[j] = patch[class] as f64 - mean;
                }
            });
    });
    Ok(out)
}

/// How a heatmap is upsampled and normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arithmetic {
    /// Source coordinates from the exact ratio of the sizes, everything in float64; a
    /// constant map becomes all zeros and is scored like any other.
    Exact,
    /// The paper's code: PyTorch's float32 `interpolate(scale_factor=patch, mode="bilinear")`
    /// (source coordinates from the float32 reciprocal of the factor) and float32 min–max;
    /// a map that is constant after clipping is its 0/0 case, scored with AP = 0.5.
    Paper,
}

/// Bilinear interpolation weights from `input` to `output` samples with half-pixel centres
/// (PyTorch's `interpolate(mode="bilinear", align_corners=False)`): for each output sample,
/// the two source indices and the weight of the second.
fn bilinear_taps(input: usize, output: usize, arithmetic: Arithmetic) -> Vec<(usize, usize, f64)> {
    let exact = input as f64 / output as f64;
    // PyTorch, given a scale factor, uses 1/factor in the input's precision.
    let single = 1.0f32 / (output as f32 / input as f32);
    (0..output)
        .map(|o| {
            let src = match arithmetic {
                Arithmetic::Exact => ((o as f64 + 0.5) * exact - 0.5).max(0.0),
                Arithmetic::Paper => (single * (o as f32 + 0.5) - 0.5).max(0.0) as f64,
            };
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 + 1 < input { i0 + 1 } else { i0 };
            let t = match arithmetic {
                Arithmetic::Exact => src - i0 as f64,
                Arithmetic::Paper => (src as f32 - i0 as f32) as f64,
            };
            (i0, i1, t)
        })
        .collect()
}

/// Precomputed separable bilinear upsampling from [h, w] to [height, width].
pub struct Upsampler {
    rows: Vec<(usize, usize, f64)>,
    cols: Vec<(usize, usize, f64)>,
    w: usize,
    arithmetic: Arithmetic,
}

impl Upsampler {
    pub fn new(h: usize, w: usize, height: usize, width: usize, arithmetic: Arithmetic) -> Self {
        Upsampler {
            rows: bilinear_taps(h, height, arithmetic),
            cols: bilinear_taps(w, width, arithmetic),
            w,
            arithmetic,
        }
    }

    pub fn height(&self) -> usize {
        self.rows.len()
    }

    pub fn width(&self) -> usize {
        self.cols.len()
    }

    /// Writes the upsampled `map` [h, w] into `out` (row-major [height, width]); `columns`
    /// is scratch of h·width values.
    pub fn upsample(&self, map: ArrayView2<f64>, columns: &mut Vec<f64>, out: &mut [f64]) {
        let (h, width) = (map.nrows(), self.width());
        debug_assert_eq!(map.ncols(), self.w);
        columns.clear();
        columns.resize(h * width, 0.0);
        if self.arithmetic == Arithmetic::Paper {
            return self.upsample_single(map, columns, out);
        }
        for (r, src) in map.outer_iter().enumerate() {
            let dst = &mut columns[r * width..(r + 1) * width];
            for (d, &(c0, c1, t)) in dst.iter_mut().zip(&self.cols) {
                *d = src[c0] * (1.0 - t) + src[c1] * t;
            }
        }
        for (o, &(r0, r1, t)) in out.chunks_exact_mut(width).zip(&self.rows) {
            let (a, b) = (&columns[r0 * width..], &columns[r1 * width..]);
            for ((d, &x0), &x1) in o.iter_mut().zip(a).zip(b) {
                *d = x0 * (1.0 - t) + x1 * t;
            }
        }
    }

    /// `upsample` in float32, grouped as PyTorch's bilinear kernel groups it:
    /// `h0·(w0·v00 + w1·v01) + h1·(w0·v10 + w1·v11)`.
    fn upsample_single(&self, map: ArrayView2<f64>, columns: &mut [f64], out: &mut [f64]) {
        let width = self.width();
        for (r, src) in map.outer_iter().enumerate() {
            let dst = &mut columns[r * width..(r + 1) * width];
            for (d, &(c0, c1, t)) in dst.iter_mut().zip(&self.cols) {
                let t = t as f32;
                *d = ((1.0 - t) * src[c0] as f32 + t * src[c1] as f32) as f64;
            }
        }
        for (o, &(r0, r1, t)) in out.chunks_exact_mut(width).zip(&self.rows) {
            let t = t as f32;
            let (a, b) = (&columns[r0 * width..], &columns[r1 * width..]);
            for ((d, &x0), &x1) in o.iter_mut().zip(a).zip(b) {
                *d = ((1.0 - t) * x0 as f32 + t * x1 as f32) as f64;
            }
        }
    }
}

/// The paper's heatmap at image resolution, in place on the upsampled map: negatives
/// clipped to zero, then min–max normalised to [0, 1]. A constant map becomes all zeros;
/// the return value says whether it was one.
pub fn clip_and_normalise(values: &mut [f64], arithmetic: Arithmetic) -> bool {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for v in values.iter_mut() {
        // `+0.0` for every non-positive value (never `-0.0`), so bit patterns sort as values.
        *v = if *v > 0.0 { *v } else { 0.0 };
        lo = lo.min(*v);
        hi = hi.max(*v);
    }
    let range = hi - lo;
    if arithmetic == Arithmetic::Paper {
        let (lo, range) = (lo as f32, range as f32);
        for v in values.iter_mut() {
            *v = if range > 0.0 {
                ((*v as f32 - lo) / range) as f64
            } else {
                0.0
            };
        }
        return range <= 0.0;
    }
    for v in values.iter_mut() {
        *v = if range > 0.0 { (*v - lo) / range } else { 0.0 };
    }
    range <= 0.0
}

/// The threshold of a normalised heatmap: its mean; the foreground is the pixels above it.
pub fn mean_threshold(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

pub(crate) fn check_maps(maps: &ArrayView3<f64>, height: usize, width: usize) -> Result<()> {
    let (n, h, w) = maps.dim();
    if h == 0 || w == 0 {
        return Err(Error::shape(
            "heatmaps",
            "[N, h, w] with h, w >= 1",
            format!("[{n}, {h}, {w}]"),
        ));
    }
    if height == 0 || width == 0 {
        return Err(Error::value(
            "size",
            "an output size of at least 1×1",
            format!("{height}×{width}"),
        ));
    }
    check_finite3("heatmaps", maps)
}

/// Normalised heatmaps [N, height, width] from patch-resolution maps [N, h, w].
pub fn normalised_heatmaps(
    maps: ArrayView3<f64>,
    height: usize,
    width: usize,
    arithmetic: Arithmetic,
) -> Result<Array3<f64>> {
    check_maps(&maps, height, width)?;
    let (n, h, w) = maps.dim();
    let up = Upsampler::new(h, w, height, width, arithmetic);
    let mut out = Array3::<f64>::zeros((n, height, width));
    let images = out.as_slice_mut().expect("a fresh array is contiguous");
    parallel::install(|| {
        images
            .par_chunks_mut(height * width)
            .enumerate()
            .for_each_init(Vec::new, |columns, (i, values)| {
                up.upsample(maps.index_axis(Axis(0), i), columns, values);
                clip_and_normalise(values, arithmetic);
            });
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn upsampling_keeps_constants_and_interpolates_half_pixel_centres() {
        let up = Upsampler::new(2, 2, 4, 4, Arithmetic::Exact);
        let map = array![[0.0, 1.0], [2.0, 3.0]];
        let mut out = vec![0.0; 16];
        up.upsample(map.view(), &mut Vec::new(), &mut out);
        // align_corners=False: output column centres map to -0.25, 0.25, 0.75, 1.25.
        assert_eq!(&out[..4], &[0.0, 0.25, 0.75, 1.0]);
        assert_eq!(&out[12..], &[2.0, 2.25, 2.75, 3.0]);
        let mut flat = vec![0.0; 16];
        up.upsample(
            Array2::from_elem((2, 2), 7.5).view(),
            &mut Vec::new(),
            &mut flat,
        );
        assert!(flat.iter().all(|&v| v == 7.5));
    }

    #[test]
    fn normalisation_clips_and_spans_zero_to_one() {
        let mut v = vec![-1.0, 0.5, 2.0, 1.0];
        assert!(!clip_and_normalise(&mut v, Arithmetic::Exact));
        assert_eq!(v, vec![0.0, 0.25, 1.0, 0.5]);
        let mut flat = vec![-3.0; 5];
        assert!(clip_and_normalise(&mut flat, Arithmetic::Paper));
        assert!(flat.iter().all(|&x| x == 0.0 && x.is_sign_positive()));
        assert_eq!(mean_threshold(&v), 0.4375);
    }

    #[test]
    fn class_heatmaps_subtract_the_mean_class_and_name_bad_classes() {
        let scores =
            Array3::from_shape_vec((1, 2, 3), vec![1.0f32, 2.0, 3.0, 0.0, 0.0, 6.0]).unwrap();
        let h = class_heatmaps(scores.view(), &[2]).unwrap();
        assert_eq!(h, array![[1.0, 4.0]]);
        let err = class_heatmaps(scores.view(), &[3]).unwrap_err();
        assert!(err.to_string().contains("classes[0]"), "{err}");
    }
}
