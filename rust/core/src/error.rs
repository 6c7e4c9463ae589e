//! The crate's one error type. Every message says what was expected and what was given;
//! the bindings (`rust/python/src/lib.rs`) map it to a Python exception in one place: bad
//! input to `InputError`, a computation that failed on valid input to `NumericalError`.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// An array of the wrong shape, or two arrays whose shapes disagree.
    Shape {
        what: String,
        expected: String,
        got: String,
    },
    /// A NaN or an infinity in an input.
    NonFinite { what: String, index: Vec<usize> },
    /// A parameter or a value out of its allowed range.
    Value {
        what: String,
        expected: String,
        got: String,
    },
    /// A computation that failed on valid input (an eigensolver that did not converge).
    Numerical { what: String, detail: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(
        what: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }

    pub fn value(
        what: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Error::Value {
            what: what.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape {
                what,
                expected,
                got,
            } => {
                write!(f, "{what}: expected shape {expected}, got {got}")
            }
            Error::NonFinite { what, index } => {
                write!(
                    f,
                    "{what}: expected finite values, got NaN or Inf at index {index:?}"
                )
            }
            Error::Value {
                what,
                expected,
                got,
            } => {
                write!(f, "{what}: expected {expected}, got {got}")
            }
            Error::Numerical { what, detail } => write!(f, "{what}: {detail}"),
        }
    }
}

impl std::error::Error for Error {}
