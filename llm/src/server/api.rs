//! The OpenAI request bodies, their validation, and OpenAI-style errors.
//!
//! Parsing is in two steps so each failure gets its own status: a body that is not JSON is a 400
//! (`invalid_request_error`), a JSON body whose fields have the wrong types is a 422; values out of range
//! (`max_tokens` 0, a temperature of 7, five stop strings) are 400, a prompt past the model's context is
//! 400 with code `context_length_exceeded`, an unknown model 404. Nothing is truncated to make a request
//! fit: it is refused with the reason.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI error type (`invalid_request_error`, `not_found_error`, …).
    pub kind: &'static str,
    /// The offending parameter, if one.
    pub param: Option<&'static str>,
    /// A machine-readable code, if any.
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429 and 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
            retry_after: None,
        }
    }

    /// The same error with another status.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The same error with a code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 429 or 503 with `Retry-After`.
    pub fn overloaded(status: StatusCode, message: impl Into<String>, retry_after: u32) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind: if status == StatusCode::TOO_MANY_REQUESTS {
                "rate_limit_error"
            } else {
                "service_unavailable"
            },
            param: None,
            code: None,
            retry_after: Some(retry_after),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert("retry-after", HeaderValue::from(s));
        }
        r
    }
}

/// A prompt: text, or token ids.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Prompt {
    /// Text, tokenized with the model's tokenizer.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
    /// A list of texts (only one is accepted: one prompt per request).
    Texts(Vec<String>),
    /// A list of id lists (only one is accepted).
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Stop {
    /// One string.
    One(String),
    /// Up to four strings.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct StreamOptions {
    /// Send a last chunk with the usage counts.
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by both endpoints.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Common {
    /// The model name (must be the served one).
    pub model: Option<String>,
    /// Tokens to generate at most.
    pub max_tokens: Option<i64>,
    /// The chat endpoint's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// 0 ..= 2; 0 = greedy.
    pub temperature: Option<f64>,
    /// (0, 1].
    pub top_p: Option<f64>,
    /// Sampler seed.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Stream options.
    pub stream_options: Option<StreamOptions>,
    /// Number of choices (only 1).
    pub n: Option<i64>,
    /// Non-standard: keep going past end-of-sequence tokens (benchmarks).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// The rest.
    #[serde(flatten)]
    pub common: Common,
}

/// A chat message's content: text or a list of text parts.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Content {
    /// Text.
    Text(String),
    /// `[{"type": "text", "text": …}]`.
    Parts(Vec<Part>),
}

/// One content part.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Part {
    /// Only `"text"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// One chat message.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`.
    pub role: String,
    /// The content.
    pub content: Content,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// The rest.
    #[serde(flatten)]
    pub common: Common,
}

/// Parses a body: 400 when it is not JSON (or not an object), 422 when a field has the wrong type or a
/// required one is missing.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    if !v.is_object() {
        return Err(ApiError::invalid("the request body must be a JSON object", None));
    }
    serde_json::from_value(v).map_err(|e| {
        ApiError::invalid(format!("invalid request: {e}"), None).with_status(StatusCode::UNPROCESSABLE_ENTITY)
    })
}

/// Validated sampling and stopping settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Tokens to generate at most (None: the endpoint's default).
    pub max_tokens: Option<usize>,
    /// Temperature.
    pub temperature: f32,
    /// Top-p.
    pub top_p: f32,
    /// Seed.
    pub seed: u64,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Streaming.
    pub stream: bool,
    /// Usage chunk at the end of a stream.
    pub include_usage: bool,
    /// Ignore EOS.
    pub ignore_eos: bool,
}

/// Checks the shared fields against `model` (the served name).
pub fn validate(c: &Common, model: &str) -> Result<Settings, ApiError> {
    match &c.model {
        None => return Err(ApiError::invalid("you must provide a model parameter", Some("model"))),
        Some(m) if m != model => {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!("the model `{m}` does not exist; this server serves `{model}`"),
                kind: "invalid_request_error",
                param: Some("model"),
                code: Some("model_not_found"),
                retry_after: None,
            })
        }
        Some(_) => {}
    }
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        None => None,
        Some(n) if n < 1 => {
            return Err(ApiError::invalid(
                format!("max_tokens must be at least 1, got {n}"),
                Some("max_tokens"),
            ))
        }
        Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
    };
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("temperature must be between 0 and 2, got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p must be in (0, 1], got {top_p}"),
            Some("top_p"),
        ));
    }
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::invalid(
                format!("n must be 1 on this server, got {n}"),
                Some("n"),
            ));
        }
    }
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid(
            format!("at most 4 stop sequences are allowed, got {}", stop.len()),
            Some("stop"),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop sequences must not be empty", Some("stop")));
    }
    let seed = c.seed.map_or(0, |s| s as u64);
    Ok(Settings {
        max_tokens,
        temperature: temperature as f32,
        top_p: top_p as f32,
        seed,
        stop,
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        ignore_eos: c.ignore_eos.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_for_each_kind_of_bad_body() {
        let e = parse::<CompletionRequest>(b"{not json").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse::<CompletionRequest>(b"[1]").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse::<CompletionRequest>(br#"{"prompt": "a", "max_tokens": "many"}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", e.message);
        let e = parse::<CompletionRequest>(br#"{"model": "m"}"#).unwrap_err();
        assert_eq!(
            e.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing prompt: {}",
            e.message
        );
        let r: CompletionRequest = parse(br#"{"model": "m", "prompt": [1, 2], "stop": "x"}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Ids(vec![1, 2]));
        let s = validate(&r.common, "m").unwrap();
        assert_eq!(s.stop, vec!["x".to_string()]);
        assert_eq!(validate(&r.common, "other").unwrap_err().status, StatusCode::NOT_FOUND);
        let bad = |body: &str| validate(&parse::<CompletionRequest>(body.as_bytes()).unwrap().common, "m");
        for b in [
            r#"{"model":"m","prompt":"a","max_tokens":0}"#,
            r#"{"model":"m","prompt":"a","temperature":3}"#,
            r#"{"model":"m","prompt":"a","top_p":0}"#,
            r#"{"model":"m","prompt":"a","n":2}"#,
            r#"{"model":"m","prompt":"a","stop":["a","b","c","d","e"]}"#,
            r#"{"model":"m","prompt":"a","stop":""}"#,
            r#"{"prompt":"a"}"#,
        ] {
            assert_eq!(bad(b).unwrap_err().status, StatusCode::BAD_REQUEST, "{b}");
        }
    }
}
