//! OpenAI's error envelope, and the HTTP status of each gRPC code.

use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::{CONTEXT_LENGTH_EXCEEDED, REQUEST_ERROR_KEY, REQUEST_FIELD_KEY};

/// An error in OpenAI's envelope.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
    retry_after_s: Option<u64>,
}

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        kind: &'static str,
        message: impl Into<String>,
        param: Option<&str>,
        code: Option<&'static str>,
    ) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: param.map(str::to_string),
            code,
            retry_after_s: None,
        }
    }

    pub(super) fn bad(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message,
            Some(param),
            None,
        )
    }

    pub(super) fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind,
            "param": self.param, "code": self.code}})
    }

    /// The HTTP form of a gRPC status from `Generate`.
    pub(super) fn from_status(s: &tonic::Status) -> Self {
        use tonic::Code;
        let detail = |key: &str| {
            s.metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let msg = s.message().to_string();
        match s.code() {
            Code::NotFound => Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                msg,
                Some("model"),
                Some("model_not_found"),
            ),
            Code::InvalidArgument => {
                let context = detail(REQUEST_ERROR_KEY).as_deref() == Some(CONTEXT_LENGTH_EXCEEDED);
                // The wire's field under OpenAI's name.
                let field = detail(REQUEST_FIELD_KEY).map(|f| match f.as_str() {
                    "max_new_tokens" => "max_tokens".to_string(),
                    "stop_sequences" => "stop".to_string(),
                    _ => f,
                });
                let param = if context {
                    Some("messages".to_string())
                } else {
                    field
                };
                Self::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    msg,
                    param.as_deref(),
                    context.then_some("context_length_exceeded"),
                )
            }
            Code::ResourceExhausted => {
                let mut e = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    msg,
                    None,
                    Some("rate_limit_exceeded"),
                );
                let ms: u64 = detail("retry-after-ms")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1000);
                e.retry_after_s = Some(ms.div_ceil(1000).max(1));
                e
            }
            Code::DeadlineExceeded => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", msg, None, None)
            }
            Code::Unavailable | Code::FailedPrecondition => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                msg,
                None,
                None,
            ),
            Code::Unauthenticated => Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                msg,
                None,
                None,
            ),
            Code::PermissionDenied => {
                Self::new(StatusCode::FORBIDDEN, "permission_error", msg, None, None)
            }
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                msg,
                None,
                None,
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            r.headers_mut()
                .insert("retry-after", s.to_string().parse().expect("digits"));
        }
        r
    }
}

/// The body as a JSON object, or the error a client should see.
pub(super) fn object(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    let body = body.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "invalid_request_error",
                format!(
                    "the request body is over the limit of this server ({})",
                    r.body_text()
                ),
                None,
                Some("request_too_large"),
            )
        } else {
            ApiError::new(status, "invalid_request_error", r.body_text(), None, None)
        }
    })?;
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad("body", "the body must be a JSON object")),
        Err(e) => Err(ApiError::bad("body", format!("the body is not JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_become_openai_statuses_and_codes() {
        let e = ApiError::from_status(&tonic::Status::not_found("model x"));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::NOT_FOUND, Some("model_not_found"))
        );
        let mut s = tonic::Status::invalid_argument("prompt too long");
        s.metadata_mut()
            .insert(REQUEST_ERROR_KEY, CONTEXT_LENGTH_EXCEEDED.parse().unwrap());
        let e = ApiError::from_status(&s);
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, Some("context_length_exceeded"))
        );
        let mut s = tonic::Status::invalid_argument("logit_bias: token 9 outside");
        s.metadata_mut()
            .insert(REQUEST_FIELD_KEY, "logit_bias".parse().unwrap());
        assert_eq!(
            ApiError::from_status(&s).param.as_deref(),
            Some("logit_bias")
        );
        let mut s = tonic::Status::invalid_argument("max_new_tokens must be at least 1");
        s.metadata_mut()
            .insert(REQUEST_FIELD_KEY, "max_new_tokens".parse().unwrap());
        assert_eq!(
            ApiError::from_status(&s).param.as_deref(),
            Some("max_tokens")
        );
        let mut s = tonic::Status::resource_exhausted("queue full");
        s.metadata_mut()
            .insert("retry-after-ms", "1500".parse().unwrap());
        let r = ApiError::from_status(&s).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["retry-after"], "2");
        for (status, code) in [
            (
                tonic::Status::unavailable("x"),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                tonic::Status::deadline_exceeded("x"),
                StatusCode::GATEWAY_TIMEOUT,
            ),
            (
                tonic::Status::unauthenticated("x"),
                StatusCode::UNAUTHORIZED,
            ),
            (tonic::Status::permission_denied("x"), StatusCode::FORBIDDEN),
            (
                tonic::Status::internal("x"),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ] {
            assert_eq!(ApiError::from_status(&status).status, code);
        }
    }
}
