//! Segmentation metrics by the ImageNet-segmentation protocol the paper follows.
//!
//! For each image, the normalised heatmap s (see `patchmap`) is thresholded at its mean and
//! compared with the binary mask m. Over the whole set:
//! - pixel accuracy and the two-class mIoU come from counts summed over all images;
//! - mAP is the mean over images of the average precision of the two-channel score
//!   [1 − s, s] against the one-hot mask [1 − m, m] (both channels ranked together), with
//!   scikit-learn's definition: AP = Σ_k (R_k − R_{k−1}) P_k over distinct thresholds.

use numpy::ndarray::{ArrayView3, Axis};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::parallel;
use crate::patchmap::{check_maps, clip_and_normalise, foreground, Upsampler};

/// The three metrics over a set of images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegmentationScores {
    pub pixel_accuracy: f64,
    pub miou: f64,
    pub map: f64,
}

/// One image's counts and average precision; summed in image order, so the result does not
/// depend on the number of threads.
#[derive(Debug, Clone, Copy, Default)]
struct ImageCounts {
    correct: u64,
    pixels: u64,
    intersection: [u64; 2],
    union: [u64; 2],
    average_precision: f64,
}

/// Sorts non-negative finite floats ascending. Their bit patterns order like the values, so
/// an LSD radix sort on the upper 33 bits (3 passes of 11 bits, skipping a pass whose digit
/// all keys share) leaves only keys that agree in those bits — 20 leading mantissa bits —
/// out of order, and an insertion sort finishes those few short runs.
fn sort_non_negative(values: &mut [f64], scratch: &mut Vec<u64>, keys: &mut Vec<u64>) {
    const BITS: u32 = 11;
    const BUCKETS: usize = 1 << BITS;
    const PASSES: usize = 3;
    const LOW: u32 = 64 - BITS * PASSES as u32;
    keys.clear();
    keys.extend(values.iter().map(|v| v.to_bits()));
    scratch.clear();
    scratch.resize(keys.len(), 0);
    let digit = |k: u64, p: usize| ((k >> (LOW + p as u32 * BITS)) as usize) & (BUCKETS - 1);
    let mut counts = [[0_usize; BUCKETS]; PASSES];
    for &k in keys.iter() {
        for (p, c) in counts.iter_mut().enumerate() {
            c[digit(k, p)] += 1;
        }
    }
    for (p, c) in counts.iter_mut().enumerate() {
        if c.contains(&keys.len()) {
            continue; // every key has the same digit here
        }
        let mut offset = 0;
        for n in c.iter_mut() {
            let here = *n;
            *n = offset;
            offset += here;
        }
        for &k in keys.iter() {
            let d = digit(k, p);
            scratch[c[d]] = k;
            c[d] += 1;
        }
        std::mem::swap(keys, scratch);
    }
    for i in 1..keys.len() {
        let k = keys[i];
        let mut j = i;
        while j > 0 && keys[j - 1] > k {
            keys[j] = keys[j - 1];
            j -= 1;
        }
        keys[j] = k;
    }
    for (v, &k) in values.iter_mut().zip(keys.iter()) {
        *v = f64::from_bits(k);
    }
}

/// Merges two ascending lists into one descending list: `a` as is and `b` mapped by 1 − x
/// (which reverses its order).
fn merge_descending(a: &[f64], b: &[f64], out: &mut Vec<f64>) {
    out.clear();
    let (mut i, mut j) = (a.len(), 0);
    while i > 0 || j < b.len() {
        let from_a = i > 0 && (j == b.len() || a[i - 1] >= 1.0 - b[j]);
        if from_a {
            i -= 1;
            out.push(a[i]);
        } else {
            out.push(1.0 - b[j]);
            j += 1;
        }
    }
}

/// Average precision of scores split into positives and negatives, each sorted descending,
/// with tied scores forming one threshold (scikit-learn's `average_precision_score`).
pub fn average_precision_sorted(positives: &[f64], negatives: &[f64]) -> f64 {
    let total = positives.len() as f64;
    if positives.is_empty() {
        return f64::NAN;
    }
    let (mut i, mut j) = (0, 0);
    let (mut tp, mut fp) = (0_u64, 0_u64);
    let mut ap = 0.0;
    while i < positives.len() || j < negatives.len() {
        let threshold = match (positives.get(i), negatives.get(j)) {
            (Some(&p), Some(&n)) => p.max(n),
            (Some(&p), None) => p,
            (None, Some(&n)) => n,
            (None, None) => unreachable!(),
        };
        let tp_before = tp;
        while i < positives.len() && positives[i] == threshold {
            tp += 1;
            i += 1;
        }
        while j < negatives.len() && negatives[j] == threshold {
            fp += 1;
            j += 1;
        }
        if tp > tp_before {
            ap += (tp - tp_before) as f64 / total * (tp as f64 / (tp + fp) as f64);
        }
    }
    ap
}

#[derive(Default)]
struct Scratch {
    columns: Vec<f64>,
    heat: Vec<f64>,
    fg: Vec<f64>,
    bg: Vec<f64>,
    positives: Vec<f64>,
    negatives: Vec<f64>,
    keys: Vec<u64>,
    scratch: Vec<u64>,
}

fn image_counts(heat: &[f64], mask: &[u8], s: &mut Scratch) -> ImageCounts {
    let mut c = ImageCounts {
        pixels: heat.len() as u64,
        ..Default::default()
    };
    let mut predicted_area = [0_u64; 2];
    let mut mask_area = [0_u64; 2];
    s.fg.clear();
    s.bg.clear();
    for ((&v, &m), predicted) in heat.iter().zip(mask).zip(foreground(heat)) {
        let (p, t) = (predicted as usize, (m != 0) as usize);
        predicted_area[p] += 1;
        mask_area[t] += 1;
        if p == t {
            c.correct += 1;
            c.intersection[t] += 1;
        }
        // Clipped pixels are exact zeros, often half of them: they are counted, not sorted.
        if v > 0.0 {
            if t == 1 {
                s.fg.push(v);
            } else {
                s.bg.push(v);
            }
        }
    }
    for k in 0..2 {
        c.union[k] = predicted_area[k] + mask_area[k] - c.intersection[k];
    }
    for (list, zeros) in [(&mut s.fg, mask_area[1]), (&mut s.bg, mask_area[0])] {
        let positive = list.len();
        sort_non_negative(list, &mut s.scratch, &mut s.keys);
        list.splice(0..0, std::iter::repeat_n(0.0, zeros as usize - positive));
    }
    // Positives: s on the mask and 1 − s off it; negatives: s off the mask and 1 − s on it.
    merge_descending(&s.fg, &s.bg, &mut s.positives);
    merge_descending(&s.bg, &s.fg, &mut s.negatives);
    c.average_precision = average_precision_sorted(&s.positives, &s.negatives);
    c
}

/// Pixel accuracy, mIoU and mAP of patch-resolution heatmaps [N, h, w] against binary masks
/// [N, H, W] (0 or 1): each map is upsampled to its mask's size, clipped, min–max
/// normalised and thresholded at its mean (see `patchmap`).
pub fn segmentation_scores(
    maps: ArrayView3<f64>,
    masks: ArrayView3<u8>,
) -> Result<SegmentationScores> {
    let (n, h, w) = maps.dim();
    let (nm, height, width) = masks.dim();
    if nm != n || n == 0 {
        return Err(Error::shape(
            "heatmaps and masks",
            "[N, h, w] and [N, H, W] with the same N >= 1",
            format!("heatmaps [{n}, {h}, {w}] and masks [{nm}, {height}, {width}]"),
        ));
    }
    check_maps(&maps, height, width)?;
    if let Some(((i, y, x), v)) = masks.indexed_iter().find(|(_, &v)| v > 1) {
        return Err(Error::value(
            format!("masks[{i}, {y}, {x}]"),
            "a binary mask (0 or 1)",
            v.to_string(),
        ));
    }
    let up = Upsampler::new(h, w, height, width);
    let per_image: Vec<ImageCounts> = parallel::install(|| {
        (0..n)
            .into_par_iter()
            .map_init(Scratch::default, |s, i| {
                s.heat.resize(height * width, 0.0);
                up.upsample(maps.index_axis(Axis(0), i), &mut s.columns, &mut s.heat);
                clip_and_normalise(&mut s.heat);
                let mask = masks.index_axis(Axis(0), i);
                let heat = std::mem::take(&mut s.heat);
                let counts = match mask.as_slice() {
                    Some(m) => image_counts(&heat, m, s),
                    None => image_counts(&heat, &mask.iter().copied().collect::<Vec<_>>(), s),
                };
                s.heat = heat;
                counts
            })
            .collect()
    });
    let mut total = ImageCounts::default();
    for c in &per_image {
        total.correct += c.correct;
        total.pixels += c.pixels;
        for k in 0..2 {
            total.intersection[k] += c.intersection[k];
            total.union[k] += c.union[k];
        }
        total.average_precision += c.average_precision;
    }
    // The protocol's IoU: intersection / (ε + union), summed over the set, per class.
    let iou = |k: usize| total.intersection[k] as f64 / (f64::EPSILON + total.union[k] as f64);
    Ok(SegmentationScores {
        pixel_accuracy: total.correct as f64 / total.pixels as f64,
        miou: (iou(0) + iou(1)) / 2.0,
        map: total.average_precision / n as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, directly: rank all scores, one threshold per distinct value.
    fn average_precision_direct(scores: &[f64], labels: &[bool]) -> f64 {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let total = labels.iter().filter(|&&l| l).count() as f64;
        let (mut tp, mut fp, mut ap, mut k) = (0.0, 0.0, 0.0, 0);
        while k < order.len() {
            let t = scores[order[k]];
            let before = tp;
            while k < order.len() && scores[order[k]] == t {
                if labels[order[k]] {
                    tp += 1.0
                } else {
                    fp += 1.0
                }
                k += 1;
            }
            ap += (tp - before) / total * tp / (tp + fp);
        }
        ap
    }

    #[test]
    fn radix_sort_orders_like_the_values() {
        let mut v: Vec<f64> = (0..5000)
            .map(|i| ((i * 7919 % 5003) as f64 / 5003.0).powi(3))
            .chain([0.0, 1.0, 0.5, 0.5, 0.5 + 1e-15, 0.5 - 1e-15, 1e-300])
            .collect();
        let mut expected = v.clone();
        expected.sort_by(f64::total_cmp);
        sort_non_negative(&mut v, &mut Vec::new(), &mut Vec::new());
        assert_eq!(v, expected);
    }

    #[test]
    fn two_channel_average_precision_equals_the_direct_definition() {
        // Coarse values, so that ties within and across channels occur.
        let heat: Vec<f64> = (0..400)
            .map(|i| ((i * 37 % 101) / 10) as f64 / 10.0)
            .collect();
        let mask: Vec<u8> = (0..400).map(|i| ((i * 13 % 7) < 3) as u8).collect();
        let c = image_counts(&heat, &mask, &mut Scratch::default());
        let scores: Vec<f64> = heat
            .iter()
            .map(|v| 1.0 - v)
            .chain(heat.iter().copied())
            .collect();
        let labels: Vec<bool> = mask
            .iter()
            .map(|&m| m == 0)
            .chain(mask.iter().map(|&m| m == 1))
            .collect();
        let direct = average_precision_direct(&scores, &labels);
        assert!(
            (c.average_precision - direct).abs() < 1e-12,
            "{} vs {direct}",
            c.average_precision
        );
    }

    #[test]
    fn non_binary_masks_and_mismatched_counts_are_named() {
        let maps = numpy::ndarray::Array3::<f64>::zeros((2, 2, 2));
        let mut masks = numpy::ndarray::Array3::<u8>::zeros((2, 4, 4));
        masks[[1, 2, 3]] = 255;
        let e = segmentation_scores(maps.view(), masks.view()).unwrap_err();
        assert!(e.to_string().contains("masks[1, 2, 3]"), "{e}");
        let e = segmentation_scores(maps.view(), masks.slice(numpy::ndarray::s![..1, .., ..]))
            .unwrap_err();
        assert!(e.to_string().contains("same N"), "{e}");
    }
}
