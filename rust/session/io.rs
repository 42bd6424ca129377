//! Reading and writing: command lines, raw reads with their deadlines, and
//! the two reply verbs, [`Session::send`] and [`Session::close`].

use super::record::Ending;
use super::replies::{IDLE_TOO_LONG, SHUTTING_DOWN};
use super::{Session, Step, Stop};
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
        reply.write(&mut self.output, self.esmtp);
    }

    /// Queue `reply` after our hostname, always with its enhanced code (as
    /// Postfix writes them), as the last words of the session.
    pub(super) fn close(&mut self, reply: Reply) -> Stop {
        self.context.metrics.reply_sent(reply.code);
        if reply.code >= 400 {
            self.log_refusal(&reply);
        }
        let text = format!("{} {}", self.params.hostname, reply.text);
        Reply { text: text.into(), ..reply }.write(&mut self.output, true);
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
        Reply { text: text.into(), ..reply }.write(&mut self.output, true);
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
    pub(super) fn message_cut_short(&mut self, error: ReadError) -> Stop {
        self.tally.refused();
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
                    filled.map_err(|error| self.read_failed(error))?;
                }
            }
        }
    }

    /// A client gets `client_timeout` to send each whole command: trickling
    /// bytes does not extend it.
    pub(super) fn command_deadline(&self) -> Instant {
        Instant::now() + self.params.client_timeout
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
