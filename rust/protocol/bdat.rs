//! The content of a message sent with BDAT (RFC 3030): chunks taken exactly
//! as sent, with no dot-unstuffing and no terminator to look for. A
//! `BODY=BINARYMIME` body has no lines, so only its size is limited; any
//! other body is text and gets DATA's rules for bare CR or LF and for line
//! length, so that what is stored is the same whichever verb carried it
//! (and a bare LF cannot reach a later hop that speaks DATA).
//! Pure logic: no I/O, no Python.

use super::framing::{DataLimits, DataVerdict, LineEndings};
use memchr::memchr2;

/// Follows one message across its chunks, saying what to store of each.
#[derive(Clone, Debug)]
pub struct ChunkedBody {
    limits: DataLimits,
    binary: bool,
    verdict: DataVerdict,
    /// Bytes stored so far: what `max_message_size` limits.
    stored: usize,
    /// Received bytes of the current line so far, excluding CRLF.
    line_len: usize,
    /// A chunk ended in a CR, not stored yet: the next byte tells whether it
    /// starts a CRLF.
    pending_cr: bool,
}

impl ChunkedBody {
    pub fn new(limits: DataLimits, binary: bool) -> Self {
        Self { limits, binary, verdict: DataVerdict::Accept, stored: 0, line_len: 0, pending_cr: false }
    }

    /// The first problem met so far, or Accept.
    pub fn verdict(&self) -> DataVerdict {
        self.verdict
    }

    /// Before a chunk of `size` octets is read: whether it can fit. If not,
    /// the message is too big, and the chunk is to be read and discarded.
    pub fn admit(&mut self, size: u64) -> bool {
        let room = self.limits.max_message_size.saturating_sub(self.stored + usize::from(self.pending_cr));
        if size > room as u64 {
            self.fail(DataVerdict::TooBig);
        }
        self.verdict == DataVerdict::Accept
    }

    /// Take `bytes` of a chunk (a chunk may come in several calls), handing
    /// what is to be stored to `store`; nothing once a problem is met.
    pub fn feed(&mut self, bytes: &[u8], mut store: impl FnMut(&[u8])) {
        if self.verdict != DataVerdict::Accept || bytes.is_empty() {
            return;
        }
        if self.binary {
            self.store(bytes, &mut store);
            return;
        }
        let mut pos = 0;
        if std::mem::take(&mut self.pending_cr) {
            if bytes[0] == b'\n' {
                self.store(b"\r\n", &mut store);
                self.line_len = 0;
                pos = 1;
            } else {
                self.bare_cr(&mut store);
            }
        }
        self.walk(bytes, pos, &mut store);
    }

    /// After the LAST chunk: a CR that ended it was bare. The final verdict.
    pub fn finish(&mut self, mut store: impl FnMut(&[u8])) -> DataVerdict {
        if std::mem::take(&mut self.pending_cr) && self.verdict == DataVerdict::Accept {
            self.bare_cr(&mut store);
        }
        self.verdict
    }

    /// Stores `bytes[pos..]` in spans between the places where a bare line
    /// ending is rewritten, checking line lengths on the way.
    fn walk(&mut self, bytes: &[u8], mut pos: usize, store: &mut impl FnMut(&[u8])) {
        let mut span = pos;
        loop {
            let Some(text_len) = memchr2(b'\r', b'\n', &bytes[pos..]) else {
                if self.take_text(bytes.len() - pos) {
                    self.store(&bytes[span..], store);
                }
                return;
            };
            if !self.take_text(text_len) {
                return;
            }
            let at = pos + text_len;
            match &bytes[at..] {
                [b'\r', b'\n', ..] => {
                    self.line_len = 0;
                    pos = at + 2;
                }
                [b'\r'] => {
                    self.store(&bytes[span..at], store);
                    self.pending_cr = true;
                    return;
                }
                _ => match self.limits.line_endings {
                    LineEndings::Deny => return self.fail(DataVerdict::BareLineEnding),
                    LineEndings::Allow => {
                        if !self.take_text(1) {
                            return;
                        }
                        pos = at + 1;
                    }
                    LineEndings::Fix => {
                        self.store(&bytes[span..at], store);
                        self.store(b"\r\n", store);
                        self.line_len = 0;
                        pos = at + 1;
                        span = pos;
                    }
                },
            }
            if self.verdict != DataVerdict::Accept {
                return;
            }
        }
    }

    /// A CR held from the end of the previous chunk turned out bare.
    fn bare_cr(&mut self, store: &mut impl FnMut(&[u8])) {
        match self.limits.line_endings {
            LineEndings::Deny => self.fail(DataVerdict::BareLineEnding),
            LineEndings::Allow => {
                if self.take_text(1) {
                    self.store(b"\r", store);
                }
            }
            LineEndings::Fix => {
                self.store(b"\r\n", store);
                self.line_len = 0;
            }
        }
    }

    /// Counts `len` more bytes on the current line; false once it is too long.
    fn take_text(&mut self, len: usize) -> bool {
        self.line_len += len;
        if self.line_len > self.limits.max_line_length {
            self.fail(DataVerdict::LineTooLong);
        }
        self.verdict == DataVerdict::Accept
    }

    fn store(&mut self, bytes: &[u8], store: &mut impl FnMut(&[u8])) {
        if self.verdict != DataVerdict::Accept {
            return;
        }
        if self.stored + bytes.len() > self.limits.max_message_size {
            self.fail(DataVerdict::TooBig);
        } else {
            self.stored += bytes.len();
            store(bytes);
        }
    }

    fn fail(&mut self, problem: DataVerdict) {
        if self.verdict == DataVerdict::Accept {
            self.verdict = problem;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(line_endings: LineEndings) -> DataLimits {
        DataLimits { max_message_size: 100, max_line_length: 10, line_endings }
    }

    /// The chunks fed in turn: the verdict and what was stored.
    fn receive(limits: DataLimits, binary: bool, chunks: &[&[u8]]) -> (DataVerdict, Vec<u8>) {
        let mut body = ChunkedBody::new(limits, binary);
        let mut stored = Vec::new();
        for chunk in chunks {
            if body.admit(chunk.len() as u64) {
                body.feed(chunk, |bytes| stored.extend_from_slice(bytes));
            }
        }
        (body.finish(|bytes| stored.extend_from_slice(bytes)), stored)
    }

    #[test]
    fn chunks_are_stored_as_sent_without_unstuffing() {
        let chunks: [&[u8]; 3] = [b"a: b\r\n\r\n.x\r", b"\n.\r\n", b"end\r\n"];
        for mode in [LineEndings::Deny, LineEndings::Allow, LineEndings::Fix] {
            assert_eq!(
                receive(limits(mode), false, &chunks),
                (DataVerdict::Accept, b"a: b\r\n\r\n.x\r\n.\r\nend\r\n".to_vec())
            );
        }
    }

    #[test]
    fn bare_line_endings_follow_invalid_line_endings_across_chunks() {
        let chunks: [&[u8]; 3] = [b"a\nb\r", b"c\r", b""];
        assert_eq!(receive(limits(LineEndings::Deny), false, &chunks).0, DataVerdict::BareLineEnding);
        assert_eq!(receive(limits(LineEndings::Allow), false, &chunks), (DataVerdict::Accept, b"a\nb\rc\r".to_vec()));
        assert_eq!(
            receive(limits(LineEndings::Fix), false, &chunks),
            (DataVerdict::Accept, b"a\r\nb\r\nc\r\n".to_vec())
        );
        // A CR ending one chunk and an LF starting the next make a CRLF.
        assert_eq!(
            receive(limits(LineEndings::Deny), false, &[b"a\r", b"\nb"]),
            (DataVerdict::Accept, b"a\r\nb".to_vec())
        );
    }

    #[test]
    fn binarymime_has_no_lines_only_a_size() {
        let binary: &[u8] = b"\0\r\x80\n\xff\r\r";
        let long = [b'x'; 50];
        assert_eq!(
            receive(limits(LineEndings::Deny), true, &[binary, &long]),
            (DataVerdict::Accept, [binary, &long].concat())
        );
        assert_eq!(receive(limits(LineEndings::Deny), false, &[&long]).0, DataVerdict::LineTooLong);
        assert_eq!(receive(limits(LineEndings::Deny), true, &[&long, &long, b"x"]).0, DataVerdict::TooBig);
    }

    #[test]
    fn the_size_is_checked_before_a_chunk_is_read_and_nothing_is_stored_after() {
        let mut body = ChunkedBody::new(limits(LineEndings::Deny), true);
        assert!(body.admit(100));
        assert!(!body.admit(101));
        assert_eq!(body.verdict(), DataVerdict::TooBig);
        let mut stored = Vec::new();
        body.feed(b"abc", |bytes| stored.extend_from_slice(bytes));
        assert!(stored.is_empty());
        // Fix's rewrites count: 60 bare LFs become 120 bytes.
        assert_eq!(receive(limits(LineEndings::Fix), false, &[&[b'\n'; 60]]).0, DataVerdict::TooBig);
    }

    #[test]
    fn line_length_counts_across_chunks() {
        assert_eq!(receive(limits(LineEndings::Deny), false, &[b"12345", b"67890\r", b"\n"]).0, DataVerdict::Accept);
        assert_eq!(receive(limits(LineEndings::Deny), false, &[b"12345", b"678901"]).0, DataVerdict::LineTooLong);
    }
}
