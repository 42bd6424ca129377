//! The exceptions the core raises.

use crate::params::ParamErrors;
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::PyErr;

create_exception!(
    _core,
    ParamsError,
    PyValueError,
    "Invalid listener parameters; the message lists every error with its key path."
);

pub fn params_error(errors: &ParamErrors) -> PyErr {
    ParamsError::new_err(errors.to_string())
}

pub fn os_error(error: std::io::Error) -> PyErr {
    PyOSError::new_err(error.to_string())
}
