//! Criterion benches of the pure Rust API, the cases of `benches/bench_textspan.py`: one head
//! (low rank, and full rank: noise in every direction), one head from its raw outputs as
//! `textspan.text_span` runs it (float32 products, certified), 64 heads over M = 3,498 and
//! over 200,000 texts, the head statistics, and the segmentation metrics. Synthetic heads
//! write into 96 directions of D = 768; 16×16 heatmaps are scored at 224×224.

use criterion::{criterion_group, criterion_main, Criterion};
use ndarray::{Array1, Array2, Array3, ArrayView3};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use textspan_core::metrics::segmentation_scores;
use textspan_core::moments::{batch_moments, Products};
use textspan_core::patchmap::Arithmetic;
use textspan_core::textspan::{
    text_span, text_span_heads, HeadMoments, Span, SpanParams, TextPool,
};

const D: usize = 768;
const M: usize = 3498;
const SIGNAL: usize = 96;

fn gaussian(rng: &mut StdRng, shape: (usize, usize)) -> Array2<f64> {
    Array2::from_shape_simple_fn(shape, || rng.sample(StandardNormal))
}

/// The covariance and mean of a head writing into `SIGNAL` directions with decaying scales.
fn head(rng: &mut StdRng) -> (Array2<f64>, Array1<f64>) {
    let basis = gaussian(rng, (D, SIGNAL)) / (D as f64).sqrt();
    let scales = Array1::from_shape_fn(SIGNAL, |i| (-0.03 * i as f64).exp());
    let scaled = &basis * &scales;
    let mean = Array1::from_shape_simple_fn(D, || 0.5 * rng.sample::<f64, _>(StandardNormal));
    (scaled.dot(&scaled.t()), mean)
}

/// TextSpan for one head from its raw outputs [N, 1, D] as `textspan.text_span` runs it:
/// statistics from float32 products, certified with the outputs' help.
fn from_outputs(outputs: ArrayView3<f32>, pool: &TextPool<f32>, params: SpanParams) -> Span {
    let n = outputs.dim().0 as f64;
    let m = batch_moments(outputs, Products::Float32).unwrap().remove(0);
    let cov = Array2::from_shape_fn((D, D), |(i, j)| m.scatter[(i, j)] / n);
    let head = HeadMoments {
        covariance_error: m.scatter_error / n,
        outputs: Some(outputs.index_axis_move(ndarray::Axis(1), 0)),
        ..HeadMoments::new(n, ndarray::ArrayView1::from(&m.mean), cov.view())
    };
    text_span(&head, pool, params).unwrap()
}

fn benches(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0);
    let texts = gaussian(&mut rng, (M, D)).mapv(|x| x as f32);
    let pool = TextPool::from_view(texts.view()).unwrap();
    let params = SpanParams::new(20, 80);
    let heads: Vec<_> = (0..8).map(|_| head(&mut rng)).collect();
    let moments: Vec<HeadMoments> = heads
        .iter()
        .map(|(cov, mean)| HeadMoments::new(10_000.0, mean.view(), cov.view()))
        .collect();

    let mut group = c.benchmark_group("textspan");
    group.sample_size(10);
    group.bench_function("one head from statistics (M 3498, D 768, 20 texts)", |b| {
        b.iter(|| text_span(&moments[0], &pool, params).unwrap())
    });
    group.bench_function("8 heads from statistics (M 3498, D 768, 20 texts)", |b| {
        b.iter(|| text_span_heads(&moments, &pool, params).unwrap())
    });
    // Full rank, as rounding noise makes real heads: a partial eigensolver's case.
    let (noisy, mean) = head(&mut rng);
    let noisy = noisy + Array2::<f64>::eye(D) * 1e-6;
    let full_rank = HeadMoments::new(10_000.0, mean.view(), noisy.view());
    group.bench_function("one head from statistics, full rank (M 3498, D 768)", |b| {
        b.iter(|| text_span(&full_rank, &pool, params).unwrap())
    });
    let many: Vec<_> = (0..64).map(|i| moments[i % moments.len()]).collect();
    group.bench_function("64 heads from statistics (M 3498, D 768, 20 texts)", |b| {
        b.iter(|| text_span_heads(&many, &pool, params).unwrap())
    });
    // Raw outputs of full rank: 96 decaying directions, a mean and noise in every direction.
    let (basis, scales) = (
        gaussian(&mut rng, (D, SIGNAL)) / (D as f64).sqrt(),
        Array1::from_shape_fn(SIGNAL, |i| (-0.03 * i as f64).exp()),
    );
    let signal = (gaussian(&mut rng, (10_000, SIGNAL)) * &scales).dot(&basis.t());
    let offset = Array1::from_shape_simple_fn(D, || 0.5 * rng.sample::<f64, _>(StandardNormal));
    let noise = gaussian(&mut rng, (10_000, D)) * 1e-3;
    let outputs = (signal + noise + &offset)
        .mapv(|x| x as f32)
        .insert_axis(ndarray::Axis(1));
    group.bench_function(
        "one head from raw outputs, full rank (N 10,000, D 768, float32 products)",
        |b| {
            b.iter(|| {
                let span = from_outputs(outputs.view(), &pool, params);
                assert!(span.certified);
                span
            })
        },
    );
    // A head as wide as ViT-B/L/H heads (64 directions and a mean) at the default rank 80:
    // the products cannot tell whether an 81st direction exists, the outputs certify that
    // none does.
    let narrow_basis = gaussian(&mut rng, (D, 64)) / (D as f64).sqrt();
    let narrow_scales = Array1::from_shape_fn(64, |i| (-0.03 * i as f64).exp());
    let narrow = ((gaussian(&mut rng, (10_000, 64)) * &narrow_scales).dot(&narrow_basis.t())
        + &offset)
        .mapv(|x| x as f32)
        .insert_axis(ndarray::Axis(1));
    group.bench_function(
        "one head from raw outputs, 64 wide at rank 80 (N 10,000, D 768, certified by them)",
        |b| {
            b.iter(|| {
                let span = from_outputs(narrow.view(), &pool, params);
                assert!(span.certified && span.rank == 65);
                span
            })
        },
    );
    let big = gaussian(&mut rng, (200_000, D)).mapv(|x| x as f32);
    let big_pool = TextPool::from_view(big.view()).unwrap();
    drop(big); // the pool holds its own copy
    group.bench_function(
        "64 heads from statistics (M 200,000, D 768, 20 texts)",
        |b| b.iter(|| text_span_heads(&many, &big_pool, params).unwrap()),
    );
    let outputs =
        Array3::from_shape_simple_fn((10_000, 1, D), || rng.sample::<f32, _>(StandardNormal));
    group.bench_function("head statistics of 10,000 outputs (D 768)", |b| {
        b.iter(|| batch_moments(outputs.view(), Products::Float64).unwrap())
    });
    group.bench_function(
        "head statistics of 10,000 outputs (D 768, float32 products)",
        |b| b.iter(|| batch_moments(outputs.view(), Products::Float32).unwrap()),
    );
    group.finish();

    let mut group = c.benchmark_group("segmentation");
    group.sample_size(10);
    let maps = Array3::from_shape_simple_fn((64, 16, 16), || rng.sample::<f64, _>(StandardNormal));
    let masks = Array3::from_shape_simple_fn((64, 224, 224), || rng.random_bool(0.3) as u8);
    group.bench_function("metrics of 64 heatmaps 16×16 at 224×224", |b| {
        b.iter(|| segmentation_scores(maps.view(), masks.view(), Arithmetic::Exact).unwrap())
    });
    group.finish();
}

criterion_group!(textspan_benches, benches);
criterion_main!(textspan_benches);
