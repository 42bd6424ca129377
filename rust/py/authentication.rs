//! `check_authentication`: the checks of the `authentication` parameter,
//! run on demand by policy (KumoMTA's `policy-extras.mail_auth.check`).

use super::convert::to_python;
use super::objects::{PyConnectionMeta, PyMessage};
use crate::auth::{self, MessageInput, OnDemand};
use crate::meta::keys;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::net::{IpAddr, SocketAddr};

/// The client's address as the connection's metadata has it (after XCLIENT).
fn client_ip(conn_meta: &PyConnectionMeta) -> PyResult<IpAddr> {
    let received_from = conn_meta.store.get_str(keys::RECEIVED_FROM).unwrap_or_default();
    received_from
        .parse::<SocketAddr>()
        .map(|address| address.ip())
        .or_else(|_| received_from.parse::<IpAddr>())
        .map_err(|_| {
            PyValueError::new_err(format!("conn_meta: no client IP address in received_from ({received_from:?})"))
        })
}

/// SPF (of the MAIL FROM identity), DKIM, DMARC, ARC and iprev of
/// `message` from the client of `conn_meta`, as asked; blocks (without
/// the GIL) until done. With `add_header`, the `Authentication-Results:`
/// field of the results goes at the top of the message.
#[pyfunction]
#[pyo3(signature = (message, conn_meta, spf, dkim, dmarc, arc, iprev, add_header))]
#[allow(clippy::too_many_arguments)]
pub fn check_authentication<'py>(
    py: Python<'py>,
    message: &Bound<'py, PyMessage>,
    conn_meta: &Bound<'py, PyConnectionMeta>,
    spf: bool,
    dkim: bool,
    dmarc: bool,
    arc: bool,
    iprev: bool,
    add_header: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let message = message.get().message.clone();
    let conn_meta = conn_meta.get();
    let hostname = conn_meta.store.get_str(keys::HOSTNAME).unwrap_or_default();
    let request = OnDemand {
        message: MessageInput {
            data: message.data.clone(),
            hostname: hostname.clone(),
            remote_ip: client_ip(conn_meta)?,
            helo: conn_meta.store.get_str(keys::EHLO_DOMAIN).unwrap_or_default(),
            sender: message.sender.to_string(),
            spf: None,
            dkim,
            arc,
            dmarc,
        },
        spf,
        iprev,
    };
    let results = py
        .detach(|| auth::engine::wait(auth::checks::on_demand(request)))
        .ok_or_else(|| PyRuntimeError::new_err("the authentication checks failed"))?;
    if add_header {
        message.prepend(&auth::results::header(&hostname, &results));
    }
    to_python(py, &auth::results::to_json(&results))
}
