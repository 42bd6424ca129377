//! `DataFramer` driven as the session drives it (a buffer, `feed` per read,
//! `consumed` bytes dropped), on every input in two ways:
//!
//! (a) Round trip. The input is a message body: normalised to CRLF line
//!     endings, dot-stuffed and terminated as a client sends it, followed by a
//!     pipelined `QUIT\r\n`, fed split at an arbitrary offset (and byte by
//!     byte when short), in each line-ending mode. The verdict is Accept, the
//!     body is the normalised one, exactly the stuffed bytes are consumed and
//!     `QUIT\r\n` is left. With the size or line limit one below what the
//!     message needs, the verdict is TooBig or LineTooLong, still consuming
//!     exactly up to the terminator.
//!
//! (b) Raw. The input is `[mode, size limit, line limit, chunk schedule,
//!     stream...]`: arbitrary bytes in arbitrary chunks. No panic; the body
//!     never exceeds `max_message_size`; at most 2 bytes are left unconsumed
//!     by a call that is not done; `done` comes exactly at the first line
//!     holding only `.` (the consumed prefix is `.\r\n` or ends in
//!     `\r\n.\r\n`), and the verdict and body are those of a byte-at-a-time
//!     model of the rules (first problem wins; Fix rewrites bare CR/LF).

#![no_main]

#[path = "common/chunks.rs"]
mod chunks;

use kumo_listener::protocol::framing::{DataFramer, DataLimits, DataVerdict, LineEndings};
use libfuzzer_sys::fuzz_target;
use memchr::memmem;

const MODES: [LineEndings; 3] = [LineEndings::Deny, LineEndings::Allow, LineEndings::Fix];
const QUIT: &[u8] = b"QUIT\r\n";
/// Inputs up to this long are also fed one byte per read.
const BYTEWISE_MAX: usize = 512;

fuzz_target!(|input: &[u8]| {
    round_trip(input);
    raw(input);
});

/// What the session's DATA loop saw.
struct Outcome {
    /// `Some` once `feed` said done.
    verdict: Option<DataVerdict>,
    body: Vec<u8>,
    /// Total of `consumed` over all calls.
    consumed: usize,
    /// Bytes after the terminator, never handed to the framer again.
    rest: Vec<u8>,
}

fn feed_all<'a>(limits: DataLimits, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut framer = DataFramer::new(limits);
    let mut buffer = Vec::new();
    let mut body = Vec::new();
    let mut consumed = 0;
    let mut chunks = chunks.into_iter();
    for chunk in chunks.by_ref() {
        buffer.extend_from_slice(chunk);
        let fed = framer.feed(&buffer, &mut body);
        assert!(fed.consumed <= buffer.len(), "consumed {} of {}", fed.consumed, buffer.len());
        assert!(body.len() <= limits.max_message_size, "body of {} over {limits:?}", body.len());
        buffer.drain(..fed.consumed);
        consumed += fed.consumed;
        if fed.done {
            buffer.extend(chunks.flatten());
            return Outcome { verdict: Some(framer.verdict()), body, consumed, rest: buffer };
        }
        assert!(buffer.len() <= 2, "{} bytes left unconsumed: {buffer:?}", buffer.len());
    }
    Outcome { verdict: None, body, consumed, rest: buffer }
}

// ---------------------------------------------------------------- (a)

/// Every CR or LF that is not part of a CRLF becomes CRLF; a body that does
/// not end in CRLF gets one.
fn normalise(raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(raw.len() + 2);
    let mut index = 0;
    while index < raw.len() {
        match raw[index] {
            b'\r' if raw.get(index + 1) == Some(&b'\n') => {
                body.extend_from_slice(b"\r\n");
                index += 2;
            }
            b'\r' | b'\n' => {
                body.extend_from_slice(b"\r\n");
                index += 1;
            }
            byte => {
                body.push(byte);
                index += 1;
            }
        }
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    body
}

/// The client's side: a dot before each line that starts with one, then the
/// terminator. Also returns the longest line as the line limit counts it:
/// without CRLF nor the stuffing dot (RFC 5321 §4.5.3.1.6).
fn stuff(body: &[u8]) -> (Vec<u8>, usize) {
    let mut stuffed = Vec::with_capacity(body.len() + body.len() / 2 + 3);
    let mut longest = 0;
    for line in body.split_inclusive(|&byte| byte == b'\n') {
        if line.starts_with(b".") {
            stuffed.push(b'.');
        }
        stuffed.extend_from_slice(line);
        longest = longest.max(line.len() - 2);
    }
    stuffed.extend_from_slice(b".\r\n");
    (stuffed, longest)
}

fn round_trip(input: &[u8]) {
    let Some((split_bytes, raw)) = input.split_first_chunk::<2>() else { return };
    let body = normalise(raw);
    let (stuffed, longest_line) = stuff(&body);
    let stream = [&stuffed[..], QUIT].concat();
    let split = usize::from(u16::from_le_bytes(*split_bytes)) % (stream.len() + 1);
    let exact = DataLimits { max_message_size: body.len(), max_line_length: longest_line, line_endings: LineEndings::Deny };

    let check = |outcome: Outcome, limits: DataLimits, expected: DataVerdict, how: &str| {
        let context = format!("{how}, {limits:?}, stuffed {:?}", String::from_utf8_lossy(&stuffed));
        assert_eq!(outcome.verdict, Some(expected), "{context}");
        if expected == DataVerdict::Accept {
            assert_eq!(outcome.body, body, "{context}");
        }
        assert_eq!(outcome.consumed, stuffed.len(), "{context}");
        assert_eq!(outcome.rest, QUIT, "{context}");
    };

    for line_endings in MODES {
        let limits = DataLimits { line_endings, ..exact };
        let (head, tail) = stream.split_at(split);
        check(feed_all(limits, [head, tail]), limits, DataVerdict::Accept, &format!("split at {split}"));
        if stream.len() <= BYTEWISE_MAX {
            check(feed_all(limits, stream.chunks(1)), limits, DataVerdict::Accept, "byte by byte");
        }
    }
    if !body.is_empty() {
        let limits = DataLimits { max_message_size: body.len() - 1, ..exact };
        check(feed_all(limits, [&stream[..]]), limits, DataVerdict::TooBig, "whole");
    }
    if longest_line > 0 {
        let limits = DataLimits { max_line_length: longest_line - 1, ..exact };
        check(feed_all(limits, [&stream[..]]), limits, DataVerdict::LineTooLong, "whole");
    }
}

// ---------------------------------------------------------------- (b)

/// Where the DATA stream ends: the end of the first line holding only `.`.
fn terminator_end(stream: &[u8]) -> Option<usize> {
    if stream.starts_with(b".\r\n") {
        return Some(3);
    }
    memmem::find(stream, b"\r\n.\r\n").map(|at| at + 5)
}

/// The rules one received byte at a time: each line's bytes (CRLF and a
/// leading dot excluded) count toward the line limit, a leading dot is dropped, a bare CR or LF is
/// refused (Deny), kept (Allow) or stored as CRLF (Fix); the first problem
/// met wins, a bare ending before the line limit before the size limit for
/// the same byte.
fn model(message: &[u8], limits: DataLimits) -> (DataVerdict, Vec<u8>) {
    let mut body = Vec::new();
    let store = |bytes: &[u8], body: &mut Vec<u8>| {
        if body.len() + bytes.len() > limits.max_message_size {
            return Err(DataVerdict::TooBig);
        }
        body.extend_from_slice(bytes);
        Ok(())
    };
    let mut walk = || -> Result<(), DataVerdict> {
        let mut rest = message;
        while let Some(end) = memmem::find(rest, b"\r\n") {
            let line = &rest[..end];
            // The stuffing dot is dropped, and not counted (RFC 5321 §4.5.3.1.6).
            let stuffed = usize::from(line.first() == Some(&b'.'));
            for (index, &byte) in line.iter().enumerate().skip(stuffed) {
                let bare = byte == b'\r' || byte == b'\n';
                if bare && limits.line_endings == LineEndings::Deny {
                    return Err(DataVerdict::BareLineEnding);
                }
                if index + 1 - stuffed > limits.max_line_length {
                    return Err(DataVerdict::LineTooLong);
                }
                if bare && limits.line_endings == LineEndings::Fix {
                    store(b"\r\n", &mut body)?;
                } else {
                    store(&[byte], &mut body)?;
                }
            }
            store(b"\r\n", &mut body)?;
            rest = &rest[end + 2..];
        }
        assert!(rest.is_empty());
        Ok(())
    };
    match walk() {
        Ok(()) => (DataVerdict::Accept, body),
        Err(problem) => (problem, Vec::new()),
    }
}

fn raw(input: &[u8]) {
    let Some((&[mode, size, line], rest)) = input.split_first_chunk::<3>() else { return };
    let limits = DataLimits {
        max_message_size: if size < 250 { usize::from(size) * 4 } else { usize::MAX },
        max_line_length: if line < 250 { usize::from(line) } else { usize::MAX },
        line_endings: MODES[usize::from(mode % 3)],
    };
    let (stream, chunks) = chunks::split(rest);
    let outcome = feed_all(limits, chunks.iter().copied());
    let context = format!("{limits:?}, chunks {:?}", chunks.iter().map(|c| c.len()).collect::<Vec<_>>());

    let Some(end) = terminator_end(stream) else {
        assert_eq!(outcome.verdict, None, "done without a terminator; {context}");
        return;
    };
    let Some(verdict) = outcome.verdict else {
        panic!("not done though the terminator ends at {end}; {context}");
    };
    assert_eq!(outcome.consumed, end, "{context}");
    let taken = &stream[..end];
    assert!(taken == b".\r\n" || taken.ends_with(b"\r\n.\r\n"), "{context}");
    assert_eq!(outcome.rest, &stream[end..], "{context}");

    let message = &stream[..end - 3];
    let (expected_verdict, expected_body) = model(message, limits);
    assert_eq!(verdict, expected_verdict, "message {:?}; {context}", String::from_utf8_lossy(message));
    assert_eq!(outcome.body, expected_body, "message {:?}; {context}", String::from_utf8_lossy(message));
}
