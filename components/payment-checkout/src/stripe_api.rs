//! Stripe's API as payment-checkout calls it: the secret key, the timeout and the answer cap
//! in one place, for the Checkout Session calls and the refund calls alike.

use std::time::Duration;

use astria_domain::config::{ExposeSecret, StripeCheckout};
use spin_kit::http_client::{self, HttpError, HttpResponse};

/// Stripe answers small JSON objects.
const MAX_ANSWER: usize = 256 * 1024;

pub(crate) struct StripeClient<'a> {
    cfg: &'a StripeCheckout,
}

impl<'a> StripeClient<'a> {
    pub(crate) fn new(cfg: &'a StripeCheckout) -> StripeClient<'a> {
        StripeClient { cfg }
    }

    /// `POST {path}` with a form body; `idempotency_key` makes a retry the same request.
    pub(crate) fn post(
        &self,
        path: &str,
        form: &str,
        idempotency_key: Option<&str>,
    ) -> Result<HttpResponse, HttpError> {
        let auth = self.auth();
        let mut headers = vec![("authorization", auth.as_str()), ("content-type", "application/x-www-form-urlencoded")];
        headers.extend(idempotency_key.map(|key| ("idempotency-key", key)));
        self.send("POST", path, &headers, form.as_bytes())
    }

    /// `GET {path}`.
    pub(crate) fn get(&self, path: &str) -> Result<HttpResponse, HttpError> {
        let auth = self.auth();
        self.send("GET", path, &[("authorization", auth.as_str())], b"")
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.cfg.secret_key.expose_secret())
    }

    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<HttpResponse, HttpError> {
        let url = format!("{}{path}", self.cfg.api_url);
        http_client::send(&http_client::Request {
            method,
            url: &url,
            headers,
            body,
            timeout: Duration::from_millis(self.cfg.timeout_ms),
            max_response: MAX_ANSWER,
        })
    }
}

/// Whether Stripe replayed the answer it stored for the idempotency key (a stored failure then
/// stays a failure for that key).
pub(crate) fn replayed(answer: &HttpResponse) -> bool {
    answer.header("idempotent-replayed").is_some_and(|v| v.eq_ignore_ascii_case("true"))
}
