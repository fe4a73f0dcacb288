//! keepalived side by side: the same lab, probe and VIP monitor, with a keepalived VRRP pair
//! holding the VIP instead of keel, so the chaos report can put keel's figures next to the
//! tool keel replaces. Only used when `keepalived` is on `PATH`; its figures are a reference
//! and never fail a run.
//!
//! keepalived moves an address, not traffic: each of the two node namespaces also runs a
//! stand-in web server (`chaos-probe serve 0.0.0.0:8080`) that answers on the VIP whenever the
//! address is there, as HAProxy or nginx would next to keepalived. The faults match keel's:
//!
//! - **kill**: SIGKILL of everything on the master node (keepalived and its web server), like
//!   `kill -9` of keel. keepalived does not remove the VIP when killed, so the dead master keeps
//!   it (and keeps answering ARP for it) while the backup takes it too: those monitor samples are
//!   counted as overlap. Before the node restarts, the VIP is deleted as a stop hook would.
//! - **cut**: the master's link goes down, then comes back.
//!
//! Both nodes are `state BACKUP` with `nopreempt` (the usual setup that avoids a second
//! failover when the old master returns), priorities 150 and 100.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::http::now_ms;
use crate::lab::{Lab, VIP, WEB_PORT};
use crate::report::{overlap, Run};
use crate::scenario::{FAILOVER_BOUND, SETTLE_BOUND};

/// How long after the failover the samples are watched for a second holder.
pub const OVERLAP_WATCH: Duration = Duration::from_millis(1000);

/// `keepalived` on `PATH`, if any.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("keepalived")).find(|p| p.is_file())
}

/// A keepalived pair on nodes 1 and 2 of a lab.
#[derive(Clone, Debug)]
pub struct Pair {
    /// The keepalived binary.
    pub bin: PathBuf,
    /// VRRP advertisement interval in ms (the master is declared dead after ≈ 3 of them).
    pub advert_ms: u64,
}

impl Pair {
    /// Scenario name prefix in reports: `keepalived-1s`, `keepalived-100ms`.
    pub fn name(&self) -> String {
        if self.advert_ms.is_multiple_of(1000) {
            format!("ka-{}s", self.advert_ms / 1000)
        } else {
            format!("ka-{}ms", self.advert_ms)
        }
    }

    fn config(&self, lab: &Lab, i: usize) -> String {
        // Below 1 s keepalived needs VRRPv3 (centisecond adverts).
        let version = if self.advert_ms < 1000 { 3 } else { 2 };
        format!(
            "global_defs {{\n  router_id {prefix}-n{n}\n}}\n\
             vrrp_instance VI_1 {{\n  state BACKUP\n  nopreempt\n  interface eth0\n  virtual_router_id 51\n  \
             version {version}\n  priority {prio}\n  advert_int {advert}\n  \
             virtual_ipaddress {{\n    {VIP}/32 dev eth0\n  }}\n}}\n",
            prefix = lab.prefix,
            n = i + 1,
            prio = if i == 0 { 150 } else { 100 },
            advert = self.advert_ms as f64 / 1000.0,
        )
    }

    /// Starts keepalived and the stand-in web server on node `i` (0 or 1).
    pub fn start_node(&self, lab: &mut Lab, i: usize) -> Result<(), String> {
        let dir = lab.dir().join(format!("n{}", i + 1));
        let conf = dir.join("keepalived.conf");
        std::fs::write(&conf, self.config(lab, i)).map_err(|e| e.to_string())?;
        let path = |name: &str| dir.join(name).display().to_string();
        // A killed keepalived leaves its pid files; a stop hook would remove them.
        for f in ["keepalived.pid", "keepalived-vrrp.pid"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let args: Vec<String> = vec![
            "--dont-fork".into(),
            "--log-console".into(),
            "--vrrp".into(),
            "--use-file".into(),
            conf.display().to_string(),
            "--pid".into(),
            path("keepalived.pid"),
            "--vrrp_pid".into(),
            path("keepalived-vrrp.pid"),
        ];
        let bin = self.bin.clone();
        lab.spawn_in_node(i, &bin, &args)?;
        let probe: PathBuf = lab.probe_bin().to_path_buf();
        let serve = vec![
            "serve".into(),
            format!("0.0.0.0:{WEB_PORT}"),
            format!("keepalived n{}", i + 1),
            crate::lab::MAX_LIFE_SECS.to_string(),
        ];
        lab.spawn_in_node(i, &probe, &serve)
    }

    /// Starts the pair and waits until one node holds the VIP and serves through it.
    pub fn start(&self, lab: &mut Lab) -> Result<usize, String> {
        if lab.nodes.len() < 2 {
            return Err("a keepalived pair needs a lab with two nodes".into());
        }
        for i in 0..2 {
            lab.remove_vip(i);
            self.start_node(lab, i)?;
        }
        wait_one_holder(lab, SETTLE_BOUND)
    }
}

/// Waits until exactly one node holds the VIP (by the monitor) and a probe through the VIP
/// succeeded in the last 300 ms; returns the holder.
pub fn wait_one_holder(lab: &Lab, within: Duration) -> Result<usize, String> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        let holders = lab.holders_now();
        let since = now_ms().saturating_sub(300);
        let probing = lab.with_probes(|v| v.iter().rev().take(5).any(|p| p.ok && p.start >= since));
        if let ([h], true) = (holders.as_slice(), probing) {
            return Ok(*h);
        }
        last = format!("monitor {holders:?}, probe ok {probing}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("keepalived pair not stable within {within:?}: {last}"))
}

fn measure(lab: &Lab, scenario: String, run_no: usize, m: usize, t0: u64) -> Run {
    let end = lab.first_ok_after(t0, FAILOVER_BOUND);
    std::thread::sleep(OVERLAP_WATCH);
    let other = 1 - m;
    let samples = lab.samples();
    let o = overlap(&samples, t0, now_ms());
    let vip_ms =
        samples.get(other).and_then(|s| s.iter().find(|(t, h)| *t >= t0 && *h).map(|(t, _)| t.saturating_sub(t0)));
    let mut warnings = Vec::new();
    if lab.holders_now().contains(&m) {
        warnings.push(format!(
            "old master n{} still holds the VIP {} ms after the fault",
            m + 1,
            now_ms().saturating_sub(t0)
        ));
    }
    Run {
        scenario,
        run: run_no,
        leader_before: m as u64 + 1,
        leader_after: if vip_ms.is_some() { other as u64 + 1 } else { m as u64 + 1 },
        outage_ms: end.map(|e| e.saturating_sub(t0)),
        vip_ms,
        overlap: o.certain,
        problems: Vec::new(),
        warnings,
    }
}

/// SIGKILL everything on the master, measure, then clean the stale VIP and restart the node.
pub fn kill_master(lab: &mut Lab, pair: &Pair, run_no: usize, rng: &mut fastrand::Rng) -> Result<Run, String> {
    let m = wait_one_holder(lab, SETTLE_BOUND)?;
    std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
    let t0 = lab.kill_node_processes(m)?;
    let run = measure(lab, format!("{}-kill", pair.name()), run_no, m, t0);
    lab.remove_vip(m);
    pair.start_node(lab, m)?;
    wait_one_holder(lab, SETTLE_BOUND)?;
    Ok(run)
}

/// Cut the master's link, measure, heal.
pub fn cut_master(lab: &mut Lab, pair: &Pair, run_no: usize, rng: &mut fastrand::Rng) -> Result<Run, String> {
    let m = wait_one_holder(lab, SETTLE_BOUND)?;
    std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
    let t0 = lab.link(m, false)?;
    let mut run = measure(lab, format!("{}-cut", pair.name()), run_no, m, t0);
    lab.link(m, true)?;
    wait_one_holder(lab, SETTLE_BOUND)?;
    // Overlap while healing counts too (both masters for a moment is split brain).
    run.overlap = overlap(&lab.samples(), t0, now_ms()).certain;
    Ok(run)
}

/// Path helper for callers that print where keepalived came from.
pub fn describe(bin: &Path) -> String {
    let v = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").to_owned()
        })
        .unwrap_or_default();
    format!("{} ({v})", bin.display())
}
