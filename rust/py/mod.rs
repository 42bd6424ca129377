//! The `kumo_listener._core` extension module: a thin layer over the core.

mod authentication;
mod convert;
mod core;
mod errors;
mod objects;

use crate::events;
use crate::forward::pool::{FORWARD_SECONDS, UPSTREAM_METRICS};
use crate::metrics::{MetricInfo, AUTHENTICATION_RESULTS, LISTENER_METRICS, REJECTIONS};
use crate::params::{parse_duration, parse_overrides_partially, ANYWHERE, DEFAULT_LISTEN, TOP_LEVEL_ONLY};
use crate::policy_latency::POLICY_CALL_SECONDS;
use crate::shared_limits::REDIS_METRICS;
use errors::ParamsError;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyFrozenSet;

/// `(name, kind, help, labels)` of every metric, as `_core.METRICS`.
fn metrics_table() -> Vec<(&'static str, &'static str, &'static str, Vec<&'static str>)> {
    let all: Vec<&MetricInfo> = LISTENER_METRICS
        .iter()
        .chain([&REJECTIONS, &AUTHENTICATION_RESULTS, &POLICY_CALL_SECONDS])
        .chain(UPSTREAM_METRICS)
        .chain([&FORWARD_SECONDS])
        .chain(REDIS_METRICS)
        .collect();
    all.into_iter().map(|info| (info.name, info.kind.name(), info.help, info.labels.to_vec())).collect()
}

/// Check an overrides table (a dynamic result or a TOML/JSON file's contents).
/// Returns every error as `"key.path: message"`; empty when valid.
#[pyfunction]
fn validate_overrides(value: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    let value = convert::to_json(value, "")?;
    let (params, mut errors) = parse_overrides_partially(&value, "");
    errors.extend(crate::tls::check_static(&params, ""));
    Ok(errors.iter().map(ToString::to_string).collect())
}

/// Seconds in a duration given as a number or a string like `"5 minutes"`.
#[pyfunction]
fn duration_seconds(value: &Bound<'_, PyAny>) -> PyResult<f64> {
    let value = convert::to_json(value, "")?;
    parse_duration(&value).map(|d| d.as_secs_f64()).map_err(PyValueError::new_err)
}

/// Point the process's resolver (the `authentication` checks') at
/// `servers` (`"HOST:PORT"` or an IP, port 53; none: the system's), with a
/// per-query `timeout` and `attempts`, and a `budget` per check, in seconds.
#[pyfunction]
#[pyo3(signature = (servers, timeout, attempts, budget))]
fn configure_dns(servers: Vec<String>, timeout: f64, attempts: usize, budget: f64) -> PyResult<()> {
    let seconds = |value: f64, name: &str| {
        std::time::Duration::try_from_secs_f64(value)
            .ok()
            .filter(|duration| !duration.is_zero())
            .ok_or_else(|| PyValueError::new_err(format!("{name}: expected a positive number of seconds, got {value}")))
    };
    let servers = servers
        .iter()
        .map(|server| {
            server
                .parse::<std::net::SocketAddr>()
                .or_else(|_| server.parse::<std::net::IpAddr>().map(|ip| std::net::SocketAddr::new(ip, 53)))
                .map_err(|_| {
                    PyValueError::new_err(format!("DNS server {server:?}: expected HOST:PORT or an IP address"))
                })
        })
        .collect::<PyResult<Vec<_>>>()?;
    if attempts == 0 {
        return Err(PyValueError::new_err("attempts: expected a positive integer"));
    }
    let config = crate::auth::DnsConfig {
        servers,
        timeout: seconds(timeout, "timeout")?,
        attempts,
        budget: seconds(budget, "budget")?,
    };
    crate::auth::configure(config).map_err(PyValueError::new_err)
}

/// Raise `ValueError` unless `name` is an event a handler may be registered
/// for; the message suggests the closest event name.
#[pyfunction]
fn check_event(name: &str) -> PyResult<()> {
    if events::names().any(|known| known == name) {
        Ok(())
    } else {
        Err(PyValueError::new_err(events::unknown(name)))
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<core::PyCore>()?;
    m.add_class::<core::PyJob>()?;
    m.add_class::<objects::PyConnectionMeta>()?;
    m.add_class::<objects::PyMessage>()?;
    m.add_class::<objects::PyEnvelopeAddress>()?;
    m.add_class::<objects::PyListenerParams>()?;
    m.add("ParamsError", m.py().get_type::<ParamsError>())?;
    m.add_function(wrap_pyfunction!(validate_overrides, m)?)?;
    m.add_function(wrap_pyfunction!(duration_seconds, m)?)?;
    m.add_function(wrap_pyfunction!(check_event, m)?)?;
    m.add_function(wrap_pyfunction!(configure_dns, m)?)?;
    m.add_function(wrap_pyfunction!(authentication::check_authentication, m)?)?;
    m.add("AUTHENTICATION_FIELDS", crate::params::Authentication::FIELDS.to_vec())?;
    let dns = crate::auth::DnsConfig::default();
    m.add("DEFAULT_DNS", (dns.timeout.as_secs_f64(), dns.attempts, dns.budget.as_secs_f64()))?;
    m.add("EVENTS", PyFrozenSet::new(m.py(), events::names())?)?;
    m.add("DEFAULT_LISTEN", DEFAULT_LISTEN)?;
    m.add("DEFAULT_MAX_CONNECTIONS", crate::params::DEFAULT_MAX_CONNECTIONS)?;
    m.add("DEFAULT_BUSY_AT", crate::bridge::DEFAULT_BUSY_AT)?;
    m.add("DEFAULT_HANDLER_THREADS", crate::handler_threads::DEFAULT_HANDLER_THREADS)?;
    m.add("METRICS", metrics_table())?;
    let scopes = TOP_LEVEL_ONLY.iter().map(|name| (*name, "top_level"));
    m.add("FORWARD_OPTIONS", crate::params::ForwardOptions::FIELDS.to_vec())?;
    m.add("PARAMETERS", scopes.chain(ANYWHERE.iter().map(|name| (*name, "anywhere"))).collect::<Vec<_>>())?;
    Ok(())
}
