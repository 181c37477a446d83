//! What every HTTP component does first with a request: its id, method, path and query, a
//! header, and its body read up to a limit. One copy, so the four HTTP components cannot drift
//! apart on how a path is split from its query.

use spin_sdk::http::{IncomingRequest, Method};

use crate::error::ApiError;

/// A request as a component routes it.
pub struct Route {
    /// The caller's `x-request-id` if it sent a reasonable one, else a fresh UUID: for log
    /// lines and error bodies.
    pub request_id: String,
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// What follows the first `?`, or "".
    pub query: String,
}

impl Route {
    pub fn of(req: &IncomingRequest) -> Route {
        let target = req.path_with_query().unwrap_or_default();
        let (path, query) = split_target(&target);
        Route {
            request_id: crate::request_id_from(header(req, "x-request-id").as_deref()),
            method: req.method(),
            path: path.to_string(),
            query: query.to_string(),
        }
    }
}

/// `/a/b?x=1&y` → (`/a/b`, `x=1&y`): at the first `?`, which a query may contain again.
pub fn split_target(target: &str) -> (&str, &str) {
    target.split_once('?').unwrap_or((target, ""))
}

/// A header, as text.
pub fn header(req: &IncomingRequest, name: &str) -> Option<String> {
    req.headers().get(&name.to_string()).into_iter().next().and_then(|v| String::from_utf8(v).ok())
}

/// Reads a request body, refusing more than `limit` bytes (from `content-length` before
/// reading anything, and while streaming for chunked bodies).
pub async fn read_body(req: IncomingRequest, limit: usize) -> Result<Vec<u8>, ApiError> {
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
    use super::split_target;

    #[test]
    fn a_target_splits_at_its_first_question_mark() {
        assert_eq!(split_target("/update-images?order=o1&token=a?b"), ("/update-images", "order=o1&token=a?b"));
        assert_eq!(split_target("/health/message"), ("/health/message", ""));
        assert_eq!(split_target("/x?"), ("/x", ""));
    }
}
