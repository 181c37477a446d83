//! The one HTTP error type of the component adapters, and the one place that maps it to status
//! codes and bodies. Bodies carry only public text and a request id; the detail of 5xx errors
//! goes to the log with the same request id.

use astria_store::DbError;
use spin_sdk::http::Response;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the input is malformed or invalid; the message says what, publicly.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing or wrong credentials or signature.
    #[error("unauthorized")]
    Unauthorized,
    /// 404: unknown route or id.
    #[error("not found")]
    NotFound,
    /// 409: the request conflicts with work in progress (e.g. a lease held).
    #[error("{0}")]
    Conflict(String),
    /// 413: the body exceeds the limit.
    #[error("request body larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// 503: a dependency is down; the caller should retry.
    #[error("{dependency} unavailable")]
    Unavailable { dependency: &'static str, detail: String },
    /// 500: a bug. The body says nothing more.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized => 401,
            ApiError::NotFound => 404,
            ApiError::Conflict(_) => 409,
            ApiError::TooLarge { .. } => 413,
            ApiError::Unavailable { .. } => 503,
            ApiError::Internal(_) => 500,
        }
    }

    /// The response, logging server-side detail for 5xx under `request_id`.
    pub fn into_response(self, request_id: &str) -> Response {
        match &self {
            ApiError::Unavailable { dependency, detail } => {
                crate::log::error_with("http", request_id, &format!("{dependency} unavailable: {detail}"))
            }
            ApiError::Internal(detail) => {
                crate::log::error_with("http", request_id, &format!("internal error: {detail}"))
            }
            _ => {}
        }
        let mut resp = crate::json_response(
            self.status(),
            &serde_json::json!({ "error": self.to_string(), "request_id": request_id }),
        );
        if let ApiError::Unavailable { .. } = self {
            resp.set_header("retry-after", "5");
        }
        resp
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(detail) => ApiError::Unavailable { dependency: "database", detail },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// Reads a request body, refusing more than `limit` bytes (from `content-length` before
/// reading anything, and while streaming for chunked bodies).
pub async fn read_body(req: spin_sdk::http::IncomingRequest, limit: usize) -> Result<Vec<u8>, ApiError> {
    use futures::StreamExt;
    let declared = req
        .headers()
        .entries()
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| String::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::TooLarge { limit });
    }
    let mut body = Vec::new();
    let mut stream = std::pin::pin!(req.into_body_stream());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("could not read the body: {e:?}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status() {
        let cases = [
            (ApiError::BadRequest("x".into()), 400),
            (ApiError::Unauthorized, 401),
            (ApiError::NotFound, 404),
            (ApiError::Conflict("busy".into()), 409),
            (ApiError::TooLarge { limit: 10 }, 413),
            (ApiError::Unavailable { dependency: "redis", detail: "refused".into() }, 503),
            (ApiError::Internal("bug".into()), 500),
        ];
        for (e, status) in cases {
            assert_eq!(e.status(), status, "{e:?}");
        }
    }

    #[test]
    fn database_outages_are_503_and_other_database_errors_500() {
        assert_eq!(ApiError::from(DbError::Unavailable("down".into())).status(), 503);
        assert_eq!(ApiError::from(DbError::Query("syntax".into())).status(), 500);
    }

    #[test]
    fn public_messages_never_carry_internal_detail() {
        let internal = ApiError::Internal("password=hunter2 in connection string".into());
        assert_eq!(internal.to_string(), "internal error");
        let down = ApiError::Unavailable { dependency: "database", detail: "postgres://u:secret@db".into() };
        assert_eq!(down.to_string(), "database unavailable");
    }
}
