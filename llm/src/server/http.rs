//! The HTTP layer (axum): OpenAI-compatible endpoints over a [`Pool`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::api::{self, ApiError, ChatRequest, CompletionRequest, Content, Prompt, Settings};
use super::metrics::Metrics;
use super::pool::{Event, GenRequest, Pool, Reject};
use crate::chat::{self, Message};
use crate::sample::SamplingParams;

/// Everything the handlers share.
pub struct App {
    /// The replicas.
    pub pool: Arc<Pool>,
    /// The name clients must send as `model`.
    pub model_name: String,
    /// Largest accepted request body, in bytes (more: 413).
    pub max_body_bytes: usize,
    /// Default `max_tokens` of `/v1/completions` (OpenAI's is 16).
    pub default_max_tokens: usize,
    created: u64,
    next_id: AtomicU64,
}

impl App {
    /// The shared state of a server over `pool`.
    pub fn new(pool: Arc<Pool>, model_name: String, max_body_bytes: usize) -> Arc<App> {
        Arc::new(App {
            pool,
            model_name,
            max_body_bytes,
            default_max_tokens: 16,
            created: now(),
            next_id: AtomicU64::new(1),
        })
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The routes.
pub fn router(app: Arc<App>) -> axum::Router {
    axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::invalid("no such endpoint", None)
                .with_status(StatusCode::NOT_FOUND)
                .into_response()
        })
        .with_state(app)
}

/// Serves `app` on `listener` until `shutdown` resolves; then refuses new requests (503), lets in-flight
/// ones finish for at most `drain_timeout`, and returns. The caller then stops the pool.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_timeout: Duration,
) -> std::io::Result<()> {
    let pool = app.pool.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        pool.drain();
        say!("shutting down: draining {} in-flight request(s)", pool.in_flight());
        let _ = tx.send(());
    };
    // Streams are many small writes: without TCP_NODELAY, Nagle's algorithm and the client's delayed ACK
    // hold each token back for tens of milliseconds.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, router(app)).with_graceful_shutdown(signal);
    let deadline = async move {
        if rx.await.is_ok() {
            tokio::time::sleep(drain_timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = std::future::IntoFuture::into_future(server) => r,
        _ = deadline => {
            say!("drain timeout ({:.0} s) reached: exiting with requests still open", drain_timeout.as_secs_f64());
            Ok(())
        }
    }
}

async fn read_body(app: &App, body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, app.max_body_bytes).await.map_err(|_| {
        ApiError::invalid(
            format!(
                "the request body is larger than this server's limit of {} bytes",
                app.max_body_bytes
            ),
            None,
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    })
}

fn count_error(app: &App, e: &ApiError) {
    let m = &app.pool.metrics;
    if e.status == StatusCode::TOO_MANY_REQUESTS || e.status == StatusCode::SERVICE_UNAVAILABLE {
        Metrics::add(&m.requests_rejected, 1);
    } else {
        Metrics::add(&m.requests_invalid, 1);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(app): State<Arc<App>>, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let req: CompletionRequest = api::parse(&bytes)?;
        let settings = api::validate(&req.common, &app.model_name)?;
        let prompt = match req.prompt {
            Prompt::Text(t) => tokenize(&app, &t, true)?,
            Prompt::Texts(v) if v.len() == 1 => tokenize(&app, &v[0], true)?,
            Prompt::Ids(ids) => ids,
            Prompt::IdLists(mut v) if v.len() == 1 => v.remove(0),
            _ => {
                return Err(ApiError::invalid(
                    "one prompt per request: send a string or one list of token ids",
                    Some("prompt"),
                ))
            }
        };
        let max = settings.max_tokens.unwrap_or(app.default_max_tokens);
        start(&app, prompt, settings, max, Kind::Completion)
    }
    .await;
    respond(&app, r).await
}

async fn chat_completions(State(app): State<Arc<App>>, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let req: ChatRequest = api::parse(&bytes)?;
        let settings = api::validate(&req.common, &app.model_name)?;
        if req.messages.is_empty() {
            return Err(ApiError::invalid("messages must not be empty", Some("messages")));
        }
        let mut msgs = Vec::with_capacity(req.messages.len());
        for m in req.messages {
            let content = match m.content {
                Content::Text(t) => t,
                Content::Parts(parts) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => s += &t,
                            (k, _) => {
                                return Err(ApiError::invalid(
                                    format!("content parts of type `{k}` are not supported (text only)"),
                                    Some("messages"),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            msgs.push(Message { role: m.role, content });
        }
        let src = app.pool.source();
        let template = src.chat_template().ok_or_else(|| {
            ApiError::invalid(
                format!("{} has no chat template: use /v1/completions", src.describe()),
                None,
            )
        })?;
        let tok = app.pool.tokenizer().ok_or_else(|| {
            ApiError::invalid(
                format!(
                    "{} has no tokenizer: use /v1/completions with token ids",
                    src.describe()
                ),
                None,
            )
        })?;
        let cfg = src.config();
        let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
        let text = chat::render(
            &template,
            &msgs,
            &name(cfg.bos_token_id),
            &name(cfg.eos_token_ids.first().copied()),
        )
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
        let prompt = tokenize(&app, &text, false)?;
        let ctx = cfg.max_position_embeddings;
        // Without max_tokens a chat answer may use the rest of the context, up to what the KV budget allows.
        let max = settings.max_tokens.unwrap_or_else(|| {
            ctx.min(app.pool.kv_positions())
                .saturating_sub(prompt.len())
                .clamp(1, 1024)
        });
        start(&app, prompt, settings, max, Kind::Chat)
    }
    .await;
    respond(&app, r).await
}

fn tokenize(app: &App, text: &str, add_special: bool) -> Result<Vec<u32>, ApiError> {
    let Some(tok) = app.pool.tokenizer() else {
        return Err(ApiError::invalid(
            format!(
                "{} has no tokenizer: send the prompt as a list of token ids",
                app.pool.source().describe()
            ),
            Some("prompt"),
        ));
    };
    let enc = tok
        .encode(text, add_special)
        .map_err(|e| ApiError::invalid(format!("tokenizer: {e}"), Some("prompt")))?;
    Ok(enc.get_ids().to_vec())
}

fn start(app: &Arc<App>, prompt: Vec<u32>, s: Settings, max_tokens: usize, kind: Kind) -> Result<Started, ApiError> {
    let ctx = app.pool.source().config().max_position_embeddings;
    if prompt.len() + max_tokens > ctx {
        return Err(ApiError::invalid(
            format!(
                "this model's maximum context length is {ctx} tokens; the prompt has {} tokens and max_tokens is \
                 {max_tokens} ({} in all)",
                prompt.len(),
                prompt.len().saturating_add(max_tokens)
            ),
            Some(if max_tokens > ctx { "max_tokens" } else { "prompt" }),
        )
        .with_code("context_length_exceeded"));
    }
    let prompt_tokens = prompt.len();
    let req = GenRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature: s.temperature,
            top_p: s.top_p,
            seed: s.seed,
        },
        stop: s.stop.clone(),
        ignore_eos: s.ignore_eos,
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    app.pool.submit(req, tx).map_err(|r| match r {
        Reject::QueueFull => ApiError::overloaded(
            StatusCode::TOO_MANY_REQUESTS,
            "the server's queue is full; retry later",
            1,
        ),
        Reject::Unavailable(m) => ApiError::overloaded(StatusCode::SERVICE_UNAVAILABLE, m, 5),
        Reject::TooLarge(m) => ApiError::invalid(m, Some("max_tokens")).with_status(StatusCode::PAYLOAD_TOO_LARGE),
        Reject::Invalid(m) => ApiError::invalid(m, Some("prompt")),
    })?;
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Completion => format!("cmpl-{id}"),
        Kind::Chat => format!("chatcmpl-{id}"),
    };
    let meta = Meta {
        id,
        created: now(),
        model: app.model_name.clone(),
        kind,
        prompt_tokens,
    };
    Ok(Started {
        meta,
        rx,
        stream: s.stream,
        include_usage: s.include_usage,
    })
}

struct Started {
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    stream: bool,
    include_usage: bool,
}

async fn respond(app: &App, r: Result<Started, ApiError>) -> Response {
    match r {
        Ok(st) if st.stream => sse(st.meta, st.rx, st.include_usage).into_response(),
        Ok(st) => collect(st.meta, st.rx).await,
        Err(e) => {
            count_error(app, &e);
            e.into_response()
        }
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
}

impl Meta {
    fn usage(&self, completion: usize) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
               "total_tokens": self.prompt_tokens + completion})
    }

    fn chunk(&self, text: &str, finish: Option<&str>, first: bool) -> Value {
        match self.kind {
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            }),
            Kind::Chat => {
                let delta = if finish.is_some() && text.is_empty() {
                    json!({})
                } else if first {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
        }
    }

    fn full(&self, text: &str, ids: &[u32], finish: &str) -> Value {
        let usage = self.usage(ids.len());
        match self.kind {
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish,
                             "token_ids": ids}],
                "usage": usage,
            }),
            Kind::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": null, "finish_reason": finish, "token_ids": ids}],
                "usage": usage,
            }),
        }
    }
}

/// A non-streaming answer: waits for the whole sequence. A client that disconnects makes hyper drop this
/// future, which drops the receiver, which cancels the sequence at the next step.
async fn collect(meta: Meta, mut rx: UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    let mut ids = Vec::new();
    loop {
        match rx.recv().await {
            Some(Event::Token { id, text: t }) => {
                ids.push(id);
                text += &t;
            }
            Some(Event::Done { finish, text: t, .. }) => {
                text += &t;
                return (StatusCode::OK, Json(meta.full(&text, &ids, finish.as_str()))).into_response();
            }
            Some(Event::Failed { status, message }) => {
                return ApiError::overloaded(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    message,
                    1,
                )
                .into_response()
            }
            None => {
                return ApiError::overloaded(StatusCode::SERVICE_UNAVAILABLE, "the replica went away", 1)
                    .into_response()
            }
        }
    }
}

fn sse(
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    struct St {
        meta: Meta,
        rx: Option<UnboundedReceiver<Event>>,
        first: bool,
        tokens: usize,
        pending: std::collections::VecDeque<String>,
        include_usage: bool,
    }
    let st = St {
        meta,
        rx: Some(rx),
        first: true,
        tokens: 0,
        pending: Default::default(),
        include_usage,
    };
    let s = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), st));
            }
            let rx = st.rx.as_mut()?;
            match rx.recv().await {
                Some(Event::Token { text, .. }) => {
                    st.tokens += 1;
                    if text.is_empty() && !st.first {
                        continue;
                    }
                    let c = st.meta.chunk(&text, None, st.first);
                    st.first = false;
                    st.pending.push_back(c.to_string());
                }
                Some(Event::Done {
                    finish,
                    text,
                    completion_tokens,
                    ..
                }) => {
                    if !text.is_empty() {
                        st.pending.push_back(st.meta.chunk(&text, None, st.first).to_string());
                        st.first = false;
                    }
                    st.pending
                        .push_back(st.meta.chunk("", Some(finish.as_str()), st.first).to_string());
                    if st.include_usage {
                        let mut u = st.meta.chunk("", None, false);
                        u["choices"] = json!([]);
                        u["usage"] = st.meta.usage(completion_tokens);
                        st.pending.push_back(u.to_string());
                    }
                    st.pending.push_back("[DONE]".into());
                    st.rx = None;
                }
                Some(Event::Failed { status, message }) => {
                    let e = ApiError::overloaded(
                        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        message,
                        1,
                    );
                    st.pending.push_back(e.body().to_string());
                    st.pending.push_back("[DONE]".into());
                    st.rx = None;
                }
                None => {
                    let e = ApiError::overloaded(StatusCode::SERVICE_UNAVAILABLE, "the replica went away", 1);
                    st.pending.push_back(e.body().to_string());
                    st.rx = None;
                }
            }
        }
    });
    Sse::new(s)
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": app.model_name, "object": "model", "created": app.created, "owned_by": "nccl-rs",
        "max_model_len": app.pool.source().config().max_position_embeddings,
    }]}))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let g = app.pool.gauges();
    let healthy = g.iter().filter(|r| r.healthy).count();
    let dead = app.pool.dead();
    let status = if dead.is_some() {
        "dead"
    } else if app.pool.is_draining() {
        "draining"
    } else if healthy == g.len() {
        "ok"
    } else if healthy > 0 {
        "degraded"
    } else {
        "unavailable"
    };
    let replicas: Vec<Value> = g
        .iter()
        .map(|r| {
            let mut v = json!({"replica": r.index, "healthy": r.healthy, "queued": r.queued, "running": r.running,
                   "kv_positions_used": r.kv_used, "restarts": r.restarts, "rebuild_failures": r.rebuild_failures});
            if let Some(e) = &r.last_rebuild_error {
                v["last_rebuild_error"] = json!(e);
            }
            if let Some(d) = r.next_rebuild_in {
                v["next_rebuild_in_secs"] = json!(d.as_secs_f64());
            }
            v
        })
        .collect();
    let code = if healthy > 0 && !app.pool.is_draining() && dead.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({"status": status, "replicas": replicas});
    if let Some(why) = dead {
        body["error"] = json!(why);
    }
    (code, Json(body)).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = app.pool.metrics.render(&app.pool.gauges());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
