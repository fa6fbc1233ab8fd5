//! What a no-op call costs over tonic between two processes, made as unary calls and as
//! messages on long-lived bidirectional streams, at the same number in flight: the
//! calls per second and each side's CPU per call: what the transport alone costs, which
//! is why the coordinator calls participants over one stream each where it can
//! (docs/PERFORMANCE.md, "A call made unary or on a stream").
//! Loopback only; the server is a child process of this one and ends with it.
//!
//! `cargo run --release -p treaty-examples --example transport_cost -- [in_flight] [seconds]`

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{SinkExt, Stream, StreamExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::{Request, Response, Status, Streaming};

/// Messages as bytes, so that no protobuf code stands between the calls and tonic.
#[derive(Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0u8; bytes::Buf::remaining(src)];
        bytes::Buf::copy_to_slice(src, &mut out);
        Ok(Some(out))
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// The server: one service with the three ways of answering.
#[derive(Clone)]
struct Echo;

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "exp.Echo";
}

/// A unary call answered with its request.
struct EchoOnce;
impl tonic::server::UnaryService<Vec<u8>> for EchoOnce {
    type Response = Vec<u8>;
    type Future = BoxFuture<Result<Response<Vec<u8>>, Status>>;
    fn call(&mut self, request: Request<Vec<u8>>) -> Self::Future {
        Box::pin(async move { Ok(Response::new(request.into_inner())) })
    }
}

type Outbound = Pin<Box<dyn Stream<Item = Result<Vec<u8>, Status>> + Send>>;
/// A stream whose messages are answered in place, in order, by the stream's own task.
struct EchoInPlace;
impl tonic::server::StreamingService<Vec<u8>> for EchoInPlace {
    type Response = Vec<u8>;
    type ResponseStream = Outbound;
    type Future = BoxFuture<Result<Response<Outbound>, Status>>;
    fn call(&mut self, request: Request<Streaming<Vec<u8>>>) -> Self::Future {
        Box::pin(async move {
            let inbound = request.into_inner();
            let outbound: Outbound = Box::pin(inbound);
            Ok(Response::new(outbound))
        })
    }
}

/// As a participant would serve a stream of calls: each message handled by a task of
/// its own, its answer sent back through a bounded queue in the order answers come.
struct EchoByTask;
impl tonic::server::StreamingService<Vec<u8>> for EchoByTask {
    type Response = Vec<u8>;
    type ResponseStream = Outbound;
    type Future = BoxFuture<Result<Response<Outbound>, Status>>;
    fn call(&mut self, request: Request<Streaming<Vec<u8>>>) -> Self::Future {
        Box::pin(async move {
            let mut inbound = request.into_inner();
            let (answers, outbound) = tokio::sync::mpsc::channel(1024);
            tokio::spawn(async move {
                while let Some(Ok(message)) = inbound.next().await {
                    let answers = answers.clone();
                    tokio::spawn(async move {
                        let _ = answers.send(Ok(message)).await;
                    });
                }
            });
            let outbound: Outbound = Box::pin(futures::stream::unfold(
                outbound,
                |mut outbound| async move { outbound.recv().await.map(|m| (m, outbound)) },
            ));
            Ok(Response::new(outbound))
        })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for Echo
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match request.uri().path() {
            "/exp.Echo/Unary" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(RawCodec);
                Ok(grpc.unary(EchoOnce, request).await)
            }),
            "/exp.Echo/Stream" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(RawCodec);
                Ok(grpc.streaming(EchoInPlace, request).await)
            }),
            "/exp.Echo/StreamSpawning" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(RawCodec);
                Ok(grpc.streaming(EchoByTask, request).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// The CPU time process `pid` (`None`: this one) has used, in seconds; 0 if unreadable.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    treaty_coordinator::bench::cpu_us(pid).map_or(0.0, |us| us as f64 / 1e6)
}

async fn serve() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?.port());
    tonic::transport::Server::builder()
        .add_service(Echo)
        .serve_with_incoming(accepted_without_delay(listener))
        .await?;
    Ok(())
}

/// The listener's connections, with Nagle's algorithm off as tonic's clients have it.
fn accepted_without_delay(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}

async fn connect(port: u16) -> anyhow::Result<tonic::transport::Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
            .tcp_nodelay(true)
            .connect()
            .await?,
    )
}

/// `in_flight` tasks, each making one call after another over one of 4 connections.
async fn unary_calls(port: u16, in_flight: usize, run_for: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + run_for;
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(connect(port).await?);
    }
    let mut tasks = Vec::new();
    for i in 0..in_flight {
        let mut grpc = tonic::client::Grpc::new(channels[i % channels.len()].clone());
        tasks.push(tokio::spawn(async move {
            let mut calls = 0u64;
            while Instant::now() < deadline {
                grpc.ready().await?;
                grpc.unary(
                    Request::new(vec![7u8; MESSAGE_BYTES]),
                    http::uri::PathAndQuery::from_static("/exp.Echo/Unary"),
                    RawCodec,
                )
                .await?;
                calls += 1;
            }
            anyhow::Ok(calls)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total)
}

/// `streams` bidirectional streams over one connection, `in_flight` messages in flight
/// over all of them: each answer received sends the next message.
async fn stream_messages(
    port: u16,
    path: &'static str,
    in_flight: usize,
    streams: usize,
    run_for: Duration,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + run_for;
    let channel = connect(port).await?;
    let streams = streams.clamp(1, in_flight.max(1));
    let per_stream = (in_flight / streams).max(1);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            grpc.ready().await?;
            let (mut sender, messages) = futures::channel::mpsc::channel::<Vec<u8>>(per_stream);
            for _ in 0..per_stream {
                sender.send(vec![7u8; MESSAGE_BYTES]).await?;
            }
            let response = grpc
                .streaming(
                    Request::new(messages),
                    http::uri::PathAndQuery::from_static(path),
                    RawCodec,
                )
                .await?;
            let mut answers = response.into_inner();
            let mut calls = 0u64;
            while let Some(answer) = answers.next().await {
                calls += 1;
                if Instant::now() >= deadline {
                    break;
                }
                sender.send(answer?).await?;
            }
            anyhow::Ok(calls)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total)
}

/// The size of each call's request and answer, about a prepare's.
const MESSAGE_BYTES: usize = 64;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        return serve().await;
    }
    let in_flight: usize = args.get(1).map_or(Ok(64), |v| v.parse())?;
    let seconds: u64 = args.get(2).map_or(Ok(8), |v| v.parse())?;
    let run_for = Duration::from_secs(seconds.clamp(1, 600));
    let mut server = tokio::process::Command::new(std::env::current_exe()?)
        .arg("serve")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = server
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("the server's stdout is not piped"))?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let port: u16 = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the server printed no port"))?
        .trim()
        .parse()?;
    let server_pid = server
        .id()
        .ok_or_else(|| anyhow::anyhow!("the server exited"))?;
    println!("{in_flight} in flight, {seconds} s each, client and server in separate processes");
    for round in 0..2 {
        for mode in [
            "unary",
            "stream",
            "stream, a task per message",
            "4 streams, a task per message",
        ] {
            let (client_before, server_before) = (cpu_seconds(None), cpu_seconds(Some(server_pid)));
            let started = Instant::now();
            let calls = match mode {
                "unary" => unary_calls(port, in_flight, run_for).await?,
                "stream" => {
                    stream_messages(port, "/exp.Echo/Stream", in_flight, 1, run_for).await?
                }
                "stream, a task per message" => {
                    stream_messages(port, "/exp.Echo/StreamSpawning", in_flight, 1, run_for).await?
                }
                _ => {
                    stream_messages(port, "/exp.Echo/StreamSpawning", in_flight, 4, run_for).await?
                }
            };
            let elapsed = started.elapsed().as_secs_f64();
            let per_call = |before: f64, after: f64| (after - before) * 1e6 / calls.max(1) as f64;
            println!(
                "round {} {mode:32} {:>9.0} calls/s   CPU per call: client {:>5.1} µs, server {:>5.1} µs",
                round + 1,
                calls as f64 / elapsed,
                per_call(client_before, cpu_seconds(None)),
                per_call(server_before, cpu_seconds(Some(server_pid))),
            );
        }
    }
    Ok(())
}
