//! Work that must not stop half-way when whoever awaits it gives up.
//!
//! A gRPC server drops a call's future when the caller cancels it or its deadline
//! passes. The barrier's operations (user code, then the barrier record) must still end,
//! so [`RunToEnd`] runs an operation inside the calling task, which costs no task of
//! its own and no hand-off back to the call, and moves what is left of it to a task of
//! its own only if it is dropped before it ended.
//!
//! Invariant: a future given to [`RunToEnd`] is polled until it completes, by the caller
//! or by the task it was moved to, unless the runtime itself shuts down (which ends
//! every task alike). [`Unfinished`] counts such operations wherever they run, so that
//! a server stopping can wait for them before it closes the store they write to.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::FutureExt;
use futures::future::CatchUnwind;

/// Runs `F` to its end; see the module docs. Resolves to `F`'s output, or to the panic's
/// message if `F` panicked (the panic is caught, as a task's would be).
pub(crate) struct RunToEnd<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    /// `None` once it has ended.
    operation: Option<Pin<Box<CatchUnwind<AssertUnwindSafe<F>>>>>,
    /// Where the rest goes if it is dropped early: the runtime it was started on.
    runtime: tokio::runtime::Handle,
}

impl<F: Future + Send + 'static> RunToEnd<F>
where
    F::Output: Send + 'static,
{
    /// Must be called within a tokio runtime (a server's handler always is).
    pub(crate) fn new(operation: F) -> Self {
        Self {
            operation: Some(Box::pin(AssertUnwindSafe(operation).catch_unwind())),
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

impl<F: Future + Send + 'static> Future for RunToEnd<F>
where
    F::Output: Send + 'static,
{
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(operation) = self.operation.as_mut() else {
            panic!("RunToEnd polled after it ended (a future is not polled after Ready)");
        };
        let output = std::task::ready!(operation.as_mut().poll(cx));
        self.operation = None;
        Poll::Ready(output.map_err(|panic| panic_message(panic.as_ref())))
    }
}

impl<F: Future + Send + 'static> Drop for RunToEnd<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let Some(rest) = self.operation.take() {
            // Its output (or panic) has no one left to hear it.
            drop(self.runtime.spawn(async move {
                let _ = rest.await;
            }));
        }
    }
}

/// The operations started and not ended yet, whether their caller still awaits them or
/// they were moved to a task of their own.
#[derive(Debug, Clone)]
pub(crate) struct Unfinished(Arc<tokio::sync::watch::Sender<usize>>);

impl Default for Unfinished {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(0).0))
    }
}

/// One operation counted by [`Unfinished`] until this is dropped: move it into the
/// operation, so that it ends with it (a panic too).
#[derive(Debug)]
pub(crate) struct Started(Arc<tokio::sync::watch::Sender<usize>>);

impl Unfinished {
    pub(crate) fn start(&self) -> Started {
        self.0.send_modify(|count| *count += 1);
        Started(self.0.clone())
    }

    /// Resolves once no counted operation is left.
    pub(crate) async fn none_left(&self) {
        let mut count = self.0.subscribe();
        // The sender lives in `self`: the wait cannot fail.
        let _ = count.wait_for(|count| *count == 0).await;
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count -= 1);
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_string(),
        (_, Some(message)) => message.clone(),
        _ => "a panic without a message".to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn an_operation_that_ends_gives_its_output() {
        assert_eq!(RunToEnd::new(async { 7 }).await, Ok(7));
    }

    #[tokio::test]
    async fn a_panic_is_answered_with_its_message() {
        let answer = RunToEnd::new(async {
            if std::hint::black_box(true) {
                panic!("user code broke");
            }
        })
        .await;
        assert_eq!(answer, Err("user code broke".to_string()));
        let formatted = RunToEnd::new(async {
            if std::hint::black_box(true) {
                panic!("user code broke at {}", 3);
            }
        })
        .await;
        assert_eq!(formatted, Err("user code broke at 3".to_string()));
    }

    #[tokio::test]
    async fn an_operation_dropped_half_way_still_ends() {
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (started, has_started) = tokio::sync::oneshot::channel::<()>();
        let ended = Arc::new(AtomicBool::new(false));
        let ended_in_operation = ended.clone();
        let operation = RunToEnd::new(async move {
            let _ = started.send(());
            let _ = released.await;
            ended_in_operation.store(true, Ordering::SeqCst);
        });
        // The caller gives up once the operation is under way.
        let caller = tokio::spawn(operation);
        has_started.await.unwrap();
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        assert!(!ended.load(Ordering::SeqCst));

        release.send(()).unwrap();
        for _ in 0..500 {
            if ended.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the operation dropped half-way never ended");
    }
}
