//! The crate's log records, for Python's `kumo_listener` logger. They travel
//! with the policy calls (see [`crate::bridge::Bridge::log`]); a record
//! below the logger's level as last known waits here, unwoken, until Python
//! next says what the level is. When `kumo-listener serve` owns the logging
//! set-up, the core writes its records itself instead, in the lines the
//! CLI's formatters would write ([`LogRecords::write_directly`]): handing
//! each to Python's `logging` cost more than receiving the message did.

use chrono::{DateTime, Local, SecondsFormat, Utc};
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU8, Ordering};

/// A log record for Python's `kumo_listener` logger; levels are Python's.
#[derive(Clone, Debug)]
pub struct LogRecord {
    pub level: u8,
    pub message: String,
    /// What the message says, as fields (`event` first), for `--log-format json`.
    pub fields: Option<Map<String, Value>>,
}

/// What a record says: its text, and for the lines an operator greps, the same as fields.
#[derive(Debug)]
pub struct LogEntry {
    message: String,
    fields: Option<Map<String, Value>>,
}

impl LogEntry {
    pub fn with_fields(message: String, fields: Map<String, Value>) -> Self {
        Self { message, fields: Some(fields) }
    }

    /// The same record with `key: value` among its fields (the text stays
    /// as it is).
    pub fn with_field(mut self, key: &str, value: &str) -> Self {
        self.fields.get_or_insert_with(Map::new).insert(key.to_owned(), Value::String(value.to_owned()));
        self
    }
}

impl From<String> for LogEntry {
    fn from(message: String) -> Self {
        Self { message, fields: None }
    }
}

pub const LOG_DEBUG: u8 = 10;
pub const LOG_INFO: u8 = 20;
pub const LOG_WARNING: u8 = 30;
pub const LOG_ERROR: u8 = 40;

/// How many records below the logger's last known level may wait for
/// Python (see [`LogRecords::push`]) between two refreshes of the level
/// (once a second). Enough for a level lowered at run time to show what led
/// up to it; few enough that a busy server at WARNING formats almost none of
/// the records it drops (formatting them was a tenth of its CPU per message).
pub const MAX_QUIET_RECORDS: usize = 256;

/// The effective level of Python's logger, as Python last said.
#[derive(Debug)]
pub struct LogLevel(AtomicU8);

impl Default for LogLevel {
    fn default() -> Self {
        Self(AtomicU8::new(LOG_DEBUG))
    }
}

impl LogLevel {
    /// Whether a record at `level` should reach Python now.
    pub fn wants(&self, level: u8) -> bool {
        level >= self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, level: u8) {
        self.0.store(level, Ordering::Relaxed);
    }
}

/// The logger the records are for, and that the lines written directly name.
pub const LOGGER: &str = "kumo_listener";

/// Past this many bytes, lines written directly go out at once rather than
/// at the next [`LogRecords::take_direct_output`].
const DIRECT_OUTPUT_FLUSH_AT: usize = 32 * 1024;

/// The lines of `kumo-listener serve --log-format`: Python's
/// `%(asctime)s %(levelname)s %(name)s: %(message)s`, or one JSON object
/// (`time`, `level`, `logger`, `message`, then the record's fields) as
/// `kumo_listener.logs.JsonFormatter` writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            _ => None,
        }
    }

    /// Append `record`'s line, written at `now`, to `out`.
    pub fn write(self, record: &LogRecord, now: DateTime<Utc>, out: &mut Vec<u8>) {
        let level = level_name(record.level);
        match self {
            Self::Text => {
                let time = now.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S,%3f");
                let line = format!("{time} {level} {LOGGER}: {}\n", record.message);
                out.extend_from_slice(line.as_bytes());
            }
            Self::Json => {
                let mut entry = Map::new();
                entry.insert("time".into(), now.to_rfc3339_opts(SecondsFormat::Micros, false).into());
                entry.insert("level".into(), level.into());
                entry.insert("logger".into(), LOGGER.into());
                entry.insert("message".into(), record.message.clone().into());
                entry.extend(record.fields.iter().flatten().map(|(name, value)| (name.clone(), value.clone())));
                // Writing a JSON value into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, &entry);
                out.push(b'\n');
            }
        }
    }
}

/// Python's name of a level.
fn level_name(level: u8) -> &'static str {
    match level {
        LOG_DEBUG => "DEBUG",
        LOG_INFO => "INFO",
        LOG_WARNING => "WARNING",
        LOG_ERROR => "ERROR",
        _ => "CRITICAL",
    }
}

/// Records waiting for Python.
#[derive(Debug, Default)]
pub struct LogRecords {
    /// For Python with the next calls.
    wanted: Vec<LogRecord>,
    /// Below the logger's level as last known, kept for [`LogRecords::take_quiet`].
    quiet: Vec<LogRecord>,
    /// Set by [`LogRecords::write_directly`]: wanted records become lines here.
    direct: Option<(LogFormat, Vec<u8>)>,
}

impl LogRecords {
    /// Keep a record, `wanted` now or quiet. At most [`MAX_QUIET_RECORDS`]
    /// quiet ones wait; more are dropped unformatted. Returns whether Python
    /// should be woken for it.
    pub fn push(&mut self, wanted: bool, level: u8, entry: impl FnOnce() -> LogEntry) -> bool {
        let record = || {
            let LogEntry { message, fields } = entry();
            LogRecord { level, message, fields }
        };
        match (&mut self.direct, wanted) {
            (Some((format, output)), true) => {
                format.write(&record(), Utc::now(), output);
                if output.len() >= DIRECT_OUTPUT_FLUSH_AT {
                    write_to_stderr(&std::mem::take(output));
                }
                false
            }
            (None, true) => {
                self.wanted.push(record());
                true
            }
            (_, false) => {
                if self.quiet.len() < MAX_QUIET_RECORDS {
                    self.quiet.push(record());
                }
                false
            }
        }
    }

    /// From now on, write wanted records to standard error in `format`
    /// rather than hand them to Python. Quiet records still go to Python.
    pub fn write_directly(&mut self, format: LogFormat) {
        self.direct = Some((format, Vec::new()));
    }

    /// The lines written directly since last asked.
    pub fn take_direct_output(&mut self) -> Vec<u8> {
        self.direct.as_mut().map(|(_, output)| std::mem::take(output)).unwrap_or_default()
    }

    /// The records Python wanted.
    pub fn take(&mut self) -> Vec<LogRecord> {
        std::mem::take(&mut self.wanted)
    }

    /// The quiet records that the logger's `level` now lets through; the others are dropped.
    pub fn take_quiet(&mut self, level: u8) -> Vec<LogRecord> {
        let quiet = std::mem::take(&mut self.quiet);
        quiet.into_iter().filter(|record| record.level >= level).collect()
    }
}

/// Best effort, as Python's `StreamHandler` does: a log that can't be
/// written must not take the server down.
pub fn write_to_stderr(lines: &[u8]) {
    use std::io::Write;
    if !lines.is_empty() {
        let _ = std::io::stderr().lock().write_all(lines);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(records: Vec<LogRecord>) -> Vec<String> {
        records.into_iter().map(|record| record.message).collect()
    }

    #[test]
    fn the_level_decides_what_is_wanted() {
        let level = LogLevel::default();
        assert!(level.wants(LOG_DEBUG));
        level.set(LOG_WARNING);
        assert!(!level.wants(LOG_INFO));
        assert!(level.wants(LOG_WARNING));
    }

    #[test]
    fn quiet_records_are_filtered_by_the_level_when_taken() {
        let mut records = LogRecords::default();
        assert!(!records.push(false, LOG_DEBUG, || String::from("quieter").into()));
        assert!(!records.push(false, LOG_INFO, || String::from("quiet").into()));
        assert!(records.push(true, LOG_WARNING, || String::from("loud").into()));
        assert_eq!(messages(records.take()), ["loud"]);
        assert_eq!(messages(records.take_quiet(LOG_INFO)), ["quiet"]);
        assert!(records.take_quiet(LOG_DEBUG).is_empty());
    }

    fn record(level: u8, message: &str, fields: Option<Value>) -> LogRecord {
        let fields = fields.map(|value| value.as_object().unwrap().clone());
        LogRecord { level, message: message.into(), fields }
    }

    #[test]
    fn text_lines_are_those_of_the_clis_formatter() {
        let now = DateTime::parse_from_rfc3339("2026-12-02T03:04:05.678901Z").unwrap().to_utc();
        let mut out = Vec::new();
        LogFormat::Text.write(&record(LOG_INFO, "stored: x", Some(serde_json::json!({"a": 1}))), now, &mut out);
        let local = now.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S").to_string();
        assert_eq!(String::from_utf8(out).unwrap(), format!("{local},678 INFO kumo_listener: stored: x\n"));
    }

    #[test]
    fn json_lines_carry_the_fields_after_the_standard_keys() {
        let now = DateTime::parse_from_rfc3339("2026-12-02T03:04:05.678901Z").unwrap().to_utc();
        let mut out = Vec::new();
        let fields = serde_json::json!({"event": "stored", "size": 12});
        LogFormat::Json.write(&record(LOG_WARNING, "stored: \"x\"", Some(fields)), now, &mut out);
        let line = String::from_utf8(out).unwrap();
        assert_eq!(
            line,
            "{\"time\":\"2026-12-02T03:04:05.678901+00:00\",\"level\":\"WARNING\",\"logger\":\"kumo_listener\",\
             \"message\":\"stored: \\\"x\\\"\",\"event\":\"stored\",\"size\":12}\n"
        );
    }

    #[test]
    fn written_directly_wanted_records_become_lines_and_quiet_ones_still_wait() {
        let mut records = LogRecords::default();
        records.write_directly(LogFormat::Text);
        assert!(!records.push(true, LOG_INFO, || String::from("loud").into()), "Python is not woken");
        records.push(false, LOG_DEBUG, || String::from("quiet").into());
        assert!(records.take().is_empty());
        let output = String::from_utf8(records.take_direct_output()).unwrap();
        assert!(output.ends_with(" INFO kumo_listener: loud\n"), "{output:?}");
        assert!(records.take_direct_output().is_empty());
        assert_eq!(messages(records.take_quiet(LOG_DEBUG)), ["quiet"]);
    }

    #[test]
    fn records_below_the_level_are_bounded() {
        let mut records = LogRecords::default();
        for _ in 0..MAX_QUIET_RECORDS + 5 {
            records.push(false, LOG_DEBUG, || String::new().into());
        }
        assert_eq!(records.take_quiet(LOG_DEBUG).len(), MAX_QUIET_RECORDS);
    }
}
