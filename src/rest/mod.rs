//! The Open Inference Protocol (KServe v2) over HTTP/REST, on a port of its own, for clients
//! such as `tritonclient.http`, curl and KServe's REST routing. See docs/http.md.
//!
//! Connections are accepted like the gRPC port's ([`crate::connections::accept`]): at most
//! `max_connections` at once, each cut once the server closes. Each is served by hyper's
//! HTTP/1.1 with bounded request headers (`max_header_list_bytes`) that must arrive within the
//! handshake timeout, over TLS when the server has it.

pub mod codec;
mod repository;
pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::connections::{accept, ConnectionLimits};
use crate::kserve::InferenceService;
use crate::security::{ApiKey, TlsConfig};
use crate::service::ServingState;

/// hyper's smallest read buffer: the header limit is raised to it when configured lower.
const MIN_HEADER_BUFFER: usize = 8192;

/// The HTTP port's settings, from the same config as the gRPC port's.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    pub api_key: Option<ApiKey>,
    pub tls: Option<TlsConfig>,
    pub connections: ConnectionLimits,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
}

/// The HTTP port, ready to serve: routes built and TLS files read.
pub struct HttpServer {
    router: axum::Router,
    tls: Option<TlsAcceptor>,
    connections: ConnectionLimits,
}

impl HttpServer {
    pub fn new(state: Arc<ServingState>, options: HttpOptions) -> anyhow::Result<Self> {
        let tls = match &options.tls {
            Some(tls) => Some(TlsAcceptor::from(Arc::new(tls.rustls_config()?))),
            None => None,
        };
        let app = routes::App {
            inference: InferenceService::new(state.clone()),
            state,
            api_key: options.api_key,
            max_body_bytes: options.max_body_bytes,
        };
        Ok(Self {
            router: routes::router(Arc::new(app)),
            tls,
            connections: options.connections,
        })
    }

    /// Serves `listener` until `closed` turns true, which also cuts every open connection.
    pub async fn serve(self, listener: TcpListener, closed: watch::Receiver<bool>) {
        let handshake = Duration::from_secs(self.connections.handshake_timeout_secs);
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(handshake)
            .max_buf_size((self.connections.max_header_list_bytes as usize).max(MIN_HEADER_BUFFER));
        let incoming = accept(listener, self.connections, closed.clone());
        let mut incoming = std::pin::pin!(incoming);
        let mut stop = closed;
        loop {
            let connection = tokio::select! {
                next = incoming.next() => next,
                _ = stop.wait_for(|closed| *closed) => break,
            };
            let Some(Ok(connection)) = connection else {
                break;
            };
            let (http, router, tls) = (http.clone(), self.router.clone(), self.tls.clone());
            tokio::spawn(async move {
                match tls {
                    None => serve_connection(&http, connection, router).await,
                    Some(tls) => {
                        match tokio::time::timeout(handshake, tls.accept(connection)).await {
                            Ok(Ok(stream)) => serve_connection(&http, stream, router).await,
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("no TLS handshake within the timeout"),
                        }
                    }
                }
            });
        }
    }
}

async fn serve_connection<IO>(http: &http1::Builder, io: IO, router: axum::Router)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    if let Err(e) = http.serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(error = %e, "HTTP connection ended");
    }
}
