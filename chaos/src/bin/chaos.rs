//! `chaos`: the full chaos run with figures (not in CI).
//!
//! ```text
//! cargo build --release -p keel-node -p keel-chaos
//! sudo target/release/chaos --runs 20 --scenario kill [--profile fast] [--seed N]
//! ```
//!
//! The `keel` binary is the one next to `chaos` (so a release `chaos` runs a release `keel`),
//! or `KEEL_BIN`.
//!
//! Scenarios: `kill` (SIGKILL the leader), `partition` (cut the leader's link, heal),
//! `rolling` (restart followers one by one, then the leader), `pair` (active/passive pair +
//! witness: kill the active, then kill the witness), `load` (no fault: full HTTP load through
//! the VIP with `wrk` for `--load-secs`, counting leader and term changes), `keepalived` (the
//! kill and link-cut faults against a keepalived pair, advert 1 s and 100 ms, when keepalived
//! is on PATH), `spread` (three spread VIPs on three nodes, a prober per VIP: per round, SIGKILL
//! of a follower holding one VIP and of the leader holding one, each restarted; a holder's link
//! cut and healed; the layout put back with `keel cluster vip move` between faults — see
//! `scenario::spread_round`), `all` (everything but `load` and `spread`; `keepalived` when
//! available). `--profile` sets
//! `[cluster] profile` on every node, `--timings 10ms,30ms,40ms` explicit heartbeat and
//! election timeouts, `--witness-timings` other ones for the witness of the `pair` lab,
//! `--realtime true|false` `[cluster] realtime` (the Raft thread under `SCHED_RR`). Prints
//! one line per fault, p50/p99/max of the outages, and keel next to keepalived; exits 1 on any
//! split-brain sample or problem of keel's (keepalived's figures are a reference and never fail
//! the run).

use std::path::PathBuf;
use std::process::ExitCode;

use keel_chaos::http::now_ms;
use keel_chaos::keepalived;
use keel_chaos::lab::{Bins, Lab, LabSpec};
use keel_chaos::report::{overlap, side_by_side, spread_summary, summary, Run, SpreadRun};
use keel_chaos::scenario;

struct Args {
    runs: usize,
    scenario: String,
    seed: u64,
    profile: Option<String>,
    timings: Option<String>,
    witness_timings: Option<String>,
    keepalived_runs: usize,
    load_secs: u64,
    realtime: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        runs: 10,
        scenario: "all".into(),
        seed: 0x6b65_656c,
        profile: None,
        timings: None,
        witness_timings: None,
        keepalived_runs: 5,
        load_secs: 30,
        realtime: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => args.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--scenario" => args.scenario = value()?,
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--profile" => args.profile = Some(value()?),
            "--timings" => args.timings = Some(value()?),
            "--witness-timings" => args.witness_timings = Some(value()?),
            "--keepalived-runs" => {
                args.keepalived_runs = value()?.parse().map_err(|e| format!("--keepalived-runs: {e}"))?
            }
            "--load-secs" => args.load_secs = value()?.parse().map_err(|e| format!("--load-secs: {e}"))?,
            "--realtime" => match value()?.as_str() {
                v @ ("true" | "false") => args.realtime = Some(v.to_owned()),
                other => return Err(format!("--realtime wants true or false, got {other:?}")),
            },
            "-h" | "--help" => {
                return Err("usage: chaos [--runs N] [--scenario kill|partition|rolling|remove|pair|load|keepalived|spread|all] \
                     [--profile default|fast] [--timings HB,MIN,MAX] [--witness-timings HB,MIN,MAX] [--keepalived-runs N] [--load-secs N] [--realtime true|false] [--seed N]"
                    .into())
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !(1..=1000).contains(&args.runs) || !(1..=1000).contains(&args.keepalived_runs) {
        return Err("--runs and --keepalived-runs must be 1-1000".into());
    }
    if !(1..=600).contains(&args.load_secs) {
        return Err("--load-secs must be 1-600".into());
    }
    Ok(args)
}

/// `heartbeat`, `election_min`, `election_max` lines from `HB,MIN,MAX`.
fn timing_lines(flag: &str, t: &str) -> Result<String, String> {
    let v: Vec<&str> = t.split(',').map(str::trim).collect();
    let [hb, min, max] = v.as_slice() else {
        return Err(format!("{flag} wants HEARTBEAT,ELECTION_MIN,ELECTION_MAX, got {t:?}"));
    };
    Ok(format!("heartbeat = \"{hb}\"\nelection_min = \"{min}\"\nelection_max = \"{max}\"\n"))
}

/// The `[cluster]` lines `--profile` and `--timings 10ms,30ms,40ms` ask for.
fn cluster_extra(args: &Args) -> Result<String, String> {
    let mut s = String::new();
    if let Some(p) = &args.profile {
        s.push_str(&format!("profile = \"{p}\"\n"));
    }
    if let Some(t) = &args.timings {
        s.push_str(&timing_lines("--timings", t)?);
    }
    if let Some(r) = &args.realtime {
        s.push_str(&format!("realtime = {r}\n"));
    }
    Ok(s)
}

/// The witness's own timing lines (`--witness-timings`, replacing `--profile`/`--timings` on
/// the witness): measures a witness slower than the data nodes, as keel's witnesses used to be.
fn witness_extra(args: &Args) -> Result<String, String> {
    args.witness_timings.as_deref().map_or(Ok(String::new()), |t| timing_lines("--witness-timings", t))
}

fn lab(witness: bool, cluster_extra: String, witness_extra: String) -> Result<Lab, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let probe = exe.with_file_name("chaos-probe");
    let keel_default = exe.with_file_name("keel");
    let mut bins = Bins::new(PathBuf::from(&probe));
    if std::env::var_os("KEEL_BIN").is_none() && keel_default.exists() {
        bins.keel = keel_default;
    }
    Lab::build(
        &LabSpec {
            nodes: 3,
            witness_last: witness,
            backends: 3,
            cluster_extra,
            witness_extra,
            spread: Vec::new(),
            sticky: None,
        },
        bins,
    )
}

fn run_three_node(args: &Args, which: &str, runs: &mut Vec<Run>) -> Result<(), String> {
    let mut lab = lab(false, cluster_extra(args)?, String::new())?;
    let t_start = now_ms();
    lab.form_cluster()?;
    let c = scenario::commit_state(&mut lab)?;
    let mut rng = fastrand::Rng::with_seed(args.seed);
    for k in 1..=args.runs {
        let r = match which {
            "kill" => vec![scenario::kill_leader(&mut lab, k, &mut rng, &c)?],
            "partition" => vec![scenario::partition(&mut lab, k, &mut rng, &c)?],
            "remove" => vec![scenario::remove_rejoin(&mut lab, k, &c)?],
            _ => scenario::rolling_restart(&mut lab, k, &c)?,
        };
        for run in &r {
            println!("{run}");
        }
        runs.extend(r);
    }
    let o = overlap(&lab.samples(), t_start, now_ms());
    println!(
        "{which}: {} monitor samples, {} certain / {} possible overlap samples, {} served by drained/dead backends",
        o.samples,
        o.certain,
        o.possible,
        scenario::served_by_excluded(&lab, &c)
    );
    Ok(())
}

fn run_pair(args: &Args, runs: &mut Vec<Run>) -> Result<(), String> {
    let mut lab = lab(true, cluster_extra(args)?, witness_extra(args)?)?;
    lab.form_cluster()?;
    let c = scenario::commit_state(&mut lab)?;
    let mut rng = fastrand::Rng::with_seed(args.seed);
    for k in 1..=args.runs {
        let mut r = scenario::kill_leader(&mut lab, k, &mut rng, &c)?;
        r.scenario = "pair-kill".into();
        println!("{r}");
        runs.push(r);
        let w = scenario::lose_witness(&mut lab, k, &c)?;
        println!("{w}");
        runs.push(w);
    }
    Ok(())
}

/// Three spread VIPs on three nodes: `--runs` rounds of [`scenario::spread_round`].
fn run_spread(args: &Args, runs: &mut Vec<SpreadRun>) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut bins = Bins::new(exe.with_file_name("chaos-probe"));
    if std::env::var_os("KEEL_BIN").is_none() && exe.with_file_name("keel").exists() {
        bins.keel = exe.with_file_name("keel");
    }
    let (mut lab, _) = Lab::three_spread(bins, &cluster_extra(args)?)?;
    let t_start = now_ms();
    let mut rng = fastrand::Rng::with_seed(args.seed);
    for k in 1..=args.runs {
        let round = scenario::spread_round(&mut lab, k, &mut rng);
        let round = match round {
            Ok(r) => r,
            Err(e) => {
                lab.dump_logs(30);
                return Err(format!("round {k}: {e}"));
            }
        };
        for r in &round {
            println!("{r}");
        }
        runs.extend(round);
    }
    for vip in lab.spread_vips() {
        let o = overlap(&lab.spread_samples(vip), t_start, now_ms());
        let probes = lab.spread_probes(vip);
        println!(
            "{vip}: {} monitor samples, {} certain / {} possible overlap samples; {} probes, {} failed",
            o.samples,
            o.certain,
            o.possible,
            probes.len(),
            probes.iter().filter(|p| !p.ok).count()
        );
    }
    Ok(())
}

fn run_keepalived(args: &Args, reference: &mut Vec<Run>) -> Result<(), String> {
    let Some(bin) = keepalived::find() else {
        println!("keepalived: not on PATH, skipped (apt-get install keepalived)");
        return Ok(());
    };
    println!("keepalived: {}", keepalived::describe(&bin));
    for advert_ms in [1000, 100] {
        // A fresh lab per advert interval: no keel node runs in it, only the pair.
        let mut lab = lab(false, String::new(), String::new())?;
        let pair = keepalived::Pair { bin: bin.clone(), advert_ms };
        pair.start(&mut lab)?;
        let mut rng = fastrand::Rng::with_seed(args.seed);
        for k in 1..=args.keepalived_runs {
            for r in [
                keepalived::kill_master(&mut lab, &pair, k, &mut rng)?,
                keepalived::cut_master(&mut lab, &pair, k, &mut rng)?,
            ] {
                println!("{r}");
                reference.push(r);
            }
        }
    }
    Ok(())
}

/// No fault: `wrk` through the VIP for `--load-secs` while every node's leader and term are
/// polled. A profile whose leader loses its lease under load shows up as changes here.
fn run_load(args: &Args, runs: &mut Vec<Run>) -> Result<(), String> {
    let mut lab = lab(false, cluster_extra(args)?, String::new())?;
    lab.form_cluster()?;
    let l = lab.wait_stable(scenario::SETTLE_BOUND)?;
    let r = scenario::under_load(&mut lab, l, std::time::Duration::from_secs(args.load_secs))?;
    println!("{r}");
    runs.push(r);
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let scenarios: Vec<&str> = match args.scenario.as_str() {
        "all" => vec!["kill", "partition", "rolling", "remove", "pair", "keepalived"],
        s @ ("kill" | "partition" | "rolling" | "remove" | "pair" | "load" | "keepalived" | "spread") => vec![s],
        other => {
            eprintln!("chaos: unknown scenario {other}");
            return ExitCode::from(2);
        }
    };
    match cluster_extra(&args) {
        Ok(extra) if !extra.is_empty() => println!("keel [cluster] timing lines:\n{extra}"),
        Ok(_) => {}
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::from(2);
        }
    }
    let mut runs = Vec::new();
    let mut reference = Vec::new();
    let mut spread = Vec::new();
    for s in scenarios {
        let r = match s {
            "spread" => run_spread(&args, &mut spread),
            "pair" => run_pair(&args, &mut runs),
            "load" => run_load(&args, &mut runs),
            "keepalived" => run_keepalived(&args, &mut reference),
            _ => run_three_node(&args, s, &mut runs),
        };
        if let Err(e) = r {
            eprintln!("chaos: {s}: {e}");
            print!("{}", summary(&runs));
            if !spread.is_empty() {
                print!("{}", spread_summary(&spread));
            }
            return ExitCode::FAILURE;
        }
    }
    if !spread.is_empty() {
        print!("\n{}", spread_summary(&spread));
        return if spread.iter().any(|r| r.certain > 0 || !r.problems.is_empty()) {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    print!("{}", summary(&runs));
    if !reference.is_empty() {
        print!("{}", summary(&reference));
    }
    let keel = format!("keel ({})", args.timings.as_deref().or(args.profile.as_deref()).unwrap_or("default"));
    print!("\n{}", side_by_side(&[(keel.as_str(), &runs), ("keepalived (reference)", &reference)]));
    let bad = runs.iter().any(|r| r.overlap > 0 || !r.problems.is_empty());
    if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
