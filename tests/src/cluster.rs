//! Several `keel` processes forming one Raft cluster: node files, process lifetime (including
//! SIGKILL and restart from the data dir), the `keel cluster …` / `keel config …` CLI, and the
//! `/cluster/*` admin API.
//!
//! A [`Cluster`] is started from a [`ClusterBuilder`]: N data nodes (ids 1..=N) and W witnesses
//! (ids N+1..). Every node gets free loopback addresses for its admin API, its Raft port and its
//! data-plane listener, a data dir and a node file in one [`TempDir`]:
//!
//! ```toml
//! [node]
//! admin = "127.0.0.1:A"
//! listen = { web = "127.0.0.1:P" }   # this node's own address for the replicated `web`
//! [cluster]
//! node_id = 1
//! raft = "127.0.0.1:R"
//! data_dir = "/tmp/…/n1"
//! cluster_id = "test-PID-N"
//! [listeners.web] …      # the seed: only `keel cluster init` reads it
//! [pools.app] …
//! ```
//!
//! Witnesses have no listeners or pools, `witness = true`, and run as `keel run --witness`.
//! The processes start with no cluster; [`Cluster::form`] runs `keel cluster init` on node 1
//! and `keel cluster join --via node1` for the others, then waits for one leader and every
//! member voting. Nodes are addressed by id everywhere ([`Cluster::admin`], [`Cluster::proxy`],
//! [`Cluster::kill`], [`Cluster::restart`]).
//!
//! # One replicated listener, several processes on one host
//!
//! The replicated config names one bind address per listener, and every node binds it: on one
//! machine, N processes cannot all bind 127.0.0.1:P. The harness therefore gives each node its
//! own data-plane address ([`Cluster::proxy`]) through the node-local override
//! [`LISTEN_OVERRIDE_KEY`] in `[node]`, and [`Cluster::listen_addr`] is the address written in
//! the replicated config. See [`ClusterBuilder::render_node_file`].
//!
//! # Pacing
//!
//! Every wait has a deadline (the constants below). Raft runs with keel's default timings
//! (heartbeat 25 ms, election 100–200 ms) unless [`ClusterBuilder::timing`] says otherwise, so
//! the measured failover is the product's. At most [`DEFAULT_SLOTS`] clusters run at once on the
//! machine (see [`ClusterSlot`]): the suite shares 2 cores with other builds, and three debug
//! processes per test times every test at once would turn heartbeats late and elections
//! spurious.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

use crate::client::{Client, Reply};
use crate::keel::{find_server, keel_command, run_keel, run_keel_env, KeelBuilder, BIND_ATTEMPTS};
use crate::ports::stable_addr;
use crate::tempdir::TempDir;
use crate::wait::{wait_for, wait_until, POLL, STARTUP};

/// Time a `keel cluster …` / `keel config …` / `keel backend …` command may take (join waits
/// for catch-up and promotion; the others answer in well under a second).
pub const CLI: Duration = Duration::from_secs(60);

/// Time for the cluster to agree on a leader after it formed or restarted (elections plus a
/// loaded machine).
pub const LEADER: Duration = Duration::from_secs(15);

/// The contract's failover bound: a new leader within this after the leader is SIGKILLed.
pub const FAILOVER: Duration = Duration::from_secs(2);

/// Time for a committed change (config, drain, verdict) to show on every live node.
pub const REPLICATION: Duration = Duration::from_secs(5);

/// Time for a restarted node to replay its log and catch up with the leader.
pub const CATCH_UP: Duration = Duration::from_secs(20);

/// Time a node may take to close a connection that sent it garbage (keel's Raft port gives a
/// frame 5 s to arrive).
pub const GARBAGE_CLOSE: Duration = Duration::from_secs(8);

/// How many clusters may run at once on this machine (`KEEL_CLUSTER_SLOTS` overrides).
pub const DEFAULT_SLOTS: usize = 2;

/// Longest a test waits for a [`ClusterSlot`].
pub const SLOT_WAIT: Duration = Duration::from_secs(20 * 60);

/// The `[node]` key naming the address this node binds for a replicated listener, instead of
/// the one in the replicated config: `listen = { web = "127.0.0.1:P" }`.
pub const LISTEN_OVERRIDE_KEY: &str = "listen";

/// A machine-wide slot among [`DEFAULT_SLOTS`]: an abstract Unix socket bound under a fixed
/// name, released by the kernel when the test process ends (even on SIGKILL), so no stale
/// lock survives a crashed run.
pub struct ClusterSlot {
    _socket: std::os::unix::net::UnixListener,
    index: usize,
}

impl ClusterSlot {
    /// Waits (polling, at most [`SLOT_WAIT`]) for a free slot.
    pub async fn acquire() -> Result<ClusterSlot> {
        use std::os::linux::net::SocketAddrExt;
        let slots = std::env::var("KEEL_CLUSTER_SLOTS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SLOTS);
        let start = Instant::now();
        loop {
            for index in 0..slots.max(1) {
                let name = format!("keel-cluster-tests-slot-{index}");
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                if let Ok(socket) = std::os::unix::net::UnixListener::bind_addr(&addr) {
                    if start.elapsed() > Duration::from_secs(1) {
                        eprintln!("waited {:?} for cluster slot {index}", start.elapsed());
                    }
                    return Ok(ClusterSlot { _socket: socket, index });
                }
            }
            if start.elapsed() > SLOT_WAIT {
                bail!("no cluster slot free within {SLOT_WAIT:?} ({slots} slots)");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Which slot this is.
    pub fn index(&self) -> usize {
        self.index
    }
}

/// Raft timings written into `[cluster]`.
#[derive(Clone, Debug)]
pub struct Timing {
    /// `heartbeat`.
    pub heartbeat: String,
    /// `election_min`.
    pub election_min: String,
    /// `election_max`.
    pub election_max: String,
}

/// What a cluster is made of, before it starts.
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    seed: KeelBuilder,
    data: usize,
    witnesses: usize,
    timing: Option<Timing>,
    token: Option<String>,
    spare: Vec<String>,
}

/// One member's addresses and files.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Raft node id (1-based, unique).
    pub id: u64,
    /// Admin API address (`[node] admin`).
    pub admin: SocketAddr,
    /// Raft RPC address (`[cluster] raft`).
    pub raft: SocketAddr,
    /// This node's data-plane address for the `web` listener (unused by witnesses).
    pub proxy: SocketAddr,
    /// This node's addresses for the other listeners a test may add later
    /// ([`ClusterBuilder::spare_listeners`]).
    pub spare: BTreeMap<String, SocketAddr>,
    /// Runs `keel run --witness`.
    pub witness: bool,
    /// `[cluster] data_dir`.
    pub data_dir: PathBuf,
    /// The node file.
    pub file: PathBuf,
}

/// A member and its process, if running.
struct Member {
    spec: NodeSpec,
    child: Option<Child>,
    runs: u32,
    logs: PathBuf,
}

impl Member {
    fn log_path(&self, run: u32) -> PathBuf {
        self.logs.join(format!("n{}.run{run}.log", self.spec.id))
    }

    /// Every run's log, oldest first, each headed by a marker line.
    fn log(&self) -> String {
        let mut s = String::new();
        for run in 1..=self.runs {
            let text = std::fs::read_to_string(self.log_path(run)).unwrap_or_default();
            s.push_str(&format!("=== node {} run {run} ===\n{text}", self.spec.id));
        }
        s
    }

    fn running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => matches!(c.try_wait(), Ok(None)),
        }
    }
}

/// The cluster's shared config (listeners and pools): the seed, or what a test applies.
pub type ServedConfig = KeelBuilder;

impl ClusterBuilder {
    /// `data` data nodes (ids 1..=data), no witness, seeded with `seed`'s listener and pools.
    pub fn new(seed: KeelBuilder, data: usize) -> ClusterBuilder {
        ClusterBuilder { seed, data, witnesses: 0, timing: None, token: None, spare: Vec::new() }
    }

    /// Adds `n` witnesses (ids after the data nodes).
    pub fn witnesses(mut self, n: usize) -> ClusterBuilder {
        self.witnesses = n;
        self
    }

    /// Protects every node's admin API with bearer `token` (`[node] admin_token_file`). The
    /// harness then sends it on every admin call and passes `--token` to every CLI run made
    /// through [`Cluster::cli`], [`Cluster::init`] and [`Cluster::join`].
    pub fn admin_token(mut self, token: &str) -> ClusterBuilder {
        self.token = Some(token.to_owned());
        self
    }

    /// Listener names a test may add with `keel config apply` later: every node gets its own
    /// address for each in `[node] listen` from the start ([`Cluster::listener_addr`]), and
    /// [`Cluster::shared_addr`] is the address to write in the replicated config.
    pub fn spare_listeners(mut self, names: &[&str]) -> ClusterBuilder {
        self.spare = names.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    /// Raft timings for every node (default: keel's own defaults, nothing written).
    pub fn timing(mut self, heartbeat: &str, election_min: &str, election_max: &str) -> ClusterBuilder {
        self.timing = Some(Timing {
            heartbeat: heartbeat.into(),
            election_min: election_min.into(),
            election_max: election_max.into(),
        });
        self
    }

    /// Renders a node file: `[node]`, `[cluster]`, and for data nodes the seed (whose `web`
    /// listener binds `listen`, the shared address, while this node binds `spec.proxy`).
    pub fn render_node_file(&self, spec: &NodeSpec, listen: SocketAddr, cluster_id: &str) -> String {
        let mut s = self.seed.render_node(spec.admin);
        if self.token.is_some() {
            let file = spec.data_dir.with_extension("token");
            s.push_str(&format!("admin_token_file = {}\n", toml_path(&file)));
        }
        if !spec.witness {
            let mut entries = vec![format!("web = \"{}\"", spec.proxy)];
            entries.extend(spec.spare.iter().map(|(name, addr)| format!("{name} = \"{addr}\"")));
            s.push_str(&format!("{LISTEN_OVERRIDE_KEY} = {{ {} }}\n", entries.join(", ")));
        }
        s.push_str(&format!(
            "\n[cluster]\nnode_id = {}\nraft = \"{}\"\ndata_dir = {}\ncluster_id = \"{cluster_id}\"\n",
            spec.id,
            spec.raft,
            toml_path(&spec.data_dir)
        ));
        if let Some(t) = &self.timing {
            s.push_str(&format!(
                "heartbeat = \"{}\"\nelection_min = \"{}\"\nelection_max = \"{}\"\n",
                t.heartbeat, t.election_min, t.election_max
            ));
        }
        if spec.witness {
            s.push_str("witness = true\n");
        }
        if !spec.witness {
            s.push('\n');
            s.push_str(&self.seed.render_config(listen, &[]));
        }
        s
    }

    /// Starts every process (no cluster yet) and waits for each admin API's `/healthz`.
    pub async fn start(self) -> Result<Cluster> {
        let slot = ClusterSlot::acquire().await?;
        let dir = TempDir::new("keel-cluster")?;
        let cluster_id = format!("test-{}-{}", std::process::id(), slot.index());
        let listen = stable_addr();
        let shared: BTreeMap<String, SocketAddr> = self.spare.iter().map(|n| (n.clone(), stable_addr())).collect();
        let mut members = Vec::new();
        for i in 0..(self.data + self.witnesses) {
            let id = i as u64 + 1;
            let witness = i >= self.data;
            let data_dir = dir.path().join(format!("n{id}"));
            std::fs::create_dir_all(&data_dir)?;
            let spec = NodeSpec {
                id,
                admin: stable_addr(),
                raft: stable_addr(),
                proxy: stable_addr(),
                spare: self.spare.iter().map(|n| (n.clone(), stable_addr())).collect(),
                witness,
                data_dir,
                file: dir.path().join(format!("n{id}.toml")),
            };
            std::fs::write(&spec.file, self.render_node_file(&spec, listen, &cluster_id))?;
            if let Some(t) = &self.token {
                std::fs::write(spec.data_dir.with_extension("token"), t)?;
            }
            members.push(Member { spec, child: None, runs: 0, logs: dir.path().to_owned() });
        }
        let token = self.token.clone();
        let mut cluster =
            Cluster { members, dir, listen, shared, client: Client::new(), applies: 0, token, _slot: slot };
        for id in cluster.ids() {
            cluster.spawn(id)?;
        }
        for id in cluster.ids() {
            let mut attempt = 1;
            loop {
                match cluster.wait_admin(id).await {
                    Err(e) if attempt < BIND_ATTEMPTS && format!("{e:#}").contains("Address already in use") => {
                        // Taken between allocation and bind (see `ports`): new addresses, once
                        // more. Nothing references them yet; the cluster is not formed.
                        eprintln!("node {id}: an address was taken before keel bound it; retrying on new ports");
                        attempt += 1;
                        let m = cluster.member_mut(id);
                        m.spec.admin = stable_addr();
                        m.spec.raft = stable_addr();
                        m.spec.proxy = stable_addr();
                        m.spec.spare = self.spare.iter().map(|n| (n.clone(), stable_addr())).collect();
                        std::fs::write(&m.spec.file, self.render_node_file(&m.spec, listen, &cluster_id))?;
                        cluster.spawn(id)?;
                    }
                    other => break other?,
                }
            }
        }
        Ok(cluster)
    }
}

fn toml_path(p: &Path) -> String {
    Value::String(p.display().to_string()).to_string()
}

/// What a CLI run printed, for error messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// stdout and stderr of a CLI run, concatenated.
pub fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Fails unless the CLI run exited 0; the error shows what it printed.
pub fn ensure_success(what: &str, out: &Output) -> Result<()> {
    ensure!(out.status.success(), "{what} failed: {}", describe(out));
    Ok(())
}

/// A running cluster of keel processes; every process is killed on drop.
pub struct Cluster {
    members: Vec<Member>,
    dir: TempDir,
    listen: SocketAddr,
    shared: BTreeMap<String, SocketAddr>,
    client: Client,
    applies: u32,
    token: Option<String>,
    _slot: ClusterSlot,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for m in &self.members {
            let log = m.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            eprintln!("--- node {} log (last 60 lines) ---\n{tail}\n--- end of node {} log ---", m.spec.id, m.spec.id);
        }
        if let Some(m) = self.members.first() {
            eprintln!("--- node 1 file ---\n{}", std::fs::read_to_string(&m.spec.file).unwrap_or_default());
        }
    }
}

impl Cluster {
    /// A builder: `data` data nodes seeded with `seed`.
    pub fn builder(seed: KeelBuilder, data: usize) -> ClusterBuilder {
        ClusterBuilder::new(seed, data)
    }

    fn member(&self, id: u64) -> &Member {
        &self.members[(id - 1) as usize]
    }

    fn member_mut(&mut self, id: u64) -> &mut Member {
        &mut self.members[(id - 1) as usize]
    }

    /// Every node id.
    pub fn ids(&self) -> Vec<u64> {
        self.members.iter().map(|m| m.spec.id).collect()
    }

    /// Ids of the data nodes (not witnesses).
    pub fn data_ids(&self) -> Vec<u64> {
        self.members.iter().filter(|m| !m.spec.witness).map(|m| m.spec.id).collect()
    }

    /// Ids of the nodes whose process is running.
    pub fn live_ids(&mut self) -> Vec<u64> {
        self.members.iter_mut().filter_map(|m| m.running().then_some(m.spec.id)).collect()
    }

    /// A node's addresses and files.
    pub fn spec(&self, id: u64) -> &NodeSpec {
        &self.member(id).spec
    }

    /// A node's admin API address.
    pub fn admin(&self, id: u64) -> SocketAddr {
        self.member(id).spec.admin
    }

    /// A node's Raft address.
    pub fn raft(&self, id: u64) -> SocketAddr {
        self.member(id).spec.raft
    }

    /// Where node `id` serves the `web` listener.
    pub fn proxy(&self, id: u64) -> SocketAddr {
        self.member(id).spec.proxy
    }

    /// Where node `id` serves the spare listener `name`.
    pub fn listener_addr(&self, id: u64, name: &str) -> Result<SocketAddr> {
        self.member(id).spec.spare.get(name).copied().ok_or_else(|| anyhow!("no spare listener {name:?}"))
    }

    /// The address to write in the replicated config for the spare listener `name`.
    pub fn shared_addr(&self, name: &str) -> Result<SocketAddr> {
        self.shared.get(name).copied().ok_or_else(|| anyhow!("no spare listener {name:?}"))
    }

    /// The `web` listener's address in the replicated config.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The scratch directory (node files, data dirs, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A keep-alive client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Everything node `id` logged, every run.
    pub fn log(&self, id: u64) -> String {
        self.member(id).log()
    }

    /// Whether node `id`'s process runs.
    pub fn is_running(&mut self, id: u64) -> bool {
        self.member_mut(id).running()
    }

    /// Writes `text` to `name` in the cluster's directory.
    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        self.dir.write(name, text)
    }

    fn spawn(&mut self, id: u64) -> Result<()> {
        let m = self.member_mut(id);
        if m.running() {
            bail!("node {id} is already running");
        }
        m.runs += 1;
        let log = std::fs::File::create(m.log_path(m.runs))?;
        let file = m.spec.file.to_str().ok_or_else(|| anyhow!("non-UTF-8 temp path"))?.to_owned();
        let mut cmd = keel_command()?;
        cmd.arg("run");
        if m.spec.witness {
            cmd.arg("--witness");
        }
        let child = cmd
            .args(["--config", &file])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning node {id}"))?;
        m.child = Some(child);
        Ok(())
    }

    /// GET `path` on node `id`'s admin API (with the bearer token, if the cluster has one).
    pub async fn admin_get(&self, id: u64, path: &str) -> Result<Reply> {
        let mut b = crate::client::get(self.admin(id), path);
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        self.client.send(crate::client::empty(b)?).await
    }

    /// Waits until node `id` answers 200 on `/healthz`, failing with its log if it exits.
    pub async fn wait_admin(&mut self, id: u64) -> Result<()> {
        let start = Instant::now();
        let admin = self.admin(id);
        loop {
            if !self.is_running(id) {
                bail!("node {id} exited before its admin API answered; log:\n{}", self.log(id));
            }
            if matches!(self.client.get(admin, "/healthz").await, Ok(r) if r.status == 200) {
                return Ok(());
            }
            if start.elapsed() > STARTUP {
                bail!("node {id}'s admin API did not answer within {STARTUP:?}; log:\n{}", self.log(id));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILLs node `id` and waits until the process is gone.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        let m = self.member_mut(id);
        let Some(mut c) = m.child.take() else { bail!("node {id} is not running") };
        c.kill().with_context(|| format!("SIGKILL node {id}"))?;
        c.wait()?;
        Ok(())
    }

    /// Starts node `id` again from its node file and data dir; waits for its admin API.
    pub async fn restart(&mut self, id: u64) -> Result<()> {
        self.spawn(id)?;
        self.wait_admin(id).await
    }

    /// Runs `keel ARGS --admin ADMIN(via)` (bounded by [`CLI`]).
    pub fn cli(&self, via: u64, args: &[&str]) -> Result<Output> {
        let admin = self.admin(via).to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--admin", &admin]);
        self.run(&all)
    }

    /// Runs `keel ARGS`, plus `--token` when the cluster has one.
    fn run(&self, args: &[&str]) -> Result<Output> {
        let mut all: Vec<&str> = args.to_vec();
        if let Some(t) = &self.token {
            all.extend(["--token", t]);
        }
        run_keel(&all, CLI)
    }

    /// Runs `keel ARGS --admin ADMIN(via)` with extra environment and no `--token`.
    pub fn cli_env(&self, via: u64, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        let admin = self.admin(via).to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--admin", &admin]);
        run_keel_env(&all, env, CLI)
    }

    /// `keel cluster init --config FILE(id)`.
    pub fn init(&self, id: u64) -> Result<Output> {
        let file = path_str(&self.spec(id).file)?;
        self.run(&["cluster", "init", "--config", &file])
    }

    /// `keel cluster join --via ADMIN(via) --config FILE(id)` (plus `--witness` for witnesses).
    pub fn join(&self, id: u64, via: u64) -> Result<Output> {
        let file = path_str(&self.spec(id).file)?;
        let via = self.admin(via).to_string();
        let mut args = vec!["cluster", "join", "--via", &via, "--config", &file];
        if self.spec(id).witness {
            args.push("--witness");
        }
        self.run(&args)
    }

    /// Init on node 1, join every other node via node 1 (each must exit 0 and print a verdict),
    /// then waits for one leader, every member a voter, and every data node serving.
    pub async fn form(&mut self) -> Result<()> {
        let out = self.init(1)?;
        ensure_success("keel cluster init", &out)?;
        for id in self.ids().into_iter().skip(1) {
            let out = self.join(id, 1)?;
            ensure_success(&format!("keel cluster join (node {id})"), &out)?;
            let verdict =
                String::from_utf8_lossy(&out.stdout).lines().rev().find(|l| !l.trim().is_empty()).map(str::to_owned);
            ensure!(verdict.is_some(), "keel cluster join (node {id}) printed no verdict: {}", describe(&out));
            eprintln!("join node {id}: {}", verdict.unwrap_or_default());
        }
        let all: Vec<u64> = self.ids();
        self.wait_voters(&all, LEADER).await?;
        self.leader(LEADER).await?;
        for id in self.data_ids() {
            self.wait_serving(id, REPLICATION).await?;
        }
        Ok(())
    }

    /// `GET /cluster/status` of node `id`.
    pub async fn cluster_status(&self, id: u64) -> Result<Value> {
        let r = self.admin_get(id, "/cluster/status").await?;
        ensure!(r.status == 200, "node {id}: GET /cluster/status answered {}: {}", r.status, r.text());
        r.json()
    }

    /// `GET /cluster/state` of node `id`.
    pub async fn cluster_state(&self, id: u64) -> Result<Value> {
        let r = self.admin_get(id, "/cluster/state").await?;
        ensure!(r.status == 200, "node {id}: GET /cluster/state answered {}: {}", r.status, r.text());
        r.json()
    }

    /// The voter ids node `id` reports in `/cluster/status`.
    pub async fn voters(&self, id: u64) -> Result<BTreeSet<u64>> {
        let st = self.cluster_status(id).await?;
        voters_of(&st)
    }

    /// Waits until node 1's view (or the first live node's) lists exactly `ids` as voters.
    pub async fn wait_voters(&mut self, ids: &[u64], deadline: Duration) -> Result<()> {
        let want: BTreeSet<u64> = ids.iter().copied().collect();
        let live = self.live_ids();
        let this = &*self;
        wait_until(deadline, &format!("voters {want:?} on every live node"), || {
            let (want, live) = (&want, &live);
            async move {
                for &id in live {
                    match this.voters(id).await {
                        Ok(v) if v == *want => {}
                        _ => return false,
                    }
                }
                true
            }
        })
        .await
    }

    /// Waits until every live node names the same leader, which is live and itself says
    /// `role: leader`; returns its id.
    pub async fn leader(&mut self, deadline: Duration) -> Result<u64> {
        let live = self.live_ids();
        self.leader_among(&live, deadline).await
    }

    /// [`leader`](Cluster::leader) over the nodes `ids` only.
    pub async fn leader_among(&self, ids: &[u64], deadline: Duration) -> Result<u64> {
        let last = std::sync::Mutex::new(String::new());
        let r = wait_for(deadline, &format!("one leader agreed by nodes {ids:?}"), || {
            let last = &last;
            async move {
                let mut leader = None;
                let mut seen = Vec::new();
                for &id in ids {
                    let st = self.cluster_status(id).await.ok()?;
                    seen.push(format!("{id}: role {} leader {}", st["role"], st["leader_id"]));
                    let l = st["leader_id"].as_u64();
                    if let Ok(mut g) = last.lock() {
                        *g = seen.join("; ");
                    }
                    let l = l?;
                    if *leader.get_or_insert(l) != l {
                        return None;
                    }
                }
                let l = leader?;
                if !ids.contains(&l) {
                    return None;
                }
                let st = self.cluster_status(l).await.ok()?;
                (st["role"] == "leader").then_some(l)
            }
        })
        .await;
        r.map_err(|e| anyhow!("{e}; last seen: {}", last.lock().map(|g| g.clone()).unwrap_or_default()))
    }

    /// Waits until node `id`'s data-plane address accepts TCP connections.
    pub async fn wait_serving(&self, id: u64, deadline: Duration) -> Result<()> {
        let proxy = self.proxy(id);
        wait_until(deadline, &format!("node {id} accepting on its listener {proxy}"), || async move {
            tokio::net::TcpStream::connect(proxy).await.is_ok()
        })
        .await
    }

    /// `GET /status` of node `id`, parsed.
    pub async fn status(&self, id: u64) -> Result<Value> {
        let r = self.admin_get(id, "/status").await?;
        ensure!(r.status == 200, "node {id}: GET /status answered {}: {}", r.status, r.text());
        r.json()
    }

    /// `GET /metrics` of node `id`.
    pub async fn metrics(&self, id: u64) -> Result<String> {
        let r = self.admin_get(id, "/metrics").await?;
        ensure!(r.status == 200, "node {id}: GET /metrics answered {}: {}", r.status, r.text());
        Ok(r.text())
    }

    /// The names of the pools node `id`'s `/status` shows.
    pub async fn pools(&self, id: u64) -> Result<BTreeSet<String>> {
        let st = self.status(id).await?;
        let pools = st["pools"].as_array().ok_or_else(|| anyhow!("node {id}: /status has no pools: {st}"))?;
        Ok(pools.iter().filter_map(|p| p["name"].as_str().map(str::to_owned)).collect())
    }

    /// A server's `state` in node `id`'s `/status`.
    pub async fn server_state(&self, id: u64, pool: &str, server: &str) -> Result<String> {
        let st = self.status(id).await?;
        let s = find_server(&st, pool, server)?;
        s["state"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("node {id}: {pool}/{server} has no state: {s}"))
    }

    /// Waits until a server's state on node `id` is `state`; the error names the last one seen.
    pub async fn wait_state(&self, id: u64, pool: &str, server: &str, state: &str, deadline: Duration) -> Result<()> {
        let last = std::sync::Mutex::new(String::from("(no answer)"));
        let r = wait_for(deadline, &format!("node {id}: {pool}/{server} {state:?} in /status"), || {
            let last = &last;
            async move {
                let seen = self.server_state(id, pool, server).await.unwrap_or_else(|e| format!("error: {e:#}"));
                let hit = seen == state;
                if let Ok(mut l) = last.lock() {
                    *l = seen;
                }
                hit.then_some(())
            }
        })
        .await;
        r.map_err(|e| anyhow!("{e}; last seen: {}", last.lock().map(|l| l.clone()).unwrap_or_default()))
    }

    /// Waits until node `id`'s `/status` shows pool `pool`.
    pub async fn wait_pool(&self, id: u64, pool: &str, deadline: Duration) -> Result<()> {
        wait_until(deadline, &format!("node {id}: pool {pool:?} in /status"), || async move {
            self.pools(id).await.is_ok_and(|p| p.contains(pool))
        })
        .await
    }

    /// Writes `config` (listeners and pools only, the `web` listener on
    /// [`listen_addr`](Cluster::listen_addr)) to a fresh file and returns its path.
    pub fn write_config(&mut self, config: &ServedConfig) -> Result<PathBuf> {
        self.applies += 1;
        self.write(&format!("apply-{}.toml", self.applies), &config.render_config(self.listen, &[]))
    }

    /// `keel config apply FILE --admin ADMIN(via)` with `config` written to a fresh file.
    pub fn apply(&mut self, via: u64, config: &ServedConfig) -> Result<Output> {
        let file = self.write_config(config)?;
        let file = path_str(&file)?;
        self.cli(via, &["config", "apply", &file])
    }
}

/// The voter ids in a `/cluster/status` document.
pub fn voters_of(status: &Value) -> Result<BTreeSet<u64>> {
    let members = status["members"].as_array().ok_or_else(|| anyhow!("no members array: {status}"))?;
    Ok(members.iter().filter(|m| m["voter"] == true).filter_map(|m| m["id"].as_u64()).collect())
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str().map(str::to_owned).ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))
}

/// `keel ARGS` without an `--admin` (for commands that take none or tests that pass their own).
pub fn keel(args: &[&str]) -> Result<Output> {
    run_keel(args, CLI)
}
