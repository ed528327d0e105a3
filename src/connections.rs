//! The gRPC port's connections: how many are accepted, how long a new one may stay silent, and
//! how they are cut when the server stops.
//!
//! [`accept`] turns a listener into the stream of connections tonic serves. It holds at most
//! `max_connections` open at once (further clients wait in the kernel's backlog), backs off and
//! warns when accepting fails (at the file-descriptor limit `accept` fails at once, and retrying
//! at once would spin a core), and wraps each connection in a [`Connection`], which ends a
//! client that sends no HTTP/2 preface within the handshake timeout and every connection still
//! open once the server closes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The HTTP/2 client preface: once it is in, the connection is HTTP/2's to keep alive or end.
const PREFACE_BYTES: usize = 24;

/// Pause after a failed `accept` before the next try.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Limits of the gRPC port's connections (the config's `[connections]` table).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Connections open at once; more clients wait to be accepted.
    pub max_connections: usize,
    /// Streams (calls) one connection may have open at once (HTTP/2 `MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
    /// Bytes of request headers (gRPC metadata) one call may send; a call over it is refused
    /// on its own (HTTP 431, then REFUSED_STREAM), its connection stays up. At least twice
    /// HTTP/2's 16 KiB frame: h2 closes the whole connection when a header block goes on for
    /// a frame more than this after it is already over.
    pub max_header_list_bytes: u32,
    /// Seconds a new connection has to send the HTTP/2 preface before it is closed.
    pub handshake_timeout_secs: u64,
    /// Seconds between HTTP/2 pings on a connection; one unanswered for
    /// `keepalive_timeout_secs` closes it. 0 turns pings off.
    pub keepalive_interval_secs: u64,
    pub keepalive_timeout_secs: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_concurrent_streams: 256,
            max_header_list_bytes: 32 << 10,
            handshake_timeout_secs: 10,
            keepalive_interval_secs: 30,
            keepalive_timeout_secs: 10,
        }
    }
}

impl ConnectionLimits {
    pub fn keepalive_interval(&self) -> Option<Duration> {
        (self.keepalive_interval_secs > 0)
            .then(|| Duration::from_secs(self.keepalive_interval_secs))
    }

    pub fn keepalive_timeout(&self) -> Duration {
        Duration::from_secs(self.keepalive_timeout_secs)
    }
}

/// The connections `listener` accepts, within `limits`; each is cut when `closed` turns true.
pub fn accept(
    listener: TcpListener,
    limits: ConnectionLimits,
    closed: watch::Receiver<bool>,
) -> impl Stream<Item = io::Result<Connection>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let handshake = Duration::from_secs(limits.handshake_timeout_secs);
    futures::stream::unfold(listener, move |listener| {
        let slots = slots.clone();
        let closed = closed.clone();
        async move {
            let slot = slots.acquire_owned().await.expect("never closed");
            let stream = accept_one(&listener).await;
            let _ = stream.set_nodelay(true);
            let connection = Connection::new(stream, slot, handshake, closed);
            Some((Ok(connection), listener))
        }
    })
}

/// The next connection, however many tries that takes.
async fn accept_one(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return stream,
            // The client gave up before it was accepted: nothing to wait for.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed; retrying shortly");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// One accepted connection: holds its slot among `max_connections`, fails reads once the
/// handshake timeout passes without a preface or once the server closes.
pub struct Connection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    preface_left: usize,
    handshake: Pin<Box<Sleep>>,
    closed: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Connection {
    fn new(
        stream: TcpStream,
        slot: OwnedSemaphorePermit,
        handshake: Duration,
        mut closed: watch::Receiver<bool>,
    ) -> Self {
        Self {
            stream,
            _slot: slot,
            preface_left: PREFACE_BYTES,
            handshake: Box::pin(tokio::time::sleep(handshake)),
            closed: Box::pin(async move {
                let _ = closed.wait_for(|closed| *closed).await;
            }),
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the server closed",
            )));
        }
        if self.preface_left > 0 && self.handshake.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within the handshake timeout",
            )));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        self.preface_left = self.preface_left.saturating_sub(got);
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
