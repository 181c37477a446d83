//! The one HTTP error type of the component adapters, and the one place that maps it to status
//! codes and bodies. Bodies carry only public text and a request id; the detail of 5xx errors
//! goes to the log with the same request id.

use astria_domain::config::ConfigError;
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
    /// 403: the credentials are understood and refused (a webhook handshake with the wrong
    /// verify token).
    #[error("{0}")]
    Forbidden(&'static str),
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
    /// 500: a bug or a misconfiguration. The body says nothing more; the cause, with its whole
    /// chain, goes to the log.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

/// A misconfigured deployment (the error names the variable): a 500, never the caller's fault.
impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        ApiError::Internal(anyhow::Error::new(e).context("configuration"))
    }
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized => 401,
            ApiError::Forbidden(_) => 403,
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
            ApiError::Internal(cause) => {
                crate::log::error_with("http", request_id, &format!("internal error: {cause:#}"))
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
            other => ApiError::Internal(anyhow::Error::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status() {
        let cases = [
            (ApiError::BadRequest("x".into()), 400),
            (ApiError::Unauthorized, 401),
            (ApiError::Forbidden("verification failed"), 403),
            (ApiError::NotFound, 404),
            (ApiError::Conflict("busy".into()), 409),
            (ApiError::TooLarge { limit: 10 }, 413),
            (ApiError::Unavailable { dependency: "redis", detail: "refused".into() }, 503),
            (ApiError::Internal(anyhow::anyhow!("bug")), 500),
        ];
        for (e, status) in cases {
            assert_eq!(e.status(), status, "{e:?}");
        }
    }

    #[test]
    fn an_internal_error_keeps_its_cause_for_the_log() {
        use anyhow::Context;
        let e: ApiError = Err::<(), _>(DbError::Query("syntax error at or near".into()))
            .context("saving the conversation")
            .unwrap_err()
            .into();
        let ApiError::Internal(cause) = e else { panic!("internal") };
        let chain = format!("{cause:#}");
        assert!(chain.contains("saving the conversation") && chain.contains("syntax error"), "{chain}");
        let config = ApiError::from(ConfigError::Missing { name: "texts_json" });
        let ApiError::Internal(cause) = config else { panic!("internal") };
        assert!(format!("{cause:#}").contains("texts_json"), "the log names the variable");
    }

    #[test]
    fn database_outages_are_503_and_other_database_errors_500() {
        assert_eq!(ApiError::from(DbError::Unavailable("down".into())).status(), 503);
        assert_eq!(ApiError::from(DbError::Query("syntax".into())).status(), 500);
    }

    #[test]
    fn public_messages_never_carry_internal_detail() {
        let internal = ApiError::Internal(anyhow::anyhow!("password=hunter2 in connection string"));
        assert_eq!(internal.to_string(), "internal error");
        let config = ApiError::from(ConfigError::Missing { name: "whatsapp_app_secret" });
        assert_eq!((config.status(), config.to_string()), (500, "internal error".to_string()));
        let down = ApiError::Unavailable { dependency: "database", detail: "postgres://u:secret@db".into() };
        assert_eq!(down.to_string(), "database unavailable");
    }
}
