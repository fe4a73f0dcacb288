//! `chaos`: the full chaos run with figures (not in CI).
//!
//! ```text
//! cargo build -p keel-node -p keel-chaos
//! sudo target/debug/chaos --runs 20 --scenario kill [--seed N]
//! ```
//!
//! Scenarios: `kill` (SIGKILL the leader), `partition` (cut the leader's link, heal),
//! `rolling` (restart followers one by one, then the leader), `pair` (active/passive pair +
//! witness: kill the active, then kill the witness), `all`. Prints one line per fault and
//! p50/p99/max of the outages; exits 1 on any split-brain sample or problem.

use std::path::PathBuf;
use std::process::ExitCode;

use keel_chaos::http::now_ms;
use keel_chaos::lab::{Bins, Lab, LabSpec};
use keel_chaos::report::{overlap, summary, Run};
use keel_chaos::scenario;

struct Args {
    runs: usize,
    scenario: String,
    seed: u64,
}

fn parse() -> Result<Args, String> {
    let mut args = Args { runs: 10, scenario: "all".into(), seed: 0x6b65_656c };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => args.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--scenario" => args.scenario = value()?,
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "-h" | "--help" => {
                return Err("usage: chaos [--runs N] [--scenario kill|partition|rolling|pair|all] [--seed N]".into())
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !(1..=1000).contains(&args.runs) {
        return Err("--runs must be 1-1000".into());
    }
    Ok(args)
}

fn lab(witness: bool) -> Result<Lab, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let probe = exe.with_file_name("chaos-probe");
    let keel_default = exe.with_file_name("keel");
    let mut bins = Bins::new(PathBuf::from(&probe));
    if std::env::var_os("KEEL_BIN").is_none() && keel_default.exists() {
        bins.keel = keel_default;
    }
    Lab::build(&LabSpec { nodes: 3, witness_last: witness, backends: 3 }, bins)
}

fn run_three_node(args: &Args, which: &str, runs: &mut Vec<Run>) -> Result<(), String> {
    let mut lab = lab(false)?;
    let t_start = now_ms();
    lab.form_cluster()?;
    let c = scenario::commit_state(&mut lab)?;
    let mut rng = fastrand::Rng::with_seed(args.seed);
    for k in 1..=args.runs {
        let r = match which {
            "kill" => vec![scenario::kill_leader(&mut lab, k, &mut rng, &c)?],
            "partition" => vec![scenario::partition(&mut lab, k, &mut rng, &c)?],
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
    let mut lab = lab(true)?;
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

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let scenarios: Vec<&str> = match args.scenario.as_str() {
        "all" => vec!["kill", "partition", "rolling", "pair"],
        s @ ("kill" | "partition" | "rolling" | "pair") => vec![s],
        other => {
            eprintln!("chaos: unknown scenario {other}");
            return ExitCode::from(2);
        }
    };
    let mut runs = Vec::new();
    for s in scenarios {
        let r = if s == "pair" { run_pair(&args, &mut runs) } else { run_three_node(&args, s, &mut runs) };
        if let Err(e) = r {
            eprintln!("chaos: {s}: {e}");
            print!("{}", summary(&runs));
            return ExitCode::FAILURE;
        }
    }
    print!("{}", summary(&runs));
    let bad = runs.iter().any(|r| r.overlap > 0 || !r.problems.is_empty());
    if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
