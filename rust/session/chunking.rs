//! RFC 3030 CHUNKING: `BDAT size [LAST]`, each chunk's bytes read exactly
//! (they are never commands, pipelined or not), the message handed over at
//! `LAST` as DATA hands it over.

use super::replies::{NEED_MAIL, NEED_RCPT, STORAGE_FAILED};
use super::{Session, Step};
use crate::body::BodyBuffer;
use crate::message::{self, ReceivedHeader};
use crate::protocol::bdat::ChunkedBody;
use crate::protocol::framing::DataVerdict;
use crate::protocol::parser::BodyType;
use crate::protocol::reply::Reply;
use crate::stream::Transport;
use bytes::Buf;
use tokio::time::Instant;

/// The message a transaction is receiving in chunks.
pub(super) struct Chunks {
    id: String,
    /// When the last chunk must be in, whatever the pace: `max_data_duration`
    /// after the first began.
    ends: Instant,
    /// The `Received:` header of each part, when it is not in `body`.
    per_part: Option<ReceivedHeader>,
    /// None once the message is refused: its bytes are then discarded.
    body: Option<BodyBuffer>,
    content: ChunkedBody,
}

impl Chunks {
    /// Before a chunk of `size` octets: the message is refused if it cannot fit.
    fn admit(&mut self, size: u64) {
        self.content.admit(size);
        self.free_if_refused();
    }

    fn take(&mut self, bytes: &[u8]) {
        let body = &mut self.body;
        self.content.feed(bytes, |stored| append(body, stored));
        self.free_if_refused();
    }

    /// The body will be refused: free it now rather than at LAST.
    fn free_if_refused(&mut self) {
        if self.content.verdict() != DataVerdict::Accept {
            self.body = None;
        }
    }
}

/// Where a chunk's bytes join the body being received. A failure to spill
/// them is kept for [`BodyBuffer::finish`]: the chunks are still read, to stay in step.
fn append(body: &mut Option<BodyBuffer>, bytes: &[u8]) {
    if let Some(body) = body {
        let _ = body.append(bytes);
    }
}

impl<S: Transport> Session<S> {
    pub(super) async fn bdat(&mut self, size: u64, last: bool) -> Step {
        // RFC 3030 §2: a refused chunk is still read, and discarded.
        let refusal = match &self.transaction {
            None => Some(NEED_MAIL),
            Some(transaction) if transaction.recipients.is_empty() => Some(NEED_RCPT),
            Some(_) => None,
        };
        if let Some(refusal) = refusal {
            self.read_chunk(size).await?;
            return self.refuse(refusal);
        }
        self.start_chunks();
        if let Some(chunks) = self.chunks() {
            chunks.admit(size);
        }
        self.read_chunk(size).await?;
        let verdict = self.chunks().map_or(DataVerdict::Accept, |chunks| chunks.content.verdict());
        if let Some(refusal) = verdict.refusal() {
            // As Postfix does, the refused message's later chunks are
            // discarded with the same reply until LAST ends it (in LMTP,
            // with that reply for each recipient).
            if last {
                let recipients = self.transaction.take().map_or(1, |transaction| transaction.recipients.len());
                return self.refuse_message(recipients, refusal);
            }
            return self.refuse(refusal);
        }
        if !last {
            self.send(&Reply::with_text(250, "2.0.0", format!("{size} octets received")));
            return Ok(());
        }
        self.last_chunk_received().await
    }

    fn chunks(&mut self) -> Option<&mut Chunks> {
        self.transaction.as_mut().and_then(|transaction| transaction.chunks.as_mut())
    }

    /// At the first BDAT of a transaction, the body starts with our trace
    /// header (when it goes there).
    fn start_chunks(&mut self) {
        let Some(transaction) = &self.transaction else {
            return;
        };
        if transaction.chunks.is_some() {
            return;
        }
        let id = message::new_message_id();
        let (in_body, per_part) = self.trace_placement(transaction, &id);
        let binary = transaction.params.body == Some(BodyType::BinaryMime);
        let capacity = in_body.len() + transaction.size_hint();
        let prefix = self.spill_prefix(transaction, per_part.is_some());
        let mut body = Some(BodyBuffer::new(&self.context.spool, self.body_limits(), capacity, prefix));
        append(&mut body, in_body.as_bytes());
        let content = ChunkedBody::new(self.data_limits(), binary);
        let ends = self.data_ends(Instant::now());
        if let Some(transaction) = &mut self.transaction {
            transaction.chunks = Some(Chunks { id, ends, per_part, body, content });
        }
    }

    /// When the message being received in chunks must be whole, if there is one.
    pub(super) fn chunks_end(&self) -> Option<Instant> {
        self.transaction.as_ref()?.chunks.as_ref().map(|chunks| chunks.ends)
    }

    /// Read the `size` octets of a chunk, with DATA's deadlines, into the
    /// message being received (which discards them once refused, or when
    /// there is none).
    async fn read_chunk(&mut self, size: u64) -> Step {
        let started = Instant::now();
        let mut received = 0u64;
        loop {
            let buffered = (size - received).min(self.input.len() as u64) as usize;
            if let Some(chunks) = self.transaction.as_mut().and_then(|transaction| transaction.chunks.as_mut()) {
                chunks.take(&self.input[..buffered]);
            }
            self.input.advance(buffered);
            received += buffered as u64;
            if received == size {
                return Ok(());
            }
            // Replies to what came before the chunk go out before waiting for the rest.
            self.flush().await?;
            let ends = self.chunks_end();
            let deadline = self.data_deadline(started, usize::try_from(received).unwrap_or(usize::MAX));
            let deadline = ends.map_or(deadline, |ends| deadline.min(ends));
            let filled = self.fill_message(deadline, self.params.data_buffer_size).await;
            filled.map_err(|error| self.message_cut_short(error, ends))?;
        }
    }

    /// `BDAT … LAST` has been read whole: the message goes where DATA's goes.
    async fn last_chunk_received(&mut self) -> Step {
        let Some(mut transaction) = self.transaction.take() else {
            return Ok(());
        };
        let Some(mut chunks) = transaction.chunks.take() else {
            return Ok(());
        };
        let body = &mut chunks.body;
        let verdict = chunks.content.finish(|stored| append(body, stored));
        match (verdict.refusal(), chunks.body) {
            (None, Some(body)) => self.accept_body(chunks.id, *transaction, body, chunks.per_part).await,
            (refusal, _) => self.refuse_message(transaction.recipients.len(), refusal.unwrap_or(STORAGE_FAILED)),
        }
    }
}
