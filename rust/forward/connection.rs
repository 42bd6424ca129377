//! One connection to an upstream: connect, greeting, EHLO (LHLO), STARTTLS
//! as `forward_tls` asks, then commands and their replies, each within its
//! timeout, and the message itself (DATA, or BDAT when offered).

use super::tls;
use super::upstream::{ForwardTls, Upstream, UpstreamAddress};
use crate::message::Message;
use crate::protocol::client::{self, parse_reply, Capabilities, DotStuffer, UpstreamReply};
use bytes::BytesMut;
use rustls::pki_types::ServerName;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

/// How much of a message is written at a time.
const WRITE_CHUNK: usize = 256 * 1024;

/// What a connection runs over: TCP or a Unix socket, with or without TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// How long each step may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Timeouts {
    /// Connecting, the greeting, EHLO and the TLS handshake.
    pub connect: Duration,
    /// Each other command, and each write of the message.
    pub command: Duration,
    /// The reply to the end of the message.
    pub data: Duration,
}

/// What a connection is opened with.
#[derive(Clone)]
pub struct ConnectOptions {
    /// Our name in EHLO: the listener's `hostname`.
    pub hello_name: String,
    pub tls: ForwardTls,
    /// For `verify`: the configuration checking against `forward_tls_ca`.
    pub verifying: Option<Arc<rustls::ClientConfig>>,
    pub timeouts: Timeouts,
}

/// Why a connection could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardError {
    /// Not opened: no connection, no greeting, refused EHLO, no TLS. The
    /// upstream is unusable for now; the next one may be tried.
    Unavailable(String),
    /// An open connection broke, timed out or answered nonsense.
    Broken(String),
}

impl fmt::Display for ForwardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardError::Unavailable(why) | ForwardError::Broken(why) => f.write_str(why),
        }
    }
}

/// How the end of a message went.
#[derive(Debug)]
pub enum DataOutcome {
    /// The upstream refused DATA (or BDAT) itself: for every recipient.
    Refused(UpstreamReply),
    /// After the end of the data: one reply (SMTP), or one per recipient (LMTP).
    Replies(Vec<UpstreamReply>),
}

/// Why a message's delivery failed: before the end of the data was sent
/// (nothing delivered), or after (the upstream may have it: a possible duplicate).
#[derive(Debug)]
pub enum DataError {
    BeforeEnd(ForwardError),
    AfterEnd(ForwardError),
}

pub struct Connection {
    io: Box<dyn Io>,
    input: BytesMut,
    pub offered: Capabilities,
    pub lmtp: bool,
    pub tls: bool,
    timeouts: Timeouts,
}

impl Connection {
    /// Connect, read the greeting, EHLO (LHLO), and STARTTLS as `options.tls` asks.
    pub async fn open(upstream: &Upstream, options: &ConnectOptions) -> Result<Self, ForwardError> {
        let limit = options.timeouts.connect;
        let unavailable = |why: String| ForwardError::Unavailable(format!("{upstream}: {why}"));
        let io: Box<dyn Io> = match &upstream.address {
            UpstreamAddress::Tcp { host, port } => {
                let connected = timeout(limit, TcpStream::connect((host.as_str(), *port))).await;
                let stream = connected.map_err(|_| unavailable("connect timed out".into()))?;
                let stream = stream.map_err(|e| unavailable(format!("connect: {e}")))?;
                let _ = stream.set_nodelay(true);
                Box::new(stream)
            }
            UpstreamAddress::Unix(path) => {
                let connected = timeout(limit, UnixStream::connect(path)).await;
                let stream = connected.map_err(|_| unavailable("connect timed out".into()))?;
                Box::new(stream.map_err(|e| unavailable(format!("connect: {e}")))?)
            }
        };
        let mut connection = Self {
            io,
            input: BytesMut::with_capacity(4096),
            offered: Capabilities::default(),
            lmtp: upstream.lmtp,
            tls: false,
            timeouts: options.timeouts,
        };
        let greeting = connection.reply_within(limit).await.map_err(|e| unavailable(e.to_string()))?;
        if greeting.code != 220 {
            return Err(unavailable(format!("greeting {}", greeting.summary())));
        }
        connection.hello(&options.hello_name).await.map_err(|e| unavailable(e.to_string()))?;
        connection.secure(upstream, options).await.map_err(unavailable)?;
        Ok(connection)
    }

    /// EHLO (LHLO), and what its reply offers.
    async fn hello(&mut self, name: &str) -> Result<(), ForwardError> {
        let reply = self.command_within(&client::hello(self.lmtp, name), self.timeouts.connect).await?;
        if reply.code != 250 {
            return Err(ForwardError::Unavailable(format!("EHLO refused: {}", reply.summary())));
        }
        self.offered = Capabilities::from_ehlo(&reply);
        Ok(())
    }

    /// STARTTLS when `options.tls` asks for it (never over a Unix socket).
    async fn secure(&mut self, upstream: &Upstream, options: &ConnectOptions) -> Result<(), String> {
        let UpstreamAddress::Tcp { host, .. } = &upstream.address else {
            return Ok(());
        };
        let required = matches!(options.tls, ForwardTls::Required | ForwardTls::Verify);
        if options.tls == ForwardTls::None || (!self.offered.starttls && !required) {
            return Ok(());
        }
        if !self.offered.starttls {
            return Err("TLS is required and STARTTLS is not offered".into());
        }
        let reply = self.command_within(b"STARTTLS\r\n", self.timeouts.connect).await.map_err(|e| e.to_string())?;
        if reply.code != 220 {
            return Err(format!("STARTTLS refused: {}", reply.summary()));
        }
        let config = match options.tls {
            ForwardTls::Verify => options.verifying.clone().ok_or("no forward_tls_ca to verify with")?,
            _ => tls::unverified(),
        };
        let name = ServerName::try_from(host.clone()).map_err(|e| format!("TLS name {host}: {e}"))?;
        let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
        let handshake = timeout(self.timeouts.connect, TlsConnector::from(config).connect(name, plain)).await;
        let stream = handshake.map_err(|_| "TLS handshake timed out".to_string())?;
        self.io = Box::new(stream.map_err(|e| format!("TLS handshake: {e}"))?);
        self.tls = true;
        self.input.clear();
        let hello_name = options.hello_name.clone();
        self.hello(&hello_name).await.map_err(|e| e.to_string())
    }

    /// Send `command` and read its reply, within the command timeout.
    pub async fn command(&mut self, command: &[u8]) -> Result<UpstreamReply, ForwardError> {
        self.command_within(command, self.timeouts.command).await
    }

    async fn command_within(&mut self, command: &[u8], limit: Duration) -> Result<UpstreamReply, ForwardError> {
        self.write(command, limit).await?;
        self.reply_within(limit).await
    }

    /// Send `commands` at once (the upstream offers PIPELINING) and read their replies in order.
    pub async fn pipeline(&mut self, commands: &[Vec<u8>]) -> Result<Vec<UpstreamReply>, ForwardError> {
        self.write(&commands.concat(), self.timeouts.command).await?;
        let mut replies = Vec::with_capacity(commands.len());
        for _ in commands {
            replies.push(self.reply_within(self.timeouts.command).await?);
        }
        Ok(replies)
    }

    /// `RSET`: the connection is clean for another transaction.
    pub async fn reset(&mut self) -> Result<(), ForwardError> {
        let reply = self.command(b"RSET\r\n").await?;
        match reply.code {
            250 => Ok(()),
            _ => Err(ForwardError::Broken(format!("RSET answered {}", reply.summary()))),
        }
    }

    /// `QUIT`, without waiting long for its reply.
    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(1), self.command(b"QUIT\r\n")).await;
    }

    /// Send `message` (BDAT when offered, else DATA) and read the replies
    /// to its end: `recipients` of them from an LMTP upstream.
    pub async fn send_message(&mut self, message: &Message, recipients: usize) -> Result<DataOutcome, DataError> {
        if self.offered.chunking {
            let command = format!("BDAT {} LAST\r\n", message.len());
            self.write_message(command.into_bytes(), message, None).await?;
        } else {
            let reply = self.command(b"DATA\r\n").await.map_err(DataError::BeforeEnd)?;
            if reply.code != 354 {
                return Ok(DataOutcome::Refused(reply));
            }
            self.write_message(Vec::new(), message, Some(DotStuffer::default())).await?;
        }
        let expected = if self.lmtp { recipients.max(1) } else { 1 };
        let mut replies = Vec::with_capacity(expected);
        for _ in 0..expected {
            replies.push(self.reply_within(self.timeouts.data).await.map_err(DataError::AfterEnd)?);
        }
        Ok(DataOutcome::Replies(replies))
    }

    /// `start`, then the message (its head, then its data read a piece at a
    /// time, so that a spilled body is never read whole into memory),
    /// dot-stuffed and ended for DATA with a `stuffer`, in writes of about
    /// [`WRITE_CHUNK`]; the end goes with the last piece. A failure of that
    /// last write leaves the upstream maybe with the message.
    async fn write_message(
        &mut self,
        start: Vec<u8>,
        message: &Message,
        mut stuffer: Option<DotStuffer>,
    ) -> Result<(), DataError> {
        let mut out = start;
        let mut offset = 0;
        let mut piece = message.full_head();
        loop {
            match &mut stuffer {
                Some(stuffer) => stuffer.feed(&piece, &mut out),
                None => out.extend_from_slice(&piece),
            }
            if offset >= message.data.len() {
                break;
            }
            if out.len() >= WRITE_CHUNK {
                self.write(&out, self.timeouts.command).await.map_err(DataError::BeforeEnd)?;
                out.clear();
            }
            piece = message
                .data
                .slice(offset, WRITE_CHUNK)
                .map_err(|e| DataError::BeforeEnd(ForwardError::Broken(format!("reading the message: {e}"))))?;
            offset += piece.len();
        }
        if let Some(stuffer) = stuffer {
            stuffer.finish(&mut out);
        }
        self.write(&out, self.timeouts.command).await.map_err(DataError::AfterEnd)
    }

    async fn write(&mut self, bytes: &[u8], limit: Duration) -> Result<(), ForwardError> {
        let written = timeout(limit, async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        })
        .await;
        written.map_err(|_| broken("write timed out"))?.map_err(|e| broken(&format!("write: {e}")))
    }

    async fn reply_within(&mut self, limit: Duration) -> Result<UpstreamReply, ForwardError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match parse_reply(&self.input) {
                Ok(Some((reply, consumed))) => {
                    let _ = self.input.split_to(consumed);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(error) => return Err(broken(&error.to_string())),
            }
            let read = tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.input)).await;
            match read.map_err(|_| broken("timed out waiting for a reply"))? {
                Ok(0) => return Err(broken("connection closed")),
                Ok(_) => {}
                Err(error) => return Err(broken(&format!("read: {error}"))),
            }
        }
    }
}

fn broken(why: &str) -> ForwardError {
    ForwardError::Broken(why.to_owned())
}
