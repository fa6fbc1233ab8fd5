//! Closing connections that have carried no call for a while.
//!
//! Every accepted connection has a [`CallCounter`]. [`CountCallsLayer`] (applied by
//! [`super::server_builder`]) counts a call from the moment the server takes it until its
//! response body is finished or dropped, so a long `Watch` stream counts for as long as it
//! runs. The connection's reader asks its [`IdleDeadline`] whenever the peer has nothing
//! to read, and ends the connection, as if the peer had closed it, once no call has been in
//! flight for the whole idle timeout. HTTP/2 pings are not calls: they keep a connection
//! alive only while it is in use.
//!
//! A request is counted only once the server's service is called, which hyper does on a
//! task of its own after reading the request's headers; so bytes read within the last
//! [`BYTES_GRACE`] also hold the connection open (a ping every 30 s barely does).
//!
//! Invariants: a connection is never closed while a call on it is in flight, while
//! bytes from the peer wait to be read, or within [`BYTES_GRACE`] of the last bytes read.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tonic::codegen::{BoxFuture, Service};
use tower_layer::Layer;

use super::ConnectionInfo;

/// Calls in flight on one connection and when the last one finished.
#[derive(Debug)]
pub struct CallCounter {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` at which the last call finished (0: none yet).
    last_finished_ms: AtomicU64,
}

impl Default for CallCounter {
    fn default() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_finished_ms: AtomicU64::new(0),
        }
    }
}

impl CallCounter {
    #[cfg(test)]
    fn new() -> Arc<Self> {
        Arc::default()
    }

    pub(super) fn start(self: &Arc<Self>) -> CallInFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        CallInFlight(self.clone())
    }

    /// How long no call has been in flight; `None` while one is.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last_finished = Duration::from_millis(self.last_finished_ms.load(Ordering::SeqCst));
        Some(self.opened.elapsed().saturating_sub(last_finished))
    }
}

/// One call being served; finishing it (dropping) restarts the connection's idle clock.
#[derive(Debug)]
pub struct CallInFlight(Arc<CallCounter>);

impl Drop for CallInFlight {
    fn drop(&mut self) {
        let counter = &self.0;
        let finished_ms = u64::try_from(counter.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        // The time first, then the count: whoever sees the count at zero sees the time.
        // The latest end wins, whatever order calls ending together store in.
        counter
            .last_finished_ms
            .fetch_max(finished_ms, Ordering::SeqCst);
        counter.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long bytes just read keep a connection open: time for the request they may carry
/// to reach the server's service and be counted.
pub const BYTES_GRACE: Duration = Duration::from_secs(2);

/// The idle clock of one connection, polled by its reader.
#[derive(Debug)]
pub(super) struct IdleDeadline {
    calls: Arc<CallCounter>,
    timeout: Duration,
    check: Pin<Box<Sleep>>,
    last_bytes: Option<Instant>,
}

impl IdleDeadline {
    pub(super) fn new(calls: Arc<CallCounter>, timeout: Duration) -> Self {
        Self {
            calls,
            timeout,
            check: Box::pin(tokio::time::sleep(timeout)),
            last_bytes: None,
        }
    }

    /// The reader got bytes from the peer.
    pub(super) fn saw_bytes(&mut self) {
        self.last_bytes = Some(Instant::now());
    }

    /// Whether the connection has been idle for the whole timeout. Otherwise the timer is
    /// set for the next moment it could be, and `cx` is woken then.
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        // Bounded: each pass either returns or moves the timer into the future.
        loop {
            if self.check.as_mut().poll(cx).is_pending() {
                return false;
            }
            let recent_bytes = self
                .last_bytes
                .map(|at| at + BYTES_GRACE)
                .filter(|until| *until > Instant::now());
            let wait = match self.calls.idle_for() {
                Some(_) if recent_bytes.is_some() => BYTES_GRACE,
                Some(idle) if idle >= self.timeout => return true,
                Some(idle) => self.timeout - idle,
                // Busy: the earliest it can expire is a full timeout after the call ends.
                None => self.timeout,
            };
            self.check.as_mut().reset(Instant::now() + wait);
        }
    }
}

/// Counts each call on the connection it arrived on (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct CountCallsLayer;

impl<S> Layer<S> for CountCallsLayer {
    type Service = CountCalls<S>;

    fn layer(&self, inner: S) -> CountCalls<S> {
        CountCalls { inner }
    }
}

/// The service [`CountCallsLayer`] makes.
#[derive(Debug, Clone)]
pub struct CountCalls<S> {
    inner: S,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for CountCalls<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<CountedBody<ResponseBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let call = request
            .extensions()
            .get::<ConnectionInfo>()
            .map(|info| info.calls.start());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| CountedBody { inner, _call: call }))
        })
    }
}

/// A response body that keeps its call counted until it is finished or dropped.
#[derive(Debug)]
pub struct CountedBody<B> {
    inner: B,
    _call: Option<CallInFlight>,
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn expired(deadline: &mut IdleDeadline) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(deadline.poll_expired(cx))).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_expires_only_after_a_full_timeout_without_calls() {
        let calls = CallCounter::new();
        let timeout = Duration::from_secs(10);
        let mut deadline = IdleDeadline::new(calls.clone(), timeout);
        assert!(!expired(&mut deadline).await, "fresh connection");

        let call = calls.start();
        tokio::time::advance(timeout * 3).await;
        assert!(!expired(&mut deadline).await, "a call is in flight");

        tokio::time::advance(Duration::from_secs(4)).await;
        drop(call);
        tokio::time::advance(timeout - Duration::from_secs(1)).await;
        assert!(!expired(&mut deadline).await, "the last call ended 9 s ago");

        tokio::time::advance(Duration::from_secs(2)).await;
        deadline.saw_bytes();
        assert!(!expired(&mut deadline).await, "bytes just read");
        tokio::time::advance(BYTES_GRACE).await;
        assert!(
            expired(&mut deadline).await,
            "idle for 11 s, bytes read 2 s ago"
        );
    }
}
