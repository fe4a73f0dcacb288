//! The operator CLI's manners: what it says when nothing answers or the token is wrong, `--json`
//! on the read commands, shell completions, `--version` with the commit, `--help` saying what
//! keel is, and the warning when a weight is set on a pool whose algorithm ignores weights.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keel_tests::backend::Backend;
use keel_tests::keel::{run_keel, Keel, KeelBuilder, PoolSpec};
use keel_tests::ports::free_addr;
use keel_tests::tempdir::TempDir;
use serde_json::Value;

/// Time one CLI command may take against a live (or absent) node.
const COMMAND: Duration = Duration::from_secs(20);

/// A 16+ character admin token.
const TOKEN: &str = "cli-test-token-0123456789";

struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn keel(args: &[&str]) -> Result<Ran> {
    let out = run_keel(args, COMMAND)?;
    Ok(Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn app_keel(app: &Backend, algorithm: &str) -> KeelBuilder {
    Keel::builder().default_pool("app").pool(PoolSpec::new("app", algorithm).backends([app]))
}

#[test]
fn a_refused_connection_says_nothing_answers_not_quorum() -> Result<()> {
    // A free port: nothing listens there.
    let addr = free_addr().to_string();
    for args in [
        vec!["status", "--admin", &addr],
        vec!["backend", "list", "--admin", &addr],
        vec!["backend", "drain", "app", "a", "--admin", &addr],
        vec!["cluster", "status", "--admin", &addr],
    ] {
        let r = keel(&args)?;
        ensure!(!r.ok, "{args:?} succeeded with nothing listening");
        let want = format!("nothing answers at {addr} (is keel running? is --admin right?)");
        ensure!(r.stderr.contains(&want), "{args:?}: no {want:?} in:\n{}", r.stderr);
        ensure!(!r.stderr.contains("quorum"), "{args:?} blames quorum for a refused connection:\n{}", r.stderr);
    }
    Ok(())
}

#[tokio::test]
async fn a_wrong_or_missing_token_says_how_to_pass_one() -> Result<()> {
    let dir = TempDir::new("keel-cli-token")?;
    let file = dir.write("token", TOKEN)?;
    let app = Backend::start("app")?;
    let node =
        app_keel(&app, "round_robin").node_line(&format!("admin_token_file = \"{}\"", file.display())).start().await?;
    let admin = node.admin_addr().to_string();
    for token in [None, Some("wrong-token-0123456789")] {
        let mut args = vec!["status", "--admin", &admin];
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        let r = keel(&args)?;
        ensure!(!r.ok, "status with token {token:?} succeeded");
        for words in ["admin token is missing or wrong", "--token", "KEEL_ADMIN_TOKEN"] {
            ensure!(r.stderr.contains(words), "token {token:?}: no {words:?} in:\n{}", r.stderr);
        }
    }
    let r = keel(&["status", "--admin", &admin, "--token", TOKEN])?;
    ensure!(r.ok, "status with the right token: {}", r.stderr);
    Ok(())
}

#[tokio::test]
async fn read_commands_print_json_with_json() -> Result<()> {
    let app = Backend::start("app")?;
    let node = app_keel(&app, "least_connections").start().await?;
    let admin = node.admin_addr().to_string();
    let json = |args: &[&str]| -> Result<Value> {
        let r = keel(args)?;
        ensure!(r.ok, "{args:?} failed: {}", r.stderr);
        serde_json::from_str(&r.stdout).with_context(|| format!("{args:?} printed no JSON:\n{}", r.stdout))
    };

    let status = json(&["status", "--json", "--admin", &admin])?;
    ensure!(status["listeners"][0]["name"] == "web", "status listeners: {status}");
    ensure!(status["pools"][0]["name"] == "app", "status pools: {status}");
    ensure!(status["pools"][0]["servers"][0]["state"].is_string(), "status servers: {status}");

    let list = json(&["backend", "list", "--json", "--admin", &admin])?;
    ensure!(list["pools"][0]["algorithm"] == "least_connections", "backend list: {list}");
    ensure!(list["pools"][0]["servers"][0]["name"] == app.name(), "backend list: {list}");
    ensure!(list["pools"][0]["servers"][0]["weight"] == 1, "backend list: {list}");

    let config = json(&["config", "show", "--json", "--admin", &admin])?;
    ensure!(config["listeners"]["web"]["default_pool"] == "app", "config show: {config}");
    ensure!(config["pools"]["app"]["servers"][0]["name"] == app.name(), "config show: {config}");

    // Without --json: tables for a person, not JSON.
    for args in [vec!["status", "--admin", &admin], vec!["backend", "list", "--admin", &admin]] {
        let r = keel(&args)?;
        ensure!(r.ok, "{args:?}: {}", r.stderr);
        ensure!(serde_json::from_str::<Value>(&r.stdout).is_err(), "{args:?} printed JSON without --json");
        ensure!(r.stdout.contains("POOL") && r.stdout.contains(app.name()), "{args:?}:\n{}", r.stdout);
    }
    let r = keel(&["config", "show", "--admin", &admin])?;
    ensure!(r.stdout.contains("[listeners.web]"), "config show is not TOML:\n{}", r.stdout);
    Ok(())
}

#[tokio::test]
async fn a_weight_on_round_robin_warns_that_it_is_ignored() -> Result<()> {
    let app = Backend::start("app")?;
    let rr = app_keel(&app, "round_robin").start().await?;
    let admin = rr.admin_addr().to_string();
    let r = keel(&["backend", "weight", "app", app.name(), "5", "--admin", &admin])?;
    ensure!(r.ok, "weight on round_robin failed: {}", r.stderr);
    ensure!(r.stdout.contains("weight set to 5"), "stdout:\n{}", r.stdout);
    ensure!(!r.stdout.contains("()") && !r.stderr.contains("()"), "a stray () in:\n{}{}", r.stdout, r.stderr);
    ensure!(
        r.stderr.contains("warning") && r.stderr.contains("round_robin") && r.stderr.contains("ignores weights"),
        "no warning on stderr:\n{}",
        r.stderr
    );
    drop(rr);

    let wrr = app_keel(&app, "weighted_round_robin").start().await?;
    let admin = wrr.admin_addr().to_string();
    let r = keel(&["backend", "weight", "app", app.name(), "5", "--admin", &admin])?;
    ensure!(r.ok && !r.stderr.contains("ignores weights"), "warned on a weighted pool:\n{}", r.stderr);
    Ok(())
}

#[test]
fn errors_from_the_node_carry_no_stray_parentheses() -> Result<()> {
    // A standalone node answers /cluster/* with an error that has no detail.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let app = Backend::start("app")?;
    let node = rt.block_on(app_keel(&app, "round_robin").start())?;
    let r = keel(&["cluster", "status", "--admin", &node.admin_addr().to_string()])?;
    ensure!(!r.ok, "cluster status on a standalone node succeeded");
    ensure!(r.stderr.contains("not in cluster mode"), "stderr:\n{}", r.stderr);
    ensure!(!r.stderr.contains("()"), "a stray () in:\n{}", r.stderr);
    Ok(())
}

#[test]
fn completion_scripts_for_bash_zsh_and_fish() -> Result<()> {
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef keel"), ("fish", "complete -c keel")] {
        let r = keel(&["completion", shell])?;
        ensure!(r.ok, "completion {shell}: {}", r.stderr);
        ensure!(r.stdout.contains(marker), "completion {shell} lacks {marker:?}");
        ensure!(r.stdout.contains("backend") && r.stdout.contains("status"), "completion {shell} lacks subcommands");
    }
    Ok(())
}

#[test]
fn version_names_the_commit_and_help_says_what_keel_is() -> Result<()> {
    let r = keel(&["--version"])?;
    ensure!(r.ok, "--version: {}", r.stderr);
    let commit = r
        .stdout
        .split("(commit ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .with_context(|| format!("no \"(commit …)\" in {:?}", r.stdout))?;
    let looks_like_commit = commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit());
    ensure!(looks_like_commit || commit == "unknown", "commit {commit:?} in {:?}", r.stdout);
    ensure!(r.stdout.starts_with(&format!("keel {}", env!("CARGO_PKG_VERSION"))), "{:?}", r.stdout);

    let r = keel(&["--help"])?;
    ensure!(r.ok, "--help: {}", r.stderr);
    for words in ["highly-available load balancer", "health checks", "virtual IP", "completion", "status"] {
        ensure!(r.stdout.contains(words), "--help lacks {words:?}:\n{}", r.stdout);
    }
    ensure!(!r.stdout.contains("data plane, daemon wiring"), "--help shows the crate description:\n{}", r.stdout);
    Ok(())
}

#[test]
fn a_node_that_accepts_but_never_answers_is_reported_as_a_timeout() -> Result<()> {
    // The kernel completes connections to a listening socket nobody accepts from: the request
    // goes out and no answer comes back.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = silent.local_addr()?.to_string();
    let r = keel(&["status", "--admin", &addr])?;
    ensure!(!r.ok, "status against a silent socket succeeded");
    ensure!(r.stderr.contains(&addr) && r.stderr.contains("timed out"), "no timeout named in:\n{}", r.stderr);
    ensure!(!r.stderr.contains("nothing answers"), "a timeout reported as a refused connection:\n{}", r.stderr);
    Ok(())
}
