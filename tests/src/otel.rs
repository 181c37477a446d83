//! A fake OpenTelemetry collector: an OTLP/HTTP receiver on `POST /v1/traces` that takes
//! protobuf (the OTLP default) and decodes it with `opentelemetry-proto`, as a collector would,
//! so that a test can follow one trace through the services. Anything a real receiver would
//! refuse (another content type, a body that is not an `ExportTraceServiceRequest`) is
//! refused here too, and shows up as spans that never arrive.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// One span as received, ids in hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    pub name: String,
    /// OTLP span kind: 1 internal, 2 server, 3 client, 5 consumer.
    pub kind: i32,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a trace's root.
    pub parent_span_id: String,
    pub attributes: BTreeMap<String, String>,
    /// The error status's message, when the span failed.
    pub error: Option<String>,
    /// What the span's flags say of its parent: `Some(true)` when it came from another
    /// process or invocation (a header, an event), `None` when the flags do not say.
    pub remote_parent: Option<bool>,
}

pub const INTERNAL: i32 = 1;
pub const SERVER: i32 = 2;
pub const CLIENT: i32 = 3;
pub const CONSUMER: i32 = 5;

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

struct Decode;

impl Respond for Decode {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let protobuf = request
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-protobuf"));
        if !protobuf {
            return ResponseTemplate::new(415);
        }
        match ExportTraceServiceRequest::decode(request.body.as_slice()) {
            Ok(_) => ResponseTemplate::new(200)
                .insert_header("content-type", "application/x-protobuf")
                .set_body_bytes(ExportTraceServiceResponse::default().encode_to_vec()),
            Err(_) => ResponseTemplate::new(400),
        }
    }
}

pub struct FakeCollector {
    pub server: MockServer,
}

impl FakeCollector {
    pub async fn start() -> FakeCollector {
        let server = MockServer::start().await;
        Mock::given(wiremock::matchers::method("POST"))
            .and(wiremock::matchers::path("/v1/traces"))
            .respond_with(Decode)
            .mount(&server)
            .await;
        FakeCollector { server }
    }

    /// `http://127.0.0.1:<port>`: the value of `otel_collector_url`.
    pub fn url(&self) -> String {
        self.server.uri()
    }

    /// Every span of every export accepted so far.
    pub async fn spans(&self) -> Vec<ReceivedSpan> {
        let mut out = Vec::new();
        for request in self.server.received_requests().await.unwrap_or_default() {
            let Ok(export) = ExportTraceServiceRequest::decode(request.body.as_slice()) else { continue };
            for rs in export.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|kv| kv.key == "service.name")
                    .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                    .unwrap_or_default();
                for span in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                    let error = span.status.as_ref().filter(|s| s.code == 2).map(|s| s.message.clone());
                    out.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        kind: span.kind,
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent_span_id: hex::encode(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .into_iter()
                            .map(|kv| (kv.key, text(kv.value.as_ref().and_then(|v| v.value.as_ref()))))
                            .collect(),
                        error,
                        remote_parent: (span.flags & 0x100 != 0).then_some(span.flags & 0x200 != 0),
                    });
                }
            }
        }
        out
    }
}

fn text(v: Option<&any_value::Value>) -> String {
    match v {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}
