//! The crate's log records, for Python's `kumo_listener` logger. They travel
//! with the policy calls (see [`crate::bridge::Bridge::log`]); a record
//! below the logger's level as last known waits here, unwoken, until Python
//! next says what the level is.

use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU8, Ordering};

/// A log record for Python's `kumo_listener` logger; levels are Python's.
#[derive(Debug)]
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
/// Python (see [`LogRecords::push`]).
pub const MAX_QUIET_RECORDS: usize = 10_000;

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

/// Records waiting for Python.
#[derive(Debug, Default)]
pub struct LogRecords {
    /// For Python with the next calls.
    wanted: Vec<LogRecord>,
    /// Below the logger's level as last known, kept for [`LogRecords::take_quiet`].
    quiet: Vec<LogRecord>,
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
        if wanted {
            self.wanted.push(record());
        } else if self.quiet.len() < MAX_QUIET_RECORDS {
            self.quiet.push(record());
        }
        wanted
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

    #[test]
    fn records_below_the_level_are_bounded() {
        let mut records = LogRecords::default();
        for _ in 0..MAX_QUIET_RECORDS + 5 {
            records.push(false, LOG_DEBUG, || String::new().into());
        }
        assert_eq!(records.take_quiet(LOG_DEBUG).len(), MAX_QUIET_RECORDS);
    }
}
