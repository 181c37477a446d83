//! astria-bot's domain: the rules, with no knowledge of Spin, wasmtime, HTTP or SQL.
//!
//! Components parse external input into these types at the edge, ask the domain what to do,
//! and perform the I/O it decides. Everything here is pure and tested natively.

pub mod astria;
pub mod config;
pub mod conversation;
pub mod events;
pub mod graph;
pub mod money;
pub mod order;
pub mod stripe;
pub mod texts;
pub mod whatsapp;

pub use money::{Money, MoneyError};
pub use order::{check_payment, PaymentCheck, TransitionError};
