//! The scenarios: each injects one kind of fault into a formed [`Lab`] and returns a [`Run`]
//! per fault with the outage, the split-brain samples and any problem found. The spread-VIP
//! faults ([`spread_round`]: kill a holder, restart it, cut and heal one, move by hand) return a
//! [`SpreadRun`] each.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::http::now_ms;
use crate::lab::Lab;
use crate::report::{overlap, Run, SpreadRun};

/// How long a leader may take to appear after a fault before the run fails.
pub const FAILOVER_BOUND: Duration = Duration::from_secs(10);
/// How long the cluster may take to settle (everyone agreeing, VIP held, probe succeeding).
pub const SETTLE_BOUND: Duration = Duration::from_secs(20);

/// How long a healed partition is watched for disruption.
pub const HEAL_WATCH: Duration = Duration::from_millis(1500);

/// Replicated state committed before the faults, checked after each of them.
#[derive(Clone, Debug)]
pub struct Committed {
    /// Commit index once it was all committed.
    pub commit: u64,
    /// Unix ms from which backend b2 is drained (no probe may be served by it).
    pub since: u64,
}

fn cluster_u64(lab: &Lab, i: usize, key: &str) -> Option<u64> {
    lab.admin_json(i, "/cluster/status").ok().and_then(|v| v[key].as_u64())
}

fn servers(lab: &Lab, i: usize) -> Result<Vec<serde_json::Value>, String> {
    let status = lab.admin_json(i, "/status")?;
    status["pools"]
        .as_array()
        .and_then(|pools| pools.iter().find(|p| p["name"] == "app"))
        .and_then(|p| p["servers"].as_array().cloned())
        .ok_or_else(|| "no pool app in /status".to_owned())
}

fn server_field(servers: &[serde_json::Value], name: &str, key: &str) -> serde_json::Value {
    servers.iter().find(|s| s["name"] == name).map(|s| s[key].clone()).unwrap_or_default()
}

/// Commits state through the leader: b1 weight 3, b2 drained (config / drain), and b3 killed
/// until every node's health verdict says it is down. Needs 3 backends.
pub fn commit_state(lab: &mut Lab) -> Result<Committed, String> {
    let l = lab.wait_stable(SETTLE_BOUND)?;
    lab.admin_post(l, "/pools/app/servers/b1/weight", r#"{"weight":3}"#)?;
    lab.admin_post(l, "/pools/app/servers/b2/drain", "{}")?;
    let since = now_ms();
    lab.kill_backend(3);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let problems = check_state(lab, l, 0);
        if problems.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("state not in force on the leader within 15 s: {problems:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let commit = cluster_u64(lab, l, "commit_index").ok_or("no commit index")?;
    Ok(Committed { commit, since })
}

/// What is wrong with node `i`'s view of the committed state (empty when all is in force).
pub fn check_state(lab: &Lab, i: usize, commit: u64) -> Vec<String> {
    let mut problems = Vec::new();
    match servers(lab, i) {
        Err(e) => problems.push(format!("node {}: {e}", i + 1)),
        Ok(s) => {
            if server_field(&s, "b1", "weight") != 3 {
                problems.push(format!("node {}: b1 weight {} != 3", i + 1, server_field(&s, "b1", "weight")));
            }
            if server_field(&s, "b2", "state") != "drain" {
                problems.push(format!("node {}: b2 state {} != drain", i + 1, server_field(&s, "b2", "state")));
            }
            if server_field(&s, "b3", "state") != "down" {
                problems.push(format!("node {}: b3 state {} != down", i + 1, server_field(&s, "b3", "state")));
            }
        }
    }
    match cluster_u64(lab, i, "commit_index") {
        Some(c) if c >= commit => {}
        other => problems.push(format!("node {}: commit index {other:?} < {commit} committed before", i + 1)),
    }
    problems
}

/// Probes served by a drained or dead backend since `c.since` (should be none).
pub fn served_by_excluded(lab: &Lab, c: &Committed) -> usize {
    lab.probes()
        .iter()
        .filter(|p| p.ok && p.start > c.since + 1000 && (p.detail.contains("b2") || p.detail.contains("b3")))
        .count()
}

/// The longest run of failed probes in `[from, to]`, from the first failure's start to the
/// next success's end (ms); 0 when nothing failed.
pub fn longest_gap(lab: &Lab, from: u64, to: u64) -> u64 {
    let mut worst = 0;
    let mut streak: Option<u64> = None;
    let mut probes: Vec<_> = lab.probes().into_iter().filter(|p| p.start >= from && p.start <= to).collect();
    probes.sort_by_key(|p| p.start);
    for p in &probes {
        match (p.ok, streak) {
            (false, None) => streak = Some(p.start),
            (true, Some(s)) => {
                worst = worst.max(p.end.saturating_sub(s));
                streak = None;
            }
            _ => {}
        }
    }
    if let Some(s) = streak {
        worst = worst.max(to.saturating_sub(s));
    }
    worst
}

/// The failed probes that started in `[from, to]`, as "start ms after `from`: error" lines.
pub fn failed_probes(lab: &Lab, from: u64, to: u64) -> Vec<String> {
    let mut failed: Vec<_> = lab.probes().into_iter().filter(|p| !p.ok && p.start >= from && p.start <= to).collect();
    failed.sort_by_key(|p| p.start);
    failed
        .iter()
        .map(|p| format!("+{} ms ({} ms long): {}", p.start.saturating_sub(from), p.end - p.start, p.detail))
        .collect()
}

/// Waits until node `i` follows a leader other than itself and has applied `commit`.
pub fn wait_rejoin(lab: &Lab, i: usize, commit: u64, within: Duration) -> Result<(), String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let s = lab.admin_json(i, "/cluster/status").ok();
        let leader = s.as_ref().and_then(|v| v["leader_id"].as_u64());
        let applied = s.as_ref().and_then(|v| v["applied_index"].as_u64()).unwrap_or(0);
        if leader.is_some() && applied >= commit {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "node {} did not rejoin within {within:?}: leader {leader:?}, applied {applied}",
                i + 1
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finish(lab: &Lab, run: &mut Run, t0: u64, c: &Committed) {
    let o = overlap(&lab.samples(), t0.saturating_sub(2000), now_ms());
    run.overlap = o.certain;
    if o.certain > 0 {
        run.problems.push(format!("split brain: {} overlap samples ({} possible)", o.certain, o.possible));
    }
    let leader = (run.leader_after as usize).saturating_sub(1);
    if run.leader_after != run.leader_before {
        run.vip_ms = lab
            .samples()
            .get(leader)
            .and_then(|s| s.iter().find(|(t, held)| *t >= t0 && *held).map(|(t, _)| t.saturating_sub(t0)));
    }
    run.problems.extend(check_state(lab, leader, c.commit));
}

/// Scenario 1: SIGKILL the leader (after a seeded 0–300 ms jitter), measure, restart it.
pub fn kill_leader(lab: &mut Lab, run_no: usize, rng: &mut fastrand::Rng, c: &Committed) -> Result<Run, String> {
    let l = lab.wait_stable(SETTLE_BOUND)?;
    let term_before = cluster_u64(lab, l, "term");
    std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
    let t0 = lab.kill(l)?;
    let end = lab.first_ok_after(t0, FAILOVER_BOUND);
    let after = lab.wait_stable(SETTLE_BOUND)?;
    let term_after = cluster_u64(lab, after, "term");
    let mut run = Run {
        scenario: "kill".into(),
        run: run_no,
        leader_before: lab.nodes[l].id,
        leader_after: lab.nodes[after].id,
        outage_ms: end.map(|e| e.saturating_sub(t0)),
        vip_ms: None,
        overlap: 0,
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    // One election moves the term by one; more means a split vote or a lost candidacy.
    if let (Some(b), Some(a)) = (term_before, term_after) {
        if a > b + 1 {
            run.warnings.push(format!("term {b} -> {a}: {} extra election(s)", a - b - 1));
        }
    }
    finish(lab, &mut run, t0, c);
    lab.start(l)?;
    lab.wait_admin(l, Duration::from_secs(30))?;
    wait_rejoin(lab, l, c.commit, SETTLE_BOUND)?;
    lab.wait_stable(SETTLE_BOUND)?;
    Ok(run)
}

/// Scenario 2: cut the leader off (its `eth0` down), measure, heal; the old leader must have
/// released the VIP while cut off and must rejoin as a follower without it.
pub fn partition(lab: &mut Lab, run_no: usize, rng: &mut fastrand::Rng, c: &Committed) -> Result<Run, String> {
    let l = lab.wait_stable(SETTLE_BOUND)?;
    std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
    let t0 = lab.link(l, false)?;
    let end = lab.first_ok_after(t0, FAILOVER_BOUND);
    // Give the cut-off node time to notice; then it must not hold the VIP.
    std::thread::sleep(Duration::from_millis(1000));
    let mut problems = Vec::new();
    if lab.holders_now().contains(&l) {
        problems.push(format!("cut-off old leader {} still holds the VIP 1 s after the fault", l + 1));
    }
    let others: Vec<usize> = (0..lab.nodes.len()).filter(|&i| i != l).collect();
    let leaders = lab.leaders();
    let new = others.iter().find_map(|i| leaders.get(i).copied().flatten()).unwrap_or(0);
    let heal = lab.link(l, true)?;
    let after = lab.wait_stable(SETTLE_BOUND)?;
    if after == l {
        problems.push(format!("old leader {} became leader again after the heal", l + 1));
    }
    // Let the healed node settle, then it must follow and not hold the VIP.
    wait_rejoin(lab, l, c.commit, SETTLE_BOUND)?;
    let view = lab.admin_json(l, "/status")?;
    if after != l && view["vip"]["holding"].as_bool() != Some(false) {
        problems.push(format!("healed old leader {} reports holding the VIP", l + 1));
    }
    // Watch the healed cluster a little longer: a disruption (lease lost, verdicts flipped)
    // shows up within a second or two of the heal.
    std::thread::sleep(HEAL_WATCH);
    let settled = lab.wait_stable(SETTLE_BOUND)?;
    if settled == l {
        problems.push(format!("old leader {} took leadership back after the heal", l + 1));
    }
    let heal_gap = longest_gap(lab, heal, now_ms());
    let mut warnings = Vec::new();
    if heal_gap > 0 {
        warnings.push(format!("{heal_gap} ms of failed requests after the heal (at {heal})"));
    }
    let mut run = Run {
        scenario: "partition".into(),
        run: run_no,
        leader_before: lab.nodes[l].id,
        leader_after: new,
        outage_ms: end.map(|e| e.saturating_sub(t0)),
        vip_ms: None,
        overlap: 0,
        problems,
        warnings,
    };
    if new == 0 {
        run.problems.push("no leader among the connected nodes".into());
        run.leader_after = lab.nodes[after].id;
    }
    finish(lab, &mut run, t0, c);
    Ok(run)
}

/// Scenario 3: restart each follower in turn (SIGTERM, start, rejoin; no request may fail),
/// then the leader last (a rolling restart), measuring its outage.
pub fn rolling_restart(lab: &mut Lab, run_no: usize, c: &Committed) -> Result<Vec<Run>, String> {
    let mut runs = Vec::new();
    let l = lab.wait_stable(SETTLE_BOUND)?;
    for f in (0..lab.nodes.len()).filter(|&i| i != l) {
        let t0 = lab.stop(f)?;
        lab.start(f)?;
        lab.wait_admin(f, Duration::from_secs(30))?;
        wait_rejoin(lab, f, c.commit, SETTLE_BOUND)?;
        let now = lab.wait_stable(SETTLE_BOUND)?;
        let gap = longest_gap(lab, t0, now_ms());
        let mut run = Run {
            scenario: "follower".into(),
            run: run_no,
            leader_before: lab.nodes[l].id,
            leader_after: lab.nodes[now].id,
            outage_ms: Some(gap),
            vip_ms: None,
            overlap: 0,
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        if gap > 0 {
            run.warnings.push(format!("restarting follower {} failed requests for {gap} ms", f + 1));
        }
        finish(lab, &mut run, t0, c);
        runs.push(run);
    }
    // A graceful stop keeps serving while it drains, so the outage is the longest run of
    // failed requests from the signal until the cluster is stable again without the node.
    let t0 = lab.stop(l)?;
    let mid = lab.wait_stable(SETTLE_BOUND)?;
    let outage = longest_gap(lab, t0, now_ms());
    let mut run = Run {
        scenario: "rolling".into(),
        run: run_no,
        leader_before: lab.nodes[l].id,
        leader_after: lab.nodes[mid].id,
        outage_ms: Some(outage),
        vip_ms: None,
        overlap: 0,
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    for failure in failed_probes(lab, t0, now_ms()) {
        run.problems.push(format!("a request failed during the hand-over: {failure}"));
    }
    finish(lab, &mut run, t0, c);
    let t1 = now_ms();
    lab.start(l)?;
    lab.wait_admin(l, Duration::from_secs(30))?;
    wait_rejoin(lab, l, c.commit, SETTLE_BOUND)?;
    let after = lab.wait_stable(SETTLE_BOUND)?;
    if after != mid {
        run.warnings.push(format!(
            "the restarted node {} took leadership back from {} (a second failover)",
            l + 1,
            mid + 1
        ));
    }
    let gap = longest_gap(lab, t1, now_ms());
    if gap > 0 {
        run.warnings.push(format!("{gap} ms of failed requests while the old leader rejoined"));
    }
    runs.push(run);
    Ok(runs)
}

/// Scenario 4, second half: kill the witness of a pair; the active node must keep the VIP
/// (quorum is 2 of 3) with no failed request. The witness is restarted afterwards.
pub fn lose_witness(lab: &mut Lab, run_no: usize, c: &Committed) -> Result<Run, String> {
    let l = lab.wait_stable(SETTLE_BOUND)?;
    let w = lab.nodes.iter().position(|n| n.witness).ok_or("no witness in this lab")?;
    let t0 = lab.kill(w)?;
    std::thread::sleep(Duration::from_secs(2));
    let after = lab.wait_stable(SETTLE_BOUND)?;
    let gap = longest_gap(lab, t0, now_ms());
    let mut run = Run {
        scenario: "witness".into(),
        run: run_no,
        leader_before: lab.nodes[l].id,
        leader_after: lab.nodes[after].id,
        outage_ms: Some(gap),
        vip_ms: None,
        overlap: 0,
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    if gap > 0 {
        run.warnings.push(format!("losing the witness failed requests for {gap} ms"));
    }
    finish(lab, &mut run, t0, c);
    lab.start(w)?;
    lab.wait_admin(w, Duration::from_secs(30))?;
    wait_rejoin(lab, w, c.commit, SETTLE_BOUND)?;
    Ok(run)
}

/// No fault: `wrk` (which must be on PATH) drives full HTTP load through the VIP from the client
/// namespace for `secs`, while every node's leader and term are polled every 250 ms. Any
/// leader or term change, or the VIP moving, is a problem: a timing profile that flaps under
/// load is worse than a slower one. The outage is the longest run of failed probes.
pub fn under_load(lab: &mut Lab, leader: usize, secs: Duration) -> Result<Run, String> {
    let t0 = now_ms();
    let before = cluster_u64(lab, leader, "term").ok_or("no term from the leader")?;
    // A lease that lapses for a moment releases and re-claims the VIP on the same node, too
    // fast for the 10 ms monitor: the controller's counters catch it.
    let vip_counts = |lab: &Lab| {
        lab.admin_json(leader, "/status").ok().map(|v| (v["vip"]["claims"].as_u64(), v["vip"]["releases"].as_u64()))
    };
    let counts_before = vip_counts(lab);
    let mut wrk = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.client_ns(), "wrk", "-t2", "-c64", "--timeout", "2s"])
        .arg(format!("-d{}s", secs.as_secs()))
        .arg(format!("http://{}:{}/", crate::lab::VIP, crate::lab::WEB_PORT))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("wrk: {e} (apt-get install wrk)"))?;
    let deadline = std::time::Instant::now() + secs + Duration::from_secs(15);
    let mut seen: Vec<(usize, u64, u64)> = Vec::new(); // (node, leader, term) whenever it changes
    let mut last: Vec<Option<(u64, u64)>> = vec![None; lab.nodes.len()];
    let status = loop {
        for (i, slot) in last.iter_mut().enumerate() {
            let Ok(v) = lab.admin_json(i, "/cluster/status") else { continue };
            if let (Some(l), Some(t)) = (v["leader_id"].as_u64(), v["term"].as_u64()) {
                if *slot != Some((l, t)) {
                    *slot = Some((l, t));
                    seen.push((i, l, t));
                }
            }
        }
        match wrk.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(250)),
            Ok(None) => {
                let _ = wrk.kill();
                let _ = wrk.wait();
                break Err("wrk ran past its deadline".to_owned());
            }
            Err(e) => break Err(format!("wrk: {e}")),
        }
    };
    let mut out = String::new();
    if let Some(mut o) = wrk.stdout.take() {
        use std::io::Read;
        let _ = o.read_to_string(&mut out);
    }
    let t1 = now_ms();
    let after = cluster_u64(lab, leader, "term");
    let mut problems = Vec::new();
    if let Err(e) = status {
        problems.push(e);
    }
    // The first poll of each node records its starting view; anything beyond is a change.
    let changes = seen.len().saturating_sub(lab.nodes.len());
    if changes > 0 || after != Some(before) {
        problems.push(format!(
            "leadership changed under load: term {before} -> {after:?}, {changes} change(s) seen: {seen:?}"
        ));
    }
    let counts_after = vip_counts(lab);
    if counts_before != counts_after {
        problems.push(format!(
            "the leader released and re-claimed the VIP under load: (claims, releases) {counts_before:?} -> {counts_after:?}"
        ));
    }
    let samples = lab.samples();
    let moves = samples
        .iter()
        .map(|s| s.windows(2).filter(|w| w[0].0 >= t0 && w[1].0 <= t1 && w[0].1 != w[1].1).count())
        .sum::<usize>();
    if moves > 0 {
        problems.push(format!("the VIP changed hands {moves} time(s) under load"));
    }
    let gap = longest_gap(lab, t0, t1);
    let failed = lab.with_probes(|v| v.iter().filter(|p| p.start >= t0 && p.start <= t1 && !p.ok).count());
    let pick = |key: &str| out.lines().find(|l| l.trim_start().starts_with(key)).map(|l| l.trim().to_owned());
    let mut warnings: Vec<String> =
        ["Requests/sec:", "Socket errors:", "Non-2xx"].iter().filter_map(|k| pick(k)).collect();
    if failed > 0 {
        warnings.push(format!("{failed} probe(s) failed during the load"));
    }
    let mut run = Run {
        scenario: "load".into(),
        run: 1,
        leader_before: lab.nodes[leader].id,
        leader_after: lab.nodes[leader].id,
        outage_ms: Some(gap),
        vip_ms: None,
        overlap: 0,
        problems,
        warnings,
    };
    let o = overlap(&samples, t0, t1);
    run.overlap = o.certain;
    Ok(run)
}

/// Scenario 5: remove a follower (`POST /cluster/remove`), wait until it reports its removal,
/// stop it, `keel cluster leave --reset`, start it and join it again. No request may fail, and
/// the leader, the term and the VIP holder must stay where they were throughout.
pub fn remove_rejoin(lab: &mut Lab, run_no: usize, c: &Committed) -> Result<Run, String> {
    let l = lab.wait_stable(SETTLE_BOUND)?;
    let f = (0..lab.nodes.len()).find(|&i| i != l && !lab.nodes[i].witness).ok_or("no follower to remove")?;
    let id = lab.nodes[f].id;
    let term_before = cluster_u64(lab, l, "term");
    let t0 = now_ms();
    lab.admin_post(l, "/cluster/remove", &format!("{{\"id\":{id}}}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lab.admin_json(f, "/cluster/status").ok().and_then(|s| s["removed"]["node_id"].as_u64()) != Some(id) {
        if std::time::Instant::now() > deadline {
            return Err(format!("node {id} did not report its removal within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut problems = Vec::new();
    let removed_term = cluster_u64(lab, f, "term");
    lab.stop(f)?;
    let config = lab.nodes[f].config.display().to_string();
    lab.keel_cli(f, &["cluster", "leave", "--reset", "--config", &config])?;
    lab.start(f)?;
    lab.wait_admin(f, Duration::from_secs(30))?;
    let via = lab.nodes[l].admin().trim_start_matches("http://").to_owned();
    lab.keel_cli(f, &["cluster", "join", "--via", &via, "--config", &config])?;
    wait_rejoin(lab, f, c.commit, SETTLE_BOUND)?;
    let after = lab.wait_stable(SETTLE_BOUND)?;
    let term_after = cluster_u64(lab, after, "term");
    if after != l {
        problems.push(format!("the leader moved from {} to {}", l + 1, after + 1));
    }
    if term_after != term_before {
        problems.push(format!("term {term_before:?} -> {term_after:?} (the removed node raised it: {removed_term:?})"));
    }
    if lab.holders_now() != vec![l] {
        problems.push(format!("VIP holders now {:?}, expected only node {}", lab.holders_now(), l + 1));
    }
    for failure in failed_probes(lab, t0, now_ms()) {
        problems.push(format!("a request failed during remove/reset/re-join: {failure}"));
    }
    let mut run = Run {
        scenario: "remove".into(),
        run: run_no,
        leader_before: lab.nodes[l].id,
        leader_after: lab.nodes[after].id,
        outage_ms: Some(longest_gap(lab, t0, now_ms())),
        vip_ms: None,
        overlap: 0,
        problems,
        warnings: Vec::new(),
    };
    finish(lab, &mut run, t0, c);
    Ok(run)
}

// ---------------------------------------------------------------------------------------------
// Spread VIPs (`[vip] addresses`): three VIPs on three nodes, a prober per VIP.

/// How long a spread scenario watches after a VIP moved, for failures of the other VIPs.
pub const SPREAD_WATCH: Duration = Duration::from_millis(500);
/// How long a restarted or healed node is watched for a VIP moving back to it.
pub const MOVE_BACK_WATCH: Duration = Duration::from_millis(1500);
/// The spread VIPs' failover bound on the default profile (p99): today's single VIP's.
pub const SPREAD_FAILOVER_MS: u64 = 200;

/// The index of the leader every running node names.
pub fn leader_index(lab: &Lab, within: Duration) -> Result<usize, String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let leaders = lab.leaders();
        let first = leaders.values().next().copied().flatten();
        if let Some(l) = first.filter(|l| leaders.values().all(|x| *x == Some(*l))) {
            return Ok((l - 1) as usize);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("no agreed leader within {within:?}: {leaders:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `vip` is on exactly one node's `eth0` other than `from` (by the monitor); returns
/// that node and its first sample holding `vip` at or after `t0`.
pub fn wait_moved(lab: &Lab, vip: IpAddr, from: usize, t0: u64, within: Duration) -> Option<(usize, u64)> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let [h] = lab.spread_holders_now(vip).as_slice() {
            if *h != from {
                let on =
                    lab.spread_samples(vip).get(*h)?.iter().find(|(t, held)| *held && *t >= t0).map(|(t, _)| *t)?;
                return Some((*h, on));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// The end of the first successful probe of `vip` that started at or after `t0`.
pub fn first_ok(lab: &Lab, vip: IpAddr, t0: u64, within: Duration) -> Option<u64> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        let ok = lab.spread_probes(vip).iter().filter(|p| p.ok && p.start >= t0).map(|p| p.end).min();
        if ok.is_some() {
            return ok;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Failed probes of `vip` that started in `[from, to]`, as "+ms: error" lines.
pub fn spread_failed(lab: &Lab, vip: IpAddr, from: u64, to: u64) -> Vec<String> {
    let mut failed: Vec<_> =
        lab.spread_probes(vip).into_iter().filter(|p| !p.ok && p.start >= from && p.start <= to).collect();
    failed.sort_by_key(|p| p.start);
    failed.iter().map(|p| format!("{vip} +{} ms: {}", p.start.saturating_sub(from), p.detail)).collect()
}

/// Overlap samples of every spread VIP in `[from, to]`; a problem per VIP with a certain one.
fn spread_overlap(lab: &Lab, run: &mut SpreadRun, from: u64, to: u64) {
    for vip in lab.spread_vips() {
        let o = overlap(&lab.spread_samples(vip), from, to);
        run.certain += o.certain;
        run.possible += o.possible;
        if o.certain > 0 {
            run.problems.push(format!("split brain: {} samples with two holders of {vip}", o.certain));
        }
    }
}

/// The VIPs node `i` holds by the monitor's latest samples.
fn held_by(lab: &Lab, i: usize) -> Vec<IpAddr> {
    lab.spread_vips().into_iter().filter(|v| lab.spread_holders_now(*v).contains(&i)).collect()
}

/// A node holding exactly one VIP: the leader (`leader_case`) or a follower. The layout is one
/// VIP per node at the start of each fault ([`spread_rebalance`]), so there is one.
fn pick_holder(lab: &Lab, leader: usize, leader_case: bool) -> Result<(usize, IpAddr), String> {
    (0..lab.nodes.len())
        .filter(|&i| (i == leader) == leader_case && lab.nodes[i].running())
        .find_map(|i| match held_by(lab, i).as_slice() {
            [v] => Some((i, *v)),
            _ => None,
        })
        .ok_or_else(|| {
            let layout: Vec<(usize, Vec<IpAddr>)> = (0..lab.nodes.len()).map(|i| (i + 1, held_by(lab, i))).collect();
            format!("no {} holding exactly one VIP: {layout:?}", if leader_case { "leader" } else { "follower" })
        })
}

/// SIGKILL a node holding one VIP — the leader (`leader_case`: the survivors elect) or a
/// follower — after a seeded 0–300 ms jitter. Measures that VIP's move and first good probe;
/// the other VIPs must fail nothing, and no VIP may have two holders. Returns the run and the
/// killed node (restart it with [`spread_restart`]).
pub fn spread_kill(
    lab: &mut Lab,
    run_no: usize,
    rng: &mut fastrand::Rng,
    leader_case: bool,
) -> Result<(SpreadRun, usize), String> {
    lab.wait_spread_stable(SETTLE_BOUND)?;
    let leader = leader_index(lab, SETTLE_BOUND)?;
    let (victim, vip) = pick_holder(lab, leader, leader_case)?;
    std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
    let t0 = lab.kill(victim)?;
    let mut run = SpreadRun {
        fault: if leader_case { "kill-leader" } else { "kill-follower" }.into(),
        run: run_no,
        node: lab.nodes[victim].id,
        vip: Some(vip),
        ..SpreadRun::default()
    };
    let moved = wait_moved(lab, vip, victim, t0, FAILOVER_BOUND);
    run.moved_ms = moved.map(|(_, on)| on.saturating_sub(t0));
    run.first_ok_ms = first_ok(lab, vip, t0, FAILOVER_BOUND).map(|e| e.saturating_sub(t0));
    if moved.is_none() {
        run.problems.push(format!("{vip} not on one other node within {FAILOVER_BOUND:?}"));
    }
    std::thread::sleep(SPREAD_WATCH);
    let t1 = now_ms();
    for other in lab.spread_vips().into_iter().filter(|v| *v != vip) {
        let failed = spread_failed(lab, other, t0, t1);
        run.other_failed += failed.len();
        run.problems.extend(failed.into_iter().map(|f| format!("another VIP failed a request: {f}")));
    }
    run.vip_failed = spread_failed(lab, vip, t0, t1).len();
    spread_overlap(lab, &mut run, t0.saturating_sub(1000), t1);
    if let Some(ms) = run.moved_ms.filter(|ms| *ms > SPREAD_FAILOVER_MS) {
        run.warnings.push(format!("moved in {ms} ms, over the {SPREAD_FAILOVER_MS} ms bound"));
    }
    if leader_case {
        let new = leader_index(lab, FAILOVER_BOUND)?;
        run.warnings.extend((new == victim).then(|| "the killed leader still named as leader".to_owned()));
    }
    Ok((run, victim))
}

/// Restarts killed node `i` and waits until it is back (following a leader, admin answering);
/// then, for [`MOVE_BACK_WATCH`], nothing may move: no VIP back to it (no `preempt`), no other
/// holder change. A failed probe meanwhile is a warning. (That it is live — renewing its
/// leases — shows right after: [`spread_rebalance`] can move a VIP to it, which the leader
/// allows only for a node renewing.)
pub fn spread_restart(lab: &mut Lab, run_no: usize, i: usize) -> Result<SpreadRun, String> {
    let before = lab.wait_spread_stable(SETTLE_BOUND)?;
    let t0 = now_ms();
    lab.start(i)?;
    lab.wait_admin(i, Duration::from_secs(30))?;
    wait_rejoin(lab, i, 0, SETTLE_BOUND)?;
    let mut run = SpreadRun { fault: "restart".into(), run: run_no, node: lab.nodes[i].id, ..SpreadRun::default() };
    let back = now_ms();
    std::thread::sleep(MOVE_BACK_WATCH);
    let after = lab.wait_spread_stable(SETTLE_BOUND)?;
    let t1 = now_ms();
    if after != before {
        run.problems.push(format!("VIPs moved after the restart: {before:?} -> {after:?}"));
    }
    for vip in lab.spread_vips() {
        let took = lab.spread_samples(vip).get(i).is_some_and(|s| s.iter().any(|(t, h)| *h && *t >= back));
        if took {
            run.problems.push(format!("the restarted node {} took {vip} back (no preempt)", i + 1));
        }
        let failed = spread_failed(lab, vip, t0, t1);
        run.other_failed += failed.len();
        run.warnings.extend(failed.into_iter().map(|f| format!("a request failed while it rejoined: {f}")));
    }
    spread_overlap(lab, &mut run, t0, t1);
    Ok(run)
}

/// Cuts the link of a node holding one VIP (the leader or a follower): it must drop the VIP from
/// its `eth0` (its own monitor says so) before the new holder's first sample, with no overlap;
/// the other VIPs fail nothing. Then heals: the node rejoins and, for [`MOVE_BACK_WATCH`],
/// nothing moves back. Returns the cut run and the heal run.
pub fn spread_cut(
    lab: &mut Lab,
    run_no: usize,
    rng: &mut fastrand::Rng,
    leader_case: bool,
) -> Result<Vec<SpreadRun>, String> {
    lab.wait_spread_stable(SETTLE_BOUND)?;
    let leader = leader_index(lab, SETTLE_BOUND)?;
    let (victim, vip) = pick_holder(lab, leader, leader_case)?;
    std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
    let t0 = lab.link(victim, false)?;
    let mut run = SpreadRun {
        fault: if leader_case { "cut-leader" } else { "cut-follower" }.into(),
        run: run_no,
        node: lab.nodes[victim].id,
        vip: Some(vip),
        ..SpreadRun::default()
    };
    let moved = wait_moved(lab, vip, victim, t0, FAILOVER_BOUND);
    run.moved_ms = moved.map(|(_, on)| on.saturating_sub(t0));
    run.first_ok_ms = first_ok(lab, vip, t0, FAILOVER_BOUND).map(|e| e.saturating_sub(t0));
    std::thread::sleep(SPREAD_WATCH);
    let t1 = now_ms();
    let own = lab.spread_samples(vip).get(victim).cloned().unwrap_or_default();
    let released = own.iter().find(|(t, h)| *t >= t0 && !*h).map(|(t, _)| *t);
    let last_held = own.iter().filter(|(t, h)| *t >= t0 && *h).map(|(t, _)| *t).max();
    run.released_ms = released.map(|r| r.saturating_sub(t0));
    match (moved, released) {
        (None, _) => run.problems.push(format!("{vip} not on one other node within {FAILOVER_BOUND:?}")),
        (_, None) => run.problems.push(format!("the cut-off node {} never let {vip} go", victim + 1)),
        (Some((to, on)), Some(rel)) => {
            if rel > on || last_held.is_some_and(|l| l >= on) {
                run.problems.push(format!(
                    "node {} had {vip} at +{} ms, before the cut-off node {} let go (+{} ms)",
                    to + 1,
                    on.saturating_sub(t0),
                    victim + 1,
                    rel.saturating_sub(t0)
                ));
            }
        }
    }
    for other in lab.spread_vips().into_iter().filter(|v| *v != vip) {
        let failed = spread_failed(lab, other, t0, t1);
        run.other_failed += failed.len();
        run.problems.extend(failed.into_iter().map(|f| format!("another VIP failed a request: {f}")));
    }
    run.vip_failed = spread_failed(lab, vip, t0, t1).len();
    spread_overlap(lab, &mut run, t0.saturating_sub(1000), t1);
    if let Some(ms) = run.moved_ms.filter(|ms| *ms > SPREAD_FAILOVER_MS) {
        run.warnings.push(format!("moved in {ms} ms, over the {SPREAD_FAILOVER_MS} ms bound"));
    }

    // Heal: nothing moves back. (No admin call reaches the cut-off node: read the monitor.)
    let before: BTreeMap<IpAddr, Vec<usize>> =
        lab.spread_vips().into_iter().map(|v| (v, lab.spread_holders_now(v))).collect();
    let heal = lab.link(victim, true)?;
    let mut healed =
        SpreadRun { fault: "heal".into(), run: run_no, node: lab.nodes[victim].id, ..SpreadRun::default() };
    wait_rejoin(lab, victim, 0, SETTLE_BOUND)?;
    lab.wait_spread_stable(SETTLE_BOUND)?;
    std::thread::sleep(MOVE_BACK_WATCH);
    let after: BTreeMap<IpAddr, Vec<usize>> =
        lab.wait_spread_stable(SETTLE_BOUND)?.into_iter().map(|(v, h)| (v, vec![h])).collect();
    let t2 = now_ms();
    if after != before {
        healed.problems.push(format!("VIPs moved after the heal: {before:?} -> {after:?}"));
    }
    for v in lab.spread_vips() {
        if lab.spread_samples(v).get(victim).is_some_and(|s| s.iter().any(|(t, h)| *h && *t >= heal)) {
            healed.problems.push(format!("the healed node {} took {v} back (no preempt)", victim + 1));
        }
        let failed = spread_failed(lab, v, heal, t2);
        healed.other_failed += failed.len();
        healed.warnings.extend(failed.into_iter().map(|f| format!("a request failed after the heal: {f}")));
    }
    spread_overlap(lab, &mut healed, heal, t2);
    Ok(vec![run, healed])
}

/// `keel cluster vip move VIP --to N` run in node `via`'s namespace against its admin API.
pub fn cli_vip_move(lab: &Lab, via: usize, vip: IpAddr, to: u64) -> Result<String, String> {
    let admin = format!("{}:{}", lab.nodes[via].addr, crate::lab::ADMIN_PORT);
    lab.keel_cli(
        via,
        &[
            "cluster",
            "vip",
            "move",
            &vip.to_string(),
            "--to",
            &to.to_string(),
            "--admin",
            &admin,
            "--token",
            &lab.token,
        ],
    )
}

/// Moves one VIP with `keel cluster vip move` from `from` to `to` and measures it: the VIP must
/// end on `to`, fail no request, and never have two holders.
pub fn spread_move(lab: &Lab, run_no: usize, vip: IpAddr, from: usize, to: usize) -> Result<SpreadRun, String> {
    let t0 = now_ms();
    let mut run =
        SpreadRun { fault: "move".into(), run: run_no, node: lab.nodes[to].id, vip: Some(vip), ..SpreadRun::default() };
    if let Err(e) = cli_vip_move(lab, from, vip, lab.nodes[to].id) {
        run.problems.push(format!("keel cluster vip move {vip} --to {}: {e}", lab.nodes[to].id));
    }
    let moved = wait_moved(lab, vip, from, t0, FAILOVER_BOUND);
    run.moved_ms = moved.map(|(_, on)| on.saturating_sub(t0));
    match moved {
        Some((h, _)) if h == to => {}
        other => run.problems.push(format!("{vip} ended on {:?}, not node {}", other.map(|(h, _)| h + 1), to + 1)),
    }
    std::thread::sleep(SPREAD_WATCH);
    let t1 = now_ms();
    for v in lab.spread_vips() {
        let failed = spread_failed(lab, v, t0, t1);
        if v == vip {
            run.vip_failed = failed.len();
        } else {
            run.other_failed += failed.len();
        }
        for f in failed {
            // A connection open when the clients' ARP entries switch to the new holder is reset
            // (its next segment reaches a node that never saw it): an L2 move cannot carry a
            // connection. Counted, and reported apart; any other failure is a problem.
            if v == vip && is_caught_mid_flight(&f) {
                run.warnings.push(format!("a connection caught mid-flight by the ARP switch: {f}"));
            } else {
                run.problems.push(format!("a request failed during the move: {f}"));
            }
        }
    }
    spread_overlap(lab, &mut run, t0.saturating_sub(1000), t1);
    Ok(run)
}

/// A failed probe line of [`spread_failed`] that is a reset of an established connection: one
/// in flight when the VIP's ARP entry switched (see [`spread_move`]).
pub fn is_caught_mid_flight(failed: &str) -> bool {
    failed.contains("read: Connection reset by peer")
}

/// Puts the layout back to one VIP per node with [`spread_move`] (after a restart or a heal
/// nothing moves back by itself); returns the moves made.
pub fn spread_rebalance(lab: &Lab, run_no: usize) -> Result<Vec<SpreadRun>, String> {
    let mut moves = Vec::new();
    for _ in 0..lab.nodes.len() {
        let holders = lab.wait_spread_stable(SETTLE_BOUND)?;
        let mut counts: Vec<Vec<IpAddr>> = vec![Vec::new(); lab.nodes.len()];
        for (vip, h) in &holders {
            counts[*h].push(*vip);
        }
        let busiest = (0..counts.len()).max_by_key(|i| counts[*i].len()).ok_or("no nodes")?;
        let idlest = (0..counts.len()).filter(|i| lab.nodes[*i].running()).min_by_key(|i| counts[*i].len());
        let Some(idlest) = idlest.filter(|i| counts[busiest].len() > counts[*i].len() + 1) else {
            return Ok(moves);
        };
        let Some(vip) = counts[busiest].first().copied() else { return Ok(moves) };
        moves.push(spread_move(lab, run_no, vip, busiest, idlest)?);
    }
    Ok(moves)
}

/// One round of the spread scenario, on a lab with one VIP per node: kill a follower holder,
/// restart it; kill the leader holder, restart it; cut a holder's link (the leader in even
/// rounds), heal — with the layout put back to one VIP per node by `keel cluster vip move`
/// between the faults (those moves are measured too).
pub fn spread_round(lab: &mut Lab, run_no: usize, rng: &mut fastrand::Rng) -> Result<Vec<SpreadRun>, String> {
    let mut runs = Vec::new();
    runs.extend(spread_rebalance(lab, run_no)?);
    for leader_case in [false, true] {
        let (run, victim) = spread_kill(lab, run_no, rng, leader_case)?;
        runs.push(run);
        runs.push(spread_restart(lab, run_no, victim)?);
        runs.extend(spread_rebalance(lab, run_no)?);
    }
    runs.extend(spread_cut(lab, run_no, rng, run_no.is_multiple_of(2))?);
    runs.extend(spread_rebalance(lab, run_no)?);
    Ok(runs)
}
