//! `LineFramer` driven as the session drives it (a buffer, a chunk appended
//! per read, `next` until `NeedMore`) over arbitrary input cut into arbitrary
//! chunks. Every `Line` is CRLF-free and at most `limit` long, the buffer
//! stays bounded, and the events are exactly those of splitting the whole
//! input on CRLF: a line per CRLF-terminated segment, `TooLong` for a
//! segment over the limit.
//!
//! Input: `[limit - 16, chunk schedule (see common/chunks.rs), stream...]`.

#![no_main]

#[path = "common/chunks.rs"]
mod chunks;

use kumo_listener::protocol::framing::{LineEvent, LineFramer};
use libfuzzer_sys::fuzz_target;
use memchr::memmem;

#[derive(Debug, PartialEq, Eq)]
enum Got<'a> {
    Line(&'a [u8]),
    TooLong,
}

fuzz_target!(|input: &[u8]| {
    let Some((&limit_byte, rest)) = input.split_first() else { return };
    let limit = 16 + usize::from(limit_byte);
    let (stream, chunks) = chunks::split(rest);

    let mut framer = LineFramer::new(limit);
    let mut buffer: Vec<u8> = Vec::new();
    // Where `buffer` starts in `stream`.
    let mut buffer_start = 0;
    let mut got = Vec::new();
    for chunk in &chunks {
        buffer.extend_from_slice(chunk);
        assert!(buffer.len() <= limit + 2 + chunk.len(), "buffer grew to {} (limit {limit})", buffer.len());
        loop {
            match framer.next(&buffer) {
                LineEvent::Line { len, consumed } => {
                    assert_eq!(consumed, len + 2);
                    assert!(len <= limit, "line of {len} bytes over the limit {limit}");
                    assert_eq!(&buffer[len..consumed], b"\r\n");
                    assert!(memmem::find(&buffer[..len], b"\r\n").is_none(), "CRLF inside a line");
                    got.push(Got::Line(&stream[buffer_start..buffer_start + len]));
                    buffer.drain(..consumed);
                    buffer_start += consumed;
                }
                LineEvent::TooLong { consumed } => {
                    assert!((2..=buffer.len()).contains(&consumed), "TooLong consumed {consumed} of {}", buffer.len());
                    assert_eq!(&buffer[consumed - 2..consumed], b"\r\n");
                    got.push(Got::TooLong);
                    buffer.drain(..consumed);
                    buffer_start += consumed;
                }
                LineEvent::NeedMore { discard } => {
                    assert!(discard <= buffer.len(), "discard {discard} of {}", buffer.len());
                    buffer.drain(..discard);
                    buffer_start += discard;
                    break;
                }
            }
        }
        // What waits for the next read: at most a line of `limit` bytes and the CR of its CRLF.
        assert!(buffer.len() <= limit + 1, "{} bytes left in the buffer (limit {limit})", buffer.len());
        assert_eq!(&buffer[..], &stream[buffer_start..buffer_start + buffer.len()]);
    }

    // The model: the whole stream split on CRLF.
    let mut expected = Vec::new();
    let mut line_start = 0;
    for crlf in memmem::find_iter(stream, b"\r\n") {
        let line = &stream[line_start..crlf];
        expected.push(if line.len() <= limit { Got::Line(line) } else { Got::TooLong });
        line_start = crlf + 2;
    }
    assert_eq!(got, expected, "limit {limit}, chunks {:?}", chunks.iter().map(|c| c.len()).collect::<Vec<_>>());

    // What is left is the unterminated last segment, or (while an over-long
    // one is being thrown away) the end of it.
    let unterminated = &stream[line_start..];
    assert!(unterminated.ends_with(&buffer), "left {buffer:?}, unterminated {unterminated:?}");
    if unterminated.len() <= limit + 1 {
        assert_eq!(&buffer[..], unterminated);
    }
});
