//! Structured logs: one JSON object per line on stderr, which Spin and devhost collect per
//! component. Callers pass no secrets; values of secret variables are also redacted by the host.

fn line(level: &str, target: &str, correlation_id: Option<&str>, message: &str) {
    let obj = match correlation_id {
        Some(id) => serde_json::json!({ "level": level, "target": target, "correlation_id": id, "message": message }),
        None => serde_json::json!({ "level": level, "target": target, "message": message }),
    };
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
