//! The lab: namespaces, a bridge, backends, keel nodes, a VIP prober and a VIP monitor, all
//! torn down by [`Lab`]'s `Drop` (processes killed, namespaces deleted) even when a test panics.
//!
//! Layout, with a per-run unique namespace prefix `P` (so it never collides with
//! `deploy/lab.sh`'s `keel-*` lab or another chaos run):
//!
//! | namespace | address | role |
//! |---|---|---|
//! | `P-sw` | — | bridge `br0`, one veth port per namespace below |
//! | `P-nI` | `10.88.0.1I/24` on `eth0` | keel node I (raft `:7000`, admin `:9090`, web `0.0.0.0:8080`) |
//! | `P-bI` | `10.88.0.10I/24` | backend `bI` on `:8080` |
//! | `P-c` | `10.88.0.200/24` | the client: the prober, and every admin call |
//!
//! The VIP is `10.88.0.100/32` on `eth0` of whichever node leads. With spread VIPs
//! ([`LabSpec::spread`], e.g. [`SPREAD`]) each is on one node's `eth0`, watched on every node and
//! probed on its own; an IPv6 one among them ([`SPREAD6`]) gives every namespace an `fd88::/64`
//! address too (`nodad`, so nothing waits for duplicate address detection), and keel listens on
//! `[::]` (dual-stack).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http::now_ms;

/// The lab's subnet; everything lives in namespaces the lab creates.
pub const SUBNET: &str = "10.88.0";
/// The VIP.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 100);
/// Port of the keel listener and of the backends.
pub const WEB_PORT: u16 = 8080;
/// Port of the admin API.
pub const ADMIN_PORT: u16 = 9090;
/// Port of Raft.
pub const RAFT_PORT: u16 = 7000;
/// Upper bound on any single lab process's life; every helper loop stops by then.
pub const MAX_LIFE_SECS: u64 = 3600;

/// What to build.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Keel nodes (1–9).
    pub nodes: usize,
    /// The last node is a witness (for a pair + witness).
    pub witness_last: bool,
    /// Backends (1–9).
    pub backends: usize,
    /// Extra `[cluster]` lines for every node (`profile = "fast"`, explicit timings); empty:
    /// keel's default timings.
    pub cluster_extra: String,
    /// When not empty, the witness's extra `[cluster]` lines instead of `cluster_extra`: to
    /// measure a witness with other timings than the data nodes.
    pub witness_extra: String,
    /// When not empty: these VIPs spread over the data nodes (`[vip] addresses`) instead of the
    /// leader's single [`VIP`], each with a watcher per node and a prober of its own. With an
    /// IPv6 VIP among them every namespace also gets an address in [`SUBNET6`] (`nodad`) and
    /// keel listens on `[::]`.
    pub spread: Vec<IpAddr>,
    /// When set: the body of a `[pools.app.sticky]` table (e.g. `mode = "source_ip"`).
    pub sticky: Option<String>,
}

impl Default for LabSpec {
    /// Three data nodes, three backends, default timings, the leader's single VIP.
    fn default() -> Self {
        LabSpec {
            nodes: 3,
            witness_last: false,
            backends: 3,
            cluster_extra: String::new(),
            witness_extra: String::new(),
            spread: Vec::new(),
            sticky: None,
        }
    }
}

/// The spread VIPs of [`Lab::three_spread`]: one per node.
pub const SPREAD: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(10, 88, 0, 121)),
    IpAddr::V4(Ipv4Addr::new(10, 88, 0, 122)),
    IpAddr::V4(Ipv4Addr::new(10, 88, 0, 123)),
];

/// The lab's IPv6 prefix (a ULA, `/64` on every `eth0`), used when a spread VIP is IPv6: node I
/// is `fd88::1I`, backend I `fd88::10I`, the client `fd88::200`.
pub const SUBNET6: &str = "fd88:";

/// Spread VIPs mixing the families: two IPv4 and one IPv6 ([`SPREAD6_V6`]).
pub const SPREAD6: [IpAddr; 3] =
    [IpAddr::V4(Ipv4Addr::new(10, 88, 0, 121)), IpAddr::V4(Ipv4Addr::new(10, 88, 0, 122)), SPREAD6_V6];

/// The IPv6 VIP of [`SPREAD6`]: `fd88::123`.
pub const SPREAD6_V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0xfd88, 0, 0, 0, 0, 0, 0, 0x123));

/// `vip` with its host prefix length, as `ip addr` takes it.
pub fn host_prefix(vip: IpAddr) -> String {
    match vip {
        IpAddr::V4(v) => format!("{v}/32"),
        IpAddr::V6(v) => format!("{v}/128"),
    }
}

/// Paths of the binaries the lab runs.
#[derive(Clone, Debug)]
pub struct Bins {
    /// `keel`.
    pub keel: PathBuf,
    /// `chaos-probe`.
    pub probe: PathBuf,
}

impl Bins {
    /// `KEEL_BIN` or the workspace's `target/debug/keel`, and the given `chaos-probe`.
    pub fn new(probe: PathBuf) -> Self {
        let keel = std::env::var_os("KEEL_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/keel"));
        Bins { keel, probe }
    }
}

/// One prober result.
#[derive(Clone, Debug)]
pub struct Probe {
    /// When the request started (Unix ms).
    pub start: u64,
    /// When it ended.
    pub end: u64,
    /// 200 received.
    pub ok: bool,
    /// Body (on success) or error.
    pub detail: String,
}

/// One keel node of the lab.
#[derive(Debug)]
pub struct Node {
    /// Node id (1-based), also its index + 1.
    pub id: u64,
    /// Its namespace.
    pub ns: String,
    /// Its address.
    pub addr: Ipv4Addr,
    /// Its config file.
    pub config: PathBuf,
    /// Its log (stdout + stderr, appended across restarts).
    pub log: PathBuf,
    /// A witness (no data plane, never the VIP).
    pub witness: bool,
    child: Option<Child>,
}

impl Node {
    /// True while its keel process runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
    /// Its admin base URL.
    pub fn admin(&self) -> String {
        format!("http://{}:{ADMIN_PORT}", self.addr)
    }
}

type Samples = Arc<Mutex<Vec<(u64, bool)>>>;
type Probes = Arc<Mutex<Vec<Probe>>>;

/// A running lab. Dropping it removes everything it made.
pub struct Lab {
    /// The unique namespace prefix.
    pub prefix: String,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// The admin token.
    pub token: String,
    bins: Bins,
    dir: tempfile::TempDir,
    namespaces: Vec<String>,
    backends: Vec<Option<Child>>,
    helpers: Vec<Child>,
    /// Other processes started inside node namespaces (keepalived and its stand-in web
    /// server); killed on drop.
    extra: Vec<Child>,
    watch: Vec<Samples>,
    probes: Arc<Mutex<Vec<Probe>>>,
    /// Spread mode: per VIP, a watcher per node and the VIP's prober.
    spread: BTreeMap<IpAddr, (Vec<Samples>, Probes)>,
    /// The lab has IPv6 addresses (a spread VIP is IPv6).
    v6: bool,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(args))
}

/// Longest a watcher sample's observation plus timestamp may take to count (see
/// [`Lab::watcher`]): a getifaddrs call takes tens of microseconds.
pub const SHARP_SAMPLE_US: u64 = 2_000;

/// Reads `child`'s stdout lines on a thread, handing each to `f`.
fn pump(child: &mut Child, mut f: impl FnMut(&str) + Send + 'static) {
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                match line {
                    Ok(l) => f(&l),
                    Err(_) => return,
                }
            }
        });
    }
}

impl Lab {
    /// Builds the namespaces, starts backends, watchers and the prober, writes the node configs
    /// (nodes are not started: see [`Lab::form_cluster`]).
    pub fn build(spec: &LabSpec, bins: Bins) -> Result<Lab, String> {
        if !(1..=9).contains(&spec.nodes) || !(1..=9).contains(&spec.backends) {
            return Err("nodes and backends must be 1-9".into());
        }
        for (what, p) in [("keel", &bins.keel), ("chaos-probe", &bins.probe)] {
            if !p.exists() {
                return Err(format!("{what} binary not found at {} (build it, or set KEEL_BIN)", p.display()));
            }
        }
        let unique = (u64::from(std::process::id()) << 16) ^ (now_ms() & 0xffff) ^ fastrand::u64(..0xffff);
        let prefix = format!("kc{:x}", unique & 0xff_ffff);
        let dir = tempfile::Builder::new().prefix("keel-chaos-").tempdir().map_err(|e| e.to_string())?;
        let token = format!("chaos-token-{:016x}", fastrand::u64(..));
        fs::write(dir.path().join("token"), &token).map_err(|e| e.to_string())?;
        let mut lab = Lab {
            prefix,
            nodes: Vec::new(),
            token,
            bins,
            dir,
            namespaces: Vec::new(),
            backends: Vec::new(),
            helpers: Vec::new(),
            extra: Vec::new(),
            watch: Vec::new(),
            probes: Arc::new(Mutex::new(Vec::new())),
            spread: spec.spread.iter().map(|v| (*v, (Vec::new(), Arc::new(Mutex::new(Vec::new()))))).collect(),
            v6: spec.spread.iter().any(IpAddr::is_ipv6),
        };
        lab.build_inner(spec)?;
        Ok(lab)
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// A formed three-node lab with `backends` backends and default timings, stable (one
    /// leader holding the VIP); returns it and the leader's index. Prints the nodes' logs
    /// before failing.
    pub fn three_nodes(bins: Bins, backends: usize) -> Result<(Lab, usize), String> {
        let spec = LabSpec { backends, ..LabSpec::default() };
        let mut lab = Lab::build(&spec, bins)?;
        let formed = lab.form_cluster().and_then(|()| lab.wait_stable(Duration::from_secs(20)));
        match formed {
            Ok(leader) => Ok((lab, leader)),
            Err(e) => {
                lab.dump_logs(30);
                Err(e)
            }
        }
    }

    /// Prints the last `lines` of every node's log (for a failing test's output).
    pub fn dump_logs(&self, lines: usize) {
        for i in 0..self.nodes.len() {
            eprintln!("--- node {} log tail ---\n{}", i + 1, self.log_tail(i, lines));
        }
    }

    /// The client namespace (prober, admin calls, load generators).
    pub fn client_ns(&self) -> String {
        self.ns("c")
    }

    /// Directory holding configs, data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn add_ns(&mut self, ns: &str) -> Result<(), String> {
        ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_owned());
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn plug(&mut self, name: &str, addr: &str) -> Result<String, String> {
        let ns = self.ns(name);
        let sw = self.ns("sw");
        self.add_ns(&ns)?;
        ip(&["-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", name, "netns", &sw])?;
        ip(&["-n", &sw, "link", "set", name, "master", "br0", "up"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        if self.v6 {
            // `nodad`: usable at once, no second of duplicate address detection.
            let host = addr.rsplit('.').next().unwrap_or("0");
            ip(&["-n", &ns, "addr", "add", &format!("{SUBNET6}:{host}/64"), "dev", "eth0", "nodad"])?;
        }
        Ok(ns)
    }

    fn spawn_helper(&self, ns: &str, args: &[String]) -> Result<Child, String> {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&self.bins.probe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn chaos-probe in {ns}: {e}"))
    }

    fn build_inner(&mut self, spec: &LabSpec) -> Result<(), String> {
        let sw = self.ns("sw");
        self.add_ns(&sw)?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        let client = self.plug("c", &format!("{SUBNET}.200"))?;
        for i in 1..=spec.backends {
            let addr = format!("{SUBNET}.{}", 100 + i);
            let ns = self.plug(&format!("b{i}"), &addr)?;
            let child = self.spawn_helper(
                &ns,
                &["serve".into(), format!("{addr}:{WEB_PORT}"), format!("backend b{i}"), MAX_LIFE_SECS.to_string()],
            )?;
            self.backends.push(Some(child));
        }
        let mut servers = String::new();
        for i in 1..=spec.backends {
            servers.push_str(&format!(
                "\n[[pools.app.servers]]\nname = \"b{i}\"\naddress = \"{SUBNET}.{}:{WEB_PORT}\"\n",
                100 + i
            ));
        }
        for i in 1..=spec.nodes {
            let addr: Ipv4Addr = format!("{SUBNET}.{}", 10 + i).parse().map_err(|e| format!("{e}"))?;
            let ns = self.plug(&format!("n{i}"), &addr.to_string())?;
            // Never use the VIP as the sender of our own ARP requests (vrrp/LIFECYCLE.md).
            run(Command::new("ip").args(["netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.conf.all.arp_announce=2"]))?;
            let witness = spec.witness_last && i == spec.nodes;
            let node_dir = self.dir.path().join(format!("n{i}"));
            fs::create_dir_all(node_dir.join("data")).map_err(|e| e.to_string())?;
            let config = node_dir.join("keel.toml");
            let text = format!(
                r#"[node]
admin = "{addr}:{ADMIN_PORT}"
admin_token_file = "{token}"
drain_timeout = "1s"
workers = 2

[cluster]
node_id = {i}
raft = "{addr}:{RAFT_PORT}"
data_dir = "{data}"
witness = {witness}
{profile}
{vip}[listeners.web]
bind = "{bind}:{WEB_PORT}"
default_pool = "app"

[pools.app]
algorithm = "round_robin"
connect_timeout = "200ms"
request_timeout = "2s"
retries = 2

[pools.app.health]
type = "http"
path = "/"
interval = "300ms"
timeout = "200ms"
rise = 2
fall = 2
{sticky}{servers}"#,
                bind = if self.v6 { "[::]" } else { "0.0.0.0" },
                sticky = spec.sticky.as_ref().map_or(String::new(), |s| format!("\n[pools.app.sticky]\n{s}\n")),
                token = self.dir.path().join("token").display(),
                data = node_dir.join("data").display(),
                profile =
                    if witness && !spec.witness_extra.is_empty() { &spec.witness_extra } else { &spec.cluster_extra },
                // keel refuses a [vip] section on a witness.
                vip = if witness {
                    String::new()
                } else if spec.spread.is_empty() {
                    format!("[vip]\naddress = \"{VIP}\"\ninterface = \"eth0\"\n\n")
                } else {
                    let list: Vec<String> = spec.spread.iter().map(|v| format!("\"{v}\"")).collect();
                    format!("[vip]\naddresses = [{}]\ninterface = \"eth0\"\n\n", list.join(", "))
                },
            );
            fs::write(&config, text).map_err(|e| e.to_string())?;
            if spec.spread.is_empty() {
                let samples = self.watcher(&ns, IpAddr::V4(VIP))?;
                self.watch.push(samples);
            }
            for vip in &spec.spread {
                let samples = self.watcher(&ns, *vip)?;
                if let Some((watch, _)) = self.spread.get_mut(vip) {
                    watch.push(samples);
                }
            }
            self.nodes.push(Node {
                id: i as u64,
                ns,
                addr,
                config,
                log: node_dir.join("keel.log"),
                witness,
                child: None,
            });
        }
        if spec.spread.is_empty() {
            let probes = self.probes.clone();
            self.prober(&client, IpAddr::V4(VIP), probes)?;
        }
        for vip in &spec.spread {
            if let Some((_, probes)) = self.spread.get(vip) {
                let probes = probes.clone();
                self.prober(&client, *vip, probes)?;
            }
        }
        // Backends must answer before keel's first health checks.
        let deadline = Instant::now() + Duration::from_secs(10);
        for i in 1..=spec.backends {
            let url = format!("http://{SUBNET}.{}:{WEB_PORT}/", 100 + i);
            while self.get(&url).is_err() {
                if Instant::now() > deadline {
                    return Err(format!("backend b{i} did not answer within 10 s"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Starts a watcher of `vip` on `ns`'s `eth0`; its samples land in the returned list.
    ///
    /// A sample whose observation and timestamp took longer than [`SHARP_SAMPLE_US`] together
    /// (the helper was preempted in between) is left out: its time could be that much later
    /// than what it saw, and a "held" stamped late reads as two holders at once. Its neighbours
    /// still bound the change, so a real overlap longer than one interval still shows.
    fn watcher(&mut self, ns: &str, vip: IpAddr) -> Result<Samples, String> {
        let samples: Samples = Arc::new(Mutex::new(Vec::new()));
        let mut w =
            self.spawn_helper(ns, &["watch".into(), vip.to_string(), "10".into(), MAX_LIFE_SECS.to_string()])?;
        let s = samples.clone();
        pump(&mut w, move |line| {
            let mut it = line.split_whitespace().skip(1);
            let (t, v) = (it.next().and_then(|t| t.parse::<u64>().ok()), it.next());
            let sharp = it.next().and_then(|us| us.parse::<u64>().ok()).is_none_or(|us| us <= SHARP_SAMPLE_US);
            if let (Some(t), Some(v), true) = (t, v, sharp) {
                if let Ok(mut s) = s.lock() {
                    s.push((t, v == "1"));
                }
            }
        });
        self.helpers.push(w);
        Ok(samples)
    }

    /// Starts a prober of `vip` (a GET every 10 ms from the client namespace) feeding `probes`.
    fn prober(&mut self, client: &str, vip: IpAddr, probes: Arc<Mutex<Vec<Probe>>>) -> Result<(), String> {
        let mut p = self.spawn_helper(
            client,
            &[
                "probe".into(),
                format!("http://{}/", SocketAddr::new(vip, WEB_PORT)),
                "10".into(),
                "150".into(),
                MAX_LIFE_SECS.to_string(),
            ],
        )?;
        pump(&mut p, move |line| {
            let parts: Vec<&str> = line.splitn(5, ' ').collect();
            if parts.len() >= 4 {
                if let (Ok(start), Ok(end)) = (parts[1].parse(), parts[2].parse()) {
                    let probe =
                        Probe { start, end, ok: parts[3] == "ok", detail: parts.get(4).unwrap_or(&"").to_string() };
                    if let Ok(mut v) = probes.lock() {
                        v.push(probe);
                    }
                }
            }
        });
        self.helpers.push(p);
        Ok(())
    }

    /// One request from the client namespace (admin calls carry the token).
    pub fn request(&self, method: &str, url: &str, body: Option<&str>) -> Result<(u16, String), String> {
        let client = self.ns("c");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &client]).arg(&self.bins.probe).args([
            if method == "GET" { "get" } else { "post" },
            url,
            "1000",
            &self.token,
        ]);
        if let Some(b) = body {
            cmd.arg(b);
        }
        let out = run(&mut cmd)?;
        let (status, body) = out.split_once('\n').unwrap_or((&out, ""));
        let status = status.trim().parse::<u16>().map_err(|_| format!("bad output {out:?}"))?;
        Ok((status, body.to_owned()))
    }

    /// Adds `addr` (`/24`) to the client namespace's `eth0`: another client host, for
    /// [`Lab::get_from`].
    pub fn add_client_address(&self, addr: Ipv4Addr) -> Result<(), String> {
        ip(&["-n", &self.ns("c"), "addr", "add", &format!("{addr}/24"), "dev", "eth0"]).map(|_| ())
    }

    /// GET `url` from the client namespace with source address `src` (see
    /// [`Lab::add_client_address`]); status and body.
    pub fn get_from(&self, src: IpAddr, url: &str) -> Result<(u16, String), String> {
        let client = self.ns("c");
        let out = run(Command::new("ip").args(["netns", "exec", &client]).arg(&self.bins.probe).args([
            "get-from",
            &src.to_string(),
            url,
            "1000",
        ]))?;
        let (status, body) = out.split_once('\n').unwrap_or((&out, ""));
        let status = status.trim().parse::<u16>().map_err(|_| format!("bad output {out:?}"))?;
        Ok((status, body.to_owned()))
    }

    /// GET `url` from the client namespace; the JSON body on 200.
    pub fn get(&self, url: &str) -> Result<String, String> {
        match self.request("GET", url, None)? {
            (200, body) => Ok(body),
            (s, body) => Err(format!("GET {url}: {s} {body}")),
        }
    }

    /// GET a node's admin `path` as JSON.
    pub fn admin_json(&self, node: usize, path: &str) -> Result<serde_json::Value, String> {
        let body = self.get(&format!("{}{path}", self.nodes[node].admin()))?;
        serde_json::from_str(&body).map_err(|e| format!("bad JSON from node {}: {e}", node + 1))
    }

    /// POST to the leader's admin API (any node forwards with 421; we ask the leader directly).
    pub fn admin_post(&self, node: usize, path: &str, body: &str) -> Result<String, String> {
        match self.request("POST", &format!("{}{path}", self.nodes[node].admin()), Some(body))? {
            (200, b) => Ok(b),
            (s, b) => Err(format!("POST {path} on node {}: {s} {b}", node + 1)),
        }
    }

    /// Starts node `i` (0-based) if it is not running.
    pub fn start(&mut self, i: usize) -> Result<(), String> {
        self.start_with_env(i, &[])
    }

    /// Starts node `i` as [`Lab::start`] does, with `env` added to its environment (the
    /// failpoints, e.g. `KEEL_TEST_FIRST_APPLY_DELAY_MS`).
    pub fn start_with_env(&mut self, i: usize, env: &[(&str, &str)]) -> Result<(), String> {
        let node = &mut self.nodes[i];
        if node.child.is_some() {
            return Ok(());
        }
        let log = fs::OpenOptions::new().create(true).append(true).open(&node.log).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns])
            .arg(&self.bins.keel)
            .arg("run")
            .arg("--config")
            .arg(&node.config)
            // The lab may inject faults (`POST /debug/stall-raft`); never set in production.
            .env("KEEL_TEST_FAILPOINTS", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start node {}: {e}", i + 1))?;
        node.child = Some(child);
        Ok(())
    }

    /// Waits until node `i`'s admin API answers `/cluster/status`.
    pub fn wait_admin(&self, i: usize, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            match self.admin_json(i, "/cluster/status") {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("node {} admin not up within {within:?}: {e}", i + 1))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Runs the `keel` CLI with `args` inside node `i`'s namespace (bounded to 60 s).
    pub fn keel_cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let node = &self.nodes[i];
        run(Command::new("timeout").arg("60").args(["ip", "netns", "exec", &node.ns]).arg(&self.bins.keel).args(args))
    }

    /// Starts every node, initializes the cluster on node 1 and joins the others through it.
    pub fn form_cluster(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            self.start(i)?;
        }
        for i in 0..self.nodes.len() {
            self.wait_admin(i, Duration::from_secs(30))?;
        }
        let c0 = self.nodes[0].config.display().to_string();
        self.keel_cli(0, &["cluster", "init", "--config", &c0])?;
        let via = format!("{}:{ADMIN_PORT}", self.nodes[0].addr);
        for i in 1..self.nodes.len() {
            let c = self.nodes[i].config.display().to_string();
            self.keel_cli(i, &["cluster", "join", "--via", &via, "--config", &c])?;
        }
        Ok(())
    }

    /// SIGKILLs node `i`, reaps it, then deletes the VIP it may have left on its interface —
    /// what the systemd unit's `ExecStopPost=-+ip addr del VIP/32 dev eth0` does in
    /// production (vrrp/LIFECYCLE.md). Returns the Unix ms of the kill.
    pub fn kill(&mut self, i: usize) -> Result<u64, String> {
        let t = now_ms();
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            // Delete the VIP before reaping: on a starved box reaping a large process took
            // ~0.4 s, longer than a failover, and the stale address then overlapped the new
            // holder. systemd runs its stop hook as soon as it sees the death; so do we.
            self.exec_stop_post(i);
            let _ = child.wait();
        }
        self.exec_stop_post(i);
        Ok(t)
    }

    /// SIGKILLs node `i` *without* the stop hook: the VIP it held stays on its interface until
    /// the address's kernel lifetime runs out. Returns the Unix ms of the kill.
    pub fn kill_without_hook(&mut self, i: usize) -> Result<u64, String> {
        let t = now_ms();
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(t)
    }

    /// Whether node `i`'s interface carries the VIP now (read from the kernel, not the monitor).
    pub fn vip_on(&self, i: usize) -> bool {
        ip(&["-n", &self.nodes[i].ns, "-o", "addr", "show", "dev", "eth0"])
            .map(|out| out.contains(&format!("inet {VIP}/32 ")))
            .unwrap_or(false)
    }

    /// Sends `signal` (a `kill -s` name: `STOP`, `CONT`, …) to node `i`'s process.
    pub fn signal(&self, i: usize, signal: &str) -> Result<(), String> {
        let pid = self.nodes[i].child.as_ref().ok_or_else(|| format!("node {} is not running", i + 1))?.id();
        run(Command::new("kill").args(["-s", signal, &pid.to_string()])).map(|_| ())
    }

    /// Deletes the VIP from node `i`'s interface (a stop hook; "not there" is fine).
    pub fn remove_vip(&self, i: usize) {
        self.exec_stop_post(i);
    }

    /// The `chaos-probe` binary (backends, stand-in servers).
    pub fn probe_bin(&self) -> &Path {
        &self.bins.probe
    }

    /// Starts `program args…` inside node `i`'s namespace, output appended to the node's log;
    /// the process is killed when the lab is dropped.
    pub fn spawn_in_node(&mut self, i: usize, program: &Path, args: &[String]) -> Result<(), String> {
        let node = &self.nodes[i];
        let log = fs::OpenOptions::new().create(true).append(true).open(&node.log).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start {} in node {}: {e}", program.display(), i + 1))?;
        self.extra.push(child);
        Ok(())
    }

    /// SIGKILLs every process in node `i`'s namespace except the lab's own monitor (the whole
    /// node dies, as with `kill -9` of keel; nothing cleans up after it). Returns the Unix ms
    /// of the kill.
    pub fn kill_node_processes(&mut self, i: usize) -> Result<u64, String> {
        let ours: Vec<String> = self.helpers.iter().map(|c| c.id().to_string()).collect();
        let pids = ip(&["netns", "pids", &self.nodes[i].ns])?;
        let t = now_ms();
        let victims: Vec<&str> = pids.split_whitespace().filter(|p| !ours.iter().any(|o| o == p)).collect();
        if !victims.is_empty() {
            // Stop them all first, then kill: killed one by one, keepalived's VRRP child got its
            // parent's death signal first and shut down gracefully (a priority-0 advert and the
            // VIP removed) — not what a crash does. One may have exited meanwhile; the others
            // still die.
            let _ = run(Command::new("kill").arg("-STOP").args(&victims));
            let _ = run(Command::new("kill").arg("-KILL").args(&victims));
        }
        // Reap the ones we started: an unreaped zombie still "exists" for `kill -0`, and
        // keepalived then refused to restart ("daemon is already running").
        self.extra.retain_mut(|c| {
            if victims.contains(&c.id().to_string().as_str()) {
                let _ = c.wait();
                false
            } else {
                !matches!(c.try_wait(), Ok(Some(_)))
            }
        });
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(t)
    }

    fn exec_stop_post(&self, i: usize) {
        for vip in std::iter::once(IpAddr::V4(VIP)).chain(self.spread.keys().copied()) {
            for dev in ["eth0", "lo"] {
                let _ = ip(&["-n", &self.nodes[i].ns, "addr", "del", &host_prefix(vip), "dev", dev]);
            }
        }
    }

    /// SIGTERMs node `i` and waits (at most 10 s, then SIGKILL). Returns the Unix ms of the
    /// signal.
    pub fn stop(&mut self, i: usize) -> Result<u64, String> {
        let t = now_ms();
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        self.exec_stop_post(i);
        Ok(t)
    }

    /// Sets node `i`'s `eth0` down (`up = false`) or up. Returns the Unix ms at which the
    /// change is in effect (after `ip` returned).
    pub fn link(&self, i: usize, up: bool) -> Result<u64, String> {
        ip(&["-n", &self.nodes[i].ns, "link", "set", "eth0", if up { "up" } else { "down" }])?;
        Ok(now_ms())
    }

    /// Kills backend `i` (1-based) so health checks fail.
    pub fn kill_backend(&mut self, i: usize) {
        if let Some(Some(mut c)) = self.backends.get_mut(i - 1).map(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Prober results so far, in completion order.
    pub fn probes(&self) -> Vec<Probe> {
        self.probes.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Watcher samples so far, per node: (Unix ms, holds the VIP).
    pub fn samples(&self) -> Vec<Vec<(u64, bool)>> {
        self.watch.iter().map(|s| s.lock().map(|v| v.clone()).unwrap_or_default()).collect()
    }

    /// Nodes (0-based) whose namespace holds the VIP according to the latest sample.
    pub fn holders_now(&self) -> Vec<usize> {
        self.watch
            .iter()
            .enumerate()
            .filter(|(_, s)| s.lock().ok().and_then(|v| v.last().map(|(_, h)| *h)).unwrap_or(false))
            .map(|(i, _)| i)
            .collect()
    }

    /// The spread VIPs of this lab.
    pub fn spread_vips(&self) -> Vec<IpAddr> {
        self.spread.keys().copied().collect()
    }

    /// Spread mode: `vip`'s prober results so far, in completion order.
    pub fn spread_probes(&self, vip: IpAddr) -> Vec<Probe> {
        self.spread.get(&vip).and_then(|(_, p)| p.lock().ok().map(|v| v.clone())).unwrap_or_default()
    }

    /// Spread mode: `vip`'s watcher samples per node.
    pub fn spread_samples(&self, vip: IpAddr) -> Vec<Vec<(u64, bool)>> {
        self.spread
            .get(&vip)
            .map(|(w, _)| w.iter().map(|s| s.lock().map(|v| v.clone()).unwrap_or_default()).collect())
            .unwrap_or_default()
    }

    /// Spread mode: the nodes (0-based) whose `eth0` carries `vip` by the latest sample.
    pub fn spread_holders_now(&self, vip: IpAddr) -> Vec<usize> {
        let Some((watch, _)) = self.spread.get(&vip) else { return Vec::new() };
        watch
            .iter()
            .enumerate()
            .filter(|(_, s)| s.lock().ok().and_then(|v| v.last().map(|(_, h)| *h)).unwrap_or(false))
            .map(|(i, _)| i)
            .collect()
    }

    /// Spread mode: waits until every running node names the same leader, every VIP is on
    /// exactly one node's interface (which its `/status` confirms), and each VIP's prober
    /// succeeds. Returns each VIP's holder (0-based).
    pub fn wait_spread_stable(&self, within: Duration) -> Result<BTreeMap<IpAddr, usize>, String> {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            let leaders = self.leaders();
            let agreed =
                leaders.values().next().copied().flatten().is_some_and(|l| leaders.values().all(|x| *x == Some(l)));
            let mut holders = BTreeMap::new();
            let mut problems = Vec::new();
            let since = now_ms().saturating_sub(300);
            for vip in self.spread.keys() {
                match self.spread_holders_now(*vip).as_slice() {
                    [h] => {
                        let says = self.admin_json(*h, "/status").ok().is_some_and(|v| {
                            v["vips"].as_array().is_some_and(|list| {
                                list.iter().any(|e| e["address"] == vip.to_string() && e["holding"] == true)
                            })
                        });
                        let probing = self.spread.get(vip).is_some_and(|(_, p)| {
                            p.lock().is_ok_and(|v| v.iter().rev().take(5).any(|p| p.ok && p.start >= since))
                        });
                        if !says || !probing {
                            problems
                                .push(format!("{vip}: on node {} (status agrees {says}, probe ok {probing})", h + 1));
                        }
                        holders.insert(*vip, *h);
                    }
                    other => problems.push(format!("{vip} on {other:?}")),
                }
            }
            if agreed && problems.is_empty() {
                return Ok(holders);
            }
            last = format!("leaders {leaders:?}; {}", problems.join("; "));
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("spread VIPs not stable within {within:?}: {last}"))
    }

    /// A formed three-node lab with the [`SPREAD`] VIPs, stable (each VIP held by one node);
    /// returns it and each VIP's holder.
    pub fn three_spread(bins: Bins, cluster_extra: &str) -> Result<(Lab, BTreeMap<IpAddr, usize>), String> {
        let spec = LabSpec { cluster_extra: cluster_extra.to_owned(), spread: SPREAD.to_vec(), ..LabSpec::default() };
        Lab::spread_with(&spec, bins)
    }

    /// A formed lab of `spec` (spread VIPs), stable; returns it and each VIP's holder. Prints the
    /// nodes' logs before failing.
    pub fn spread_with(spec: &LabSpec, bins: Bins) -> Result<(Lab, BTreeMap<IpAddr, usize>), String> {
        let mut lab = Lab::build(spec, bins)?;
        let formed = lab.form_cluster().and_then(|()| lab.wait_spread_stable(Duration::from_secs(30)));
        match formed {
            Ok(holders) => Ok((lab, holders)),
            Err(e) => {
                lab.dump_logs(30);
                Err(e)
            }
        }
    }

    /// Runs `f` on the prober results so far, without copying them.
    pub fn with_probes<T>(&self, f: impl FnOnce(&[Probe]) -> T) -> T {
        match self.probes.lock() {
            Ok(v) => f(&v),
            Err(_) => f(&[]),
        }
    }

    /// The leader id each running node reports (`None` if unreachable or no leader).
    pub fn leaders(&self) -> BTreeMap<usize, Option<u64>> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].running())
            .map(|i| {
                let l = self.admin_json(i, "/cluster/status").ok().and_then(|v| v["leader_id"].as_u64());
                (i, l)
            })
            .collect()
    }

    /// Waits until every running node names the same leader, that leader holds the VIP (its
    /// `/status` and the monitor agree, nobody else holds it) and the prober succeeds through
    /// the VIP. Returns the leader's index.
    pub fn wait_stable(&self, within: Duration) -> Result<usize, String> {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            let leaders = self.leaders();
            let ids: Vec<Option<u64>> = leaders.values().copied().collect();
            match ids.first().copied().flatten() {
                Some(l) if ids.iter().all(|x| *x == Some(l)) => {
                    let li = (l - 1) as usize;
                    let holding = self.admin_json(li, "/status").ok().and_then(|v| v["vip"]["holding"].as_bool());
                    let holders = self.holders_now();
                    let since = now_ms().saturating_sub(300);
                    let probing = self.with_probes(|v| v.iter().rev().take(5).any(|p| p.ok && p.start >= since));
                    if holding == Some(true) && holders == vec![li] && probing {
                        return Ok(li);
                    }
                    let witness = if self.nodes[li].witness { " (a witness: it never holds the VIP)" } else { "" };
                    last = format!("leader {l}{witness}, holding {holding:?}, monitor {holders:?}, probe ok {probing}");
                }
                _ => last = format!("leaders {leaders:?}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("not stable within {within:?}: {last}"))
    }

    /// Waits for the first successful probe that started at or after `t0`; returns its end.
    pub fn first_ok_after(&self, t0: u64, within: Duration) -> Option<u64> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            // Lines arrive in completion order: scan back over those that ended after t0.
            let found = self.with_probes(|v| {
                v.iter().rev().take_while(|p| p.end >= t0).filter(|p| p.ok && p.start >= t0).map(|p| p.end).min()
            });
            if found.is_some() {
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// The tail of node `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let v: Vec<&str> = text.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for c in self.helpers.iter_mut().chain(self.extra.iter_mut()).chain(self.backends.iter_mut().flatten()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Anything else left in our namespaces (a CLI call cut short) goes too.
        for ns in &self.namespaces {
            if let Ok(pids) = ip(&["netns", "pids", ns]) {
                for pid in pids.split_whitespace() {
                    let _ = run(Command::new("kill").args(["-9", pid]));
                }
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
        if std::env::var_os("KEEL_CHAOS_KEEP").is_some() {
            let probes: String = self
                .probes()
                .iter()
                .map(|p| format!("{} {} {} {}\n", p.start, p.end, if p.ok { "ok" } else { "err" }, p.detail))
                .collect();
            let _ = fs::write(self.dir.path().join("probes.log"), probes);
            for (i, s) in self.samples().iter().enumerate() {
                let text: String = s.iter().map(|(t, h)| format!("{t} {}\n", u8::from(*h))).collect();
                let _ = fs::write(self.dir.path().join(format!("n{}/vip-samples.log", i + 1)), text);
            }
            eprintln!("chaos: keeping {}", self.dir.path().display());
            self.dir.disable_cleanup(true);
        }
    }
}
