//! Figures: outage percentiles and split-brain (overlap) analysis of the monitor's samples.

use std::fmt;

/// One fault and its outcome.
#[derive(Clone, Debug)]
pub struct Run {
    /// Scenario name.
    pub scenario: String,
    /// Run number within the scenario.
    pub run: usize,
    /// Leader (node id) before the fault.
    pub leader_before: u64,
    /// Leader (node id) after it.
    pub leader_after: u64,
    /// Fault → end of the first successful response through the VIP (ms); `None` if none came.
    pub outage_ms: Option<u64>,
    /// Fault → first monitor sample showing the VIP on the new leader (ms), when the leader
    /// changed.
    pub vip_ms: Option<u64>,
    /// Monitor samples during the run where two nodes certainly held the VIP.
    pub overlap: usize,
    /// Problems found (state lost, old leader still holding, …): the run fails.
    pub problems: Vec<String>,
    /// Oddities worth reporting that the pass does not fail on (requests failing after a
    /// heal, …).
    pub warnings: Vec<String>,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<10} run {:>2}: leader {} -> {}, outage {:>6} ms, VIP moved {:>6} ms, overlap samples {}{}{}",
            self.scenario,
            self.run,
            self.leader_before,
            self.leader_after,
            self.outage_ms.map_or("NONE".to_owned(), |o| o.to_string()),
            self.vip_ms.map_or("-".to_owned(), |o| o.to_string()),
            self.overlap,
            if self.problems.is_empty() { String::new() } else { format!(", PROBLEMS: {}", self.problems.join("; ")) },
            if self.warnings.is_empty() { String::new() } else { format!(", warnings: {}", self.warnings.join("; ")) }
        )
    }
}

/// The value at quantile `q` (0–1) of `values` (nearest rank); `None` when empty.
pub fn percentile(values: &[u64], q: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// Split-brain analysis of per-node samples `(unix_ms, holding)` within `[from, to]`.
///
/// A node *certainly* holds the VIP at time t when its last sample at or before t and its next
/// sample at or after t both say so. `certain` counts samples (of any node) that hold while
/// another node certainly holds; `possible` counts samples that hold while another node's
/// neighbouring sample holds (the sampling cannot rule overlap out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overlap {
    /// Samples with two holders for certain.
    pub certain: usize,
    /// Samples where two holders cannot be ruled out.
    pub possible: usize,
    /// Samples examined.
    pub samples: usize,
}

/// See [`Overlap`].
pub fn overlap(samples: &[Vec<(u64, bool)>], from: u64, to: u64) -> Overlap {
    let mut out = Overlap::default();
    for (i, own) in samples.iter().enumerate() {
        for &(t, held) in own.iter().filter(|(t, _)| *t >= from && *t <= to) {
            out.samples += 1;
            if !held {
                continue;
            }
            let (certain, possible) = others_at(samples, i, t);
            out.certain += usize::from(certain);
            out.possible += usize::from(certain || possible);
        }
    }
    out
}

/// Whether another node than `i` certainly, or possibly, held at `t`.
fn others_at(samples: &[Vec<(u64, bool)>], i: usize, t: u64) -> (bool, bool) {
    let mut certain = false;
    let mut possible = false;
    for (j, other) in samples.iter().enumerate() {
        if i == j {
            continue;
        }
        let idx = other.partition_point(|(u, _)| *u <= t);
        let before = idx.checked_sub(1).map(|k| other[k].1);
        let after = other.get(idx).map(|s| s.1);
        match (before, after) {
            (Some(true), Some(true)) | (Some(true), None) => certain = true,
            (Some(true), _) | (_, Some(true)) => possible = true,
            _ => {}
        }
    }
    (certain, possible)
}

/// For a failed run: every certain overlap sample in `from..=to` with each node's samples
/// within 50 ms of it, one line each (`node N: t=held …`), to tell a real overlap from a
/// measurement one.
pub fn overlap_detail(samples: &[Vec<(u64, bool)>], from: u64, to: u64) -> String {
    let mut out = String::new();
    for (i, own) in samples.iter().enumerate() {
        for &(t, _) in own.iter().filter(|(t, held)| *held && *t >= from && *t <= to) {
            if !others_at(samples, i, t).0 {
                continue;
            }
            out.push_str(&format!("node {} held at {t}, and so did another:\n", i + 1));
            for (j, other) in samples.iter().enumerate() {
                let near: Vec<String> = other
                    .iter()
                    .filter(|(u, _)| u.abs_diff(t) <= 50)
                    .map(|(u, h)| format!("{u}={}", u8::from(*h)))
                    .collect();
                out.push_str(&format!("  node {}: {}\n", j + 1, near.join(" ")));
            }
        }
    }
    out
}

fn figures(values: &[u64]) -> String {
    match (percentile(values, 0.5), percentile(values, 0.99), values.iter().max()) {
        (Some(p50), Some(p99), Some(max)) => format!("p50 {p50} ms, p99 {p99} ms, max {max} ms"),
        _ => "-".to_owned(),
    }
}

/// Summary lines: per run, then per scenario p50/p99/max of the outages and VIP moves.
pub fn summary(runs: &[Run]) -> String {
    let mut s = String::new();
    for r in runs {
        s.push_str(&format!("{r}\n"));
    }
    let mut names: Vec<&str> = runs.iter().map(|r| r.scenario.as_str()).collect();
    names.dedup();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let these: Vec<&Run> = runs.iter().filter(|r| r.scenario == name).collect();
        let outages: Vec<u64> = these.iter().filter_map(|r| r.outage_ms).collect();
        let vip: Vec<u64> = these.iter().filter_map(|r| r.vip_ms).collect();
        s.push_str(&format!(
            "{name:<10} {} run(s): outage {}; VIP moved {}; overlap samples {}; problems {}; warnings {}\n",
            these.len(),
            figures(&outages),
            figures(&vip),
            these.iter().map(|r| r.overlap).sum::<usize>(),
            these.iter().map(|r| r.problems.len()).sum::<usize>(),
            these.iter().map(|r| r.warnings.len()).sum::<usize>(),
        ));
    }
    s
}

/// One line per scenario — trials, outage p50/p99/max, overlap samples — under a heading, for
/// putting keel and keepalived side by side.
pub fn side_by_side(groups: &[(&str, &[Run])]) -> String {
    let mut s = format!(
        "{:<22} {:<16} {:>6} {:>8} {:>8} {:>8} {:>8}\n",
        "who", "scenario", "trials", "p50 ms", "p99 ms", "max ms", "overlap"
    );
    for (who, runs) in groups {
        let mut names: Vec<&str> = runs.iter().map(|r| r.scenario.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let these: Vec<&Run> = runs.iter().filter(|r| r.scenario == name).collect();
            let outages: Vec<u64> = these.iter().filter_map(|r| r.outage_ms).collect();
            let cell = |v: Option<u64>| v.map_or("-".to_owned(), |x| x.to_string());
            let missing = these.len() - outages.len();
            s.push_str(&format!(
                "{who:<22} {name:<16} {:>6} {:>8} {:>8} {:>8} {:>8}{}\n",
                these.len(),
                cell(percentile(&outages, 0.5)),
                cell(percentile(&outages, 0.99)),
                cell(outages.iter().max().copied()),
                these.iter().map(|r| r.overlap).sum::<usize>(),
                if missing > 0 { format!("  ({missing} never recovered)") } else { String::new() },
            ));
        }
    }
    s
}

/// One fault of the spread-VIP scenario (`chaos --scenario spread`, [`crate::scenario::spread_round`]).
#[derive(Clone, Debug, Default)]
pub struct SpreadRun {
    /// `kill-follower`, `kill-leader`, `restart`, `cut-follower`, `cut-leader`, `heal`, `move`.
    pub fault: String,
    /// Round number (1-based).
    pub run: usize,
    /// The node the fault hit (id), or the move's target.
    pub node: u64,
    /// The VIP that had to move (kill, cut, move), if any.
    pub vip: Option<std::net::IpAddr>,
    /// Fault → first monitor sample of `vip` on its new holder.
    pub moved_ms: Option<u64>,
    /// Fault → end of the first successful probe of `vip` that started after the fault.
    pub first_ok_ms: Option<u64>,
    /// Cut: fault → the cut node's own monitor shows `vip` gone from its `eth0`.
    pub released_ms: Option<u64>,
    /// Failed probes of `vip` (counted for moves, restarts and heals, where none may fail).
    pub vip_failed: usize,
    /// Failed probes of the VIPs the fault did not touch.
    pub other_failed: usize,
    /// Overlap samples over every VIP: certain / possible.
    pub certain: usize,
    /// See [`Overlap::possible`].
    pub possible: usize,
    /// What broke an invariant.
    pub problems: Vec<String>,
    /// What is worth a look but breaks none (a bound missed, a slow step).
    pub warnings: Vec<String>,
}

impl std::fmt::Display for SpreadRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("{v} ms"));
        write!(
            f,
            "{:<13} #{:<3} node {} vip {}: moved {}, first ok {}, released {}, failed {} (vip) / {} (others), overlap {} certain / {} possible{}{}",
            self.fault,
            self.run,
            self.node,
            self.vip.map_or("-".to_owned(), |v| v.to_string()),
            ms(self.moved_ms),
            ms(self.first_ok_ms),
            ms(self.released_ms),
            self.vip_failed,
            self.other_failed,
            self.certain,
            self.possible,
            if self.problems.is_empty() { String::new() } else { format!(", PROBLEMS: {}", self.problems.join("; ")) },
            if self.warnings.is_empty() { String::new() } else { format!(", warnings: {}", self.warnings.join("; ")) }
        )
    }
}

/// Per fault of the spread scenario: runs, p50/p99/max of the move and the first good probe,
/// failed probes (the moved VIP's, the others'), overlap samples, problems.
pub fn spread_summary(runs: &[SpreadRun]) -> String {
    let mut s = format!(
        "{:<13} {:>4}  {:<17} {:<17} {:<17} {:>9} {:>10} {:>13} {:>8}\n",
        "fault",
        "runs",
        "moved p50/p99/max",
        "1st ok p50/p99/mx",
        "released p50/p99",
        "vip fail",
        "other fail",
        "overlap c/p",
        "problems"
    );
    let mut names: Vec<&str> = runs.iter().map(|r| r.fault.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let cell = |v: &[u64]| match (percentile(v, 0.5), percentile(v, 0.99), v.iter().max()) {
        (Some(a), Some(b), Some(c)) => format!("{a}/{b}/{c}"),
        _ => "-".to_owned(),
    };
    for name in names {
        let these: Vec<&SpreadRun> = runs.iter().filter(|r| r.fault == name).collect();
        let moved: Vec<u64> = these.iter().filter_map(|r| r.moved_ms).collect();
        let ok: Vec<u64> = these.iter().filter_map(|r| r.first_ok_ms).collect();
        let rel: Vec<u64> = these.iter().filter_map(|r| r.released_ms).collect();
        s.push_str(&format!(
            "{name:<13} {:>4}  {:<17} {:<17} {:<17} {:>9} {:>10} {:>13} {:>8}\n",
            these.len(),
            cell(&moved),
            cell(&ok),
            cell(&rel),
            these.iter().map(|r| r.vip_failed).sum::<usize>(),
            these.iter().map(|r| r.other_failed).sum::<usize>(),
            format!(
                "{}/{}",
                these.iter().map(|r| r.certain).sum::<usize>(),
                these.iter().map(|r| r.possible).sum::<usize>()
            ),
            these.iter().map(|r| r.problems.len()).sum::<usize>(),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[5, 1, 3], 0.5), Some(3));
        assert_eq!(percentile(&[5, 1, 3], 0.99), Some(5));
    }

    #[test]
    fn overlap_detects_two_holders_and_ignores_handover() {
        // Clean handover: a holds until 20, b from 30.
        let a = vec![(0, true), (10, true), (20, true), (30, false), (40, false)];
        let b = vec![(5, false), (15, false), (25, false), (35, true), (45, true)];
        assert_eq!(overlap(&[a.clone(), b], 0, 100).certain, 0);
        // Split brain: both hold from 10 to 30.
        let c = vec![(5, false), (12, true), (22, true), (32, true)];
        let o = overlap(&[a.clone(), c.clone()], 0, 100);
        assert!(o.certain >= 2, "{o:?}");
        let detail = overlap_detail(&[a, c], 0, 100);
        assert!(detail.contains("node 2 held at 12") && detail.contains("  node 1: 0=1 10=1 20=1 30=0"), "{detail}");
    }
}
