//! Rust core of `textspan`: TextSpan over CLIP attention heads from their statistics, and
//! the patch-map reductions and metrics of zero-shot segmentation.
//!
//! The pure modules take and return `ndarray` values and know nothing of Python;
//! `python.rs` holds the bindings.

pub mod error;
pub mod metrics;
pub mod moments;
pub mod parallel;
pub mod patchmap;
mod python;
pub mod scalar;
pub mod textspan;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    python::register(m)
}
