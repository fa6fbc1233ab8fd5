//! The `/metrics` endpoint, shared by the coordinator and the participant server:
//! HTTP/1.1 on a listener of its own, accepted by the same loop as the gRPC servers (TLS
//! when the server has a certificate, the connection cap, the idle timeout).
//! `GET /metrics` renders the metrics; anything else is 404 or 405.
//!
//! `/metrics` has no authentication of its own, so [`check_metrics_listen`] refuses an
//! address beyond loopback unless the operator allowed unauthenticated callers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::connections::{ConnectionLimits, incoming};
use crate::tls::ReloadableServerTls;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::transport::server::Connected;

/// The content type of Prometheus' text format as prometheus-client writes it.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Refuses to serve `/metrics` on `address` if it is beyond loopback and unauthenticated
/// callers were not allowed (`--allow-unauthenticated`); the message says so.
pub fn check_metrics_listen(
    address: SocketAddr,
    allow_unauthenticated: bool,
) -> Result<(), String> {
    if address.ip().is_loopback() || allow_unauthenticated {
        return Ok(());
    }
    Err(format!(
        "{address} is not a loopback address and /metrics has no authentication; \
         pass --allow-unauthenticated to serve it there"
    ))
}

/// Serves `GET /metrics` with what `render` returns until `stop` turns true.
pub async fn serve_metrics<R, F>(
    listener: TcpListener,
    tls: Option<Arc<ReloadableServerTls>>,
    limits: ConnectionLimits,
    render: R,
    mut stop: watch::Receiver<bool>,
) where
    R: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<String, String>> + Send + 'static,
{
    let mut connections = incoming(listener, tls, limits);
    loop {
        let connection = tokio::select! {
            next = connections.next() => match next {
                Some(Ok(connection)) => connection,
                Some(Err(_)) => continue,
                None => return,
            },
            _ = stop.wait_for(|stopping| *stopping) => return,
        };
        let info = connection.connect_info();
        let render = render.clone();
        let mut connection_stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                // Counted while it is answered: a scrape is never cut by the idle timeout.
                let call = info.start_call();
                let render = render.clone();
                async move {
                    let response = respond(&request, render).await;
                    drop(call);
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(connection), service);
            tokio::pin!(served);
            // On stop, a keep-alive connection ends after the answer in progress.
            let served = tokio::select! {
                served = served.as_mut() => served,
                () = async { let _ = connection_stop.wait_for(|stopping| *stopping).await; } => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%error, "metrics connection ended with an error");
            }
        });
    }
}

async fn respond<R, F>(request: &Request<Incoming>, render: R) -> Response<String>
where
    R: Fn() -> F,
    F: Future<Output = Result<String, String>>,
{
    let reply = |status: StatusCode, body: String| {
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "try /metrics\n".into());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into());
    }
    match render().await {
        Ok(text) => {
            let mut response = reply(StatusCode::OK, text);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(CONTENT_TYPE),
            );
            response
        }
        Err(error) => {
            tracing::warn!(%error, "cannot render metrics");
            reply(StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n"))
        }
    }
}
