//! Segmentation metrics by the ImageNet-segmentation protocol the paper follows.
//!
//! For each image, the normalised heatmap s (see `patchmap`) is thresholded at its mean and
//! compared with the binary mask m. Over the whole set:
//! - pixel accuracy and the two-class mIoU come from counts summed over all images;
//! - mAP is the mean over images of the average precision of the two-channel score
//!   [1 − s, s] against the one-hot mask [1 − m, m] (both channels ranked together), with
//!   scikit-learn's definition: AP = Σ_k (R_k − R_{k−1}) P_k over distinct thresholds.

use ndarray::{ArrayView3, Axis};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::parallel;
use crate::patchmap::{check_maps, clip_and_normalise, mean_threshold, Arithmetic, Upsampler};

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

/// Appends `values` sorted ascending between sentinels: [−∞, zeros…, values…, +∞], where
/// `zeros` exact zeros (the clipped pixels) are counted rather than sorted.
fn padded_ascending(values: &mut [f64], zeros: usize, s: &mut SortScratch, out: &mut Vec<f64>) {
    sort_non_negative(values, &mut s.scratch, &mut s.keys);
    out.clear();
    out.push(f64::NEG_INFINITY);
    out.resize(1 + zeros, 0.0);
    out.extend_from_slice(values);
    out.push(f64::INFINITY);
}

/// The descending merge of `a`'s values and `b`'s values mapped by 1 − x (which reverses
/// their order), both given padded by `padded_ascending`, followed by a −∞ sentinel.
/// Branch-free, and from both ends at once: the largest values from the front, the smallest
/// from the back, two independent chains of loads and compares. (With ties, either end may
/// take either of two equal values; the merged values are the same.)
fn merge_descending(a: &[f64], b: &[f64], out: &mut Vec<f64>) {
    let (na, nb) = (a.len() - 2, b.len() - 2);
    let total = na + nb;
    out.clear();
    out.resize(total, 0.0);
    let (mut i, mut j) = (na, 1); // the front: a's largest left, b's smallest left
    let (mut k, mut l) = (1, nb); // the back: a's smallest left, b's largest left
    let half = total / 2;
    for step in 0..half {
        let (x, y) = (a[i], 1.0 - b[j]);
        let front_a = x >= y;
        out[step] = if front_a { x } else { y };
        i -= front_a as usize;
        j += !front_a as usize;
        let (x, y) = (a[k], 1.0 - b[l]);
        let back_a = x < y;
        out[total - 1 - step] = if back_a { x } else { y };
        k += back_a as usize;
        l -= !back_a as usize;
    }
    if total % 2 == 1 {
        out[half] = a[i].max(1.0 - b[j]);
    }
    out.push(f64::NEG_INFINITY);
}

/// Average precision of the two-channel score against the one-hot mask, from the padded
/// ascending heatmap values on the mask (`fg`) and off it (`bg`). Positives are fg's s and
/// bg's 1 − s (`positives`: their descending merge, −∞ last); negatives are bg's s and fg's
/// 1 − s, counted above each threshold by two pointers. Tied scores form one threshold:
/// AP = Σ_thresholds (ΔTP / P) · TP / (TP + FP), scikit-learn's `average_precision_score`.
fn two_channel_average_precision(fg: &[f64], bg: &[f64], positives: &[f64]) -> f64 {
    let total = positives.len() - 1;
    let n_bg = bg.len() - 2;
    let (mut i, mut high_bg, mut low_fg) = (0, n_bg, 1);
    let mut sum = 0.0;
    while i < total {
        let t = positives[i];
        let start = i;
        while positives[i] == t {
            i += 1;
        }
        while bg[high_bg] >= t {
            high_bg -= 1;
        }
        while 1.0 - fg[low_fg] >= t {
            low_fg += 1;
        }
        let false_positives = (n_bg - high_bg) + (low_fg - 1);
        sum += (i - start) as f64 * (i as f64 / (i + false_positives) as f64);
    }
    sum / total as f64
}

#[derive(Default)]
struct SortScratch {
    keys: Vec<u64>,
    scratch: Vec<u64>,
}

#[derive(Default)]
struct Scratch {
    columns: Vec<f64>,
    heat: Vec<f64>,
    fg: Vec<f64>,
    bg: Vec<f64>,
    fg_padded: Vec<f64>,
    bg_padded: Vec<f64>,
    positives: Vec<f64>,
    sort: SortScratch,
}

fn image_counts(heat: &[f64], mask: &[u8], s: &mut Scratch) -> ImageCounts {
    let n = heat.len();
    let threshold = mean_threshold(heat);
    // counts[predicted][truth]; the non-zero values on and off the mask, gathered without
    // branches (clipped pixels are exact zeros, often half of them: counted, not sorted).
    let mut counts = [[0_u64; 2]; 2];
    s.fg.resize(n, 0.0);
    s.bg.resize(n, 0.0);
    let (mut nf, mut nb) = (0, 0);
    for (&v, &m) in heat.iter().zip(mask) {
        let (p, t) = ((v > threshold) as usize, (m != 0) as usize);
        counts[p][t] += 1;
        let positive = v > 0.0;
        s.fg[nf] = v;
        nf += (positive & (t == 1)) as usize;
        s.bg[nb] = v;
        nb += (positive & (t == 0)) as usize;
    }
    let mask_area = [counts[0][0] + counts[1][0], counts[0][1] + counts[1][1]];
    let mut c = ImageCounts {
        pixels: n as u64,
        correct: counts[0][0] + counts[1][1],
        intersection: [counts[0][0], counts[1][1]],
        ..Default::default()
    };
    for k in 0..2 {
        c.union[k] = counts[k][0] + counts[k][1] + mask_area[k] - c.intersection[k];
    }
    let on = mask_area[1] as usize;
    padded_ascending(&mut s.fg[..nf], on - nf, &mut s.sort, &mut s.fg_padded);
    padded_ascending(&mut s.bg[..nb], n - on - nb, &mut s.sort, &mut s.bg_padded);
    merge_descending(&s.fg_padded, &s.bg_padded, &mut s.positives);
    c.average_precision = two_channel_average_precision(&s.fg_padded, &s.bg_padded, &s.positives);
    c
}

/// Pixel accuracy, mIoU and mAP of patch-resolution heatmaps [N, h, w] against binary masks
/// [N, H, W] (0 or 1): each map is upsampled to its mask's size, clipped, min–max
/// normalised and thresholded at its mean (see `patchmap`).
pub fn segmentation_scores(
    maps: ArrayView3<f64>,
    masks: ArrayView3<u8>,
    arithmetic: Arithmetic,
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
    // A fast scan first; the index of the offending value only on failure.
    if masks.iter().fold(0, |acc, &v| acc | v) > 1 {
        if let Some(((i, y, x), v)) = masks.indexed_iter().find(|(_, &v)| v > 1) {
            return Err(Error::value(
                format!("masks[{i}, {y}, {x}]"),
                "a binary mask (0 or 1)",
                v.to_string(),
            ));
        }
    }
    let up = Upsampler::new(h, w, height, width, arithmetic);
    let per_image: Vec<ImageCounts> = parallel::install(|| {
        (0..n)
            .into_par_iter()
            .map_init(Scratch::default, |s, i| {
                s.heat.resize(height * width, 0.0);
                up.upsample(maps.index_axis(Axis(0), i), &mut s.columns, &mut s.heat);
                let constant = clip_and_normalise(&mut s.heat, arithmetic);
                let mask = masks.index_axis(Axis(0), i);
                let heat = std::mem::take(&mut s.heat);
                let mut counts = match mask.as_slice() {
                    Some(m) => image_counts(&heat, m, s),
                    None => image_counts(&heat, &mask.iter().copied().collect::<Vec<_>>(), s),
                };
                if constant && arithmetic == Arithmetic::Paper {
                    counts.average_precision = 0.5; // the paper's 0/0 map
                }
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
    fn merging_from_both_ends_equals_sorting_with_ties_and_odd_lengths() {
        for (na, nb) in [(0, 1), (1, 0), (3, 4), (7, 7), (10, 3)] {
            let mut a: Vec<f64> = (0..na).map(|i| ((i * 5 % 7) / 2) as f64 / 4.0).collect();
            let mut b: Vec<f64> = (0..nb).map(|i| ((i * 3 % 5) / 2) as f64 / 4.0).collect();
            let mut expected: Vec<f64> =
                a.iter().copied().chain(b.iter().map(|v| 1.0 - v)).collect();
            expected.sort_by(|x, y| y.total_cmp(x));
            let (mut pa, mut pb, mut out) = (Vec::new(), Vec::new(), Vec::new());
            padded_ascending(&mut a, 0, &mut SortScratch::default(), &mut pa);
            padded_ascending(&mut b, 0, &mut SortScratch::default(), &mut pb);
            merge_descending(&pa, &pb, &mut out);
            assert_eq!(out.pop(), Some(f64::NEG_INFINITY));
            assert_eq!(out, expected, "{na} + {nb}");
        }
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
        let maps = ndarray::Array3::<f64>::zeros((2, 2, 2));
        let mut masks = ndarray::Array3::<u8>::zeros((2, 4, 4));
        masks[[1, 2, 3]] = 255;
        let e = segmentation_scores(maps.view(), masks.view(), Arithmetic::Exact).unwrap_err();
        assert!(e.to_string().contains("masks[1, 2, 3]"), "{e}");
        let e = segmentation_scores(
            maps.view(),
            masks.slice(ndarray::s![..1, .., ..]),
            Arithmetic::Exact,
        )
        .unwrap_err();
        assert!(e.to_string().contains("same N"), "{e}");
    }
}
