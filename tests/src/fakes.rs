//! A bare fake HTTP server (`wiremock`) for tests of the host and of the app's outbound calls
//! that need no fake of a real party (devhost's outbound checks, a collector that refuses
//! spans). A mock given `.expect(n)` is verified when the server is dropped.
//!
//! The parties the app talks to have fakes of their own that behave like them and record
//! what they received, for the tests to assert on: `whatsapp.rs`, `stripe.rs`, `astria.rs`,
//! all started together by `world.rs`.

pub use wiremock::matchers;
pub use wiremock::{Mock, MockServer, ResponseTemplate};

/// Starts a fake server on a free loopback port.
pub async fn fake_server() -> MockServer {
    MockServer::start().await
}

/// `http://127.0.0.1:<port>`: the form `allowed_outbound_hosts` and URL variables take.
pub fn base_url(server: &MockServer) -> String {
    server.uri()
}

/// Just the port, for `allowed_outbound_hosts = ["http://127.0.0.1:{{ fake_port }}"]`.
pub fn port(server: &MockServer) -> u16 {
    server.address().port()
}
