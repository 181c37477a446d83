//! Traces across the event pipeline: one trace from the webhook through the outbox and Redis
//! to the consumer and its call to WhatsApp, Astria or Stripe.
//!
//! Why the components record spans themselves: Spin traces each trigger on its own (set
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), and continues an incoming `traceparent` over HTTP, but a
//! Redis message carries no trace context, so a consumer's host spans start a new trace. The
//! guest interface that would let a component open spans under the host's (`wasi:otel`) is
//! linked only with `spin up --experimental-wasi-otel`, which SpinKube's shim does not pass:
//! a component importing it would not start in production. So each invocation here keeps its
//! own spans, parented through the W3C `traceparent` (`astria_domain::trace`) that every event
//! envelope stores, and posts them as OTLP/HTTP protobuf (`opentelemetry-proto`'s types) to
//! `{otel_collector_url}/v1/traces` when `otel_traces_enabled` is `true`.
//!
//! The state is per instance (Spin and devhost make one instance per request or message, and
//! a component is single-threaded): [`Invocation::begin`] starts it, dropping the
//! [`Invocation`] ends the root span and exports. [`crate::log`] reads the trace id and the
//! order id from here, so every log line of an invocation carries them.
//!
//! Spans carry no secrets and no phone numbers: routes, channels, event ids and types, order
//! ids, hosts and status codes only.

use std::cell::RefCell;
use std::time::Duration;

use astria_domain::trace::SpanContext;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;

/// What a span stands for (OpenTelemetry's span kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Handling an incoming HTTP request.
    Server,
    /// Handling one message from a Redis channel.
    Consumer,
    /// A call out to another service.
    Client,
    Internal,
}

impl Kind {
    fn otlp(self) -> span::SpanKind {
        match self {
            Kind::Server => span::SpanKind::Server,
            Kind::Consumer => span::SpanKind::Consumer,
            Kind::Client => span::SpanKind::Client,
            Kind::Internal => span::SpanKind::Internal,
        }
    }
}

#[derive(Clone)]
struct Open {
    context: SpanContext,
    parent: Option<[u8; 8]>,
    /// The parent came from elsewhere: a caller's header, an event, a queued message.
    remote_parent: bool,
    name: String,
    kind: Kind,
    start_ns: u64,
    attributes: Vec<KeyValue>,
    error: Option<String>,
}

struct State {
    service: &'static str,
    /// Whether the spans go to the collector: not for reads that come every few seconds
    /// (health probes, metrics scrapes, the console), whose log lines still carry a trace id.
    export: bool,
    /// The open spans, innermost last; the first is the invocation's root.
    open: Vec<Open>,
    done: Vec<Span>,
    order_id: Option<String>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Random bytes from the host's random source (wasi:random), through UUID v4: 122 random bits
/// per UUID, plenty for ids that only need to be unique.
fn random<const N: usize>() -> [u8; N] {
    let mut out = [0; N];
    for chunk in out.chunks_mut(16) {
        let u = uuid::Uuid::new_v4();
        chunk.copy_from_slice(&u.as_bytes()[..chunk.len()]);
    }
    out
}

fn string_attr(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

fn int_attr(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(any_value::Value::IntValue(value)) }),
        ..Default::default()
    }
}

/// The work of one request or one Redis message, traced. Dropping it ends the root span and
/// exports every span of the invocation.
#[must_use = "the invocation's spans are exported when it is dropped"]
pub struct Invocation(());

impl Invocation {
    /// Starts the invocation's root span, a child of `parent` (a `traceparent` value) when that
    /// is valid, else the root of a new trace.
    pub fn begin(service: &'static str, name: &str, kind: Kind, parent: Option<&str>) -> Invocation {
        let parent = parent.and_then(SpanContext::parse);
        let context = match parent {
            Some(p) => p.child(random()),
            None => SpanContext::root(random()),
        };
        let root = Open {
            context,
            parent: parent.map(|p| p.span_id),
            remote_parent: parent.is_some(),
            name: name.to_string(),
            kind,
            start_ns: now_ns(),
            attributes: Vec::new(),
            error: None,
        };
        STATE.with(|s| {
            *s.borrow_mut() = Some(State { service, export: true, open: vec![root], done: Vec::new(), order_id: None })
        });
        Invocation(())
    }

    /// An incoming HTTP request: `METHOD /path`, continuing the caller's `traceparent`.
    pub fn http(service: &'static str, method: &str, path: &str, traceparent: Option<&str>) -> Invocation {
        let inv = Invocation::begin(service, &format!("{method} {path}"), Kind::Server, traceparent);
        attr("http.request.method", method);
        attr("url.path", path);
        inv
    }

    /// An incoming request of a Spin HTTP handler; `path` without the query (it may carry
    /// tokens).
    pub fn incoming(service: &'static str, req: &spin_sdk::http::IncomingRequest, path: &str) -> Invocation {
        Invocation::http(service, &req.method().to_string(), path, crate::header(req, "traceparent").as_deref())
    }

    /// Keeps the spans from the collector when `export` is false; the log lines still carry
    /// the trace id.
    pub fn exported(self, export: bool) -> Invocation {
        self.set_exported(export);
        self
    }

    /// [`Invocation::exported`], decided once the work is known (a refused request exports
    /// nothing).
    pub fn set_exported(&self, export: bool) {
        STATE.with(|s| {
            if let Some(st) = s.borrow_mut().as_mut() {
                st.export = export;
            }
        });
    }

    /// Records the answer's status on the root span, and passes the answer on.
    pub fn answered(&self, response: spin_sdk::http::Response) -> spin_sdk::http::Response {
        status_code(*response.status());
        response
    }

    /// Runs a Redis handler as this invocation's work: an error marks the root span failed (the
    /// log says why; the relay delivers the event again).
    pub fn run<T, E>(&self, handler: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let result = handler();
        if result.is_err() {
            fail("the handler failed; the event is delivered again by the relay");
        }
        result
    }

    /// One Redis message: `process <channel>`, continuing the trace of the span that emitted
    /// the event. A payload that is no envelope starts a new trace (and is dropped by the
    /// caller, which logs why under this trace).
    pub fn message(service: &'static str, channel: &str, payload: &[u8]) -> Invocation {
        #[derive(serde::Deserialize)]
        struct Head {
            id: Option<String>,
            event_type: Option<String>,
            traceparent: Option<String>,
        }
        let head = serde_json::from_slice::<Head>(payload).ok();
        let parent = head.as_ref().and_then(|h| h.traceparent.as_deref());
        let inv = Invocation::begin(service, &format!("process {channel}"), Kind::Consumer, parent);
        attr("messaging.system", "redis");
        attr("messaging.destination.name", channel);
        // Anyone who can publish on Redis writes these: a span keeps a bounded part.
        let bounded = |v: String| v.chars().take(128).collect::<String>();
        if let Some(h) = head {
            if let Some(id) = h.id {
                attr("messaging.message.id", bounded(id));
            }
            if let Some(t) = h.event_type {
                attr("astria.event_type", bounded(t));
            }
        }
        inv
    }
}

impl Drop for Invocation {
    fn drop(&mut self) {
        // End every span, but keep the root open while exporting: a failed export's log line
        // then carries the trace id of the work it describes. Spans that are not exported are
        // never built (a health probe or a scrape pays for nothing but the ids).
        let ended = STATE.with(|s| {
            let mut s = s.borrow_mut();
            let st = s.as_mut()?;
            if !st.export {
                return None;
            }
            while st.open.len() > 1 {
                st.end_innermost();
            }
            let root = finish(st.open.first()?.clone(), &st.order_id);
            let mut spans = std::mem::take(&mut st.done);
            spans.push(root);
            Some((st.service, spans))
        });
        if let Some((service, spans)) = ended {
            export(service, spans);
        }
        STATE.with(|s| s.borrow_mut().take());
    }
}

impl State {
    /// Ends the innermost open span: into `done` when the invocation is exported, otherwise
    /// just closed. The one place a child span ends, whether its work returned or the
    /// invocation ended around it.
    fn end_innermost(&mut self) {
        if let Some(open) = self.open.pop() {
            if self.export {
                let span = finish(open, &self.order_id);
                self.done.push(span);
            }
        }
    }
}

fn finish(open: Open, order_id: &Option<String>) -> Span {
    let mut attributes = open.attributes;
    if let Some(order) = order_id {
        attributes.push(string_attr("astria.order_id", order.clone()));
    }
    let status = match open.error {
        Some(message) => Status { code: status::StatusCode::Error as i32, message },
        None => Status::default(),
    };
    Span {
        trace_id: open.context.trace_id.to_vec(),
        span_id: open.context.span_id.to_vec(),
        parent_span_id: open.parent.map(|p| p.to_vec()).unwrap_or_default(),
        // Bits 0-7: the W3C trace flags; bit 8: whether the parent is remote is known; bit 9: it is.
        flags: u32::from(open.context.sampled) | 0x100 | if open.remote_parent { 0x200 } else { 0 },
        name: open.name,
        kind: open.kind.otlp() as i32,
        start_time_unix_nano: open.start_ns,
        end_time_unix_nano: now_ns().max(open.start_ns),
        attributes,
        status: Some(status),
        ..Default::default()
    }
}

fn with_innermost<T>(f: impl FnOnce(&mut Open) -> T) -> Option<T> {
    STATE.with(|s| s.borrow_mut().as_mut().and_then(|st| st.open.last_mut().map(f)))
}

/// The `traceparent` naming the innermost open span: what an event emitted now stores and an
/// outbound call sends.
pub fn traceparent() -> Option<String> {
    with_innermost(|o| o.context.traceparent())
}

/// The current trace's id (32 hex digits), for log lines.
pub fn trace_id() -> Option<String> {
    with_innermost(|o| o.context.trace_id_hex())
}

/// Ties the rest of the invocation to an order: its log lines and its spans name it.
pub fn set_order(order_id: &str) {
    STATE.with(|s| {
        if let Some(st) = s.borrow_mut().as_mut() {
            st.order_id = Some(order_id.to_string());
        }
    })
}

/// The order the invocation works on, once known.
pub fn order_id() -> Option<String> {
    STATE.with(|s| s.borrow().as_ref().and_then(|st| st.order_id.clone()))
}

/// A string attribute on the innermost open span.
pub fn attr(key: &str, value: impl Into<String>) {
    let kv = string_attr(key, value);
    with_innermost(|o| o.attributes.push(kv));
}

/// The HTTP status the innermost span answered or received; 5xx marks it failed (a 4xx is the
/// caller's error, not this span's, for a server; for a client call it is recorded as is).
pub fn status_code(code: u16) {
    with_innermost(|o| {
        o.attributes.push(int_attr("http.response.status_code", i64::from(code)));
        if code >= 500 || (o.kind == Kind::Client && code >= 400) {
            o.error.get_or_insert_with(|| format!("HTTP {code}"));
        }
    });
}

/// Marks the innermost span failed, with a reason free of secrets.
pub fn fail(reason: &str) {
    with_innermost(|o| o.error = Some(reason.to_string()));
}

/// Runs `f` in a child span of the innermost open span; outside an invocation, just runs it.
pub fn in_span<T>(name: &str, kind: Kind, f: impl FnOnce() -> T) -> T {
    in_span_under(None, name, kind, f)
}

/// Like [`in_span`], but a child of `parent` (a `traceparent`) when that is valid: for work
/// this invocation does on behalf of another trace, as the sender does when it delivers a
/// message another invocation queued.
pub fn in_span_under<T>(parent: Option<&str>, name: &str, kind: Kind, f: impl FnOnce() -> T) -> T {
    let remote = parent.and_then(SpanContext::parse);
    let opened = STATE.with(|s| {
        let mut s = s.borrow_mut();
        let Some(st) = s.as_mut() else { return false };
        let Some(parent) = remote.or_else(|| st.open.last().map(|o| o.context)) else { return false };
        st.open.push(Open {
            context: parent.child(random()),
            parent: Some(parent.span_id),
            remote_parent: remote.is_some(),
            name: name.to_string(),
            kind,
            start_ns: now_ns(),
            attributes: Vec::new(),
            error: None,
        });
        true
    });
    let out = f();
    if opened {
        STATE.with(|s| {
            if let Some(st) = s.borrow_mut().as_mut() {
                st.end_innermost();
            }
        });
    }
    out
}

/// How long the export may take; a slow collector must not hold a webhook's answer.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Posts the spans to the collector when tracing is on. Best effort: a failed export is
/// logged and the work it describes stands.
fn export(service: &str, spans: Vec<Span>) {
    // Natively (unit tests, the benchmark's reference server) there is no Spin host to ask.
    if cfg!(not(target_arch = "wasm32")) {
        return;
    }
    if spans.is_empty() {
        return;
    }
    let base = match astria_domain::config::tracing(&crate::SpinVars) {
        Ok(Some(base)) => base,
        Ok(None) => return,
        Err(e) => return crate::log::warn("trace.export", &format!("{e}; spans dropped")),
    };
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![string_attr("service.name", service), string_attr("service.namespace", "astria-bot")],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "astria-bot/spin-kit".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    };
    let body = request.encode_to_vec();
    let url = format!("{}/v1/traces", base.trim_end_matches('/'));
    let answer = crate::http_client::send_untraced(&crate::http_client::Request {
        method: "POST",
        url: &url,
        headers: &[("content-type", "application/x-protobuf")],
        body: &body,
        timeout: EXPORT_TIMEOUT,
        max_response: 64 * 1024,
    });
    match answer {
        Ok(r) if (200..300).contains(&r.status) => {}
        Ok(r) => crate::log::warn("trace.export", &format!("the collector answered {}; spans dropped", r.status)),
        Err(e) => crate::log::warn("trace.export", &format!("spans dropped: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_continues_the_trace_its_event_names_and_nests_its_calls() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let payload = format!(
            r#"{{"id":"e1","event_type":"order.paid","occurred_at":"x","correlation_id":"c","payload":"{{}}","traceparent":"{parent}"}}"#
        );
        let inv = Invocation::message("test", "astria.orders", payload.as_bytes());
        assert_eq!(trace_id().as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        let root = traceparent().unwrap();
        let inner = in_span("POST", Kind::Client, || {
            status_code(502);
            traceparent().unwrap()
        });
        assert_ne!(inner, root);
        assert_eq!(inner[..36], root[..36], "same trace");
        set_order("o-1");
        assert_eq!(order_id().as_deref(), Some("o-1"));
        let spans = STATE.with(|s| {
            let st = s.borrow();
            let st = st.as_ref().unwrap();
            (st.done.len(), st.done[0].parent_span_id.clone(), st.done[0].status.clone().unwrap().code)
        });
        assert_eq!(spans.0, 1);
        assert_eq!(hex_of(&spans.1), root[36..52]);
        assert_eq!(spans.2, status::StatusCode::Error as i32);
        drop(inv);
        assert_eq!(trace_id(), None, "the invocation's state ends with it");
    }

    #[test]
    fn a_failed_handler_fails_its_span_and_long_ids_are_cut() {
        let payload = format!(r#"{{"id":"{}","event_type":"order.paid"}}"#, "x".repeat(5000));
        let inv = Invocation::message("test", "astria.orders", payload.as_bytes());
        let root_error = || STATE.with(|s| s.borrow().as_ref().unwrap().open[0].error.clone());
        let id = STATE.with(|s| {
            let st = s.borrow();
            let kv =
                st.as_ref().unwrap().open[0].attributes.iter().find(|kv| kv.key == "messaging.message.id").cloned();
            match kv.and_then(|kv| kv.value).and_then(|v| v.value) {
                Some(any_value::Value::StringValue(v)) => v,
                other => panic!("{other:?}"),
            }
        });
        assert_eq!(id, "x".repeat(128));
        assert_eq!(inv.run(|| Ok::<_, ()>(())), Ok(()));
        assert_eq!(root_error(), None);
        assert_eq!(inv.run(|| Err::<(), _>("boom")), Err("boom"));
        assert!(root_error().is_some());
    }

    #[test]
    fn without_a_valid_parent_a_new_trace_starts() {
        let _inv = Invocation::message("test", "astria.orders", b"not json");
        let a = trace_id().unwrap();
        drop(_inv);
        let _inv = Invocation::http("test", "POST", "/SmsReceived", Some("00-zz"));
        assert_ne!(trace_id().unwrap(), a);
        assert_eq!(trace_id().unwrap().len(), 32);
    }

    #[test]
    fn spans_of_an_invocation_that_is_not_exported_are_never_built() {
        let inv = Invocation::http("test", "GET", "/health/test", None).exported(false);
        let inner = in_span("SELECT", Kind::Client, || traceparent());
        assert!(inner.is_some(), "ids still exist for the log lines");
        let done = STATE.with(|s| s.borrow().as_ref().unwrap().done.len());
        assert_eq!(done, 0, "a closed child span of an unexported invocation is not built");
        drop(inv);
        assert_eq!(trace_id(), None);
    }

    #[test]
    fn child_spans_name_the_order_once_it_is_known() {
        let _inv = Invocation::http("test", "POST", "/payment-received", None);
        set_order("o-7");
        in_span("POST", Kind::Client, || ());
        let attrs = STATE.with(|s| s.borrow().as_ref().unwrap().done[0].attributes.clone());
        let order = attrs.iter().find(|kv| kv.key == "astria.order_id").and_then(|kv| kv.value.clone());
        assert_eq!(order.and_then(|v| v.value), Some(any_value::Value::StringValue("o-7".into())));
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
