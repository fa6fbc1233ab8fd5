//! Metrics: the `/metrics` endpoint the coordinator serves its Prometheus metrics on.

mod http;

pub use http::{check_metrics_listen, serve_metrics};
