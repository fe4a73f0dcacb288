//! `keel demo`: three named backends on loopback behind a balancer, so a newcomer can watch
//! keel balance, check health and drain with nothing but `curl`.
//!
//! The backends are tiny hyper servers inside the same process; each answers with its own
//! name, and `/healthz` answers 200. The balancer is the real daemon, configured from an
//! embedded config (printed at start) rather than a file.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::{self, NodeFile};

/// Names of the demo backends.
pub const BACKENDS: [&str; 3] = ["backend-1", "backend-2", "backend-3"];

/// Starts one demo backend on an ephemeral loopback port; it runs until the process exits.
pub async fn start_backend(name: &'static str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| async move {
                    let body = if req.uri().path() == "/healthz" {
                        "ok\n".to_owned()
                    } else {
                        format!("Hello from {name} ({addr}), you asked for {}\n", req.uri().path())
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    resp.headers_mut().insert("x-backend", http::HeaderValue::from_static(name));
                    Ok::<_, Infallible>(resp)
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(addr)
}

/// The demo's config for backends at `backends`, listening on `listen` with the admin API on
/// `admin`.
pub fn config_text(listen: SocketAddr, admin: SocketAddr, backends: &[SocketAddr]) -> String {
    let mut text = format!(
        r#"[node]
admin = "{admin}"
drain_timeout = "5s"

[listeners.web]
bind = "{listen}"
protocol = "http"
default_pool = "demo"
access_log = {{ destination = "stdout" }}

[pools.demo]
algorithm = "round_robin"
retries = 2

[pools.demo.health]
type = "http"
path = "/healthz"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 2
"#
    );
    for (name, addr) in BACKENDS.iter().zip(backends) {
        text.push_str(&format!("\n[[pools.demo.servers]]\nname = \"{name}\"\naddress = \"{addr}\"\n"));
    }
    text
}

/// Starts the backends and returns the parsed demo config, with its text for display.
pub async fn prepare(listen: SocketAddr, admin: SocketAddr) -> anyhow::Result<(NodeFile, String)> {
    let mut addrs = Vec::new();
    for name in BACKENDS {
        addrs.push(start_backend(name).await?);
    }
    let text = config_text(listen, admin, &addrs);
    let file = config::parse(&text, "<demo>")?;
    Ok((file, text))
}

/// What to try, printed once the demo is up.
pub fn banner(listen: SocketAddr, admin: SocketAddr) -> String {
    format!(
        "\nkeel demo is running: three backends behind http://{listen}/\n\n\
         Try:\n  \
         for i in 1 2 3 4 5 6; do curl -s http://{listen}/; done      # round robin over backend-1..3\n  \
         curl -s http://{admin}/status                                 # pools, servers, health, counters (JSON)\n  \
         curl -s http://{admin}/metrics | grep keel_requests_total     # Prometheus metrics\n  \
         curl -s -X POST http://{admin}/pools/demo/servers/backend-2/drain   # take backend-2 out\n  \
         curl -s -X POST http://{admin}/pools/demo/servers/backend-2/enable  # and back in\n  \
         open http://{admin}/ in a browser for the live dashboard\n\n\
         Ctrl-C stops it.\n"
    )
}
