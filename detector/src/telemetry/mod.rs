//! Prometheus metrics: a leaf that the HTTP server, Kubernetes and the event loop depend on,
//! and that depends on none of them.

pub mod metrics;
