//! WhatsApp Cloud API, each direction in its own module: what Meta sends us (`webhook`: the
//! handshake, the signature, the envelope's messages, statuses and preferences, and who a
//! customer is), what we send (`send`: request bodies and what an answer means), and the
//! customer's photos (`media`). Pure: the components do the HTTP.

pub mod media;
pub mod send;
pub mod webhook;

pub use webhook::*;
