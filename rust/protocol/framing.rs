//! Byte framing for the SMTP stream: command lines and the DATA body.
//! Pure logic: no I/O, no Python.

use super::reply::Reply;
use memchr::{memchr2, memmem};

/// What to do with a bare CR or bare LF inside message data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LineEndings {
    /// Refuse the message (after reading it to its terminator).
    #[default]
    Deny,
    /// Keep the bytes as sent.
    Allow,
    /// Normalise every bare CR or LF to CRLF.
    Fix,
}

/// What [`LineFramer::next`] found at the front of the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineEvent {
    /// A complete command line: `input[..len]` is the line without CRLF; `consumed` = len + 2.
    Line { len: usize, consumed: usize },
    /// A line longer than the limit has ended; `consumed` bytes (through its CRLF) are to be dropped.
    TooLong { consumed: usize },
    /// No complete line yet. The caller drops the first `discard` bytes of input (non-zero only while an over-long line is being thrown away), then reads more.
    NeedMore { discard: usize },
}

/// Splits the command stream into CRLF-terminated lines of bounded length.
/// Only CRLF ends a line: a bare CR or LF is part of it.
#[derive(Clone, Debug)]
pub struct LineFramer {
    limit: usize,
    /// Bytes at the front of the caller's input already searched for CRLF.
    scanned: usize,
    /// An over-long line is being thrown away until its CRLF arrives.
    discarding: bool,
}

impl LineFramer {
    /// `limit` is the longest line accepted, excluding its CRLF.
    pub fn new(limit: usize) -> Self {
        Self { limit, scanned: 0, discarding: false }
    }

    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// `input` is the caller's unconsumed buffer, starting where the previous event left off.
    pub fn next(&mut self, input: &[u8]) -> LineEvent {
        // Resume one byte early: a CR ending the last scan may pair with a new LF.
        let start = self.scanned.saturating_sub(1).min(input.len());
        match memmem::find(&input[start..], b"\r\n") {
            Some(offset) => self.line_ended(start + offset),
            None => self.line_unfinished(input),
        }
    }

    fn line_ended(&mut self, len: usize) -> LineEvent {
        let consumed = len + 2;
        let too_long = self.discarding || len > self.limit;
        self.scanned = 0;
        self.discarding = false;
        if too_long {
            LineEvent::TooLong { consumed }
        } else {
            LineEvent::Line { len, consumed }
        }
    }

    fn line_unfinished(&mut self, input: &[u8]) -> LineEvent {
        // A valid line can leave at most `limit` bytes plus the CR of its CRLF.
        if !self.discarding && input.len() <= self.limit.saturating_add(1) {
            self.scanned = input.len();
            return LineEvent::NeedMore { discard: 0 };
        }
        self.discarding = true;
        let kept = usize::from(input.ends_with(b"\r"));
        self.scanned = kept;
        LineEvent::NeedMore { discard: input.len() - kept }
    }
}

/// Limits applied to one message while its DATA stream is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataLimits {
    /// Longest body accepted, counted as stored: after unstuffing and `Fix` rewrites.
    pub max_message_size: usize,
    /// Longest body line accepted, counted in received bytes excluding CRLF
    /// and the dot stuffed before a line starting with one (in DATA).
    pub max_line_length: usize,
    pub line_endings: LineEndings,
}

/// The outcome of a DATA transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataVerdict {
    Accept,
    TooBig,
    LineTooLong,
    BareLineEnding,
}

pub const MESSAGE_TOO_BIG: Reply = Reply::new(552, "5.3.4", "message size exceeds fixed maximum message size");

impl DataVerdict {
    /// The refusal, or `None` when the message may be accepted.
    pub fn refusal(self) -> Option<Reply> {
        match self {
            DataVerdict::Accept => None,
            DataVerdict::TooBig => Some(MESSAGE_TOO_BIG),
            DataVerdict::LineTooLong => Some(Reply::new(500, "5.2.3", "message line too long")),
            DataVerdict::BareLineEnding => {
                Some(Reply::new(550, "5.6.0", "message contains a bare CR or LF; lines must end in CRLF"))
            }
        }
    }
}

/// What one [`DataFramer::feed`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fed {
    pub consumed: usize,
    pub done: bool,
}

/// Reads the DATA stream up to its terminator, a line holding only `.`,
/// removing the dot that stuffs any other line starting with one.
///
/// Only CRLF ends a line, so no bare CR or LF next to a dot can end the
/// message early (SMTP smuggling).
#[derive(Clone, Debug)]
pub struct DataFramer {
    limits: DataLimits,
    verdict: DataVerdict,
    at_line_start: bool,
    /// Received bytes of the current line so far, excluding CRLF.
    line_len: usize,
    /// Bytes of the message stored so far: what `max_message_size` limits.
    stored: usize,
}

/// One `feed` call's walk through its input. The clean text between `stored`
/// and `pos` is copied into `body` as a single span when something interrupts it.
struct Cursor<'a> {
    input: &'a [u8],
    pos: usize,
    stored: usize,
    body: &'a mut Vec<u8>,
}

enum LineStart {
    Text,
    Stuffed,
    Terminator,
    /// Too few bytes yet to tell.
    Undecided,
}

fn classify_line_start(rest: &[u8]) -> LineStart {
    match rest {
        [b'.', b'\r', b'\n', ..] => LineStart::Terminator,
        [] | [b'.'] | [b'.', b'\r'] => LineStart::Undecided,
        [b'.', ..] => LineStart::Stuffed,
        _ => LineStart::Text,
    }
}

const TERMINATOR: &[u8] = b".\r\n";

impl DataFramer {
    pub fn new(limits: DataLimits) -> Self {
        Self { limits, verdict: DataVerdict::Accept, at_line_start: true, line_len: 0, stored: 0 }
    }

    /// Consume bytes of the DATA stream from `input`, appending the unstuffed
    /// message to `body` (which may start with headers of our own: only what
    /// is appended counts against `max_message_size`). On a refusal `body`
    /// is emptied.
    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> Fed {
        let mut cursor = Cursor { input, pos: 0, stored: 0, body };
        let done = self.walk(&mut cursor);
        self.flush(&mut cursor);
        let terminator = if done { TERMINATOR.len() } else { 0 };
        Fed { consumed: cursor.pos + terminator, done }
    }

    /// Valid once `feed` returned `done`: the first problem met, or Accept.
    pub fn verdict(&self) -> DataVerdict {
        self.verdict
    }

    /// Walks line by line; true when `c.pos` reaches the terminator, false
    /// when the input runs out first.
    fn walk(&mut self, c: &mut Cursor<'_>) -> bool {
        loop {
            if self.at_line_start {
                match classify_line_start(&c.input[c.pos..]) {
                    LineStart::Terminator => return true,
                    LineStart::Undecided => return false,
                    LineStart::Stuffed => self.skip_stuffing_dot(c),
                    LineStart::Text => {}
                }
                self.at_line_start = false;
            }
            if !self.walk_to_line_end(c) {
                return false;
            }
        }
    }

    /// RFC 5321 §4.5.3.1.6: the dot a client doubles for transparency does
    /// not count toward the line limit (a 998-octet line starting with `.`
    /// is 999 octets on the wire, and legal).
    fn skip_stuffing_dot(&mut self, c: &mut Cursor<'_>) {
        self.flush(c);
        c.pos += 1;
        c.stored = c.pos;
    }

    /// True once past the current line's CRLF, false when the input runs out first.
    fn walk_to_line_end(&mut self, c: &mut Cursor<'_>) -> bool {
        loop {
            let rest = &c.input[c.pos..];
            let Some(text_len) = memchr2(b'\r', b'\n', rest) else {
                self.take_text(c, rest.len());
                return false;
            };
            self.take_text(c, text_len);
            match &c.input[c.pos..] {
                [b'\r', b'\n', ..] => {
                    c.pos += 2;
                    self.line_len = 0;
                    self.at_line_start = true;
                    return true;
                }
                // Possibly the first half of a CRLF: leave it for the next call.
                [b'\r'] => return false,
                _ => self.bare_line_ending(c),
            }
        }
    }

    /// Advances over `len` bytes of line content, failing at the first byte past the line limit.
    fn take_text(&mut self, c: &mut Cursor<'_>, len: usize) {
        let room = self.limits.max_line_length.saturating_sub(self.line_len);
        self.line_len += len;
        if len > room {
            c.pos += room;
            self.fail(DataVerdict::LineTooLong, c);
            c.pos += len - room;
        } else {
            c.pos += len;
        }
    }

    /// `c.pos` is at a CR or LF that is not part of a CRLF.
    fn bare_line_ending(&mut self, c: &mut Cursor<'_>) {
        match self.limits.line_endings {
            LineEndings::Deny => {
                self.fail(DataVerdict::BareLineEnding, c);
                self.take_text(c, 1);
            }
            LineEndings::Allow => self.take_text(c, 1),
            LineEndings::Fix => {
                self.flush(c);
                self.take_text(c, 1);
                c.stored = c.pos;
                self.store(b"\r\n", c.body);
            }
        }
    }

    fn flush(&mut self, c: &mut Cursor<'_>) {
        let pending = &c.input[c.stored..c.pos];
        c.stored = c.pos;
        self.store(pending, c.body);
    }

    fn store(&mut self, bytes: &[u8], body: &mut Vec<u8>) {
        if self.verdict != DataVerdict::Accept {
            return;
        }
        if self.stored + bytes.len() > self.limits.max_message_size {
            self.record(DataVerdict::TooBig, body);
        } else {
            self.stored += bytes.len();
            body.extend_from_slice(bytes);
        }
    }

    /// Records `problem` at `c.pos` unless an earlier one was met.
    fn fail(&mut self, problem: DataVerdict, c: &mut Cursor<'_>) {
        // The text before `c.pos` comes first and may itself make the body too big.
        self.flush(c);
        self.record(problem, c.body);
    }

    fn record(&mut self, problem: DataVerdict, body: &mut Vec<u8>) {
        if self.verdict == DataVerdict::Accept {
            self.verdict = problem;
            // The body will be refused: free it now rather than at the terminator.
            *body = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Line(Vec<u8>),
        TooLong,
    }

    /// Plays the session's command loop over `chunks`; returns the events and
    /// the largest the caller's buffer ever grew.
    fn frame_lines<'a>(limit: usize, chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Got>, usize) {
        let mut framer = LineFramer::new(limit);
        let mut buffer = Vec::new();
        let mut got = Vec::new();
        let mut peak = 0;
        for chunk in chunks {
            buffer.extend_from_slice(chunk);
            peak = peak.max(buffer.len());
            loop {
                match framer.next(&buffer) {
                    LineEvent::Line { len, consumed } => {
                        got.push(Got::Line(buffer[..len].to_vec()));
                        buffer.drain(..consumed);
                    }
                    LineEvent::TooLong { consumed } => {
                        got.push(Got::TooLong);
                        buffer.drain(..consumed);
                    }
                    LineEvent::NeedMore { discard } => {
                        buffer.drain(..discard);
                        break;
                    }
                }
            }
        }
        (got, peak)
    }

    fn line(text: &[u8]) -> Got {
        Got::Line(text.to_vec())
    }

    #[test]
    fn simple_line() {
        let mut framer = LineFramer::new(100);
        assert_eq!(framer.next(b"NOOP\r\n"), LineEvent::Line { len: 4, consumed: 6 });
    }

    #[test]
    fn pipelined_lines_in_one_input() {
        let (got, _) = frame_lines(100, [&b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"[..]]);
        assert_eq!(got, [line(b"MAIL FROM:<a@b>"), line(b"RCPT TO:<c@d>")]);
    }

    #[test]
    fn incomplete_line_needs_more() {
        let mut framer = LineFramer::new(100);
        assert_eq!(framer.next(b"NOOP\r"), LineEvent::NeedMore { discard: 0 });
        assert_eq!(framer.next(b"NOOP\r\n"), LineEvent::Line { len: 4, consumed: 6 });
    }

    #[test]
    fn long_line_fed_byte_by_byte() {
        let mut input = vec![b'x'; 10_000];
        input.extend_from_slice(b"\r\nQUIT\r\n");
        let (got, _) = frame_lines(10_000, input.chunks(1));
        assert_eq!(got, [line(&input[..10_000]), line(b"QUIT")]);
    }

    #[test]
    fn scan_resumes_where_it_stopped() {
        let mut framer = LineFramer::new(100);
        assert_eq!(framer.next(b"NOOP"), LineEvent::NeedMore { discard: 0 });
        assert_eq!(framer.scanned, 4);
        assert_eq!(framer.next(b"NOOP\r\n"), LineEvent::Line { len: 4, consumed: 6 });
        assert_eq!(framer.scanned, 0);
    }

    #[test]
    fn line_of_exactly_limit_is_accepted_one_more_is_too_long() {
        let (got, _) = frame_lines(5, [&b"12345\r\n123456\r\nNOOP\r\n"[..]]);
        assert_eq!(got, [line(b"12345"), Got::TooLong, line(b"NOOP")]);
    }

    #[test]
    fn limit_plus_cr_waits_for_the_lf() {
        let mut framer = LineFramer::new(5);
        assert_eq!(framer.next(b"12345\r"), LineEvent::NeedMore { discard: 0 });
        assert_eq!(framer.next(b"12345\r\n"), LineEvent::Line { len: 5, consumed: 7 });
    }

    #[test]
    fn over_long_line_already_ended_is_too_long_directly() {
        let mut framer = LineFramer::new(5);
        assert_eq!(framer.next(b"1234567890\r\nNOOP\r\n"), LineEvent::TooLong { consumed: 12 });
        assert_eq!(framer.next(b"NOOP\r\n"), LineEvent::Line { len: 4, consumed: 6 });
    }

    #[test]
    fn ten_megabyte_line_is_discarded_in_bounded_memory() {
        const CHUNK: usize = 64 * 1024;
        let limit = 1000;
        let mut input = vec![b'x'; 10 * 1024 * 1024];
        input.extend_from_slice(b"\r\nNOOP\r\n");
        let (got, peak) = frame_lines(limit, input.chunks(CHUNK));
        assert_eq!(got, [Got::TooLong, line(b"NOOP")]);
        assert!(peak <= limit + CHUNK, "buffer grew to {peak}");
    }

    #[test]
    fn bare_lf_and_bare_cr_stay_inside_the_line() {
        let (got, _) = frame_lines(100, [&b"NOOP\nRSET\r\nNO\rOP\r\n"[..]]);
        assert_eq!(got, [line(b"NOOP\nRSET"), line(b"NO\rOP")]);
    }

    #[test]
    fn trailing_cr_is_kept_across_a_discard() {
        let mut framer = LineFramer::new(5);
        assert_eq!(framer.next(b"1234567890\r"), LineEvent::NeedMore { discard: 10 });
        assert_eq!(framer.next(b"\r"), LineEvent::NeedMore { discard: 0 });
        assert_eq!(framer.next(b"\r\nNOOP\r\n"), LineEvent::TooLong { consumed: 2 });
        assert_eq!(framer.next(b"NOOP\r\n"), LineEvent::Line { len: 4, consumed: 6 });
    }

    #[test]
    fn discarding_drops_a_cr_not_at_the_end() {
        let mut framer = LineFramer::new(5);
        assert_eq!(framer.next(b"1234567890"), LineEvent::NeedMore { discard: 10 });
        assert_eq!(framer.next(b"\rx"), LineEvent::NeedMore { discard: 2 });
        assert_eq!(framer.next(b"\nNOOP\r\n"), LineEvent::TooLong { consumed: 7 });
    }

    #[test]
    fn set_limit_applies_to_the_next_line() {
        let mut framer = LineFramer::new(3);
        assert_eq!(framer.next(b"NOOP\r\n"), LineEvent::TooLong { consumed: 6 });
        framer.set_limit(4);
        assert_eq!(framer.next(b"NOOP\r\n"), LineEvent::Line { len: 4, consumed: 6 });
    }

    struct Outcome {
        verdict: DataVerdict,
        body: Vec<u8>,
        /// Bytes after the terminator, not consumed.
        rest: Vec<u8>,
        /// Most bytes ever left unconsumed by a call that was not done.
        most_left: usize,
        most_body_capacity: usize,
    }

    /// Plays the session's DATA loop over `chunks`; panics if the terminator never comes.
    fn read_data<'a>(limits: DataLimits, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
        let mut framer = DataFramer::new(limits);
        let mut buffer = Vec::new();
        let mut body = Vec::new();
        let mut most_left = 0;
        let mut most_body_capacity = 0;
        let mut chunks = chunks.into_iter();
        for chunk in chunks.by_ref() {
            buffer.extend_from_slice(chunk);
            let fed = framer.feed(&buffer, &mut body);
            buffer.drain(..fed.consumed);
            most_body_capacity = most_body_capacity.max(body.capacity());
            if fed.done {
                buffer.extend(chunks.flatten());
                return Outcome { verdict: framer.verdict(), body, rest: buffer, most_left, most_body_capacity };
            }
            most_left = most_left.max(buffer.len());
        }
        panic!("DATA never ended; left over: {buffer:?}");
    }

    fn limits(line_endings: LineEndings) -> DataLimits {
        DataLimits { max_message_size: 1 << 20, max_line_length: 998, line_endings }
    }

    fn read_whole(input: &[u8], line_endings: LineEndings) -> Outcome {
        read_data(limits(line_endings), [input])
    }

    fn read_whole_and_bytewise(input: &[u8], line_endings: LineEndings) -> [Outcome; 2] {
        [read_whole(input, line_endings), read_data(limits(line_endings), input.chunks(1))]
    }

    /// The sender's side: stuff lines starting with a dot, then terminate.
    fn stuff(body: &[u8]) -> Vec<u8> {
        let mut stuffed = Vec::new();
        let mut at_line_start = true;
        for (index, &byte) in body.iter().enumerate() {
            if at_line_start && byte == b'.' {
                stuffed.push(b'.');
            }
            stuffed.push(byte);
            at_line_start = body[..=index].ends_with(b"\r\n");
        }
        stuffed.extend_from_slice(TERMINATOR);
        stuffed
    }

    const SAMPLE_BODIES: [&[u8]; 8] = [
        b"",
        b"\r\n",
        b".\r\n",
        b"..\r\n",
        b"Subject: hi\r\n\r\n.leading dot\r\n..two\r\nmiddle . dot\r\n",
        b".\r\n.\r\n.\r\n",
        b"\r\n\r\n.\r\n\r\n",
        b"end with dot line\r\n.\r\n",
    ];

    #[test]
    fn empty_body() {
        let outcome = read_whole(b".\r\n", LineEndings::Deny);
        assert_eq!(outcome.verdict, DataVerdict::Accept);
        assert_eq!(outcome.body, b"");
    }

    #[test]
    fn terminator_crlf_belongs_to_the_last_line() {
        let outcome = read_whole(b"a\r\n.\r\n", LineEndings::Deny);
        assert_eq!(outcome.body, b"a\r\n");
    }

    #[test]
    fn dot_unstuffing_including_the_first_line() {
        let outcome = read_whole(b"..first\r\n..\r\n...\r\nx.y\r\n.\r\n", LineEndings::Deny);
        assert_eq!(outcome.verdict, DataVerdict::Accept);
        assert_eq!(outcome.body, b".first\r\n.\r\n..\r\nx.y\r\n");
    }

    #[test]
    fn split_at_every_offset_gives_the_same_body() {
        let input = b"..a\r\n\r\n.\r\r\nb\r\n.\r\n";
        let expected = b".a\r\n\r\n\r\r\nb\r\n";
        for split in 0..=input.len() {
            let (head, tail) = input.split_at(split);
            let outcome = read_data(limits(LineEndings::Allow), [head, tail]);
            assert_eq!(outcome.body, expected, "split at {split}");
            assert_eq!(outcome.rest, b"");
        }
        let outcome = read_data(limits(LineEndings::Allow), input.chunks(1));
        assert_eq!(outcome.body, expected);
        assert!(outcome.most_left <= 2, "left {} bytes unconsumed", outcome.most_left);
    }

    #[test]
    fn unstuffing_undoes_stuffing() {
        for body in SAMPLE_BODIES {
            let stuffed = stuff(body);
            for outcome in read_whole_and_bytewise(&stuffed, LineEndings::Deny) {
                assert_eq!(outcome.verdict, DataVerdict::Accept);
                assert_eq!(outcome.body, body, "{:?}", String::from_utf8_lossy(body));
            }
        }
    }

    #[test]
    fn pipelined_command_after_the_terminator_is_left() {
        let mut framer = DataFramer::new(limits(LineEndings::Deny));
        let mut body = Vec::new();
        let fed = framer.feed(b"a\r\n.\r\nQUIT\r\n", &mut body);
        assert_eq!(fed, Fed { consumed: 6, done: true });
        assert_eq!(body, b"a\r\n");
    }

    /// Each smuggling ending, with the body `Allow` and `Fix` make of
    /// `a{ending}b\r\n` before the real terminator. The last holds no bare
    /// CR or LF, so every mode accepts it as it is.
    const SMUGGLING: [(&[u8], &[u8], &[u8]); 9] = [
        (b"\n.\n", b"a\n.\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"\n.\r\n", b"a\n.\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"\r.\r", b"a\r.\rb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"\r.\n", b"a\r.\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"\n.\r", b"a\n.\rb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"\r\n.\n", b"a\r\n\nb\r\n", b"a\r\n\r\nb\r\n"),
        (b"\r.\r\n", b"a\r.\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"\r\n.\r", b"a\r\n\rb\r\n", b"a\r\n\r\nb\r\n"),
        (b"\r\n\x00.\r\n", b"a\r\n\x00.\r\nb\r\n", b"a\r\n\x00.\r\nb\r\n"),
    ];

    fn smuggling_input(ending: &[u8]) -> Vec<u8> {
        [b"a", ending, b"b\r\n.\r\nQUIT\r\n"].concat()
    }

    #[test]
    fn smuggled_endings_do_not_end_data() {
        for (ending, allowed, fixed) in SMUGGLING {
            let input = smuggling_input(ending);
            let has_bare = allowed != fixed;
            for mode in [LineEndings::Deny, LineEndings::Allow, LineEndings::Fix] {
                for outcome in read_whole_and_bytewise(&input, mode) {
                    let context = format!("{ending:?} {mode:?}");
                    assert_eq!(outcome.rest, b"QUIT\r\n", "{context}");
                    match mode {
                        LineEndings::Deny if has_bare => {
                            assert_eq!(outcome.verdict, DataVerdict::BareLineEnding, "{context}")
                        }
                        LineEndings::Deny | LineEndings::Allow => assert_eq!(outcome.body, allowed, "{context}"),
                        LineEndings::Fix => assert_eq!(outcome.body, fixed, "{context}"),
                    }
                }
            }
        }
    }

    #[test]
    fn fix_rewrites_each_bare_ending() {
        let outcome = read_whole(b"a\r\r\nb\nc\rd\r\n.\r\n", LineEndings::Fix);
        assert_eq!(outcome.verdict, DataVerdict::Accept);
        assert_eq!(outcome.body, b"a\r\n\r\nb\r\nc\r\nd\r\n");
    }

    #[test]
    fn too_big_reads_to_the_terminator_in_bounded_memory() {
        let max = 100;
        let data_limits = DataLimits { max_message_size: max, ..limits(LineEndings::Deny) };
        let mut input = b"line of text\r\n".repeat(1000);
        input.extend_from_slice(b".\r\nQUIT\r\n");
        let outcome = read_data(data_limits, input.chunks(1000));
        assert_eq!(outcome.verdict, DataVerdict::TooBig);
        assert_eq!(outcome.rest, b"QUIT\r\n");
        assert!(outcome.most_body_capacity <= 2 * max, "body grew to {}", outcome.most_body_capacity);
    }

    #[test]
    fn body_of_exactly_max_size_is_accepted() {
        let data_limits = DataLimits { max_message_size: 6, ..limits(LineEndings::Deny) };
        assert_eq!(read_data(data_limits, [&b"..ab\r\nc\r\n.\r\n"[..]]).verdict, DataVerdict::TooBig);
        assert_eq!(read_data(data_limits, [&b"..ab\r\n.\r\n"[..]]).verdict, DataVerdict::Accept);
    }

    #[test]
    fn what_the_body_starts_with_does_not_count_against_the_size_limit() {
        let data_limits = DataLimits { max_message_size: 4, ..limits(LineEndings::Deny) };
        let mut body = b"Received: by us\r\n".to_vec();
        let fed = DataFramer::new(data_limits).feed(b"ab\r\n.\r\n", &mut body);
        assert!(fed.done);
        assert_eq!(body, b"Received: by us\r\nab\r\n");
    }

    #[test]
    fn line_over_limit_is_refused() {
        let data_limits = DataLimits { max_line_length: 4, ..limits(LineEndings::Deny) };
        let verdict = |input: &[u8]| read_data(data_limits, [input]).verdict;
        assert_eq!(verdict(b"1234\r\n.\r\n"), DataVerdict::Accept);
        assert_eq!(verdict(b"12345\r\n.\r\n"), DataVerdict::LineTooLong);
        // Counted as received, but for the stuffing dot.
        assert_eq!(verdict(b"..234\r\n.\r\n"), DataVerdict::Accept);
        assert_eq!(verdict(b"..2345\r\n.\r\n"), DataVerdict::LineTooLong);
        let outcome = read_data(data_limits, b"ok\r\n123456789\r\n.\r\nQUIT\r\n".chunks(3));
        assert_eq!(outcome.verdict, DataVerdict::LineTooLong);
        assert_eq!(outcome.rest, b"QUIT\r\n");
    }

    /// RFC 5321 §4.5.3.1.6: 1,000 octets with CRLF, "not counting the
    /// leading dot duplicated for transparency" (the line kumod sent).
    #[test]
    fn the_998_octet_limit_with_and_without_a_leading_dot() {
        let verdict = |line: &[u8]| {
            let input = [stuff(line).as_slice(), b"QUIT\r\n"].concat();
            let outcomes =
                [read_whole(&input, LineEndings::Deny), read_data(limits(LineEndings::Deny), input.chunks(7))];
            let [whole, chunked] = outcomes;
            assert_eq!(whole.verdict, chunked.verdict);
            assert_eq!(whole.rest, b"QUIT\r\n");
            if whole.verdict == DataVerdict::Accept {
                assert_eq!(whole.body, line);
            }
            whole.verdict
        };
        let line = |first: u8, len: usize| {
            let mut line = vec![b'x'; len];
            line[0] = first;
            line.extend_from_slice(b"\r\n");
            line
        };
        assert_eq!(verdict(&line(b'x', 998)), DataVerdict::Accept);
        assert_eq!(verdict(&line(b'.', 998)), DataVerdict::Accept, "999 on the wire, the first dot stuffed");
        assert_eq!(verdict(&line(b'x', 999)), DataVerdict::LineTooLong);
        assert_eq!(verdict(&line(b'.', 999)), DataVerdict::LineTooLong);
        // A stuffed line of only dots: the stuffing dot alone is free.
        assert_eq!(verdict(&vec![b'.'; 998].into_iter().chain(*b"\r\n").collect::<Vec<_>>()), DataVerdict::Accept);
    }

    #[test]
    fn first_problem_wins() {
        let data_limits = DataLimits { max_message_size: 20, max_line_length: 10, line_endings: LineEndings::Deny };
        let cases: [(&[u8], DataVerdict); 6] = [
            (b"a\nb\r\n0123456789ab\r\n", DataVerdict::BareLineEnding),
            (b"0123456789ab\r\na\nb\r\n", DataVerdict::LineTooLong),
            (b"0123456789ab\r\n0123456789\r\n0123456789\r\n", DataVerdict::LineTooLong),
            (b"012345678\r\n012345678\r\n0123456789ab\r\n", DataVerdict::TooBig),
            // Both limits crossed within one line: whichever byte comes first decides.
            (b"01\r\n0123456789abcdefghij\r\n", DataVerdict::LineTooLong),
            (b"0123456789\r\n0123456789ab\r\n", DataVerdict::TooBig),
        ];
        for (body, expected) in cases {
            let input = [body, TERMINATOR].concat();
            let outcome = read_data(data_limits, [&input[..]]);
            assert_eq!(outcome.verdict, expected, "{:?}", String::from_utf8_lossy(body));
        }
    }
}
