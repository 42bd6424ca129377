//! Python objects ↔ JSON values, the currency of metadata and parameters.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};

/// Convert a JSON-compatible Python value; `path` names it in errors.
pub fn to_json(value: &Bound<'_, PyAny>, path: &str) -> PyResult<Value> {
    if value.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = value.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if value.is_instance_of::<PyInt>() {
        return int_to_json(value, path);
    }
    if let Ok(f) = value.cast::<PyFloat>() {
        return Number::from_f64(f.value())
            .map(Value::Number)
            .ok_or_else(|| type_error(path, "a finite number", value));
    }
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(Value::String(s.to_str()?.to_owned()));
    }
    if let Ok(dict) = value.cast::<PyDict>() {
        return dict_to_json(dict, path);
    }
    if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        return value
            .try_iter()?
            .enumerate()
            .map(|(index, item)| to_json(&item?, &format!("{path}[{index}]")))
            .collect::<PyResult<Vec<_>>>()
            .map(Value::Array);
    }
    Err(type_error(path, "a JSON-compatible value (None, bool, int, float, str, list or dict)", value))
}

fn int_to_json(value: &Bound<'_, PyAny>, path: &str) -> PyResult<Value> {
    if let Ok(i) = value.extract::<i64>() {
        return Ok(Value::from(i));
    }
    value
        .extract::<u64>()
        .map(Value::from)
        .map_err(|_| PyTypeError::new_err(format!("{}: integer {value} does not fit in 64 bits", label(path))))
}

fn dict_to_json(dict: &Bound<'_, PyDict>, path: &str) -> PyResult<Value> {
    let mut map = Map::with_capacity(dict.len());
    for (key, item) in dict.iter() {
        let Ok(key) = key.cast::<PyString>() else {
            return Err(type_error(path, "string keys", &key));
        };
        let key = key.to_str()?;
        let child = if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
        map.insert(key.to_owned(), to_json(&item, &child)?);
    }
    Ok(Value::Object(map))
}

fn label(path: &str) -> &str {
    if path.is_empty() {
        "value"
    } else {
        path
    }
}

fn type_error(path: &str, expected: &str, got: &Bound<'_, PyAny>) -> PyErr {
    let type_name = got.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
    PyTypeError::new_err(format!("{}: expected {expected}, got {type_name}", label(path)))
}

/// Build the Python equivalent of a JSON value.
pub fn to_python<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => number_to_python(py, n)?,
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let items = items.iter().map(|item| to_python(py, item)).collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (key, item) in map {
                dict.set_item(key, to_python(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

fn number_to_python<'py>(py: Python<'py>, n: &Number) -> PyResult<Bound<'py, PyAny>> {
    if let Some(i) = n.as_i64() {
        return Ok(i.into_pyobject(py)?.into_any());
    }
    if let Some(u) = n.as_u64() {
        return Ok(u.into_pyobject(py)?.into_any());
    }
    Ok(n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any())
}
