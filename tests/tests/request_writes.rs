//! How a unary gRPC request leaves the client: in one write to the socket, HEADERS and
//! DATA together. This is the change Treaty's vendored hyper makes
//! (third_party/hyper/TREATY-PATCHES.md): the release handed a request's body to h2 only
//! once the stream had send capacity, which it never has before the connection task
//! next runs, so every request cost a second task and a second write, and could cost a
//! second read at the server.
//!
//! The client is tonic's `Channel` over a real TCP connection to a real gRPC server on
//! 127.0.0.1; the connector wraps the socket to record what each write carried. The
//! tests run on tokio's current-thread runtime, where the connection task cannot run
//! between the request's hand-over and its first chunk's, so the single write is
//! certain; on a multi-threaded runtime it is the usual case, not a guarantee.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// The bytes of every write the client made, one entry per write, in order.
type Writes = Arc<Mutex<Vec<Vec<u8>>>>;

/// A TCP stream that records the bytes each write accepted.
struct RecordedStream {
    inner: TcpStream,
    writes: Writes,
}

impl RecordedStream {
    fn record(&self, bytes: &[u8]) {
        if let Ok(mut writes) = self.writes.lock() {
            writes.push(bytes.to_vec());
        }
    }
}

impl AsyncRead for RecordedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for RecordedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(count)) = written {
            self.record(&buf[..count]);
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(count)) = written {
            let all: Vec<u8> = bufs
                .iter()
                .flat_map(|slice| slice.iter().copied())
                .collect();
            self.record(&all[..count]);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Connects every channel to one address, recording the writes.
#[derive(Clone)]
struct RecordingConnector {
    address: std::net::SocketAddr,
    writes: Writes,
}

impl Service<Uri> for RecordingConnector {
    type Response = TokioIo<RecordedStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let address = self.address;
        let writes = self.writes.clone();
        Box::pin(async move {
            let inner = TcpStream::connect(address).await?;
            inner.set_nodelay(true)?;
            Ok(TokioIo::new(RecordedStream { inner, writes }))
        })
    }
}

const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FLAG_END_STREAM: u8 = 0x1;
const CLIENT_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 frame the client sent, and the index of the write its header was in.
#[derive(Debug)]
struct SentFrame {
    write: usize,
    length: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

/// Splits the client's byte stream into frames (RFC 9113 §4.1: a 9-byte header of
/// length, type, flags and stream id), noting which write each one began in.
fn frames_sent(writes: &[Vec<u8>]) -> Vec<SentFrame> {
    let mut bytes = Vec::new();
    let mut write_of_byte = Vec::new();
    for (index, write) in writes.iter().enumerate() {
        bytes.extend_from_slice(write);
        write_of_byte.extend(std::iter::repeat_n(index, write.len()));
    }
    assert!(
        bytes.starts_with(CLIENT_PREFACE),
        "an HTTP/2 client's first bytes are the connection preface"
    );
    let mut frames = Vec::new();
    let mut at = CLIENT_PREFACE.len();
    while at + 9 <= bytes.len() {
        let length = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        let stream = u32::from_be_bytes([
            bytes[at + 5] & 0x7f,
            bytes[at + 6],
            bytes[at + 7],
            bytes[at + 8],
        ]);
        frames.push(SentFrame {
            write: write_of_byte[at],
            length,
            kind: bytes[at + 3],
            flags: bytes[at + 4],
            stream,
        });
        at += 9 + length;
    }
    frames
}

/// The windows the test server grants: HTTP/2's initial 65,535 bytes, for the stream
/// and for the connection, so that a body of a few hundred KiB must wait for the
/// server's WINDOW_UPDATEs (hyper's server would otherwise grant 1 MiB).
const SERVER_WINDOW_BYTES: u32 = 65_535;

/// A gRPC server on 127.0.0.1 (health, and reflection for a streaming call), and a
/// channel to it whose writes are recorded.
async fn recorded_channel() -> anyhow::Result<(
    Channel,
    Writes,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
)> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure().build_v1()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(
        Server::builder()
            .initial_stream_window_size(SERVER_WINDOW_BYTES)
            .initial_connection_window_size(SERVER_WINDOW_BYTES)
            .add_service(health)
            .add_service(reflection)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let writes = Writes::default();
    let connector = RecordingConnector {
        address,
        writes: writes.clone(),
    };
    let channel = Endpoint::from_static("http://127.0.0.1")
        .timeout(Duration::from_secs(30))
        .connect_with_connector(connector)
        .await?;
    Ok((channel, writes, server))
}

#[tokio::test]
async fn a_unary_requests_headers_and_data_leave_in_one_write() -> anyhow::Result<()> {
    let (channel, writes, server) = recorded_channel().await?;
    let mut client = HealthClient::new(channel);
    const CALLS: usize = 3;
    for _ in 0..CALLS {
        client.check(HealthCheckRequest::default()).await?;
    }
    server.abort();

    let frames = frames_sent(&writes.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let request_streams: Vec<u32> = frames
        .iter()
        .filter(|frame| frame.kind == FRAME_HEADERS && frame.stream != 0)
        .map(|frame| frame.stream)
        .collect();
    assert_eq!(
        request_streams.len(),
        CALLS,
        "one HEADERS frame per call; frames sent: {frames:?}"
    );
    for stream in request_streams {
        let on_stream: Vec<&SentFrame> = frames.iter().filter(|f| f.stream == stream).collect();
        let headers = on_stream
            .iter()
            .find(|f| f.kind == FRAME_HEADERS)
            .ok_or_else(|| anyhow::anyhow!("stream {stream} has no HEADERS"))?;
        let data: Vec<&&SentFrame> = on_stream.iter().filter(|f| f.kind == FRAME_DATA).collect();
        assert!(
            data.iter().any(|f| f.flags & FLAG_END_STREAM != 0),
            "stream {stream} ends its request with DATA carrying END_STREAM: {on_stream:?}"
        );
        for frame in data {
            assert_eq!(
                frame.write, headers.write,
                "stream {stream}'s DATA left in write {} and its HEADERS in write {}: {on_stream:?}",
                frame.write, headers.write
            );
        }
    }
    Ok(())
}

/// A 10 KiB body (a first chunk handed over at once), bodies larger than the 16 KiB such
/// a chunk may be (hyper's own path), and a body larger than the server's windows (which
/// waits for its WINDOW_UPDATEs) all arrive whole. The server answers NOT_FOUND for a
/// service it does not know, which it can only do after reading the whole name.
#[tokio::test]
async fn requests_larger_than_a_frame_or_the_window_still_arrive_whole() -> anyhow::Result<()> {
    let (channel, _writes, server) = recorded_channel().await?;
    let mut client = HealthClient::new(channel);
    for name_bytes in [10 * 1024, 20 * 1024, 200 * 1024] {
        let request = HealthCheckRequest {
            service: "x".repeat(name_bytes),
        };
        let status = client
            .check(request)
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("a service of {name_bytes} bytes was found"))?;
        assert_eq!(
            status.code(),
            tonic::Code::NotFound,
            "a {name_bytes}-byte service name is read whole and not found: {status:?}"
        );
    }
    server.abort();
    Ok(())
}

/// A streaming body: its first chunk is small and handed over at once; the chunks after
/// it (tonic puts ready messages in one until it holds 32 KiB or more) wait for send
/// capacity, and together they are six times the server's windows. Every message arrives
/// and is answered, in order. The requests are reflection's ListServices, padded in the
/// field the server ignores and echoes back.
#[tokio::test]
async fn a_streaming_body_after_a_first_small_chunk_keeps_to_the_window() -> anyhow::Result<()> {
    let (channel, writes, server) = recorded_channel().await?;
    let mut client = ServerReflectionClient::new(channel);
    let asking_for = |padding: String| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(padding)),
    };
    let (requests, outgoing) = tokio::sync::mpsc::channel(64);
    requests.send(asking_for("first".to_string())).await?;
    let mut responses = client
        .server_reflection_info(ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    const WAIT: Duration = Duration::from_secs(30);
    let first = tokio::time::timeout(WAIT, responses.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("no answer to the first request"))?;
    assert_eq!(
        first.original_request,
        Some(asking_for("first".to_string()))
    );

    const LATER: usize = 40;
    const PADDING_BYTES: usize = 10 * 1024;
    let padding = |index: usize| format!("{index:04}{}", "x".repeat(PADDING_BYTES));
    let sender = tokio::spawn(async move {
        for index in 0..LATER {
            if requests.send(asking_for(padding(index))).await.is_err() {
                break;
            }
        }
    });
    for index in 0..LATER {
        let response = tokio::time::timeout(WAIT, responses.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("the stream ended after {index} of {LATER}"))?;
        assert_eq!(
            response.original_request,
            Some(asking_for(padding(index))),
            "answer {index} is to request {index}, whole"
        );
        assert!(
            matches!(
                response.message_response,
                Some(MessageResponse::ListServicesResponse(_))
            ),
            "answer {index} lists the services"
        );
    }
    tokio::time::timeout(WAIT, sender).await??;
    let end = tokio::time::timeout(WAIT, responses.message()).await??;
    assert!(end.is_none(), "nothing is answered twice: {end:?}");
    server.abort();

    let frames = frames_sent(&writes.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let data_bytes: usize = frames
        .iter()
        .filter(|frame| frame.kind == FRAME_DATA && frame.stream != 0)
        .map(|frame| frame.length)
        .sum();
    assert!(
        data_bytes > 6 * SERVER_WINDOW_BYTES as usize,
        "the body ({data_bytes} bytes) outgrew the server's windows several times over"
    );
    Ok(())
}
