//! Structured logs: one JSON object per line on stderr, which Spin and devhost collect per
//! component. Callers pass no secrets; values of secret variables are also redacted by the host.

fn line(level: &str, target: &str, message: &str) {
    let obj = serde_json::json!({ "level": level, "target": target, "message": message });
    eprintln!("{obj}");
}

pub fn info(target: &str, message: &str) {
    line("info", target, message);
}

pub fn warn(target: &str, message: &str) {
    line("warn", target, message);
}

pub fn error(target: &str, message: &str) {
    line("error", target, message);
}
