//! Outbound HTTP (`wasi:http/outgoing-handler`) as Spin does it: checked against
//! `allowed_outbound_hosts`, and served in-process for `http://<component>.spin.internal`.

use std::future::Future;
use std::sync::Arc;

use http_body_util::BodyExt;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

use super::ComponentCtx;
use crate::app::App;

pub struct OutboundHttp {
    pub app: Arc<App>,
    pub ctx: Arc<ComponentCtx>,
}

type IoFuture = Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>;
type SendFuture =
    Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), wasmtime_wasi_http::Error>> + Send>;

impl WasiHttpHooks for OutboundHttp {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> SendFuture {
        let uri = request.uri().clone();
        let scheme = uri.scheme_str().unwrap_or("http").to_string();
        let host = uri.host().unwrap_or_default().to_ascii_lowercase();
        let port = uri.port_u16();
        let ctx = self.ctx.clone();
        let app = self.app.clone();
        Box::new(async move {
            if !ctx.allowed_hosts.allows(&scheme, &host, port) {
                tracing::warn!(component = %ctx.id, "outbound HTTP to {scheme}://{host} denied by allowed_outbound_hosts");
                return Err(wasmtime_wasi_http::Error::HttpRequestDenied);
            }
            if let Some(target) = host.strip_suffix(".spin.internal") {
                if scheme != "http" {
                    return Err(wasmtime_wasi_http::Error::HttpRequestDenied);
                }
                let mut request = request;
                request.headers_mut().remove(http::header::HOST);
                let response = app.chain(target, request).await.map_err(|e| {
                    tracing::warn!(component = %ctx.id, "service chaining to '{target}' failed: {e:#}");
                    wasmtime_wasi_http::Error::DestinationNotFound
                })?;
                let io: IoFuture = Box::new(async { Ok(()) });
                return Ok((response, io));
            }
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            let io: IoFuture = Box::new(io);
            Ok((response.map(|b| b.boxed_unsync()), io))
        })
    }
}
