//! The objects policy handlers receive: connection metadata, messages and
//! envelope addresses. Each is a thin view on state the Rust side shares.

use super::convert::{to_json, to_python};
use super::errors::params_error;
use crate::body::Body;
use crate::message::Message;
use crate::meta::MetaStore;
use crate::params::{parse_overrides, GenericParams};
use crate::protocol::parser::Mailbox;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;

fn get_meta<'py>(py: Python<'py>, store: &MetaStore, name: &str) -> PyResult<Bound<'py, PyAny>> {
    match store.get(name) {
        Some(value) => to_python(py, &value),
        None => Ok(py.None().into_bound(py)),
    }
}

fn set_meta(store: &MetaStore, name: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
    store.set(name, to_json(value, name)?);
    Ok(())
}

/// Metadata of one connection, shared by every event of that connection.
#[pyclass(frozen, module = "kumo_listener._core", name = "ConnectionMeta")]
pub struct PyConnectionMeta {
    pub store: MetaStore,
}

#[pymethods]
impl PyConnectionMeta {
    /// The value stored under `name`, or None.
    fn get_meta<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        get_meta(py, &self.store, name)
    }

    /// Store a JSON-serialisable value under `name`.
    fn set_meta(&self, name: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
        set_meta(&self.store, name, value)
    }

    fn __repr__(&self) -> String {
        format!("ConnectionMeta({})", serde_json::Value::Object(self.store.snapshot()))
    }
}

/// An envelope address: `user@domain`, or the null sender `<>`.
#[pyclass(frozen, module = "kumo_listener._core", name = "EnvelopeAddress")]
pub struct PyEnvelopeAddress {
    mailbox: Mailbox,
}

impl PyEnvelopeAddress {
    pub fn new(mailbox: Mailbox) -> Self {
        Self { mailbox }
    }
}

#[pymethods]
impl PyEnvelopeAddress {
    #[getter]
    fn user(&self) -> &str {
        &self.mailbox.local_part
    }

    #[getter]
    fn domain(&self) -> &str {
        &self.mailbox.domain
    }

    /// The ESMTP parameters of its `MAIL FROM`/`RCPT TO`: keys upper-case,
    /// values xtext-decoded, None for a bare keyword. A new dict each time.
    #[getter]
    fn params<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let params = PyDict::new(py);
        for (keyword, value) in self.mailbox.params.iter() {
            params.set_item(keyword, value)?;
        }
        Ok(params)
    }

    fn __str__(&self) -> String {
        self.mailbox.to_string()
    }

    fn __repr__(&self) -> String {
        format!("EnvelopeAddress({:?})", self.__str__())
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        // The address, as `__hash__`: parameters do not make it another address.
        other.cast::<PyEnvelopeAddress>().is_ok_and(|other| other.get().mailbox.same_address(&self.mailbox))
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.mailbox.local_part.hash(&mut hasher);
        self.mailbox.domain.hash(&mut hasher);
        hasher.finish()
    }
}

/// A received message: the whole transaction in `smtp_server_data`, one
/// split part in `smtp_server_message_received`.
#[pyclass(frozen, module = "kumo_listener._core", name = "Message")]
pub struct PyMessage {
    pub message: Arc<Message>,
}

#[pymethods]
impl PyMessage {
    #[getter]
    fn id(&self) -> &str {
        &self.message.id
    }

    #[getter]
    fn sender(&self) -> PyEnvelopeAddress {
        PyEnvelopeAddress::new(self.message.sender.clone())
    }

    #[getter]
    fn recipients(&self) -> Vec<PyEnvelopeAddress> {
        self.message.recipients.iter().cloned().map(PyEnvelopeAddress::new).collect()
    }

    /// The message as received, trace headers included (not the Maildir's
    /// `Return-Path:`/`Delivered-To:`, which the sink adds as it writes),
    /// read from its file if the body was spilled.
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let message = &self.message;
        if let (true, Body::Memory(bytes)) = (message.full_head().is_empty(), &message.data) {
            return Ok(PyBytes::new(py, bytes));
        }
        PyBytes::new_with(py, message.len(), |out| message.read_into(out).map_err(PyErr::from))
    }

    /// The same bytes as `data`, as a binary file object, without loading
    /// a spilled body.
    fn open<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let message = &self.message;
        let Body::File(spilled) = &message.data else {
            return py.import("io")?.call_method1("BytesIO", (self.data(py)?,));
        };
        let fd = spilled.file().try_clone()?.into_raw_fd();
        let head = PyBytes::new(py, &message.full_head());
        let args = (head, fd, spilled.offset(), message.data.len());
        let opened = py.import("kumo_listener.body").and_then(|module| module.call_method1("open_spilled", args));
        if opened.is_err() {
            // SAFETY: our own duplicate, which nothing took over.
            drop(unsafe { std::fs::File::from_raw_fd(fd) });
        }
        opened
    }

    fn get_meta<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        get_meta(py, &self.message.meta, name)
    }

    /// The `authentication` parameter's results (the metadata's
    /// `authentication_results`): a list of `{"method", "result", "reason",
    /// "props"}`; empty when nothing was checked.
    #[getter]
    fn authentication_results<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let results = self.message.meta.get(crate::meta::keys::AUTHENTICATION_RESULTS);
        crate::py::convert::to_python(py, &results.unwrap_or_else(|| serde_json::Value::Array(Vec::new())))
    }

    fn set_meta(&self, name: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
        set_meta(&self.message.meta, name, value)
    }

    fn __repr__(&self) -> String {
        format!("Message(id={:?}, recipients={})", self.message.id, self.message.recipients.len())
    }
}

/// Listener parameters validated once, for `smtp_server_get_dynamic_parameters`
/// to return (typically through `kumo.memoize`): each connection then costs
/// a pointer copy instead of a walk over a dict.
#[pyclass(frozen, module = "kumo_listener._core", name = "ListenerParams")]
pub struct PyListenerParams {
    pub params: Arc<GenericParams>,
}

#[pymethods]
impl PyListenerParams {
    /// `ListenerParams({"via": {...}})` or `ListenerParams(hostname="mx")`:
    /// the overrides a dynamic hook may return, checked now.
    #[new]
    #[pyo3(signature = (params=None, **overrides))]
    fn new(
        py: Python<'_>,
        params: Option<&Bound<'_, PyDict>>,
        overrides: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let merged = PyDict::new(py);
        for given in [params, overrides].into_iter().flatten() {
            merged.update(given.as_mapping())?;
        }
        let value = to_json(merged.as_any(), "")?;
        let params = parse_overrides(&value, "").map_err(|errors| params_error(&errors))?;
        Ok(Self { params: Arc::new(params) })
    }

    fn __repr__(&self) -> String {
        format!("ListenerParams({:?})", self.params)
    }
}
