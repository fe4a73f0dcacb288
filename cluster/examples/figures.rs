//! Cluster figures for a large sticky table (issue #16), printed as README's table rows.
//!
//! `cargo run --release -p keel-cluster --example figures [ENTRIES] [memory]` (default
//! 1,000,000) — a measurement, not a test: it prints figures and asserts nothing about them (the
//! machine is shared and noisy). With `memory`, only the first figure is measured.
//!
//! 1. **Memory per entry**: ENTRIES source-IP bindings applied to a `ClusterState` as a
//!    follower applies them (batches of `MAX_STICKY_BATCH`), counted by a counting allocator
//!    (live heap) and by RSS; once with addresses in ascending order, once in a scrambled order
//!    (as clients arrive), since a B-tree's nodes fill differently under the two; and once with
//!    32-character session ids (`learn` mode).
//! 2. **A three-node loopback cluster** (real Raft over TCP, real redb stores), each node on a
//!    one-worker runtime of its own as `keel run` runs Raft, with a probe task on each runtime
//!    that records how late it got to run (the Raft thread's worst stall). Config apply latency
//!    with 0, 300k and ENTRIES entries; the fill rate; a snapshot built at ENTRIES (its time off
//!    the Raft thread, and the Raft thread's worst stall meanwhile); a fourth node that can only
//!    catch up by installing that snapshot over the network; and every term and leader seen.
//!    The Raft runtimes run under `SCHED_RR` as `keel run`'s do by default (when allowed).

// The counting allocator below is the one unsafe piece: GlobalAlloc is an unsafe trait.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_cluster::command::{StickyEntry, MAX_STICKY_BATCH};
use keel_cluster::node::now_ms;
use keel_cluster::{ClusterHandle, ClusterNode, ClusterSettings, ClusterState, Command, Config, Role};
use tokio::runtime::Runtime;

/// Counts live heap bytes (for the memory-per-entry figure).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Proposals in flight at once, as the data plane's batcher allows.
const IN_FLIGHT: usize = 4;
/// Config proposals per measurement.
const APPLIES: usize = 50;
/// Deadline for any cluster-wide condition.
const CONVERGE: Duration = Duration::from_secs(120);
/// How often each Raft runtime's probe asks to run.
const PROBE_EVERY: Duration = Duration::from_millis(2);

fn config(n: usize) -> anyhow::Result<Config> {
    let servers: Vec<String> =
        (0..n).map(|i| format!(r#"{{"name":"s{i}","address":"127.0.0.1:{}"}}"#, 9100 + i)).collect();
    Ok(serde_json::from_str(&format!(
        r#"{{"listeners":{{"web":{{"bind":"127.0.0.1:8080","default_pool":"app"}}}},
            "pools":{{"app":{{"servers":[{}],"sticky":{{"mode":"source_ip"}}}}}}}}"#,
        servers.join(",")
    ))?)
}

fn key(i: usize) -> String {
    let [a, b, c, d] = (0x0a00_0000u32.wrapping_add(i as u32)).to_be_bytes();
    format!("{a}.{b}.{c}.{d}")
}

fn batch(from: usize, to: usize) -> Vec<StickyEntry> {
    let expires_at_ms = now_ms() + 24 * 3_600_000;
    (from..to).map(|i| StickyEntry { pool: "app".into(), key: key(i), server: "s0".into(), expires_at_ms }).collect()
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The keys of the memory figure, and the order they arrive in.
#[derive(Clone, Copy, Debug)]
enum Keys {
    /// IPv4 addresses 10.0.0.0, 10.0.0.1, …
    Ascending,
    /// IPv4 addresses spread over the whole space by an odd multiplier (a bijection, so all
    /// distinct).
    Scrambled,
    /// 32-character session ids (`learn` mode), scrambled likewise.
    SessionIds,
}

/// Memory of ENTRIES bindings in a follower's state.
fn memory_per_entry(entries: usize, keys: Keys) -> anyhow::Result<()> {
    let mut state = ClusterState::default();
    state.apply(&Command::ApplyConfig(config(2)?), 1, now_ms());
    let (live0, rss0) = (LIVE.load(Ordering::Relaxed), rss_bytes());
    let started = Instant::now();
    let mut from = 0;
    let mut index = 2;
    while from < entries {
        let to = (from + MAX_STICKY_BATCH).min(entries);
        let mut b = batch(from, to);
        for (i, e) in (from..to).zip(b.iter_mut()) {
            let scrambled = (i as u32).wrapping_mul(0x9e37_79b1);
            match keys {
                Keys::Ascending => {}
                Keys::Scrambled => e.key = std::net::Ipv4Addr::from(scrambled).to_string(),
                Keys::SessionIds => e.key = format!("{scrambled:032x}"),
            }
        }
        state.apply(&Command::PutStickyBatch(b), index, now_ms());
        from = to;
        index += 1;
    }
    let took = started.elapsed();
    let (live, rss) = (LIVE.load(Ordering::Relaxed), rss_bytes());
    println!(
        "| memory per entry ({entries} entries, {keys:?}) | {:.0} B live heap, {:.0} B RSS | applied at {:.0} entries/s |",
        (live - live0) as f64 / entries as f64,
        rss.saturating_sub(rss0) as f64 / entries as f64,
        entries as f64 / took.as_secs_f64()
    );
    let started = Instant::now();
    let bytes = keel_cluster::codec::encode(&state)?;
    let encode = started.elapsed();
    let before_decode = LIVE.load(Ordering::Relaxed);
    let started = Instant::now();
    let back: ClusterState = keel_cluster::codec::decode(&bytes)?;
    let decode = started.elapsed();
    println!(
        "| snapshot encode / decode, {entries} entries, one thread | {:.0} / {:.0} ms | {:.1} MB, {:.1} B/entry; decoded state {:.0} B/entry live heap |",
        ms(encode),
        ms(decode),
        bytes.len() as f64 / 1e6,
        bytes.len() as f64 / entries as f64,
        LIVE.load(Ordering::Relaxed).saturating_sub(before_decode) as f64 / entries as f64
    );
    drop((state, back));
    Ok(())
}

/// keel-node's `[cluster] realtime` (the default): the Raft runtime's threads under `SCHED_RR`,
/// priority 10, when allowed (root or CAP_SYS_NICE).
fn realtime() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: `pthread_self` is valid for the calling thread and `param` outlives the call.
    let _ = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_RR, &param) };
}

/// One node on its own one-worker runtime, with a probe recording that runtime's worst lateness.
struct Member {
    handle: ClusterHandle,
    rt: Option<Runtime>,
    worst_lateness_us: Arc<AtomicU64>,
    stop_probe: Arc<AtomicBool>,
}

impl Member {
    async fn start(id: u64, dir: std::path::PathBuf) -> anyhow::Result<Member> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("raft-{id}"))
            .on_thread_start(realtime)
            .enable_all()
            .build()?;
        let admin: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let settings = ClusterSettings::new(id, "127.0.0.1:0".parse()?, admin, dir, "figures");
        let handle = rt.spawn(ClusterNode::start(settings)).await??;
        let (worst, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (w, s) = (worst.clone(), stop.clone());
        rt.spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let asked = Instant::now();
                tokio::time::sleep(PROBE_EVERY).await;
                let late = asked.elapsed().saturating_sub(PROBE_EVERY);
                w.fetch_max(u64::try_from(late.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
            }
        });
        Ok(Member { handle, rt: Some(rt), worst_lateness_us: worst, stop_probe: stop })
    }

    /// The worst lateness since the last call, and reset.
    fn take_worst(&self) -> Duration {
        Duration::from_micros(self.worst_lateness_us.swap(0, Ordering::Relaxed))
    }

    async fn stop(mut self) {
        self.stop_probe.store(true, Ordering::Relaxed);
        self.handle.shutdown().await;
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Every term and leader the nodes report, polled until stopped.
#[derive(Default)]
struct Seen {
    terms: Mutex<BTreeSet<u64>>,
    leaders: Mutex<BTreeSet<u64>>,
    stop: AtomicBool,
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < CONVERGE {
        if cond() {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    anyhow::bail!("timed out after {CONVERGE:?} waiting for: {what}")
}

/// The node that leads now.
fn leader_of(members: &[Member]) -> Option<ClusterHandle> {
    members
        .iter()
        .map(|m| &m.handle)
        .find(|h| h.status().role == Role::Leader && h.status().quorum_acked_within_lease)
        .cloned()
}

async fn fill(members: &[Member], from: usize, to: usize) -> anyhow::Result<()> {
    let mut start = from;
    while start < to {
        let mut inflight = Vec::new();
        for _ in 0..IN_FLIGHT {
            if start >= to {
                break;
            }
            let end = (start + MAX_STICKY_BATCH).min(to);
            let b = batch(start, end);
            start = end;
            let leader = leader_of(members).ok_or_else(|| anyhow::anyhow!("no leader"))?;
            inflight.push(tokio::spawn(async move { leader.propose(Command::PutStickyBatch(b)).await }));
        }
        for p in inflight {
            p.await??;
        }
    }
    for m in members {
        let rx = m.handle.state();
        wait_for("every node applied the fill", || rx.borrow().sticky.len() >= to).await?;
    }
    Ok(())
}

/// Commit latency and time until every node applied it, over APPLIES config changes.
async fn config_apply(members: &[Member], label: &str) -> anyhow::Result<()> {
    let mut commit = Vec::with_capacity(APPLIES);
    let mut everywhere = Vec::with_capacity(APPLIES);
    for i in 0..APPLIES {
        let cfg = config(2 + i % 3)?;
        let leader = leader_of(members).ok_or_else(|| anyhow::anyhow!("no leader"))?;
        let t = Instant::now();
        leader.propose(Command::ApplyConfig(cfg.clone())).await?;
        commit.push(t.elapsed());
        let rx: Vec<_> = members.iter().map(|m| m.handle.state()).collect();
        wait_for("config applied on every node", || rx.iter().all(|r| r.borrow().config == cfg)).await?;
        everywhere.push(t.elapsed());
    }
    commit.sort();
    everywhere.sort();
    println!(
        "| config apply, {label} | commit p50 {:.1} / p99 {:.1} ms | applied on all three p50 {:.1} / p99 {:.1} ms |",
        ms(percentile(&commit, 0.5)),
        ms(percentile(&commit, 0.99)),
        ms(percentile(&everywhere, 0.5)),
        ms(percentile(&everywhere, 0.99)),
    );
    Ok(())
}

fn worst_stall(members: &[Member]) -> Duration {
    members.iter().map(Member::take_worst).max().unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let entries: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000).max(10_000);
    println!("| figure | value | note |\n|---|---|---|");
    memory_per_entry(entries, Keys::Ascending)?;
    memory_per_entry(entries, Keys::Scrambled)?;
    memory_per_entry(entries, Keys::SessionIds)?;
    if std::env::args().nth(2).as_deref() == Some("memory") {
        return Ok(());
    }

    let tmp = tempfile::tempdir()?;
    let mut members = Vec::new();
    for id in 1..=3u64 {
        members.push(Member::start(id, tmp.path().join(format!("n{id}"))).await?);
    }
    let first = members[0].handle.clone();
    first.initialize(config(2)?).await?;
    for m in &members[1..] {
        first.add_voter(m.handle.id(), m.handle.node_info()).await?;
    }
    let seen = Arc::new(Seen::default());
    let watcher = {
        let (seen, nodes) = (seen.clone(), members.iter().map(|m| m.handle.clone()).collect::<Vec<_>>());
        tokio::spawn(async move {
            while !seen.stop.load(Ordering::Relaxed) {
                for n in &nodes {
                    let s = n.status();
                    if s.role != Role::Shutdown {
                        if let Ok(mut t) = seen.terms.lock() {
                            t.insert(s.term);
                        }
                        if let (Some(l), Ok(mut ls)) = (s.leader_id, seen.leaders.lock()) {
                            ls.insert(l);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    worst_stall(&members);

    config_apply(&members, "0 entries").await?;
    let third = (300_000).min(entries);
    let started = Instant::now();
    fill(&members, 0, third).await?;
    let first_fill = started.elapsed();
    config_apply(&members, &format!("{third} entries")).await?;
    let started = Instant::now();
    fill(&members, third, entries).await?;
    let fill_time = first_fill + started.elapsed();
    println!(
        "| fill through Raft, 3 nodes | {:.0} entries/s | batches of {MAX_STICKY_BATCH}, {IN_FLIGHT} in flight; worst Raft-thread stall while filling {:.0} ms |",
        entries as f64 / fill_time.as_secs_f64(),
        ms(worst_stall(&members))
    );
    config_apply(&members, &format!("{entries} entries")).await?;

    // A snapshot at ENTRIES on every node: its time on the snapshot thread, and the Raft threads'
    // worst stall meanwhile.
    worst_stall(&members);
    for m in &members {
        let before = m.handle.snapshot_figures().builds;
        m.handle.raft().trigger().snapshot().await?;
        wait_for("snapshot built", || m.handle.snapshot_figures().builds > before).await?;
    }
    let stall = worst_stall(&members);
    let f = first.snapshot_figures();
    println!(
        "| snapshot build at {entries} entries (encode + write + fsync) | {:.0} ms, off the Raft thread | {:.1} MB; worst Raft-thread stall during the three builds {:.1} ms |",
        f.last_build_micros as f64 / 1e3,
        f.last_bytes as f64 / 1e6,
        ms(stall)
    );

    // A fourth node joins after the leader purged its log: it catches up by snapshot only.
    let leader = leader_of(&members).ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let snap = leader.status().snapshot_index.unwrap_or(0);
    leader.raft().trigger().purge_log(snap).await?;
    wait_for("log purged", || leader.raft().metrics().borrow().purged.is_some_and(|p| p.index >= snap)).await?;
    let fourth = Member::start(4, tmp.path().join("n4")).await?;
    let started = Instant::now();
    leader.add_learner(4, fourth.handle.node_info()).await?;
    let rx = fourth.handle.state();
    wait_for("the learner holds every entry", || rx.borrow().sticky.len() >= entries).await?;
    let caught_up = started.elapsed();
    let f4 = fourth.handle.snapshot_figures();
    members.push(fourth);
    println!(
        "| snapshot install on a new node, {entries} entries | {:.0} ms decode + write, off the Raft thread | caught up {:.0} ms after joining; worst Raft-thread stall {:.1} ms |",
        f4.last_install_micros as f64 / 1e3,
        ms(caught_up),
        ms(worst_stall(&members))
    );

    seen.stop.store(true, Ordering::Relaxed);
    watcher.await?;
    let terms = seen.terms.lock().map(|t| t.clone()).unwrap_or_default();
    let leaders = seen.leaders.lock().map(|l| l.clone()).unwrap_or_default();
    // Term 0 is a joining node's before it first hears from the leader: not an election.
    let elected: Vec<u64> = terms.iter().copied().filter(|t| *t > 0).collect();
    println!(
        "| leader changes during the run | {} | terms seen {elected:?}, leaders seen {leaders:?} |",
        elected.len().saturating_sub(1).max(leaders.len().saturating_sub(1))
    );
    for m in members {
        m.stop().await;
    }
    Ok(())
}
