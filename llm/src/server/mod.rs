//! An OpenAI-compatible inference server on the engine: `dp` data-parallel replicas, each a `tp × pp`
//! layout of CPU ranks (host backend), continuous batching inside each replica, a least-loaded router in
//! front, and an HTTP API on tokio + axum.
//!
//! * [`pool`]: replicas, scheduling (admission by KV budget, chunked prefill, batched decode, cancellation),
//!   failover and rebuild, and the batch call [`pool::generate_distributed`].
//! * [`ranks`]: a replica's ranks (threads or processes) and each step's plan going to them through the
//!   communicator.
//! * [`http`]: `POST /v1/completions`, `POST /v1/chat/completions` (both with `"stream": true`),
//!   `GET /v1/models`, `/health`, `/metrics`.
//! * [`api`]: request bodies, validation and OpenAI-style errors.
//! * [`cli`]: the `serve` example's command line.

pub mod api;
pub mod cli;
pub mod http;
pub mod metrics;
pub mod pool;
pub mod ranks;
pub mod text;

pub use http::{router, serve, App};
pub use pool::{generate_distributed, Event, Fault, Finish, GenOutput, GenRequest, Pool, PoolConfig, Reject};
