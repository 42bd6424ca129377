//! Reading and writing: command lines, raw reads with their deadlines, and
//! the two reply verbs, [`Session::send`] and [`Session::close`].

use super::record::Ending;
use super::replies::{DATA_TIMEOUT, IDLE_TOO_LONG, SHUTTING_DOWN};
use super::{Session, Step, Stop};
use crate::events::{Event, EventKind, Outcome, Response};
use crate::protocol::framing::LineEvent;
use crate::protocol::reply::Reply;
use crate::stream::{Stream, Transport};
use std::future::Future;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout, timeout_at, Instant};

/// The smallest read; also the growth step of the input buffer between
/// messages (`data_buffer_size` is the step inside DATA).
pub(super) const MIN_READ: usize = 4096;

/// The most [`Session::receive_pending`] takes in one go.
const MAX_PENDING: usize = 64 * 1024;

/// A buffered line, or the end of one too long to keep.
pub(super) enum Framed {
    Line { len: usize, consumed: usize },
    TooLong { consumed: usize },
}

/// Why a read brought nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReadError {
    /// The deadline passed.
    Timeout,
    /// The server is shutting down.
    Shutdown,
    /// The client closed, or the stream failed.
    Gone,
}

impl ReadError {
    /// Why a read that brought nothing ends the session.
    pub(super) fn ending(self) -> Ending {
        match self {
            ReadError::Timeout => Ending::Timeout,
            ReadError::Shutdown => Ending::Shutdown,
            ReadError::Gone => Ending::ClientClosed,
        }
    }
}

impl<S: Transport> Session<S> {
    /// Queue `reply`; its enhanced code only for a client that said EHLO.
    pub(super) fn send(&mut self, reply: &Reply) {
        self.context.metrics.reply_sent(reply.code);
        if reply.code >= 400 {
            self.log_refusal(reply);
        }
        self.queue(reply, self.esmtp);
    }

    /// Queue a reply's bytes. With `smtp_server_rewrite_response` registered,
    /// the reply waits for policy's say at the next flush, in order.
    pub(super) fn queue(&mut self, reply: &Reply, with_enhanced: bool) {
        if self.is_registered(EventKind::RewriteResponse) {
            let command = self.tally.command();
            self.rewrites.push((reply.clone(), with_enhanced, command));
        } else {
            reply.write(&mut self.output, with_enhanced);
        }
    }

    /// Each reply waiting for `smtp_server_rewrite_response`, as the
    /// handler changes it (a handler that fails changes nothing), written.
    async fn rewrite_replies(&mut self) -> Step {
        for (reply, with_enhanced, command) in std::mem::take(&mut self.rewrites) {
            let response = match (&reply.enhanced, with_enhanced) {
                (Some(enhanced), true) => format!("{enhanced} {}", reply.text),
                _ => reply.text.to_string(),
            };
            let make = |session: &Self| Event::RewriteResponse {
                status: reply.code,
                response: response.clone(),
                command: command.clone(),
                meta: session.meta.clone(),
            };
            let reply = match self.ask(EventKind::RewriteResponse, make).await? {
                Some(Outcome::Done(Response::Rewritten { status, response: text })) => {
                    rewritten(&reply, status, text.as_deref().unwrap_or(&response))
                }
                _ => reply,
            };
            reply.write(&mut self.output, with_enhanced);
        }
        Ok(())
    }

    /// Queue `reply` after our hostname, always with its enhanced code (as
    /// Postfix writes them), as the last words of the session.
    pub(super) fn close(&mut self, reply: Reply) -> Stop {
        self.context.metrics.reply_sent(reply.code);
        if reply.code >= 400 {
            self.log_refusal(&reply);
        }
        let text = format!("{} {}", self.params.hostname, reply.text);
        self.queue(&Reply { text: text.into(), ..reply }, true);
        Stop::Closing
    }

    /// Queue `reply` as [`Session::close`] does, for a session that ends
    /// for `ending` rather than for the command it was answering: logged as
    /// `timeout after RCPT from …`, and not counted as a refusal of that RCPT.
    pub(super) fn close_session(&mut self, ending: Ending, reply: Reply) -> Stop {
        self.end_as(ending);
        self.context.metrics.reply_sent(reply.code);
        self.log_ending(ending, &reply);
        let text = format!("{} {}", self.params.hostname, reply.text);
        self.queue(&Reply { text: text.into(), ..reply }, true);
        Stop::Closing
    }

    /// How a session ends after a failed read: a reply, unless the client is gone.
    pub(super) fn read_failed(&mut self, error: ReadError) -> Stop {
        match error {
            ReadError::Gone => {
                self.end_as(Ending::ClientClosed);
                Stop::Gone
            }
            ReadError::Timeout => self.close_session(Ending::Timeout, IDLE_TOO_LONG),
            ReadError::Shutdown => self.close_session(Ending::Shutdown, SHUTTING_DOWN),
        }
    }

    /// A message's bytes stopped coming: its command (DATA, BDAT) did not
    /// succeed, as Postfix counts it (`data=0/1`), whatever ended it.
    /// `ends`: the end of the message's `max_data_duration`.
    pub(super) fn message_cut_short(&mut self, error: ReadError, ends: Option<Instant>) -> Stop {
        self.tally.refused();
        self.read_failed_within(error, ends)
    }

    /// As [`Self::read_failed`], but a timeout at `ends` (the end of
    /// `max_data_duration` for the message being received) is the data timeout.
    pub(super) fn read_failed_within(&mut self, error: ReadError, ends: Option<Instant>) -> Stop {
        if error == ReadError::Timeout && ends.is_some_and(|ends| Instant::now() >= ends) {
            return self.close_session(Ending::Timeout, DATA_TIMEOUT);
        }
        self.read_failed(error)
    }

    /// Read until a whole line (or the end of an over-long one) is buffered.
    /// Between the chunks of a message (BDAT), a shutdown lets it finish.
    pub(super) async fn next_line(&mut self, deadline: Instant) -> Result<Framed, Stop> {
        let in_message = self.transaction.as_ref().is_some_and(|transaction| transaction.chunks.is_some());
        loop {
            match self.lines.next(&self.input) {
                LineEvent::Line { len, consumed } => return Ok(Framed::Line { len, consumed }),
                LineEvent::TooLong { consumed } => return Ok(Framed::TooLong { consumed }),
                LineEvent::NeedMore { discard } => {
                    bytes::Buf::advance(&mut self.input, discard);
                    self.flush().await?;
                    let filled = self.read_more(deadline, MIN_READ, in_message).await;
                    // Between BDAT chunks, the message's time runs on.
                    let ends = self.chunks_end();
                    filled.map_err(|error| self.read_failed_within(error, ends))?;
                }
            }
        }
    }

    /// A client gets `client_timeout` to send each whole command: trickling
    /// bytes does not extend it. Between the chunks of a message, no later
    /// than its `max_data_duration` allows.
    pub(super) fn command_deadline(&self) -> Instant {
        let deadline = Instant::now() + self.params.client_timeout;
        self.chunks_end().map_or(deadline, |ends| deadline.min(ends))
    }

    /// Read more into `input`, growing it by `step` when less than
    /// [`MIN_READ`] bytes are free; stop on end of stream, deadline or shutdown.
    pub(super) async fn fill(&mut self, deadline: Instant, step: usize) -> Result<(), ReadError> {
        self.read_more(deadline, step, false).await
    }

    /// [`Session::fill`] for the bytes of a message (DATA, BDAT): a shutdown
    /// lets it go on until the grace it gives messages ends
    /// ([`super::message_grace_ends`]), then stops it.
    pub(super) async fn fill_message(&mut self, deadline: Instant, step: usize) -> Result<(), ReadError> {
        self.read_more(deadline, step, true).await
    }

    async fn read_more(&mut self, deadline: Instant, step: usize, in_message: bool) -> Result<(), ReadError> {
        if self.input.capacity() - self.input.len() < MIN_READ {
            self.input.reserve(step.max(MIN_READ));
        }
        let shutdown = self.context.shutdown.clone();
        loop {
            let grace_ends = shutdown.grace_ends();
            let (until, late) = match grace_ends {
                Some(_) if !in_message => return Err(ReadError::Shutdown),
                Some(ends) if ends < deadline => (ends, ReadError::Shutdown),
                _ => (deadline, ReadError::Timeout),
            };
            tokio::select! {
                read = timeout_at(until, self.stream.read_buf(&mut self.input)) => return match read {
                    Ok(Ok(0)) | Ok(Err(_)) => Err(ReadError::Gone),
                    Ok(Ok(_)) => Ok(()),
                    Err(_) => Err(late),
                },
                // Asked for while waiting: wait again, by the new rule.
                () = shutdown.requested(), if grace_ends.is_none() => {}
            }
        }
    }

    /// Wait for `call` (a policy call), reading what the client sends
    /// meanwhile into the input buffer (as a later read would have, up to
    /// [`MIN_READ`] bytes in it), so that a client that resets the
    /// connection while its call waits is noticed: the call is dropped,
    /// abandoned before its handler starts if it has not (Python skips it),
    /// and the session ends. A client that only closes its sending side may
    /// still read the reply: it is waited for. Not before an implicit TLS
    /// handshake, where what the client sends is the handshake's.
    pub(super) async fn while_client_waits<T>(&mut self, call: impl Future<Output = T>) -> Result<T, Stop> {
        let watched = !(self.context.config.implicit_tls && matches!(self.stream, Stream::Plain(_)));
        let (stream, input) = (&mut self.stream, &mut self.input);
        let gone = async {
            if watched {
                while input.len() < MIN_READ {
                    input.reserve(MIN_READ);
                    match stream.read_buf(input).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            biased;
            outcome = call => Ok(outcome),
            () = gone => Err(Stop::Gone),
        }
    }

    /// Move what the client has already sent into the input buffer without
    /// waiting. True if anything came. Only on a plain stream.
    pub(super) fn receive_pending(&mut self) -> Result<bool, Stop> {
        let Stream::Plain(plain) = &mut self.stream else {
            return Ok(false);
        };
        let before = self.input.len();
        // Polled once with a waker that does nothing: ready bytes or not, no waiting.
        let mut context = Context::from_waker(Waker::noop());
        while self.input.len() - before < MAX_PENDING {
            self.input.reserve(MIN_READ);
            match std::pin::pin!(plain.read_buf(&mut self.input)).poll(&mut context) {
                Poll::Ready(Ok(0)) => return Err(Stop::Gone),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(_)) | Poll::Pending => break,
            }
        }
        Ok(self.input.len() > before)
    }

    pub(super) async fn flush(&mut self) -> Step {
        if !self.rewrites.is_empty() {
            Box::pin(self.rewrite_replies()).await?;
        }
        if self.output.is_empty() {
            return Ok(());
        }
        let written = timeout(self.params.client_timeout, self.stream.write_all(&self.output)).await;
        self.output.clear();
        match written {
            Ok(Ok(())) => Ok(()),
            _ => Err(Stop::Gone),
        }
    }

    /// Write the closing reply and close our side.
    pub(super) async fn finish(&mut self) {
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

/// `reply` as `smtp_server_rewrite_response` changed it: its status (when
/// given), and its text, with an enhanced code at its start taken as the
/// reply's own. A reply without an enhanced code (the greeting, EHLO's)
/// stays without one.
fn rewritten(reply: &Reply, status: Option<u16>, text: &str) -> Reply {
    let code = status.unwrap_or(reply.code);
    match reply.enhanced {
        Some(_) => Reply::from_policy(code, text),
        None => Reply::bare(code, text.to_owned()),
    }
}
