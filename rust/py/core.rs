//! The server handle Python drives, and the jobs it hands to Python.

use super::convert::{to_json, to_python};
use super::errors::{os_error, params_error};
use super::objects::{PyConnectionMeta, PyEnvelopeAddress, PyListenerParams, PyMessage};
use crate::bridge::{Bridge, Call, DEFAULT_BUSY_AT};
use crate::driver::Driver;
use crate::events::{self, Event, EventKind, Outcome, Response};
use crate::forward::pool::{FORWARD_SECONDS, UPSTREAM_METRICS};
use crate::log::{self, LogFormat, LogRecord};
use crate::message::Message;
use crate::meta::MetaStore;
use crate::metrics::{MetricInfo, MetricValues, AUTHENTICATION_RESULTS, LISTENER_METRICS, REJECTIONS};
use crate::params::{parse_listener_config, parse_listener_domain, parse_overrides, ParamErrors};
use crate::policy_latency::POLICY_CALL_SECONDS;
use crate::protocol::parser::Mailbox;
use crate::protocol::sasl::PlainCredentials;
use crate::server::{self, BoundAddress, ServerState};
use crate::shared_limits::{self, SharedConfig, SharedLimits, REDIS_METRICS};
use crate::sink::{Maildir, Sink};
use crate::tls;
use ipnet::IpNet;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One server: its listeners, its sink, and the queue to Python policy.
#[pyclass(frozen, module = "kumo_listener._core", name = "Core")]
pub struct PyCore {
    state: Arc<ServerState>,
    /// Held here, not by the state the tasks hold: dropping the core drops
    /// the runtime, and every task and socket with it.
    driver: Driver,
}

#[pymethods]
impl PyCore {
    #[new]
    #[pyo3(signature = (
        sink, maildir=None, reuse_port=false, busy_at=DEFAULT_BUSY_AT, redis=None, redis_timeout=None,
        redis_fail_closed=false
    ))]
    fn new(
        sink: &str,
        maildir: Option<PathBuf>,
        reuse_port: bool,
        busy_at: usize,
        redis: Option<String>,
        redis_timeout: Option<f64>,
        redis_fail_closed: bool,
    ) -> PyResult<Self> {
        let sink = match (sink, maildir) {
            ("discard", _) => Sink::Discard,
            ("maildir", Some(path)) => Sink::Maildir(Arc::new(
                Maildir::open(&path).map_err(|e| PyOSError::new_err(format!("maildir {}: {e}", path.display())))?,
            )),
            ("maildir", None) => return Err(PyValueError::new_err("the maildir sink needs a directory")),
            (other, _) => {
                return Err(PyValueError::new_err(format!("sink: expected \"maildir\" or \"discard\", got {other:?}")))
            }
        };
        let bridge = Arc::new(Bridge::new().map_err(os_error)?);
        bridge.set_busy_at(busy_at);
        let driver = Driver::new().map_err(os_error)?;
        let shared_limits = match redis {
            None => None,
            Some(url) => {
                let timeout = match redis_timeout {
                    None => shared_limits::DEFAULT_TIMEOUT,
                    Some(seconds) => {
                        Duration::try_from_secs_f64(seconds).ok().filter(|timeout| !timeout.is_zero()).ok_or_else(
                            || PyValueError::new_err(format!("redis_timeout: {seconds} is not a duration > 0")),
                        )?
                    }
                };
                let config = SharedConfig { url, timeout, fail_closed: redis_fail_closed };
                let _entered = driver.handle().enter();
                let limits = SharedLimits::new(config, bridge.clone()).map_err(PyValueError::new_err)?;
                driver.handle().spawn(limits.clone().check());
                Some(limits)
            }
        };
        Ok(Self { state: ServerState::new(bridge, sink, reuse_port, shared_limits), driver })
    }

    /// Validate `params`, bind the listener and start serving it.
    /// Returns the bound `(host, port)`, or the path of a Unix socket.
    fn start_listener<'py>(&self, py: Python<'py>, params: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyAny>> {
        let value = to_json(params.as_any(), "")?;
        let config = parse_listener_config(&value).map_err(|e| params_error(&e))?;
        let tls_errors = tls::check_static(&config.params, "");
        if !tls_errors.is_empty() {
            return Err(params_error(&ParamErrors(tls_errors)));
        }
        let state = self.state.clone();
        let bound = py.detach(|| server::start_listener(state, self.driver.handle(), config)).map_err(os_error)?;
        Ok(match bound {
            BoundAddress::Inet(address) => (address.ip().to_string(), address.port()).into_pyobject(py)?.into_any(),
            BoundAddress::Unix(path) => PyString::new(py, &path.to_string_lossy()).into_any(),
        })
    }

    /// Tell the core which events have handlers, so it skips the others,
    /// and which of them run on the handler threads (plain `def`). `init`
    /// is accepted and ignored (Python runs it); any other name that is not
    /// an event raises `ValueError`.
    #[pyo3(signature = (events, threaded=Vec::new()))]
    fn set_handlers(&self, events: Vec<String>, threaded: Vec<String>) -> PyResult<()> {
        self.state.bridge.set_registered(event_kinds(&events)?);
        self.state.bridge.set_threaded(event_kinds(&threaded)?);
        Ok(())
    }

    /// Make (or, for a server run again, reopen) the queue of at most
    /// `size` handler threads, counting the one the caller starts now; each
    /// then calls [`PyCore::next_handler_job`].
    fn start_handler_threads(&self, size: usize) -> PyResult<()> {
        if size < 1 {
            return Err(PyValueError::new_err(format!("handler_threads must be at least 1, got {size}")));
        }
        self.state.bridge.start_handler_threads(size).thread_started();
        Ok(())
    }

    /// For a handler thread: wait (GIL released) for the next call, having
    /// finished `finished`. Returns the job and whether to start one more
    /// thread first; `None` when the thread should end.
    #[pyo3(signature = (finished=None))]
    fn next_handler_job(&self, py: Python<'_>, finished: Option<&PyJob>) -> Option<(PyJob, bool)> {
        let bridge = &self.state.bridge;
        let finished = finished.map(|job| job.client);
        let taken = py.detach(|| bridge.take_for_handler_thread(finished))?;
        Some((PyJob::new(taken.item, bridge.clone()), taken.start_another))
    }

    /// Hand `job` (taken from the loop's queue) to the handler threads.
    fn run_on_handler_thread(&self, job: &PyJob) -> PyResult<()> {
        let call = job.take_call()?;
        match self.state.bridge.run_on_handler_thread(call) {
            None => Ok(()),
            Some(call) => {
                let message = format!("{}: the handler threads are not started", call.event.kind().name());
                call.finish(Outcome::Failed(message.clone()));
                Err(PyRuntimeError::new_err(message))
            }
        }
    }

    /// Let the handler threads end once the calls queued are done.
    fn close_handler_threads(&self) {
        if let Some(threads) = self.state.bridge.handler_threads() {
            threads.close();
        }
    }

    /// Calls dropped unrun because their sessions stopped waiting before a
    /// handler thread was free.
    #[getter]
    fn handler_calls_dropped(&self) -> u64 {
        self.state.bridge.handler_threads().map_or(0, |threads| threads.dropped())
    }

    /// Tell the core the `kumo_listener` logger's level (Python's numbering):
    /// records below it do not wake Python. Returns `(level, message)` of
    /// the records queued below the previous level that this one lets through.
    fn refresh_log_level<'py>(&self, py: Python<'py>, level: u8) -> PyResult<Vec<LogTuple<'py>>> {
        self.state.bridge.refresh_log_level(level).into_iter().map(|record| log_tuple(py, record)).collect()
    }

    /// Run the sessions (GIL released) until policy calls or log records are
    /// queued, `watched` (asyncio's selector) is readable, or `timeout`
    /// seconds have passed (`None`: no limit). Returns whether `watched` is readable.
    #[pyo3(signature = (watched, timeout))]
    fn drive(&self, py: Python<'_>, watched: i32, timeout: Option<f64>) -> PyResult<bool> {
        // Too large to represent (or NaN): no limit.
        let timeout = timeout.and_then(|seconds| Duration::try_from_secs_f64(seconds.max(0.0)).ok());
        py.detach(|| {
            let readable = self.driver.drive(&self.state.bridge, watched, timeout);
            self.state.bridge.flush_logs();
            readable
        })
        .map_err(os_error)
    }

    /// Write the core's records to standard error in `format` (`"text"` or
    /// `"json"`, as `kumo-listener serve --log-format`), rather than hand
    /// them to the `kumo_listener` logger; its level still decides which.
    fn write_logs_directly(&self, format: &str) -> PyResult<()> {
        let format = LogFormat::from_name(format)
            .ok_or_else(|| PyValueError::new_err(format!("log format {format:?}: expected \"text\" or \"json\"")))?;
        self.state.bridge.write_logs_directly(format);
        Ok(())
    }

    /// Stop watching the descriptor `drive` watched; call before closing it.
    fn unwatch(&self) {
        self.driver.unwatch();
    }

    /// Run the sessions on a thread of their own, for a Python loop that
    /// does not call `drive`. Returns the descriptor that becomes readable
    /// when policy calls or log records are queued.
    fn drive_in_background(&self) -> PyResult<i32> {
        self.driver.drive_in_background().map_err(os_error)?;
        Ok(self.state.bridge.watch_wake_fd())
    }

    fn stop_background(&self, py: Python<'_>) {
        py.detach(|| self.driver.stop_background());
    }

    /// Queued policy calls and log records `(level, message)`.
    fn take<'py>(&self, py: Python<'py>) -> PyResult<(Vec<PyJob>, Vec<LogTuple<'py>>)> {
        let bridge = &self.state.bridge;
        let (calls, logs) = bridge.take();
        let lines = bridge.take_log_output();
        if !lines.is_empty() {
            // Standard error may block: not while holding the GIL.
            py.detach(|| log::write_to_stderr(&lines));
        }
        let jobs = calls.into_iter().map(|call| PyJob::new(call, bridge.clone())).collect();
        Ok((jobs, logs.into_iter().map(|record| log_tuple(py, record)).collect::<PyResult<_>>()?))
    }

    /// Stop accepting; sessions answer 421 at their next read, except that a
    /// session receiving a message gets most of `grace` (seconds) to finish it.
    #[pyo3(signature = (grace=0.0))]
    fn begin_shutdown(&self, grace: f64) {
        // Negative or NaN: none; too long for a Duration (infinity): the longest.
        let grace = std::time::Duration::try_from_secs_f64(grace.max(0.0)).unwrap_or(std::time::Duration::MAX);
        self.state.begin_shutdown(grace);
    }

    fn active_sessions(&self) -> usize {
        self.state.active_sessions()
    }

    /// Listening sockets not yet closed since `begin_shutdown`.
    fn open_listeners(&self) -> usize {
        self.state.open_listeners()
    }

    fn describe_sink(&self) -> String {
        self.state.sink.describe()
    }

    /// Every sample of every metric in `_core.METRICS`, by name:
    /// `[(label values, value)]`, a histogram's value being
    /// `([(upper bound, cumulative count), …, (inf, count)], sum)`.
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let all = PyDict::new(py);
        let listeners = self.state.listener_metrics();
        set_samples(&all, LISTENER_METRICS, &listeners)?;
        let mut rejections = Vec::new();
        for (name, metrics) in &listeners {
            rejections.extend(metrics.refusals().into_iter().map(|(code, count)| ((&**name, code.to_string()), count)));
        }
        all.set_item(REJECTIONS.name, rejections)?;
        let mut authentication = Vec::new();
        for (name, metrics) in &listeners {
            let results = metrics.authentication_results().into_iter();
            authentication.extend(results.map(|(method, result, count)| ((&**name, method, result), count)));
        }
        all.set_item(AUTHENTICATION_RESULTS.name, authentication)?;
        let latency: Vec<((&str,), Histogram)> = self
            .state
            .bridge
            .latency()
            .snapshot()
            .into_iter()
            .map(|(event, histogram)| ((event,), (histogram.buckets, histogram.sum_seconds)))
            .collect();
        all.set_item(POLICY_CALL_SECONDS.name, latency)?;
        let upstreams = self.state.forwarder.upstream_metrics();
        set_samples(&all, UPSTREAM_METRICS, &upstreams)?;
        let forward_latency: Vec<((&str,), Histogram)> = upstreams
            .iter()
            .filter_map(|(url, metrics)| {
                let histogram = metrics.latency().snapshot()?;
                Some(((&**url,), (histogram.buckets, histogram.sum_seconds)))
            })
            .collect();
        all.set_item(FORWARD_SECONDS.name, forward_latency)?;
        let redis: Vec<_> = self.state.shared_limits.iter().map(|limits| limits.metrics()).collect();
        set_samples(&all, REDIS_METRICS, &redis)?;
        Ok(all)
    }
}

/// Each row of `table`: a sample per labelled entry (a listener, an upstream).
fn set_samples<M: MetricValues>(
    all: &Bound<'_, PyDict>,
    table: &[MetricInfo],
    entries: &[(Arc<str>, Arc<M>)],
) -> PyResult<()> {
    let values: Vec<Vec<u64>> = entries.iter().map(|(_, metrics)| metrics.values()).collect();
    for (index, info) in table.iter().enumerate() {
        let samples: Vec<((&str,), u64)> =
            entries.iter().zip(&values).map(|((label, _), values)| ((&**label,), values[index])).collect();
        all.set_item(info.name, samples)?;
    }
    Ok(())
}

/// A histogram's value: `[(upper bound, cumulative count)]` and the sum.
type Histogram = (Vec<(f64, u64)>, f64);

/// A log record for Python: `(level, message, fields or None)`.
type LogTuple<'py> = (u8, String, Option<Bound<'py, PyAny>>);

/// The events named, `init` left out; `ValueError` for a name that is no event.
fn event_kinds(names: &[String]) -> PyResult<Vec<EventKind>> {
    let mut kinds = Vec::with_capacity(names.len());
    for name in names {
        match EventKind::from_name(name) {
            Some(kind) => kinds.push(kind),
            None if name == events::INIT => {}
            None => return Err(PyValueError::new_err(events::unknown(name))),
        }
    }
    Ok(kinds)
}

fn log_tuple(py: Python<'_>, record: LogRecord) -> PyResult<LogTuple<'_>> {
    let fields = record.fields.map(|fields| to_python(py, &Value::Object(fields))).transpose()?;
    Ok((record.level, record.message, fields))
}

/// A policy call waiting for its handler's result.
#[pyclass(frozen, module = "kumo_listener._core", name = "Job")]
pub struct PyJob {
    kind: EventKind,
    client: Option<IpNet>,
    call: Mutex<Option<Call>>,
    bridge: Arc<Bridge>,
}

impl PyJob {
    fn new(call: Call, bridge: Arc<Bridge>) -> Self {
        Self { kind: call.event.kind(), client: call.client, call: Mutex::new(Some(call)), bridge }
    }

    fn finish(&self, outcome: Outcome) -> PyResult<()> {
        self.bridge.finish(self.take_call()?, outcome);
        Ok(())
    }

    fn take_call(&self) -> PyResult<Call> {
        let call = self.call.lock().map_err(|_| PyRuntimeError::new_err("job lock poisoned"))?.take();
        call.ok_or_else(|| PyRuntimeError::new_err("job already finished"))
    }

    fn with_event<R>(&self, read: impl FnOnce(&Event) -> PyResult<R>) -> PyResult<R> {
        let call = self.call.lock().map_err(|_| PyRuntimeError::new_err("job lock poisoned"))?;
        let call = call.as_ref().ok_or_else(|| PyRuntimeError::new_err("job already finished"))?;
        read(&call.event)
    }
}

fn meta_object(py: Python<'_>, meta: &MetaStore) -> PyResult<Py<PyConnectionMeta>> {
    Py::new(py, PyConnectionMeta { store: meta.clone() })
}

fn message_object(py: Python<'_>, message: &Arc<Message>) -> PyResult<Py<PyMessage>> {
    Py::new(py, PyMessage { message: message.clone() })
}

/// How an event's field becomes the handler's argument(s).
trait PushArgs {
    fn push_args<'py>(&self, py: Python<'py>, args: &mut Vec<Bound<'py, PyAny>>) -> PyResult<()>;
}

impl PushArgs for Arc<str> {
    fn push_args<'py>(&self, py: Python<'py>, args: &mut Vec<Bound<'py, PyAny>>) -> PyResult<()> {
        args.push(PyString::new(py, self).into_any());
        Ok(())
    }
}

impl PushArgs for String {
    fn push_args<'py>(&self, py: Python<'py>, args: &mut Vec<Bound<'py, PyAny>>) -> PyResult<()> {
        args.push(PyString::new(py, self).into_any());
        Ok(())
    }
}

impl PushArgs for u16 {
    fn push_args<'py>(&self, py: Python<'py>, args: &mut Vec<Bound<'py, PyAny>>) -> PyResult<()> {
        args.push(self.into_pyobject(py)?.into_any());
        Ok(())
    }
}

impl PushArgs for Option<String> {
    fn push_args<'py>(&self, py: Python<'py>, args: &mut Vec<Bound<'py, PyAny>>) -> PyResult<()> {
        match self {
            Some(text) => text.push_args(py, args),
            None => {
                args.push(py.None().into_bound(py));
                Ok(())
            }
        }
    }
}

impl PushArgs for Vec<String> {
    fn push_args<'py>(&self, py: Python<'py>, args: &mut Vec<Bound<'py, PyAny>>) -> PyResult<()> {
        args.push(PyList::new(py, self)?.into_any());
        Ok(())
    }
}

impl PushArgs for MetaStore {
    fn push_args<'py>(&self, py: Python<'py>, args: &mut Vec<Bound<'py, PyAny>>) -> PyResult<()> {
        args.push(meta_object(py, self)?.into_bound(py).into_any());
        Ok(())
    }
}

impl PushArgs for Mailbox {
    fn push_args<'py>(&self, py: Python<'py>, args: &mut Vec<Bound<'py, PyAny>>) -> PyResult<()> {
        args.push(Py::new(py, PyEnvelopeAddress::new(self.clone()))?.into_bound(py).into_any());
        Ok(())
    }
}

impl PushArgs for Arc<Message> {
    fn push_args<'py>(&self, py: Python<'py>, args: &mut Vec<Bound<'py, PyAny>>) -> PyResult<()> {
        args.push(message_object(py, self)?.into_bound(py).into_any());
        Ok(())
    }
}

/// `authz, authc, password`.
impl PushArgs for PlainCredentials {
    fn push_args<'py>(&self, py: Python<'py>, args: &mut Vec<Bound<'py, PyAny>>) -> PyResult<()> {
        for text in [&self.authz, &self.authc, &self.password] {
            text.push_args(py, args)?;
        }
        Ok(())
    }
}

/// Generates `push_event_args` from the one list of events.
macro_rules! event_args {
    ($($kind:ident => $name:literal ($($argument:ident),*) { $($field:ident: $ty:ty),* },)*) => {
        /// The handler's positional arguments for `event`, in order.
        fn push_event_args<'py>(py: Python<'py>, event: &Event, args: &mut Vec<Bound<'py, PyAny>>) -> PyResult<()> {
            match event {
                $(Event::$kind { $($field),* } => { $($field.push_args(py, args)?;)* })*
            }
            Ok(())
        }
    };
}

crate::with_events!(event_args);

#[pymethods]
impl PyJob {
    /// The event name the handler is registered under.
    #[getter]
    fn event(&self) -> &'static str {
        self.kind.name()
    }

    /// Whether the session no longer waits for this job (it gave up at
    /// `data_processing_timeout`, or went away).
    #[getter]
    fn abandoned(&self) -> PyResult<bool> {
        let call = self.call.lock().map_err(|_| PyRuntimeError::new_err("job lock poisoned"))?;
        Ok(call.as_ref().is_some_and(Call::is_abandoned))
    }

    /// The client whose session waits, as the per-client limits count it:
    /// `"192.0.2.7/32"`, or an IPv6 network such as `"2001:db8::/84"`
    /// (`client_ipv6_prefix_length`); `None` for a client exempt from them
    /// (`relay_hosts`, a Unix socket's).
    #[getter]
    fn client(&self) -> Option<String> {
        self.client.map(|network| network.to_string())
    }

    /// The handler's positional arguments.
    #[getter]
    fn args<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        self.with_event(|event| {
            let mut args = Vec::with_capacity(4);
            push_event_args(py, event, &mut args)?;
            debug_assert_eq!(args.len(), event.kind().arguments().len());
            PyTuple::new(py, args)
        })
    }

    /// Finish with the handler's return value. Raises (and leaves the job
    /// open) when the value does not fit the event.
    fn complete(&self, result: &Bound<'_, PyAny>) -> PyResult<()> {
        let response = convert_result(self.kind, result)?;
        self.finish(Outcome::Done(response))
    }

    /// Finish with `Reject(code, message)`.
    fn reject(&self, code: u16, message: String) -> PyResult<()> {
        self.finish(Outcome::Reject { code, text: message })
    }

    /// Finish with a failure (already logged by the caller).
    fn fail(&self, reason: String) -> PyResult<()> {
        self.finish(Outcome::Failed(reason))
    }
}

fn convert_result(kind: EventKind, result: &Bound<'_, PyAny>) -> PyResult<Response> {
    if result.is_none() {
        return Ok(Response::Nothing);
    }
    match kind {
        EventKind::GetDynamicParameters => match result.cast::<PyListenerParams>() {
            Ok(validated) => Ok(Response::Params(validated.get().params.clone())),
            Err(_) => parse_overrides(&to_json(result, "")?, "")
                .map(|params| Response::Params(Arc::new(params)))
                .map_err(|e| params_error(&e)),
        },
        EventKind::Ehlo => ehlo_extensions(result).map(Response::Extensions),
        EventKind::AuthPlain => result
            .extract::<bool>()
            .map(Response::Authenticated)
            .map_err(|_| PyTypeError::new_err("smtp_server_auth_plain handlers must return True or False")),
        EventKind::GetListenerDomain => {
            parse_listener_domain(&to_json(result, "")?).map(Response::ListenerDomain).map_err(|e| params_error(&e))
        }
        EventKind::SplitTransaction => recipient_groups(result).map(Response::Groups),
        EventKind::RewriteResponse => {
            let (status, response): (Option<u16>, Option<String>) = result.extract().map_err(|_| {
                PyTypeError::new_err(
                    "smtp_server_rewrite_response handlers must return None or (status or None, text or None)",
                )
            })?;
            if status.is_some_and(|status| !(200..600).contains(&status)) {
                return Err(PyValueError::new_err("smtp_server_rewrite_response: a status is 200 to 599"));
            }
            Ok(Response::Rewritten { status, response })
        }
        _ => Err(PyTypeError::new_err(format!(
            "{} handlers must return None, got {}",
            kind.name(),
            result.get_type().name()?
        ))),
    }
}

/// A list of lists of recipients (`EnvelopeAddress`, or `str` as it prints).
fn recipient_groups(result: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<String>>> {
    let wrong = || {
        PyTypeError::new_err("smtp_server_split_transaction handlers must return None or a list of lists of recipients")
    };
    let groups = result.cast::<PyList>().map_err(|_| wrong())?;
    groups
        .iter()
        .map(|group| {
            let group = group.cast::<PyList>().map_err(|_| wrong())?;
            group.iter().map(|address| address.str().map(|text| text.to_string()).map_err(|_| wrong())).collect()
        })
        .collect()
}

fn ehlo_extensions(result: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    let extensions: Vec<String> = result
        .extract()
        .map_err(|_| PyTypeError::new_err("smtp_server_ehlo handlers must return None or a list of str"))?;
    match extensions.iter().position(|e| e.is_empty() || e.chars().any(char::is_control)) {
        Some(index) => Err(PyValueError::new_err(format!("[{index}]: an EHLO extension must be a non-empty line"))),
        None => Ok(extensions),
    }
}
