//! The element types the crate accepts from Python: float32 and float64.

/// A real scalar that faer can multiply and that converts to and from `f64`.
pub trait Real:
    faer::traits::ComplexField
    + faer::traits::Conjugate<Canonical = Self>
    + Copy
    + Send
    + Sync
    + PartialOrd
    + std::fmt::Debug
    + 'static
{
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl Real for f32 {
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}
