//! Running the real `keel` binary: generated configs, process lifetime, logs, admin API.
//!
//! [`KeelBuilder`] renders a config (a `[node]` table with a free admin address, one listener
//! called `web` on a free address, and the pools given as [`PoolSpec`]s), writes it into a
//! [`TempDir`], spawns `keel run --config FILE` with `RUST_LOG=info` and stdout/stderr captured
//! to files there, and waits until `GET /healthz` on the admin address answers 200 and the
//! proxy port accepts connections. If keel exits or the deadline passes first, the error carries
//! its log. [`Keel`] kills the process on drop and prints its config and log tail (test runners
//! show that output only for failing tests).
//!
//! The binary is `$KEEL_BIN` if set, else `<workspace>/target/debug/keel`; this crate does not
//! build it (`cargo build -p keel-node`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::backend::Backend;
use crate::client::{Client, Reply};
use crate::ports::free_addr;
use crate::tempdir::TempDir;
use crate::wait::{wait_for, POLL, STARTUP};

/// Path of the keel binary under test: `$KEEL_BIN`, else `<workspace>/target/debug/keel`.
pub fn keel_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("KEEL_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("debug").join("keel"),
    };
    if !path.is_file() {
        bail!("keel binary not found at {}: build it first: cargo build -p keel-node", path.display());
    }
    Ok(path)
}

/// A [`Command`] for the keel binary, with `RUST_LOG=info`.
pub fn keel_command() -> Result<Command> {
    let mut c = Command::new(keel_bin()?);
    c.env("RUST_LOG", "info").stdin(Stdio::null());
    Ok(c)
}

/// Runs `keel ARGS` to completion, killing it if it takes longer than `deadline`.
pub fn run_keel(args: &[&str], deadline: Duration) -> Result<Output> {
    run_keel_env(args, &[], deadline)
}

/// [`run_keel`] with extra environment variables.
pub fn run_keel_env(args: &[&str], env: &[(&str, &str)], deadline: Duration) -> Result<Output> {
    let mut cmd = keel_command()?;
    cmd.args(args).envs(env.iter().copied()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().context("spawning keel")?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline) {
        Ok(out) => Ok(out?),
        Err(_) => {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            bail!("keel {args:?} did not finish within {deadline:?}")
        }
    }
}

/// One pool of a generated config: `[pools.NAME]` with its servers, health and outlier tables.
#[derive(Clone, Debug)]
pub struct PoolSpec {
    name: String,
    lines: Vec<String>,
    servers: Vec<(String, String, Option<u32>)>,
    health: Option<Vec<String>>,
    outlier: Option<Vec<String>>,
}

impl PoolSpec {
    /// A pool called `name` balancing with `algorithm` (as written in the config).
    pub fn new(name: &str, algorithm: &str) -> PoolSpec {
        PoolSpec {
            name: name.to_owned(),
            lines: vec![format!("algorithm = {}", toml_str(algorithm))],
            servers: Vec::new(),
            health: None,
            outlier: None,
        }
    }

    /// Adds each backend as a server named like the backend, default weight.
    pub fn backends<'a>(mut self, backends: impl IntoIterator<Item = &'a Backend>) -> PoolSpec {
        for b in backends {
            self.servers.push((b.name().to_owned(), b.addr().to_string(), None));
        }
        self
    }

    /// Adds a server.
    pub fn server(mut self, name: &str, addr: SocketAddr, weight: Option<u32>) -> PoolSpec {
        self.servers.push((name.to_owned(), addr.to_string(), weight));
        self
    }

    /// Adds a server whose address is written as given, e.g. a DNS name `"app.test:8080"`.
    pub fn server_named(mut self, name: &str, address: &str, weight: Option<u32>) -> PoolSpec {
        self.servers.push((name.to_owned(), address.to_owned(), weight));
        self
    }

    /// Sets the weights of the servers added so far, in order.
    pub fn weights(mut self, weights: &[u32]) -> PoolSpec {
        for (s, w) in self.servers.iter_mut().zip(weights) {
            s.2 = Some(*w);
        }
        self
    }

    /// Adds a raw TOML line to the pool table, e.g. `request_timeout = "300ms"`.
    pub fn set(mut self, line: &str) -> PoolSpec {
        self.lines.push(line.to_owned());
        self
    }

    /// An HTTP health check of `/healthz` every `interval` (timeout = interval).
    pub fn health_http(self, interval: &str, rise: u32, fall: u32) -> PoolSpec {
        let i = toml_str(interval);
        self.health(&[
            "type = \"http\"",
            "path = \"/healthz\"",
            "expect_status = \"200-399\"",
            &format!("interval = {i}"),
            &format!("timeout = {i}"),
            &format!("rise = {rise}"),
            &format!("fall = {fall}"),
        ])
    }

    /// A health table from raw TOML lines.
    pub fn health(mut self, lines: &[&str]) -> PoolSpec {
        self.health = Some(lines.iter().map(|l| (*l).to_owned()).collect());
        self
    }

    /// Passive outlier detection settings.
    pub fn outlier(mut self, consecutive_failures: u32, ejection: &str) -> PoolSpec {
        self.outlier = Some(vec![
            format!("consecutive_failures = {consecutive_failures}"),
            format!("ejection = {}", toml_str(ejection)),
        ]);
        self
    }

    /// Turns passive outlier detection off, so only active checks judge servers.
    pub fn no_outlier(self) -> PoolSpec {
        self.outlier(0, "10s")
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TOML for this pool.
    pub fn to_toml(&self) -> String {
        let n = &self.name;
        let mut s = format!("[pools.{n}]\n");
        for l in &self.lines {
            let _ = writeln!(s, "{l}");
        }
        if let Some(h) = &self.health {
            let _ = writeln!(s, "\n[pools.{n}.health]");
            for l in h {
                let _ = writeln!(s, "{l}");
            }
        }
        if let Some(o) = &self.outlier {
            let _ = writeln!(s, "\n[pools.{n}.outlier]");
            for l in o {
                let _ = writeln!(s, "{l}");
            }
        }
        for (name, addr, weight) in &self.servers {
            let _ = writeln!(s, "\n[[pools.{n}.servers]]\nname = {}\naddress = \"{addr}\"", toml_str(name));
            if let Some(w) = weight {
                let _ = writeln!(s, "weight = {w}");
            }
        }
        s
    }
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// How many times [`KeelBuilder::start`] tries fresh ports when one was taken under it.
pub const BIND_ATTEMPTS: u32 = 3;

/// A config for one keel node with one listener, `web`, and the pools given.
#[derive(Clone, Debug)]
pub struct KeelBuilder {
    drain_timeout: String,
    workers: u32,
    protocol: String,
    node_lines: Vec<String>,
    env: Vec<(String, String)>,
    extra_listeners: Vec<(String, Vec<String>)>,
    listener_lines: Vec<String>,
    routes: Vec<String>,
    pools: Vec<PoolSpec>,
    raw: Vec<String>,
}

impl Default for KeelBuilder {
    fn default() -> Self {
        KeelBuilder {
            drain_timeout: "5s".into(),
            workers: 1,
            protocol: "http".into(),
            node_lines: Vec::new(),
            env: Vec::new(),
            extra_listeners: Vec::new(),
            listener_lines: Vec::new(),
            routes: Vec::new(),
            pools: Vec::new(),
            raw: Vec::new(),
        }
    }
}

impl KeelBuilder {
    /// `node.drain_timeout` (default 5s).
    pub fn drain_timeout(mut self, d: &str) -> KeelBuilder {
        self.drain_timeout = d.to_owned();
        self
    }

    /// `node.workers` (default 1: the suite runs several keels on 2 cores).
    pub fn workers(mut self, n: u32) -> KeelBuilder {
        self.workers = n;
        self
    }

    /// `listeners.web.protocol` (default `"http"`): `"https"`, `"tcp"`...
    pub fn protocol(mut self, protocol: &str) -> KeelBuilder {
        self.protocol = protocol.to_owned();
        self
    }

    /// A raw TOML line in the `[node]` table, e.g. `admin_token_file = "/x"`.
    pub fn node_line(mut self, line: &str) -> KeelBuilder {
        self.node_lines.push(line.to_owned());
        self
    }

    /// An environment variable for the keel process.
    pub fn env(mut self, key: &str, value: &str) -> KeelBuilder {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Another listener, `[listeners.NAME]`, on its own free address (see
    /// [`Keel::listener_addr`]), with these raw TOML lines after its `bind`. Its sub-tables
    /// (`[listeners.NAME.tls]`...) go in [`raw`](KeelBuilder::raw).
    pub fn listener(mut self, name: &str, lines: &[&str]) -> KeelBuilder {
        self.extra_listeners.push((name.to_owned(), lines.iter().map(|l| (*l).to_owned()).collect()));
        self
    }

    /// `listeners.web.default_pool`.
    pub fn default_pool(self, pool: &str) -> KeelBuilder {
        self.listener_line(&format!("default_pool = {}", toml_str(pool)))
    }

    /// A raw TOML line in the `[listeners.web]` table.
    pub fn listener_line(mut self, line: &str) -> KeelBuilder {
        self.listener_lines.push(line.to_owned());
        self
    }

    /// A `[[listeners.web.routes]]` entry from raw TOML lines, e.g.
    /// `"host = \"api.example.com\"\npool = \"api\""`. Routes keep the order they are added in.
    pub fn route(mut self, toml: &str) -> KeelBuilder {
        self.routes.push(toml.to_owned());
        self
    }

    /// Adds a pool.
    pub fn pool(mut self, pool: PoolSpec) -> KeelBuilder {
        self.pools.push(pool);
        self
    }

    /// Raw TOML appended at the end.
    pub fn raw(mut self, toml: &str) -> KeelBuilder {
        self.raw.push(toml.to_owned());
        self
    }

    /// The config text for a node whose proxy listens on `proxy` and admin API on `admin`;
    /// the listeners added with [`listener`](KeelBuilder::listener) bind `extra` in order
    /// (127.0.0.1:0 for any not given).
    pub fn render(&self, proxy: SocketAddr, admin: SocketAddr, extra: &[SocketAddr]) -> String {
        format!("{}\n{}", self.render_node(admin), self.render_config(proxy, extra))
    }

    /// The `[node]` table alone: this node's admin address, drain deadline, workers and the
    /// lines added with [`node_line`](KeelBuilder::node_line).
    pub fn render_node(&self, admin: SocketAddr) -> String {
        let mut s = format!(
            "[node]\nadmin = \"{admin}\"\ndrain_timeout = {}\nworkers = {}\n",
            toml_str(&self.drain_timeout),
            self.workers
        );
        for l in &self.node_lines {
            let _ = writeln!(s, "{l}");
        }
        s
    }

    /// The served configuration alone (the `web` listener on `proxy`, the other listeners on
    /// `extra`, routes, pools and raw tables), without `[node]`: what `keel config apply`
    /// replicates to a cluster.
    pub fn render_config(&self, proxy: SocketAddr, extra: &[SocketAddr]) -> String {
        let mut s = format!("[listeners.web]\nbind = \"{proxy}\"\nprotocol = {}\n", toml_str(&self.protocol));
        for l in &self.listener_lines {
            let _ = writeln!(s, "{l}");
        }
        for (i, (name, lines)) in self.extra_listeners.iter().enumerate() {
            let addr = extra.get(i).copied().unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
            let _ = writeln!(s, "\n[listeners.{name}]\nbind = \"{addr}\"");
            for l in lines {
                let _ = writeln!(s, "{l}");
            }
        }
        for r in &self.routes {
            let _ = writeln!(s, "\n[[listeners.web.routes]]\n{r}");
        }
        for p in &self.pools {
            let _ = write!(s, "\n{}", p.to_toml());
        }
        for r in &self.raw {
            let _ = writeln!(s, "\n{r}");
        }
        s
    }

    /// Starts keel with this config on free ports and waits until it is ready.
    ///
    /// If keel cannot bind because another process took one of the ports in the moment between
    /// [`free_addr`] and keel's bind (see [`ports`](crate::ports)), it is started again on new
    /// ports, up to [`BIND_ATTEMPTS`] times.
    pub async fn start(self) -> Result<Keel> {
        let mut attempt = 1;
        loop {
            let proxy = free_addr();
            let admin = free_addr();
            let extra: Vec<SocketAddr> = self.extra_listeners.iter().map(|_| free_addr()).collect();
            let config = self.render(proxy, admin, &extra);
            let named = self.extra_listeners.iter().map(|(n, _)| n.clone()).zip(extra.iter().copied()).collect();
            match Keel::start_full(config, proxy, admin, named, &self.env).await {
                Err(e) if attempt < BIND_ATTEMPTS && format!("{e:#}").contains("Address already in use") => {
                    eprintln!("port taken between allocation and bind (attempt {attempt}); retrying on new ports");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// A spawned keel process with captured output, killed on drop.
struct Proc {
    child: Child,
    dir: TempDir,
    exit: Option<ExitStatus>,
    what: String,
}

impl Proc {
    fn spawn(args: &[&str], dir: TempDir, what: String) -> Result<Proc> {
        Proc::spawn_env(args, dir, what, &[])
    }

    fn spawn_env(args: &[&str], dir: TempDir, what: String, env: &[(String, String)]) -> Result<Proc> {
        let stdout = std::fs::File::create(dir.path().join("stdout.log"))?;
        let stderr = std::fs::File::create(dir.path().join("stderr.log"))?;
        let child = keel_command()?
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {what}"))?;
        Ok(Proc { child, dir, exit: None, what })
    }

    fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        let (out, err) = (read("stdout.log"), read("stderr.log"));
        if out.is_empty() {
            err
        } else {
            format!("{err}\n--- stdout ---\n{out}")
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits until `probe` holds, failing with the log if the process exits or time runs out.
    async fn wait_ready<F, Fut>(&mut self, deadline: Duration, what: &str, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                bail!("{} exited ({status}) before {what}; log:\n{}", self.what, self.log());
            }
            let left = deadline.saturating_sub(start.elapsed());
            if tokio::time::timeout(left, probe()).await.unwrap_or(false) {
                return Ok(());
            }
            if start.elapsed() >= deadline {
                bail!("{} not ready ({what}) within {deadline:?}; log:\n{}", self.what, self.log());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let st = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status()?;
        if !st.success() {
            bail!("kill -{sig} {} failed: {st}", self.child.id());
        }
        Ok(())
    }

    async fn wait_exit(&mut self, deadline: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.exited() {
                return Ok(st);
            }
            if start.elapsed() >= deadline {
                bail!("{} still running {deadline:?} after being asked to stop; log:\n{}", self.what, self.log());
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Printed for every test, not only panicking ones: tests that fail by returning an
        // error do not panic, and both nextest and libtest show a test's output only when it
        // fails.
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(80)..].join("\n");
        eprintln!("--- {} log (last 80 lines) ---\n{tail}\n--- end of log ---", self.what);
    }
}

/// A running `keel run` node.
pub struct Keel {
    proc: Proc,
    proxy: SocketAddr,
    admin: SocketAddr,
    listeners: Vec<(String, SocketAddr)>,
    config: String,
    client: Client,
}

impl Drop for Keel {
    fn drop(&mut self) {
        eprintln!("--- keel config ---\n{}--- end of config ---", self.config);
    }
}

impl Keel {
    /// A builder for the node's config.
    pub fn builder() -> KeelBuilder {
        KeelBuilder::default()
    }

    /// Starts keel on `config` (whose listener binds `proxy` and admin API binds `admin`) and
    /// waits until both answer.
    pub async fn start_config(config: String, proxy: SocketAddr, admin: SocketAddr) -> Result<Keel> {
        Keel::start_full(config, proxy, admin, Vec::new(), &[]).await
    }

    /// [`start_config`](Keel::start_config) with named extra listeners (for
    /// [`listener_addr`](Keel::listener_addr)) and environment variables for the process.
    pub async fn start_full(
        config: String,
        proxy: SocketAddr,
        admin: SocketAddr,
        listeners: Vec<(String, SocketAddr)>,
        env: &[(String, String)],
    ) -> Result<Keel> {
        let dir = TempDir::new("keel-test")?;
        let path = dir.write("keel.toml", &config)?;
        let path = path.to_str().ok_or_else(|| anyhow!("non-UTF-8 temp path"))?.to_owned();
        let proc =
            Proc::spawn_env(&["run", "--config", &path], dir, format!("keel (proxy {proxy}, admin {admin})"), env)?;
        let mut keel = Keel { proc, proxy, admin, listeners, config, client: Client::new() };
        let client = keel.client.clone();
        let ready = keel
            .proc
            .wait_ready(STARTUP, "admin /healthz answering 200 and the proxy port accepting", || {
                let client = client.clone();
                async move {
                    let admin_ok = matches!(client.get(admin, "/healthz").await, Ok(r) if r.status == 200);
                    admin_ok && tokio::net::TcpStream::connect(proxy).await.is_ok()
                }
            })
            .await;
        if let Err(e) = ready {
            bail!("{e}\nconfig:\n{}", keel.config);
        }
        Ok(keel)
    }

    /// Address of the `web` listener.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy
    }

    /// Address of the extra listener `name` (see [`KeelBuilder::listener`]).
    pub fn listener_addr(&self, name: &str) -> Result<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .ok_or_else(|| anyhow!("no listener called {name:?} in this config"))
    }

    /// Address of the admin API.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// `http://PROXY` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// The config keel was started with.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// Everything keel wrote to stderr (and stdout) so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// A keep-alive client (shared pool) for talking to the proxy.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// GET `path` through the proxy on the shared keep-alive client.
    pub async fn get(&self, path: &str) -> Result<Reply> {
        self.client.get(self.proxy, path).await
    }

    /// GET `path` on the admin API.
    pub async fn admin_get(&self, path: &str) -> Result<Reply> {
        self.client.get(self.admin, path).await
    }

    /// POST `body` to `path` on the admin API.
    pub async fn admin_post(&self, path: &str, body: &str) -> Result<Reply> {
        self.client.post(self.admin, path, body).await
    }

    /// `GET /status`, parsed.
    pub async fn status_json(&self) -> Result<Value> {
        let r = self.admin_get("/status").await?;
        if r.status != 200 {
            bail!("GET /status answered {}: {}", r.status, r.text());
        }
        r.json()
    }

    /// `GET /metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let r = self.admin_get("/metrics").await?;
        if r.status != 200 {
            bail!("GET /metrics answered {}: {}", r.status, r.text());
        }
        Ok(r.text())
    }

    /// The `/status` object of server `server` in pool `pool`.
    pub async fn server_status(&self, pool: &str, server: &str) -> Result<Value> {
        let status = self.status_json().await?;
        find_server(&status, pool, server).cloned()
    }

    /// The `state` of a server in `/status`: "up", "down", "drain" or "ejected".
    pub async fn server_state(&self, pool: &str, server: &str) -> Result<String> {
        let s = self.server_status(pool, server).await?;
        s["state"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("server {pool}/{server} has no state: {s}"))
    }

    /// Waits until a server's `/status` state is `state`; the error names the last state seen.
    pub async fn wait_state(&self, pool: &str, server: &str, state: &str, deadline: Duration) -> Result<()> {
        let last = std::sync::Mutex::new(String::from("(no answer)"));
        let r = wait_for(deadline, &format!("server {pool}/{server} to be {state:?} in /status"), || {
            let last = &last;
            async move {
                let seen = match self.server_state(pool, server).await {
                    Ok(s) => s,
                    Err(e) => format!("error: {e:#}"),
                };
                let hit = seen == state;
                if let Ok(mut l) = last.lock() {
                    *l = seen;
                }
                hit.then_some(())
            }
        })
        .await;
        r.map_err(|e| {
            let seen = last.lock().map(|l| l.clone()).unwrap_or_default();
            anyhow!("{e}; last state seen: {seen}")
        })
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) -> Result<()> {
        self.proc.signal("TERM")
    }

    /// Sends SIGINT.
    pub fn sigint(&self) -> Result<()> {
        self.proc.signal("INT")
    }

    /// The config file the node runs from: rewrite it, then [`sighup`](Keel::sighup), to reload.
    pub fn config_path(&self) -> std::path::PathBuf {
        self.proc.dir.path().join("keel.toml")
    }

    /// Sends SIGHUP (a standalone node reloads its config file and certificates; a cluster
    /// node its certificates).
    pub fn sighup(&self) -> Result<()> {
        self.proc.signal("HUP")
    }

    /// Sends SIGUSR1 (reopen access log files).
    pub fn sigusr1(&self) -> Result<()> {
        self.proc.signal("USR1")
    }

    /// Sends `method path` to the admin API with `Authorization: Bearer TOKEN` when a token is
    /// given, and a JSON `body` when given.
    pub async fn admin_request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Result<Reply> {
        let mut b = http::Request::builder()
            .method(http::Method::from_bytes(method.as_bytes())?)
            .uri(format!("http://{}{path}", self.admin));
        if let Some(t) = token {
            b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            b = b.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = b.body(http_body_util::Full::new(bytes::Bytes::from(body.unwrap_or_default().to_owned())))?;
        crate::client::send_fresh(self.admin, req).await
    }

    /// The value of the first sample of `metric` whose labels contain every `label="value"`
    /// pair in `labels` (e.g. `&["listener=\"web\""]`), from `GET /metrics` (with `token`).
    pub async fn metric(&self, metric: &str, labels: &[&str], token: Option<&str>) -> Result<Option<f64>> {
        let r = self.admin_request("GET", "/metrics", token, None).await?;
        if r.status != 200 {
            bail!("GET /metrics answered {}: {}", r.status, r.text());
        }
        Ok(metric_value(&r.text(), metric, labels))
    }

    /// Resident memory of the process (`VmRSS` in `/proc/PID/status`), in bytes.
    pub fn rss_bytes(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| anyhow!("no VmRSS line"))?;
        let kb: u64 = line.split_whitespace().nth(1).ok_or_else(|| anyhow!("bad VmRSS line {line:?}"))?.parse()?;
        Ok(kb * 1024)
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        self.proc.exited().is_some()
    }

    /// Waits for the process to exit, at most `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Result<ExitStatus> {
        self.proc.wait_exit(deadline).await
    }
}

/// The value of the first sample of `metric` in Prometheus text whose labels contain every
/// `label="value"` in `labels`.
pub fn metric_value(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name_labels, value) = l.rsplit_once(' ')?;
        let (name, rest) = match name_labels.split_once('{') {
            Some((n, r)) => (n, r),
            None => (name_labels, ""),
        };
        (name == metric && labels.iter().all(|want| rest.contains(want))).then(|| value.trim().parse().ok()).flatten()
    })
}

/// Finds `pools[name=pool].servers[name=server]` in a `/status` document.
pub fn find_server<'a>(status: &'a Value, pool: &str, server: &str) -> Result<&'a Value> {
    let pools = status["pools"].as_array().ok_or_else(|| anyhow!("/status has no pools array: {status}"))?;
    let p =
        pools.iter().find(|p| p["name"] == pool).ok_or_else(|| anyhow!("/status has no pool {pool:?}: {status}"))?;
    let servers = p["servers"].as_array().ok_or_else(|| anyhow!("pool {pool:?} has no servers array: {p}"))?;
    servers.iter().find(|s| s["name"] == server).ok_or_else(|| anyhow!("pool {pool:?} has no server {server:?}: {p}"))
}

/// A running `keel demo`, killed on drop.
pub struct Demo {
    proc: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Demo {
    /// Runs `keel demo --listen L --admin A` on free ports and waits until the balancer answers
    /// 200 on `/`.
    pub async fn start() -> Result<Demo> {
        let mut attempt = 1;
        loop {
            match Demo::start_once().await {
                Err(e) if attempt < BIND_ATTEMPTS && format!("{e:#}").contains("Address already in use") => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_once() -> Result<Demo> {
        let (listen, admin) = (free_addr(), free_addr());
        let dir = TempDir::new("keel-demo")?;
        let (l, a) = (listen.to_string(), admin.to_string());
        let mut proc = Proc::spawn(&["demo", "--listen", &l, "--admin", &a], dir, format!("keel demo on {listen}"))?;
        let client = Client::new();
        proc.wait_ready(STARTUP, "the demo balancer answering 200 on /", || {
            let client = client.clone();
            async move { matches!(client.get(listen, "/").await, Ok(r) if r.status == 200) }
        })
        .await?;
        Ok(Demo { proc, listen, admin })
    }

    /// The balancer's address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The admin API's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// What the demo printed.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_configs_have_node_listener_and_pools() {
        let p = PoolSpec::new("app", "weighted_round_robin")
            .server("a", "127.0.0.1:1".parse().expect("addr"), None)
            .server("b", "127.0.0.1:2".parse().expect("addr"), None)
            .weights(&[5, 1])
            .set("retries = 2")
            .health_http("100ms", 2, 2)
            .outlier(3, "30s");
        let text = Keel::builder().default_pool("app").route("path_prefix = \"/api\"\npool = \"app\"").pool(p).render(
            "127.0.0.1:8080".parse().expect("addr"),
            "127.0.0.1:9090".parse().expect("addr"),
            &[],
        );
        for needle in [
            "[node]\nadmin = \"127.0.0.1:9090\"",
            "[listeners.web]\nbind = \"127.0.0.1:8080\"\nprotocol = \"http\"\ndefault_pool = \"app\"",
            "[[listeners.web.routes]]\npath_prefix = \"/api\"\npool = \"app\"",
            "[pools.app]\nalgorithm = \"weighted_round_robin\"\nretries = 2",
            "[pools.app.health]\ntype = \"http\"",
            "interval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2",
            "[pools.app.outlier]\nconsecutive_failures = 3\nejection = \"30s\"",
            "[[pools.app.servers]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nweight = 5",
            "[[pools.app.servers]]\nname = \"b\"\naddress = \"127.0.0.1:2\"\nweight = 1",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn find_server_walks_the_status_document() {
        let doc = serde_json::json!({"pools": [{"name": "app", "servers": [{"name": "a", "state": "up"}]}]});
        assert_eq!(find_server(&doc, "app", "a").expect("found")["state"], "up");
        assert!(find_server(&doc, "app", "b").is_err());
        assert!(find_server(&doc, "web", "a").is_err());
    }
}
