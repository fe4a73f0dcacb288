//! gRPC for the tests: a real gRPC server ([`GrpcServer`], tonic's server half on hyper's HTTP/2
//! server) and a real gRPC client ([`GrpcClient`], tonic's `Channel`), both without generated
//! code: messages are raw bytes ([`BytesCodec`]), so no `protoc` and no prost are needed.
//!
//! The server's methods (service `test.Echo`, every message UTF-8 text):
//!
//! | method | kind | answer |
//! | --- | --- | --- |
//! | `Unary` | unary | `NAME:REQUEST`; `not-found` → status NOT_FOUND, message `no such thing` |
//! | `Count` | server streaming | request `N` or `N/MS`: N messages `NAME:I`, one every MS ms (default 0) |
//! | `Slow` | unary | `NAME:MS` after sleeping MS ms before the answer's head |
//! | `Join` | client streaming | `NAME:` + every message joined with `,` |
//! | `Chat` | bidirectional | `NAME:M` for each message M, as it arrives |
//! | `Hang` | server streaming | `NAME:open`, then nothing until the call is cancelled, which [`GrpcServer::cancelled`] counts |
//! | `Reset` | server streaming | `NAME:first`, then (100 ms later) RST_STREAM with ENHANCE_YOUR_CALM |
//!
//! and `grpc.health.v1.Health/Check`, answering SERVING or NOT_SERVING
//! ([`GrpcServer::set_serving`]) by hand-encoded protobuf.
//!
//! Like [`crate::Backend`], a server runs on its own thread and runtime (HTTP/2 only: h2c, or TLS
//! with ALPN `h2`); [`GrpcServer::stop`] ends that runtime, closing the listener and every
//! connection mid-stream, as dead as a crashed server.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use bytes::{Buf, BufMut, Bytes};
use futures_util::{Stream, StreamExt};
use http::uri::PathAndQuery;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder, Streaming};
use tonic::server::{ClientStreamingService, Grpc, ServerStreamingService, StreamingService, UnaryService};
use tonic::{Request, Response, Status};

use crate::backend::{bind, Running};

/// A codec whose messages are the raw bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> BytesCodec {
        BytesCodec
    }

    fn decoder(&mut self) -> BytesCodec {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

/// What a server has seen, kept across restarts.
#[derive(Debug, Default)]
struct State {
    name: String,
    /// Calls by method, health checks excluded.
    calls: AtomicU64,
    health_checks: AtomicU64,
    not_serving: AtomicBool,
    cancelled: AtomicU64,
    /// `te` header values seen on calls, for the test that keel keeps `te: trailers`.
    te_trailers: AtomicU64,
}

type BoxStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send + 'static>>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send + 'static>>;

fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn msg(name: &str, what: impl std::fmt::Display) -> Bytes {
    Bytes::from(format!("{name}:{what}"))
}

struct Unary(Arc<State>);

impl UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let body = text(request.get_ref());
            if body == "not-found" {
                return Err(Status::not_found("no such thing"));
            }
            Ok(Response::new(msg(&state.name, body)))
        })
    }
}

struct Slow(Arc<State>);

impl UnaryService<Bytes> for Slow {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let body = text(request.get_ref());
            let ms: u64 = body.parse().map_err(|_| Status::invalid_argument("Slow takes MS"))?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Response::new(msg(&state.name, body)))
        })
    }
}

struct Count(Arc<State>);

impl ServerStreamingService<Bytes> for Count {
    type Response = Bytes;
    type ResponseStream = BoxStream;
    type Future = BoxFuture<Response<BoxStream>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let body = text(request.get_ref());
            let (n, ms) = body.split_once('/').unwrap_or((&body, "0"));
            let n: u64 = n.parse().map_err(|_| Status::invalid_argument("Count takes N or N/MS"))?;
            let ms: u64 = ms.parse().map_err(|_| Status::invalid_argument("Count takes N or N/MS"))?;
            let stream = futures_util::stream::unfold(0, move |i| {
                let name = state.name.clone();
                async move {
                    if i >= n {
                        return None;
                    }
                    if i > 0 && ms > 0 {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    Some((Ok(msg(&name, i)), i + 1))
                }
            });
            Ok(Response::new(Box::pin(stream) as BoxStream))
        })
    }
}

struct Join(Arc<State>);

impl ClientStreamingService<Bytes> for Join {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let mut stream = request.into_inner();
            let mut parts = Vec::new();
            while let Some(m) = stream.message().await? {
                parts.push(text(&m));
            }
            Ok(Response::new(msg(&state.name, parts.join(","))))
        })
    }
}

struct Chat(Arc<State>);

impl StreamingService<Bytes> for Chat {
    type Response = Bytes;
    type ResponseStream = BoxStream;
    type Future = BoxFuture<Response<BoxStream>>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let name = state.name.clone();
            let stream = request.into_inner().map(move |m| m.map(|m| msg(&name, text(&m))));
            Ok(Response::new(Box::pin(stream) as BoxStream))
        })
    }
}

/// Counts the call as cancelled when its response stream is dropped before it ended (it never
/// ends by itself).
struct OnCancel(Arc<State>);

impl Drop for OnCancel {
    fn drop(&mut self) {
        self.0.cancelled.fetch_add(1, Ordering::SeqCst);
    }
}

struct Hang(Arc<State>);

impl ServerStreamingService<Bytes> for Hang {
    type Response = Bytes;
    type ResponseStream = BoxStream;
    type Future = BoxFuture<Response<BoxStream>>;

    fn call(&mut self, _request: Request<Bytes>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let guard = OnCancel(state.clone());
            let first = futures_util::stream::once(std::future::ready(Ok(msg(&state.name, "open"))));
            let never = futures_util::stream::pending().map(move |m: Result<Bytes, Status>| {
                let _held = &guard;
                m
            });
            Ok(Response::new(Box::pin(first.chain(never)) as BoxStream))
        })
    }
}

struct Health(Arc<State>);

impl UnaryService<Bytes> for Health {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>>;

    fn call(&mut self, _request: Request<Bytes>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            state.health_checks.fetch_add(1, Ordering::SeqCst);
            // HealthCheckResponse { status = 1 (SERVING) | 2 (NOT_SERVING) }.
            let status = if state.not_serving.load(Ordering::SeqCst) { 2 } else { 1 };
            Ok(Response::new(Bytes::from(vec![0x08, status])))
        })
    }
}

/// Answers one HTTP/2 request with the method its path names.
async fn route(state: Arc<State>, req: http::Request<hyper::body::Incoming>) -> http::Response<tonic::body::Body> {
    let mut grpc = Grpc::new(BytesCodec);
    let path = req.uri().path().to_owned();
    if path != "/grpc.health.v1.Health/Check" {
        state.calls.fetch_add(1, Ordering::SeqCst);
        if req.headers().get(http::header::TE).is_some_and(|v| v == "trailers") {
            state.te_trailers.fetch_add(1, Ordering::SeqCst);
        }
    }
    match path.as_str() {
        "/test.Echo/Unary" => grpc.unary(Unary(state), req).await,
        "/test.Echo/Count" => grpc.server_streaming(Count(state), req).await,
        "/test.Echo/Slow" => grpc.unary(Slow(state), req).await,
        "/test.Echo/Join" => grpc.client_streaming(Join(state), req).await,
        "/test.Echo/Chat" => grpc.streaming(Chat(state), req).await,
        "/test.Echo/Hang" => grpc.server_streaming(Hang(state), req).await,
        "/grpc.health.v1.Health/Check" => grpc.unary(Health(state), req).await,
        "/test.Echo/Reset" => reset_after_one(&state.name),
        _ => Status::unimplemented(format!("no method {path}")).into_http(),
    }
}

/// One message, then the stream reset: hyper's server resets a stream whose body fails with the
/// reason of the `h2` error it fails with.
fn reset_after_one(name: &str) -> http::Response<tonic::body::Body> {
    let text = format!("{name}:first");
    let mut framed = Vec::with_capacity(5 + text.len());
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(text.len()).unwrap_or(0).to_be_bytes());
    framed.extend_from_slice(text.as_bytes());
    let first: Result<hyper::body::Frame<Bytes>, h2::Error> = Ok(hyper::body::Frame::data(Bytes::from(framed)));
    // The reset comes a moment later: a stream reset at once would drop its queued head and
    // message unsent (the `h2` crate clears a reset stream's send queue).
    let reset = futures_util::stream::once(async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Err(h2::Error::from(h2::Reason::ENHANCE_YOUR_CALM))
    });
    let body = http_body_util::StreamBody::new(futures_util::stream::once(std::future::ready(first)).chain(reset));
    let mut resp = http::Response::new(tonic::body::Body::new(body));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    resp
}

/// A named gRPC server; see the [module docs](self).
pub struct GrpcServer {
    state: Arc<State>,
    addr: SocketAddr,
    running: Option<Running>,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServer").field("name", &self.state.name).field("addr", &self.addr).finish()
    }
}

impl GrpcServer {
    /// Starts a server called `name` on a free 127.0.0.1 port, h2c.
    pub fn start(name: &str) -> Result<GrpcServer> {
        GrpcServer::start_with(name, None)
    }

    /// Starts a server called `name` speaking TLS with `leaf` (ALPN `h2` only).
    pub fn start_tls(name: &str, leaf: &crate::tls::Leaf) -> Result<GrpcServer> {
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der.clone()], leaf.private_key())
            .context("gRPC server TLS config")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        GrpcServer::start_with(name, Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }

    fn start_with(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Result<GrpcServer> {
        let state = Arc::new(State { name: name.to_owned(), ..State::default() });
        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener.local_addr()?;
        let shared = state.clone();
        let running = Running::spawn(listener, format!("grpc-{name}"), move |stream, _peer| {
            let state = shared.clone();
            let tls = tls.clone();
            async move {
                match tls {
                    None => serve(stream, state).await,
                    Some(acceptor) => {
                        if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(stream)).await
                        {
                            serve(tls, state).await;
                        }
                    }
                }
            }
        })?;
        Ok(GrpcServer { state, addr, running: Some(running) })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Calls it has received (health checks excluded).
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Calls that arrived with `te: trailers`.
    pub fn te_trailers(&self) -> u64 {
        self.state.te_trailers.load(Ordering::SeqCst)
    }

    /// Health checks it has answered.
    pub fn health_checks(&self) -> u64 {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    /// `Hang` calls whose response stream was dropped: the call was cancelled.
    pub fn cancelled(&self) -> u64 {
        self.state.cancelled.load(Ordering::SeqCst)
    }

    /// Whether the health service answers SERVING.
    pub fn set_serving(&self, serving: bool) {
        self.state.not_serving.store(!serving, Ordering::SeqCst);
    }

    /// Closes the listener and every connection, mid-stream or not.
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve<IO>(io: IO, state: Arc<State>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(route(state, req).await) }
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// A gRPC client of the `test.Echo` service on one HTTP/2 channel.
#[derive(Clone, Debug)]
pub struct GrpcClient {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
}

/// Connects `TokioIo`-wrapped TLS streams for a channel (tonic's own TLS is not compiled in).
#[derive(Clone)]
struct TlsConnect {
    client: crate::tls::TlsClient,
    addr: SocketAddr,
    server_name: String,
}

impl tower_service::Service<http::Uri> for TlsConnect {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let hs = this.client.connect(this.addr, &this.server_name).await.map_err(|e| e.to_string())?;
            if hs.alpn.as_deref() != Some(&b"h2"[..]) {
                return Err(format!("ALPN negotiated {:?}, not h2", hs.alpn).into());
            }
            Ok(TokioIo::new(hs.stream))
        })
    }
}

impl GrpcClient {
    /// A client of `addr` over h2c.
    pub async fn h2c(addr: SocketAddr) -> Result<GrpcClient> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("gRPC channel to {addr}"))?;
        Ok(GrpcClient { grpc: tonic::client::Grpc::new(channel) })
    }

    /// A client of `addr` over TLS (ALPN h2), verifying `server_name` against `ca`.
    pub async fn tls(addr: SocketAddr, ca: &crate::tls::TestCa, server_name: &str) -> Result<GrpcClient> {
        let client = crate::tls::TlsClient::verified(ca)?.alpn(&[b"h2"]);
        let connector = TlsConnect { client, addr, server_name: server_name.to_owned() };
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{server_name}"))?
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(connector)
            .await
            .with_context(|| format!("gRPC channel to {addr} over TLS"))?;
        Ok(GrpcClient { grpc: tonic::client::Grpc::new(channel) })
    }

    async fn ready(&mut self) -> Result<()> {
        self.grpc.ready().await.map_err(|e| anyhow!("channel not ready: {e}"))
    }

    /// `Unary`: the answer text, or the call's status.
    pub async fn unary(&mut self, message: &str) -> Result<Result<String, Status>> {
        self.ready().await?;
        let path = PathAndQuery::from_static("/test.Echo/Unary");
        let r = self.grpc.unary(Request::new(Bytes::from(message.to_owned())), path, BytesCodec).await;
        Ok(r.map(|r| text(r.get_ref())))
    }

    /// `Slow` (an answer after `ms` ms) with a `grpc-timeout`.
    pub async fn slow_with_timeout(&mut self, ms: u64, timeout: Duration) -> Result<Result<String, Status>> {
        self.ready().await?;
        let path = PathAndQuery::from_static("/test.Echo/Slow");
        let mut request = Request::new(Bytes::from(ms.to_string()));
        request.set_timeout(timeout);
        let r = self.grpc.unary(request, path, BytesCodec).await;
        Ok(r.map(|r| text(r.get_ref())))
    }

    /// Starts the server-streaming method at `path` with `message`; returns its stream.
    async fn server_streaming(
        &mut self,
        path: &'static str,
        message: Bytes,
    ) -> Result<Result<Streaming<Bytes>, Status>> {
        self.ready().await?;
        let r = self.grpc.server_streaming(Request::new(message), PathAndQuery::from_static(path), BytesCodec).await;
        Ok(r.map(Response::into_inner))
    }

    /// Starts `Count` (`N` or `N/MS`) and returns its stream of messages.
    pub async fn count(&mut self, request: &str) -> Result<Result<Streaming<Bytes>, Status>> {
        self.server_streaming("/test.Echo/Count", Bytes::from(request.to_owned())).await
    }

    /// Starts `Hang` and returns its stream.
    pub async fn hang(&mut self) -> Result<Result<Streaming<Bytes>, Status>> {
        self.server_streaming("/test.Echo/Hang", Bytes::new()).await
    }

    /// Starts `Reset` and returns its stream.
    pub async fn reset(&mut self) -> Result<Result<Streaming<Bytes>, Status>> {
        self.server_streaming("/test.Echo/Reset", Bytes::new()).await
    }

    /// `Join` of `messages`.
    pub async fn join(&mut self, messages: &[&str]) -> Result<Result<String, Status>> {
        self.ready().await?;
        let path = PathAndQuery::from_static("/test.Echo/Join");
        let owned: Vec<Bytes> = messages.iter().map(|m| Bytes::from((*m).to_owned())).collect();
        let r = self.grpc.client_streaming(Request::new(futures_util::stream::iter(owned)), path, BytesCodec).await;
        Ok(r.map(|r| text(r.get_ref())))
    }

    /// Starts `Chat` with the messages `outgoing` yields, as it yields them.
    pub async fn chat<S>(&mut self, outgoing: S) -> Result<Result<Streaming<Bytes>, Status>>
    where
        S: Stream<Item = Bytes> + Send + 'static,
    {
        self.ready().await?;
        let path = PathAndQuery::from_static("/test.Echo/Chat");
        let r = self.grpc.streaming(Request::new(outgoing), path, BytesCodec).await;
        Ok(r.map(Response::into_inner))
    }
}

/// The next message of a stream as text; `Ok(None)` at its end.
pub async fn next_text(stream: &mut Streaming<Bytes>) -> Result<Option<String>, Status> {
    Ok(stream.message().await?.map(|m| text(&m)))
}
