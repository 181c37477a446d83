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

/// A TCP proxy to a local port that can go silent: after [`BlackHole::close`] it forwards
/// nothing more in either direction, yet keeps every connection open (no FIN, no RST), as a NAT
/// or a load balancer that dropped its state does. New connections are accepted and left
/// silent too.
pub struct BlackHole {
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    pub async fn start(upstream_port: u16) -> BlackHole {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = open.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    held.push(client);
                    continue;
                }
                let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await else { continue };
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::spawn(forward(cr, uw, flag.clone()));
                tokio::spawn(forward(ur, cw, flag.clone()));
            }
        });
        BlackHole { port, open, task }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// From now on nothing gets through, and nothing is closed.
    pub fn close(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` while `open`; once it is not, holds both ends open and silent.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !open.load(std::sync::atomic::Ordering::SeqCst) {
            // Silent from here on: keep the sockets (no FIN, no RST) and forward nothing.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
