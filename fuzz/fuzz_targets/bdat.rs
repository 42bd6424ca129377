//! `ChunkedBody` driven as the session drives it: `admit` per BDAT chunk,
//! then its bytes fed in one or more reads, `finish` at LAST. The input is
//! `[mode, size limit, line limit, chunk schedule, stream...]`: the mode
//! picks the line-ending rule and BINARYMIME, the schedule cuts the stream
//! into chunks (each fed in two reads). Invariants: no panic; the body
//! never exceeds `max_message_size`; the outcome is that of a byte-at-a-time
//! model over the whole stream, wherever the chunks are cut: Accept with
//! the model's body when the model accepts, a refusal when it refuses (which
//! problem comes first may differ: a chunk too big is refused before it is
//! read, and a line is measured before it is stored).

#![no_main]

#[path = "common/chunks.rs"]
mod chunks;

use kumo_listener::protocol::bdat::ChunkedBody;
use kumo_listener::protocol::framing::{DataLimits, DataVerdict, LineEndings};
use libfuzzer_sys::fuzz_target;

const MODES: [LineEndings; 3] = [LineEndings::Deny, LineEndings::Allow, LineEndings::Fix];

fuzz_target!(|input: &[u8]| {
    let [mode, size, line, rest @ ..] = input else {
        return;
    };
    let limits = DataLimits {
        max_message_size: usize::from(*size) * 4,
        max_line_length: usize::from(*line),
        line_endings: MODES[usize::from(mode % 3)],
    };
    let binary = mode & 4 != 0;
    let (stream, chunks) = chunks::split(rest);
    let (verdict, body) = receive(limits, binary, &chunks);
    assert!(body.len() <= limits.max_message_size, "{} bytes stored over {limits:?}", body.len());
    let (expected, expected_body) = model(limits, binary, stream);
    if expected == DataVerdict::Accept {
        assert_eq!(verdict, DataVerdict::Accept, "{limits:?} binary={binary} {chunks:?}");
        assert_eq!(body, expected_body, "{limits:?} binary={binary} {chunks:?}");
    } else {
        assert_ne!(verdict, DataVerdict::Accept, "model {expected:?}: {limits:?} binary={binary} {chunks:?}");
    }
});

fn receive(limits: DataLimits, binary: bool, chunks: &[&[u8]]) -> (DataVerdict, Vec<u8>) {
    let mut content = ChunkedBody::new(limits, binary);
    let mut body = Vec::new();
    for chunk in chunks {
        if !content.admit(chunk.len() as u64) {
            continue;
        }
        let (first, second) = chunk.split_at(chunk.len() / 2);
        for read in [first, second] {
            content.feed(read, |bytes| body.extend_from_slice(bytes));
        }
    }
    (content.finish(|bytes| body.extend_from_slice(bytes)), body)
}

/// The rules one byte at a time over the whole message.
fn model(limits: DataLimits, binary: bool, stream: &[u8]) -> (DataVerdict, Vec<u8>) {
    if binary {
        let verdict = if stream.len() > limits.max_message_size { DataVerdict::TooBig } else { DataVerdict::Accept };
        return (verdict, stream.to_vec());
    }
    let mut body = Vec::new();
    let mut line = 0;
    let mut index = 0;
    while index < stream.len() {
        let byte = stream[index];
        let emitted: &[u8] = match byte {
            b'\r' if stream.get(index + 1) == Some(&b'\n') => {
                index += 1;
                line = 0;
                b"\r\n"
            }
            b'\r' | b'\n' => match limits.line_endings {
                LineEndings::Deny => return (DataVerdict::BareLineEnding, body),
                LineEndings::Allow => {
                    line += 1;
                    std::slice::from_ref(&stream[index])
                }
                LineEndings::Fix => {
                    line = 0;
                    b"\r\n"
                }
            },
            _ => {
                line += 1;
                std::slice::from_ref(&stream[index])
            }
        };
        if line > limits.max_line_length {
            return (DataVerdict::LineTooLong, body);
        }
        if body.len() + emitted.len() > limits.max_message_size {
            return (DataVerdict::TooBig, body);
        }
        body.extend_from_slice(emitted);
        index += 1;
    }
    (DataVerdict::Accept, body)
}
