//! astria-bot's domain: the rules, with no knowledge of Spin, wasmtime, HTTP or SQL.
//!
//! Components parse external input into these types at the edge, ask the domain what to do,
//! and perform the I/O it decides. Everything here is pure and tested natively.

pub mod astria;
pub mod config;
pub mod conversation;
pub mod events;
pub mod money;
pub mod order;
pub mod stripe;
pub mod texts;
pub mod trace;
pub mod whatsapp;

/// Whether a JSON body carries a NUL character (`\u0000`). No webhook sender uses one in real
/// data, and PostgreSQL refuses it in text (SQLSTATE 22021): parsers refuse such bodies as
/// malformed at the edge, so that it costs a 400 instead of a failed transaction.
pub fn has_nul_escape(raw: &[u8]) -> bool {
    raw.contains(&0) || raw.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000"))
}

pub use money::{Money, MoneyError};
pub use order::{check_payment, PaymentCheck, TransitionError};
