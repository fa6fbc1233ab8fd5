//! Accepting connections for a gRPC server: TLS when configured, a cap on open
//! connections, a time limit on handshakes, and back-off when the process runs out of
//! file descriptors (instead of spinning on `accept`), and closing connections that have
//! carried no call for the idle timeout (see [`idle`]).
//!
//! [`incoming`] turns a bound listener into the stream tonic's
//! `serve_with_incoming_shutdown` takes. Every request then carries a
//! [`ConnectionInfo`] in its extensions: the peer's address and, with mutual TLS, the
//! names of its verified client certificate.
//!
//! Invariants: at most `max_connections` connections are open at once (one past it is
//! closed at once, before any handshake); with TLS configured no connection reaches the
//! server without a completed handshake; a failed handshake affects only its connection;
//! a connection is closed for idleness only with no call in flight and nothing to read.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::tls::{ReloadableServerTls, peer_names};

mod idle;

use idle::{CallCounter, IdleDeadline};
pub use idle::{CallInFlight, CountCalls, CountCallsLayer, CountedBody};

/// Limits on a server's connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections open at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Time a client has to finish its TLS handshake.
    pub handshake_timeout_ms: u64,
    /// A connection with no call in flight for this long is closed; clients reconnect.
    pub idle_timeout_ms: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1_024,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
        }
    }
}

/// Concurrent HTTP/2 streams (calls) on one connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// How often an idle connection is pinged, and how long the answer may take before the
/// connection is closed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A tonic server builder with the HTTP/2 limits every Treaty server applies, counting
/// the calls on each connection for the idle timeout of [`incoming`].
pub fn server_builder()
-> tonic::transport::Server<tower_layer::Stack<CountCallsLayer, tower_layer::Identity>> {
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(CountCallsLayer)
}

/// First and longest pause after `accept` fails (e.g. EMFILE: out of file descriptors).
const ACCEPT_BACKOFF_INITIAL: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Accepted connections waiting for the server to take them.
const HANDOFF_QUEUE: usize = 64;

/// Who is at the other end of a connection, as the server saw it.
#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The names of the verified client certificate (see [`peer_names`]); empty without
    /// mutual TLS.
    pub peer_names: Arc<[String]>,
    /// The calls in flight on this connection (for its idle timeout).
    pub(crate) calls: Arc<CallCounter>,
    /// The places of the calls being answered on this connection's calls streams, all
    /// streams together (made with the first stream's bound).
    pub(crate) stream_calls: Arc<std::sync::OnceLock<Arc<tokio::sync::Semaphore>>>,
    /// The waits of calls that gave their place back to wait for an outcome, all streams
    /// together (made with the first stream's bound).
    pub(crate) stream_waits: Arc<std::sync::OnceLock<Arc<tokio::sync::Semaphore>>>,
}

impl ConnectionInfo {
    /// The places shared by the calls streams of this connection: `max_in_flight` in
    /// all, however many streams it opens.
    pub fn stream_call_places(&self, max_in_flight: usize) -> Arc<tokio::sync::Semaphore> {
        self.stream_calls
            .get_or_init(|| Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1))))
            .clone()
    }

    /// The waits shared by the calls streams of this connection (see
    /// [`CallPlace`](crate::call_stream::CallPlace)): `max_waits` in all.
    pub fn stream_call_waits(&self, max_waits: usize) -> Arc<tokio::sync::Semaphore> {
        self.stream_waits
            .get_or_init(|| Arc::new(tokio::sync::Semaphore::new(max_waits.max(1))))
            .clone()
    }

    /// Counts a call on this connection until the guard is dropped (servers that are not
    /// built with [`server_builder`] use it to keep busy connections from the idle
    /// timeout).
    pub fn start_call(&self) -> CallInFlight {
        self.calls.start()
    }
}

#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One accepted connection; it holds its place under the connection cap until dropped.
#[derive(Debug)]
pub struct Connection {
    stream: Stream,
    info: ConnectionInfo,
    idle: IdleDeadline,
    /// Set once the idle timeout ended the connection: every later read is end-of-stream.
    closed_for_idleness: bool,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    fn new(
        stream: Stream,
        remote_addr: SocketAddr,
        peer_names: Arc<[String]>,
        idle_timeout: Duration,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        let calls = Arc::new(CallCounter::default());
        Self {
            stream,
            idle: IdleDeadline::new(calls.clone(), idle_timeout),
            info: ConnectionInfo {
                remote_addr: Some(remote_addr),
                peer_names,
                calls,
                stream_calls: Arc::default(),
                stream_waits: Arc::default(),
            },
            closed_for_idleness: false,
            _permit: permit,
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed_for_idleness {
            return Poll::Ready(Ok(()));
        }
        let filled_before = buf.filled().len();
        let read = match &mut this.stream {
            Stream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        };
        if buf.filled().len() > filled_before {
            this.idle.saw_bytes();
        }
        if read.is_pending() && this.idle.poll_expired(cx) {
            // Reads as the peer's end of stream: the server closes the connection.
            tracing::debug!(remote_addr = ?this.info.remote_addr, "closing an idle connection");
            this.closed_for_idleness = true;
            return Poll::Ready(Ok(()));
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(stream) => stream.is_write_vectored(),
            Stream::Tls(stream) => stream.is_write_vectored(),
        }
    }
}

/// The connections `listener` accepts, TLS-wrapped when `tls` is given, within `limits`.
/// The accept loop ends when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ReloadableServerTls>>,
    limits: ConnectionLimits,
) -> ReceiverStream<io::Result<Connection>> {
    let (sender, receiver) = mpsc::channel(HANDOFF_QUEUE);
    tokio::spawn(accept_loop(listener, tls, limits, sender));
    ReceiverStream::new(receiver)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<ReloadableServerTls>>,
    limits: ConnectionLimits,
    sender: mpsc::Sender<io::Result<Connection>>,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let handshake_timeout = Duration::from_millis(limits.handshake_timeout_ms.max(1));
    let idle_timeout = Duration::from_millis(limits.idle_timeout_ms.max(1));
    let mut backoff = ACCEPT_BACKOFF_INITIAL;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = sender.closed() => return,
        };
        let (tcp, remote_addr) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_INITIAL;
                accepted
            }
            Err(error) if is_per_connection(&error) => continue,
            Err(error) => {
                // Out of file descriptors or memory: wait for some to be freed.
                tracing::warn!(%error, pause_ms = backoff.as_millis() as u64, "accept failed; pausing");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::warn!(%remote_addr, max = limits.max_connections, "connection limit reached; closing a new connection");
            drop(tcp);
            continue;
        };
        // Without TCP_NODELAY on accepted sockets, replies wait on delayed ACKs (~40 ms).
        let _ = tcp.set_nodelay(true);
        let sender = sender.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let connection = match tls {
                None => Connection::new(
                    Stream::Plain(tcp),
                    remote_addr,
                    Arc::new([]),
                    idle_timeout,
                    permit,
                ),
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                    let stream =
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => {
                                tracing::debug!(%remote_addr, %error, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%remote_addr, "TLS handshake timed out");
                                return;
                            }
                        };
                    let peer_names = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|leaf| peer_names(leaf))
                        .unwrap_or_default();
                    Connection::new(
                        Stream::Tls(Box::new(stream)),
                        remote_addr,
                        peer_names.into(),
                        idle_timeout,
                        permit,
                    )
                }
            };
            let _ = sender.send(Ok(connection)).await;
        });
    }
}

/// Errors of one connection that came and went before it was accepted: try the next.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}
