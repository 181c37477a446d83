//! The wire formats of the app's three outside parties, written once: the test fakes
//! (`tests/src/{whatsapp,stripe,astria}.rs`) and the sandbox (`tools/sandbox`) both build what
//! they send and answer from here, so a change to what a party puts on the wire is made in one
//! place and seen by the tests and the sandbox alike.
//!
//! Only shapes and signatures live here; behaviour (scripts, fault switches, state) stays with
//! each fake.

pub mod astria;
pub mod stripe;
pub mod whatsapp;

/// Seconds since the Unix epoch, as all three parties write timestamps.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Lowercase hex SHA-256 of `bytes` (WhatsApp's media checksum).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
