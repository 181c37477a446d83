//! Structured logs: one JSON object per line on stderr, which Spin and devhost collect per
//! component. Callers pass no secrets; values of secret variables are also redacted by the host.
//! Inside a traced invocation each line also carries `trace_id`, and `order_id` once the
//! invocation knows its order.

fn line(level: &str, target: &str, correlation_id: Option<&str>, message: &str) {
    let mut obj = serde_json::json!({ "level": level, "target": target, "message": message });
    if let Some(id) = correlation_id {
        obj["correlation_id"] = id.into();
    }
    // The invocation's trace and order (`crate::trace`): one search finds every line of an
    // order across services, and the trace id leads to its spans.
    if let Some(trace_id) = crate::trace::trace_id() {
        obj["trace_id"] = trace_id.into();
    }
    if let Some(order_id) = crate::trace::order_id() {
        obj["order_id"] = order_id.into();
    }
    eprintln!("{obj}");
}

/// An error tied to a request or event id.
pub fn error_with(target: &str, correlation_id: &str, message: &str) {
    line("error", target, Some(correlation_id), message);
}

/// A line tied to a request or event id.
pub fn info_with(target: &str, correlation_id: &str, message: &str) {
    line("info", target, Some(correlation_id), message);
}

pub fn warn(target: &str, message: &str) {
    line("warn", target, None, message);
}
