//! A real `redis-server` for the sticky-session store tests, on a free loopback port.
//!
//! [`Redis::start`] runs `redis-server --port P --bind 127.0.0.1 --save "" --appendonly no --dir
//! <tempdir>` (nothing persisted: a restart comes back empty, like a Redis that lost its data) and
//! waits until it answers `PING` with `+PONG`. [`Redis::stop`] kills it (SIGKILL: a crash, not a
//! shutdown) and [`Redis::restart`] starts it again on the same port. It is killed on drop.
//!
//! The binary is `redis-server` from `PATH`; when it is missing, [`Redis::start`] fails with a
//! message saying how to install it (`apt-get install -y redis-server`), rather than the test
//! being skipped silently.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ports::stable_addr;
use crate::tempdir::TempDir;
use crate::wait::POLL;

/// Time for `redis-server` to answer PING after it was spawned.
pub const REDIS_STARTUP: Duration = Duration::from_secs(10);

/// A running (or stopped) `redis-server`, killed on drop.
pub struct Redis {
    addr: SocketAddr,
    dir: TempDir,
    child: Option<Child>,
    runs: u32,
}

/// Where `redis-server` is, if it is on `PATH`.
pub fn redis_server_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("redis-server")).find(|p| p.is_file())
}

impl Redis {
    /// Starts `redis-server` on a free loopback port and waits for PING.
    pub async fn start() -> Result<Redis> {
        let mut r = Redis { addr: stable_addr(), dir: TempDir::new("keel-redis")?, child: None, runs: 0 };
        r.spawn().await?;
        Ok(r)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://ADDR`, as written in a sticky `redis` setting.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    async fn spawn(&mut self) -> Result<()> {
        let Some(bin) = redis_server_bin() else {
            bail!("redis-server is not installed (CI installs it; locally: apt-get install -y redis-server)");
        };
        self.runs += 1;
        let log = std::fs::File::create(self.dir.path().join(format!("redis.{}.log", self.runs)))?;
        let (port, ip) = (self.addr.port().to_string(), self.addr.ip().to_string());
        let child = Command::new(bin)
            .args(["--port", &port, "--bind", &ip, "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning redis-server")?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("redis-server exited ({st}) before answering PING; log:\n{}", self.log());
                }
            }
            if self.ping().await {
                return Ok(());
            }
            if start.elapsed() > REDIS_STARTUP {
                bail!(
                    "redis-server on {} did not answer PING within {REDIS_STARTUP:?}; log:\n{}",
                    self.addr,
                    self.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether it answers `PING` with `+PONG` (within one second).
    pub async fn ping(&self) -> bool {
        let addr = self.addr;
        let exchange = async move {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(b"*1\r\n$4\r\nPING\r\n").await.ok()?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.ok()?;
            Some(buf[..n].starts_with(b"+PONG"))
        };
        matches!(tokio::time::timeout(Duration::from_secs(1), exchange).await, Ok(Some(true)))
    }

    /// Kills it with SIGKILL and waits for the process to be gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: nothing was saved).
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("redis-server is already running");
        }
        self.spawn().await
    }

    /// What the current (or last) run logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("redis.{}.log", self.runs))).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
