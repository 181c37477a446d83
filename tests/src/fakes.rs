//! Fake external HTTP servers for tests, built on `wiremock`: each test declares what it
//! expects (`.expect(n)`), and the expectations are verified when the server is dropped.

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
