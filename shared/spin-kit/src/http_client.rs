//! Outbound HTTP with timeouts, for calls to WhatsApp, Stripe and Astria.
//!
//! spin-sdk's `http::send` cannot set timeouts, and a hung external API must not hold a
//! sender (and its lease) forever. This calls wasi-http's `outgoing-handler` directly with
//! `request-options` (connect, first-byte and between-bytes timeouts), which Spin and devhost
//! both honour. Synchronous: Redis-trigger handlers and HTTP handlers alike can call it.
//!
//! Those per-phase timeouts alone let a server that trickles a byte just under the gap
//! timeout, or never reads the request body, hold the call for as long as it likes. So
//! [`Request::timeout`] is also the **overall deadline** of the call, from the first byte of
//! the request written to the last byte of the answer read: every wait (writing the body,
//! the answer's head, each read) polls the stream together with a monotonic-clock deadline.
//! A caller working under a lease knows from this that one call ends within `timeout`.

use std::time::Duration;

use wasi::clocks::monotonic_clock;
use wasi::http::outgoing_handler;
use wasi::http::types::{ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme};
use wasi::io::poll::{poll, Pollable};
use wasi::io::streams::StreamError;

/// Waits until `ready` is, or the monotonic clock passes `deadline` (then: timed out).
fn wait(ready: &Pollable, deadline: u64) -> Result<(), HttpError> {
    if ready.ready() {
        return Ok(());
    }
    let timer = monotonic_clock::subscribe_instant(deadline);
    let woke = poll(&[ready, &timer]);
    if woke.contains(&0) {
        Ok(())
    } else {
        Err(HttpError::Timeout)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Why no answer came. Details never include headers (they carry credentials).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("timed out")]
    Timeout,
    #[error("could not connect: {0}")]
    Connect(String),
    /// The host refused the call (not in `allowed_outbound_hosts`) or the request was invalid.
    #[error("request refused: {0}")]
    Refused(String),
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Other(String),
}

impl HttpError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, HttpError::Timeout | HttpError::Connect(_) | HttpError::Other(_))
    }
}

/// One request.
pub struct Request<'a> {
    pub method: &'a str,
    pub url: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
    pub timeout: Duration,
    /// Answers longer than this are refused (the APIs we call answer small JSON).
    pub max_response: usize,
}

fn split_url(url: &str) -> Result<(Scheme, &str, &str), HttpError> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("https://") {
        (Scheme::Https, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (Scheme::Http, r)
    } else {
        return Err(HttpError::Refused("URL must start with http:// or https://".into()));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok((scheme, authority, path))
}

fn error_code(e: ErrorCode) -> HttpError {
    match e {
        ErrorCode::ConnectionTimeout | ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => {
            HttpError::Timeout
        }
        ErrorCode::ConnectionRefused
        | ErrorCode::DnsTimeout
        | ErrorCode::DnsError(_)
        | ErrorCode::DestinationNotFound
        | ErrorCode::DestinationUnavailable
        | ErrorCode::ConnectionTerminated
        | ErrorCode::TlsProtocolError => HttpError::Connect(format!("{e:?}")),
        ErrorCode::HttpRequestDenied | ErrorCode::HttpRequestUriInvalid => HttpError::Refused(format!("{e:?}")),
        other => HttpError::Other(format!("{other:?}")),
    }
}

/// Sends `req` and reads the whole answer, in a client span of the current trace whose
/// `traceparent` goes with the request (`crate::trace`).
pub fn send(req: &Request<'_>) -> Result<HttpResponse, HttpError> {
    let host = split_url(req.url).map(|(_, authority, _)| authority.to_string()).unwrap_or_default();
    crate::trace::in_span(req.method, crate::trace::Kind::Client, || {
        crate::trace::attr("http.request.method", req.method);
        crate::trace::attr("server.address", host.as_str());
        let answer = send_with(req, crate::trace::traceparent());
        match &answer {
            Ok(r) => crate::trace::status_code(r.status),
            Err(e) => crate::trace::fail(&e.to_string()),
        }
        answer
    })
}

/// Sends `req` outside any span: for exporting the spans themselves.
pub fn send_untraced(req: &Request<'_>) -> Result<HttpResponse, HttpError> {
    send_with(req, None)
}

fn send_with(req: &Request<'_>, traceparent: Option<String>) -> Result<HttpResponse, HttpError> {
    let (scheme, authority, path) = split_url(req.url)?;
    let mut entries: Vec<(String, Vec<u8>)> =
        req.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec())).collect();
    if let Some(tp) = traceparent {
        entries.retain(|(k, _)| k != "traceparent");
        entries.push(("traceparent".into(), tp.into_bytes()));
    }
    let fields = Fields::from_list(&entries).map_err(|e| HttpError::Refused(format!("header: {e:?}")))?;
    let request = OutgoingRequest::new(fields);
    let method = match req.method {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        other => Method::Other(other.to_string()),
    };
    let invalid = |what: &str| HttpError::Refused(format!("invalid {what}"));
    request.set_method(&method).map_err(|()| invalid("method"))?;
    request.set_scheme(Some(&scheme)).map_err(|()| invalid("scheme"))?;
    request.set_authority(Some(authority)).map_err(|()| invalid("host"))?;
    request.set_path_with_query(Some(path)).map_err(|()| invalid("path"))?;

    let nanos = req.timeout.as_nanos().min(u64::MAX as u128) as u64;
    let deadline = monotonic_clock::now().saturating_add(nanos);
    let options = RequestOptions::new();
    // Setting a timeout is optional for a host; one that refuses still answers eventually.
    let _ = options.set_connect_timeout(Some(nanos));
    let _ = options.set_first_byte_timeout(Some(nanos));
    let _ = options.set_between_bytes_timeout(Some(nanos));

    let outgoing_body = request.body().map_err(|()| HttpError::Other("request body unavailable".into()))?;
    // Hand the request over first, then stream the body: the host may not buffer a large body.
    let future = outgoing_handler::handle(request, Some(options)).map_err(error_code)?;
    {
        let stream = outgoing_body.write().map_err(|()| HttpError::Other("request body unavailable".into()))?;
        // A host closes the body stream when the request itself failed: its own timeout (the
        // per-phase ones below end with the deadline), a refused or reset connection. The
        // response then says which; or the deadline passes first. Only without either is it
        // the write's own failure (seen under Spin 4.0.2, whose first-byte timeout can close
        // the stream just before the deadline's own wait ends).
        let writing = |e: StreamError| match wait(&future.subscribe(), deadline) {
            Err(timed_out) => timed_out,
            Ok(()) => match future.get() {
                Some(Ok(Err(code))) => error_code(code),
                _ => HttpError::Connect(format!("writing body: {e:?}")),
            },
        };
        let ready = stream.subscribe();
        let mut rest = req.body;
        while !rest.is_empty() {
            wait(&ready, deadline)?;
            let n = (stream.check_write().map_err(writing)? as usize).min(rest.len());
            if n > 0 {
                stream.write(&rest[..n]).map_err(writing)?;
                rest = &rest[n..];
            }
        }
        // Nothing to flush without a body: the host may already have closed the stream of a
        // GET once its answer came (Spin 3.6.3 does), which is no error.
        if !req.body.is_empty() {
            stream.flush().map_err(writing)?;
            wait(&ready, deadline)?;
            match stream.check_write() {
                // Closed after the last byte went out: the server answered without reading on.
                Ok(_) | Err(StreamError::Closed) => {}
                Err(e) => return Err(writing(e)),
            }
        }
    }
    OutgoingBody::finish(outgoing_body, None).map_err(error_code)?;

    wait(&future.subscribe(), deadline)?;
    let response = match future.get() {
        Some(Ok(Ok(r))) => r,
        Some(Ok(Err(e))) => return Err(error_code(e)),
        Some(Err(())) | None => return Err(HttpError::Other("response already taken".into())),
    };
    let status = response.status();
    let headers = response
        .headers()
        .entries()
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), String::from_utf8_lossy(&v).into_owned()))
        .collect();
    let body = response.consume().map_err(|()| HttpError::Other("response body unavailable".into()))?;
    let stream = body.stream().map_err(|()| HttpError::Other("response body unavailable".into()))?;
    let mut bytes = Vec::new();
    let ready = stream.subscribe();
    loop {
        wait(&ready, deadline)?;
        match stream.read(64 * 1024) {
            Ok(chunk) => {
                if bytes.len() + chunk.len() > req.max_response {
                    return Err(HttpError::TooLarge(req.max_response));
                }
                bytes.extend_from_slice(&chunk);
            }
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(HttpError::Connect(format!("reading answer: {}", e.to_debug_string())))
            }
        }
    }
    Ok(HttpResponse { status, headers, body: bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        let (s, a, p) = split_url("https://graph.facebook.com/v24.0/1/messages").unwrap();
        assert!(matches!(s, Scheme::Https));
        assert_eq!((a, p), ("graph.facebook.com", "/v24.0/1/messages"));
        let (s, a, p) = split_url("http://127.0.0.1:9000").unwrap();
        assert!(matches!(s, Scheme::Http));
        assert_eq!((a, p), ("127.0.0.1:9000", "/"));
        assert_eq!(split_url("http://h?x=1").unwrap().2, "?x=1");
        assert!(split_url("ftp://h/x").is_err());
    }
}
