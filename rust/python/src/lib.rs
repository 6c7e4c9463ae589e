//! The extension module `textspan._core`: thin PyO3 bindings over `textspan-core`. Each
//! function copies its Python inputs into Rust values, releases the GIL around the work and
//! hands back NumPy arrays. Large arrays read once are the exception: a text pool, and head
//! outputs (for their statistics and certificates), are read in place with the GIL held, so
//! that no Python thread can write into them meanwhile. Errors become Python exceptions here
//! and nowhere else.

use ndarray::{Array1, ArrayView3, Axis};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArray3, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3,
};
use pyo3::prelude::*;

use textspan_core::error::Error;
use textspan_core::textspan::{self, HeadMoments, Span, SpanParams, TextPool};
use textspan_core::{metrics, moments, parallel, patchmap, scalar};

// The package's exception classes live in Python (`textspan/errors.py`, where `InputError`
// is also a `ValueError`): bad input is an `InputError`, a computation that failed on valid
// input a `NumericalError`.
pyo3::import_exception!(textspan.errors, InputError);
pyo3::import_exception!(textspan.errors, NumericalError);

/// The one mapping from the core's error to a Python exception.
fn py_err(e: Error) -> PyErr {
    match e {
        Error::Numerical { .. } => NumericalError::new_err(e.to_string()),
        _ => InputError::new_err(e.to_string()),
    }
}

/// The dtype's name of a NumPy array (None for anything else).
fn dtype_name(a: &Bound<'_, PyAny>) -> Option<String> {
    a.getattr("dtype").ok()?.str().ok().map(|s| s.to_string())
}

enum Pool {
    F32(TextPool<f32>),
    F64(TextPool<f64>),
}

/// A text pool held once on the Rust side: rows copied and scaled to unit norm.
#[pyclass(name = "TextPool", module = "textspan._core", frozen)]
pub struct PyTextPool {
    pool: Pool,
}

#[pymethods]
impl PyTextPool {
    #[new]
    fn new(embeddings: &Bound<'_, PyAny>) -> PyResult<Self> {
        // Copied and scaled in one parallel pass that keeps the GIL: no Python thread can
        // write into the array meanwhile, and a large pool is read only once.
        let pool = if let Ok(a) = embeddings.extract::<PyReadonlyArray2<f32>>() {
            Pool::F32(TextPool::from_view(a.as_array()).map_err(py_err)?)
        } else if let Ok(a) = embeddings.extract::<PyReadonlyArray2<f64>>() {
            Pool::F64(TextPool::from_view(a.as_array()).map_err(py_err)?)
        } else if dtype_name(embeddings).as_deref() == Some("float16") {
            // float16 embeddings, as `text_span` takes them: held in float32.
            let a32 = embeddings.call_method1("astype", ("float32",))?;
            let a = a32
                .extract::<PyReadonlyArray2<f32>>()
                .map_err(|_| InputError::new_err("text embeddings: expected a 2-D array [M, D]"))?;
            Pool::F32(TextPool::from_view(a.as_array()).map_err(py_err)?)
        } else {
            let given = match (dtype_name(embeddings), embeddings.getattr("shape")) {
                (Some(dtype), Ok(shape)) => format!("{dtype} of shape {shape}"),
                _ => embeddings.get_type().name()?.to_string(),
            };
            return Err(InputError::new_err(format!(
                "text embeddings: expected a 2-D float32, float64 or float16 NumPy array \
                 [M, D], got {given}"
            )));
        };
        Ok(PyTextPool { pool })
    }

    fn __len__(&self) -> usize {
        match &self.pool {
            Pool::F32(p) => p.len(),
            Pool::F64(p) => p.len(),
        }
    }

    /// The embedding dimension D.
    #[getter]
    fn dim(&self) -> usize {
        match &self.pool {
            Pool::F32(p) => p.dim(),
            Pool::F64(p) => p.dim(),
        }
    }

    /// "float32" or "float64": the precision the pool is held and projected in.
    #[getter]
    fn dtype(&self) -> &'static str {
        match &self.pool {
            Pool::F32(_) => "float32",
            Pool::F64(_) => "float64",
        }
    }
}

/// One head's TextSpan, as the core found it (`textspan.core.span` makes a `SpanResult`).
#[pyclass(name = "HeadSpan", module = "textspan._core", frozen, get_all)]
pub struct HeadSpan {
    /// The chosen texts' indices in the pool, in the order chosen.
    indices: Vec<usize>,
    /// The variance each chosen text explains (of what is left after the earlier ones).
    variance: Py<PyArray1<f64>>,
    /// The head's total variance.
    total_variance: f64,
    /// The chosen texts' directions, projected onto the head's span [n, D].
    directions: Py<PyArray2<f64>>,
    /// The directions of the span used.
    rank: usize,
    /// The directions of the head's second moment above its tolerance.
    numerical_rank: usize,
    /// False where the statistics' error could have changed the directions kept.
    certified: bool,
}

impl HeadSpan {
    fn new(py: Python<'_>, s: Span) -> Self {
        HeadSpan {
            indices: s.indices,
            variance: Array1::from(s.variance).into_pyarray(py).unbind(),
            total_variance: s.total_variance,
            directions: s.directions.into_pyarray(py).unbind(),
            rank: s.rank,
            numerical_rank: s.numerical_rank,
            certified: s.certified,
        }
    }
}

/// TextSpan for K heads given by their statistics: counts [K], means [K, D], population
/// covariances [K, D, D] and rank tolerances [K] (directions of a head's second moment below
/// its tolerance times the largest eigenvalue count as absent, unless `exact_rank`: then
/// exactly `rank` directions, as published), and optionally bounds [K] on the spectral norm
/// of each covariance's error (from `batch_moments(..., float32_products=True)`) with the
/// float32 outputs [N, K, D] they came from, which certify heads narrower than `rank`.
/// Returns a `HeadSpan` per head; its `certified` is false where a covariance's error could
/// have changed the directions kept.
#[pyfunction]
#[pyo3(signature = (pool, counts, means, covariances, rank_tolerances, n_texts, rank, exact_rank=false, covariance_errors=None, outputs=None))]
#[allow(clippy::too_many_arguments)]
fn text_span_heads<'py>(
    py: Python<'py>,
    pool: &PyTextPool,
    counts: PyReadonlyArray1<'py, f64>,
    means: PyReadonlyArray2<'py, f64>,
    covariances: PyReadonlyArray3<'py, f64>,
    rank_tolerances: PyReadonlyArray1<'py, f64>,
    n_texts: usize,
    rank: usize,
    exact_rank: bool,
    covariance_errors: Option<PyReadonlyArray1<'py, f64>>,
    outputs: Option<PyReadonlyArray3<'py, f32>>,
) -> PyResult<Vec<HeadSpan>> {
    let counts = counts.as_array().to_owned();
    let means = means.as_array().to_owned();
    let covs = covariances.as_array().to_owned();
    let tolerances = rank_tolerances.as_array().to_owned();
    let k = counts.len();
    let errors = match covariance_errors {
        Some(e) => e.as_array().to_owned(),
        None => Array1::zeros(k),
    };
    if means.shape()[0] != k || covs.shape()[0] != k || tolerances.len() != k || errors.len() != k {
        return Err(py_err(Error::shape(
            "head statistics",
            format!(
                "counts [K], means [K, D], covariances [K, D, D], rank tolerances [K] and \
                 covariance errors [K] with one K (K = {k})"
            ),
            format!(
                "means {:?}, covariances {:?}, rank tolerances {:?}, covariance errors {:?}",
                means.shape(),
                covs.shape(),
                tolerances.shape(),
                errors.shape()
            ),
        )));
    }
    if let Some(e) = errors.iter().find(|e| !(e.is_finite() && **e >= 0.0)) {
        return Err(py_err(Error::value(
            "covariance errors",
            "finite bounds >= 0",
            e.to_string(),
        )));
    }
    let params = if exact_rank {
        SpanParams::exact(n_texts, rank)
    } else {
        SpanParams::new(n_texts, rank)
    };
    let run = |outputs: Option<ArrayView3<f32>>| {
        let heads: Vec<HeadMoments> = (0..k)
            .map(|h| HeadMoments {
                count: counts[h],
                mean: means.row(h),
                covariance: covs.index_axis(Axis(0), h),
                rank_tolerance: tolerances[h],
                covariance_error: errors[h],
                outputs: outputs.map(|x| x.index_axis_move(Axis(1), h)),
            })
            .collect();
        match &pool.pool {
            Pool::F32(p) => textspan::text_span_heads(&heads, p, params),
            Pool::F64(p) => textspan::text_span_heads(&heads, p, params),
        }
    };
    let spans = match &outputs {
        // Outputs can be gigabytes: they are read in place, with the GIL held so that no
        // Python thread writes into them meanwhile (as a text pool is read).
        Some(x) => {
            let x = x.as_array();
            if x.shape()[1] != k {
                return Err(py_err(Error::shape(
                    "outputs",
                    format!("[N, {k}, D] (one head per statistics)"),
                    format!("{:?}", x.shape()),
                )));
            }
            run(Some(x))
        }
        None => py.detach(|| run(None)),
    }
    .map_err(py_err)?;
    Ok(spans.into_iter().map(|s| HeadSpan::new(py, s)).collect())
}

/// Checks the statistics of K heads (counts, means [D], covariances [D, D]) for texts of
/// width `dim`, as `text_span_heads` does, without copying them (the GIL is held): the error
/// names the first bad head by its index in the lists.
#[pyfunction]
fn check_heads(
    counts: Vec<f64>,
    means: Vec<PyReadonlyArray1<'_, f64>>,
    covariances: Vec<PyReadonlyArray2<'_, f64>>,
    dim: usize,
) -> PyResult<()> {
    if means.len() != counts.len() || covariances.len() != counts.len() {
        return Err(py_err(Error::shape(
            "head statistics",
            format!(
                "one count, mean and covariance per head ({} counts)",
                counts.len()
            ),
            format!(
                "{} means and {} covariances",
                means.len(),
                covariances.len()
            ),
        )));
    }
    let heads: Vec<HeadMoments> = counts
        .iter()
        .zip(&means)
        .zip(&covariances)
        .map(|((&count, mean), cov)| HeadMoments::new(count, mean.as_array(), cov.as_array()))
        .collect();
    textspan::check_heads(&heads, dim).map_err(py_err)
}

/// Means [K, D], scatters [K, D, D] and the scatters' error bounds [K].
type MomentArrays<'py> = (
    Bound<'py, PyArray2<f64>>,
    Bound<'py, PyArray3<f64>>,
    Bound<'py, PyArray1<f64>>,
);

fn moments_of<'py, T: scalar::Real + numpy::Element>(
    py: Python<'py>,
    x: PyReadonlyArray3<'py, T>,
    products: moments::Products,
) -> PyResult<MomentArrays<'py>> {
    // Outputs can be gigabytes: read in place, with the GIL held so that no Python thread
    // writes into them meanwhile (a copy cost a tenth of the products).
    let (means, scatters, errors) =
        moments::batch_moments_arrays(x.as_array(), products).map_err(py_err)?;
    Ok((
        means.into_pyarray(py),
        scatters.into_pyarray(py),
        Array1::from(errors).into_pyarray(py),
    ))
}

/// Mean [K, D] and centred scatter Σ(x − μ)(x − μ)ᵀ [K, D, D] of each head of x [n, K, D],
/// accumulated in float64, and a bound [K] on the spectral norm of each scatter's error:
/// 0 with float64 products; with `float32_products` (twice as fast), the bound of the
/// float32 products' rounding.
#[pyfunction]
#[pyo3(signature = (x, float32_products=false))]
fn batch_moments<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    float32_products: bool,
) -> PyResult<MomentArrays<'py>> {
    let products = if float32_products {
        moments::Products::Float32
    } else {
        moments::Products::Float64
    };
    if let Ok(a) = x.extract::<PyReadonlyArray3<f32>>() {
        moments_of(py, a, products)
    } else if let Ok(a) = x.extract::<PyReadonlyArray3<f64>>() {
        moments_of(py, a, products)
    } else {
        Err(InputError::new_err(
            "head outputs: expected a 3-D float32 or float64 NumPy array [n, heads, D]",
        ))
    }
}

/// Each image's heatmap [N, P] from its patch scores [N, P, C] against C class texts: its
/// class's score minus the mean over classes.
#[pyfunction]
fn class_heatmaps<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray3<'py, f32>,
    classes: PyReadonlyArray1<'py, i64>,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let scores = scores.as_array().to_owned();
    let classes = classes.as_array().to_vec();
    let maps = py
        .detach(|| patchmap::class_heatmaps(scores.view(), &classes))
        .map_err(py_err)?;
    Ok(maps.into_pyarray(py))
}

fn arithmetic(paper: bool) -> patchmap::Arithmetic {
    if paper {
        patchmap::Arithmetic::Paper
    } else {
        patchmap::Arithmetic::Exact
    }
}

/// Patch-resolution maps [N, h, w] upsampled bilinearly to [N, height, width], negatives
/// clipped, each min–max normalised to [0, 1] (`paper`: in the paper code's float32
/// arithmetic).
#[pyfunction]
#[pyo3(signature = (maps, height, width, paper=false))]
fn normalised_heatmaps<'py>(
    py: Python<'py>,
    maps: PyReadonlyArray3<'py, f64>,
    height: usize,
    width: usize,
    paper: bool,
) -> PyResult<Bound<'py, PyArray3<f64>>> {
    let maps = maps.as_array().to_owned();
    let out = py
        .detach(|| patchmap::normalised_heatmaps(maps.view(), height, width, arithmetic(paper)))
        .map_err(py_err)?;
    Ok(out.into_pyarray(py))
}

/// (pixel_accuracy, miou, map) of patch-resolution maps [N, h, w] against binary masks
/// [N, H, W], by the ImageNet-segmentation protocol (`paper`: the paper code's float32
/// arithmetic, and AP = 0.5 for a map that is constant after clipping).
#[pyfunction]
#[pyo3(signature = (maps, masks, paper=false))]
fn segmentation_scores(
    py: Python<'_>,
    maps: PyReadonlyArray3<'_, f64>,
    masks: PyReadonlyArray3<'_, u8>,
    paper: bool,
) -> PyResult<(f64, f64, f64)> {
    let maps = maps.as_array().to_owned();
    let masks = masks.as_array().to_owned();
    let s = py
        .detach(|| metrics::segmentation_scores(maps.view(), masks.view(), arithmetic(paper)))
        .map_err(py_err)?;
    Ok((s.pixel_accuracy, s.miou, s.map))
}

/// Sets the number of threads of the Rust core's pool (0: one per core). The environment
/// variable TEXTSPAN_NUM_THREADS sets the default.
#[pyfunction]
fn set_num_threads(n: usize) {
    parallel::set_num_threads(n);
}

/// The number of threads the Rust core's pool runs.
#[pyfunction]
fn get_num_threads() -> usize {
    parallel::num_threads()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTextPool>()?;
    m.add_class::<HeadSpan>()?;
    m.add_function(wrap_pyfunction!(text_span_heads, m)?)?;
    m.add_function(wrap_pyfunction!(check_heads, m)?)?;
    m.add_function(wrap_pyfunction!(batch_moments, m)?)?;
    m.add_function(wrap_pyfunction!(class_heatmaps, m)?)?;
    m.add_function(wrap_pyfunction!(normalised_heatmaps, m)?)?;
    m.add_function(wrap_pyfunction!(segmentation_scores, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add("RANK_TOLERANCE", textspan::RANK_TOLERANCE)?;
    Ok(())
}
