//! textspan's algorithms: TextSpan over CLIP attention heads from their statistics, and the
//! patch-map reductions and metrics of zero-shot segmentation.
//!
//! Every module takes and returns `ndarray` values and knows nothing of Python; the
//! `textspan-python` crate beside this one holds the bindings.

pub mod certify;
pub mod error;
pub mod metrics;
pub mod moments;
pub mod parallel;
pub mod patchmap;
pub mod scalar;
pub mod textspan;
