//! `keel config check FILE...`: `FILE: ok` on stdout for a good file; for a bad one, one
//! `FILE:LINE: KEY: REASON` line per problem on stderr (`FILE:LINE: REASON` for TOML
//! syntax/type errors) and exit 1.
//!
//! Each broken config is the good one with one line changed; the changed line carries a
//! `# <-` comment, so the expected line number is computed, not counted by hand. The asserts
//! are on stable fragments: the `FILE:LINE:` prefix, the key path, a key word of the reason.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keel_tests::keel::run_keel;
use keel_tests::tempdir::TempDir;

/// Time `config check` may take: it parses a file and exits.
const CHECK: Duration = Duration::from_secs(10);

const GOOD: &str = r#"[node]
admin = "127.0.0.1:9090"
drain_timeout = "10s"
workers = 1

[listeners.web]
bind = "127.0.0.1:8080"
protocol = "http"
default_pool = "app"

[[listeners.web.routes]]
host = "api.example.com"
path_prefix = "/api"
header = { name = "x-canary", value = "1" }
pool = "app"

[pools.app]
algorithm = "round_robin"
connect_timeout = "2s"
request_timeout = "30s"
idle_timeout = "60s"
retries = 2

[[pools.app.servers]]
name = "a"
address = "127.0.0.1:9001"
weight = 1

[[pools.app.servers]]
name = "b"
address = "127.0.0.1:9002"
weight = 1

[pools.app.health]
type = "http"
method = "GET"
path = "/healthz"
expect_status = "200-399"
interval = "2s"
timeout = "1s"
rise = 2
fall = 3

[pools.app.outlier]
consecutive_failures = 5
ejection = "10s"
"#;

struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn check(files: &[&Path]) -> Result<Checked> {
    let mut args = vec!["config", "check"];
    for f in files {
        args.push(f.to_str().context("utf-8 path")?);
    }
    let out = run_keel(&args, CHECK)?;
    Ok(Checked {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `GOOD` with the `nth` (0-based) occurrence of `from` replaced by `to # <-`.
fn broken(from: &str, nth: usize, to: &str) -> String {
    let (start, _) = GOOD.match_indices(from).nth(nth).unwrap_or_else(|| panic!("{from:?} #{nth} not in GOOD"));
    format!("{}{to} # <-{}", &GOOD[..start], &GOOD[start + from.len()..])
}

/// 1-based number of the line marked `# <-`.
fn marked_line(text: &str) -> usize {
    text.lines().position(|l| l.contains("# <-")).expect("a marked line") + 1
}

/// Checks a broken config: exit 1, no `ok`, and a stderr line starting `FILE:LINE: ` (plus
/// `KEY: ` when `key` is given) that contains every one of `words`.
fn expect_problem(text: &str, key: Option<&str>, words: &[&str]) -> Result<()> {
    let dir = TempDir::new("keel-check")?;
    let file = dir.write("keel.toml", text)?;
    let line = marked_line(text);
    let c = check(&[&file])?;
    let f = file.display();
    ensure!(c.code == Some(1), "exit code {:?} for a broken config; stderr:\n{}", c.code, c.stderr);
    ensure!(!c.stdout.contains(&format!("{f}: ok")), "a broken config was reported ok:\n{}", c.stdout);
    let prefix = match key {
        Some(k) => format!("{f}:{line}: {k}: "),
        None => format!("{f}:{line}: "),
    };
    let hit = c.stderr.lines().any(|l| l.starts_with(&prefix) && words.iter().all(|w| l.contains(w)));
    ensure!(hit, "no stderr line starting {prefix:?} and containing {words:?}; stderr:\n{}\nconfig:\n{text}", c.stderr);
    Ok(())
}

#[test]
fn a_good_config_is_ok() -> Result<()> {
    let dir = TempDir::new("keel-check")?;
    let file = dir.write("good.toml", GOOD)?;
    let c = check(&[&file])?;
    ensure!(c.code == Some(0), "exit {:?}; stderr:\n{}", c.code, c.stderr);
    ensure!(c.stdout.lines().any(|l| l == format!("{}: ok", file.display())), "stdout:\n{}", c.stdout);
    Ok(())
}

#[test]
fn a_minimal_config_is_ok() -> Result<()> {
    let dir = TempDir::new("keel-check")?;
    let file = dir.write(
        "min.toml",
        "[listeners.web]\nbind = \"127.0.0.1:8080\"\ndefault_pool = \"app\"\n\n\
         [pools.app]\n[[pools.app.servers]]\nname = \"a\"\naddress = \"127.0.0.1:9001\"\n",
    )?;
    let c = check(&[&file])?;
    ensure!(c.code == Some(0), "defaults must fill in [node] and the pool settings; stderr:\n{}", c.stderr);
    Ok(())
}

#[test]
fn undefined_default_pool() -> Result<()> {
    expect_problem(
        &broken("default_pool = \"app\"", 0, "default_pool = \"nope\""),
        Some("listeners.web.default_pool"),
        &["nope", "not defined", "app"],
    )
}

#[test]
fn undefined_route_pool() -> Result<()> {
    // "\npool" so that default_pool does not match.
    expect_problem(
        &broken("\npool = \"app\"", 0, "\npool = \"nope\""),
        Some("listeners.web.routes[0].pool"),
        &["not defined"],
    )
}

#[test]
fn weight_zero() -> Result<()> {
    expect_problem(&broken("weight = 1", 0, "weight = 0"), Some("pools.app.servers[0].weight"), &["out of range"])
}

#[test]
fn weight_too_high() -> Result<()> {
    expect_problem(&broken("weight = 1", 1, "weight = 257"), Some("pools.app.servers[1].weight"), &["out of range"])
}

#[test]
fn duplicate_server_name() -> Result<()> {
    expect_problem(&broken("name = \"b\"", 0, "name = \"a\""), Some("pools.app.servers[1].name"), &["duplicate"])
}

#[test]
fn duplicate_server_address() -> Result<()> {
    expect_problem(
        &broken("address = \"127.0.0.1:9002\"", 0, "address = \"127.0.0.1:9001\""),
        Some("pools.app.servers[1].address"),
        &["duplicate"],
    )
}

#[test]
fn empty_server_list() -> Result<()> {
    let start = GOOD.find("[[pools.app.servers]]").expect("servers");
    let end = GOOD.find("[pools.app.health]").expect("health");
    let text = GOOD[..start].replace("retries = 2\n", "retries = 2\nservers = [] # <-\n") + &GOOD[end..];
    expect_problem(&text, Some("pools.app.servers"), &["at least one server"])
}

#[test]
fn bad_server_address() -> Result<()> {
    expect_problem(
        &broken("address = \"127.0.0.1:9001\"", 0, "address = \"127.0.0.1\""),
        None,
        &["invalid socket address"],
    )
}

#[test]
fn unknown_algorithm() -> Result<()> {
    expect_problem(&broken("algorithm = \"round_robin\"", 0, "algorithm = \"fastest\""), None, &["fastest"])
}

#[test]
fn unknown_key_in_a_pool() -> Result<()> {
    // The marker lands on the added line.
    expect_problem(&broken("retries = 2", 0, "retries = 2\ncolour = \"red\""), None, &["unknown field", "colour"])
}

#[test]
fn unknown_key_in_node() -> Result<()> {
    expect_problem(&broken("workers = 1", 0, "workerz = 1"), None, &["unknown field", "workerz"])
}

#[test]
fn bad_duration() -> Result<()> {
    expect_problem(
        &broken("connect_timeout = \"2s\"", 0, "connect_timeout = \"5\""),
        None,
        &["invalid duration", "500ms"],
    )
}

#[test]
fn health_timeout_above_interval() -> Result<()> {
    expect_problem(&broken("timeout = \"1s\"", 0, "timeout = \"5s\""), Some("pools.app.health.timeout"), &["interval"])
}

#[test]
fn health_rise_zero() -> Result<()> {
    expect_problem(&broken("rise = 2", 0, "rise = 0"), Some("pools.app.health.rise"), &[])
}

#[test]
fn health_fall_zero() -> Result<()> {
    expect_problem(&broken("fall = 3", 0, "fall = 0"), Some("pools.app.health.fall"), &[])
}

#[test]
fn path_prefix_without_slash() -> Result<()> {
    expect_problem(
        &broken("path_prefix = \"/api\"", 0, "path_prefix = \"api\""),
        Some("listeners.web.routes[0].path_prefix"),
        &["'/'"],
    )
}

#[test]
fn toml_syntax_error() -> Result<()> {
    expect_problem(&broken("[pools.app]", 0, "[pools.app"), None, &[])
}

#[test]
fn wrong_value_type() -> Result<()> {
    expect_problem(&broken("retries = 2", 0, "retries = \"two\""), None, &[])
}

#[test]
fn request_timeout_is_the_old_name_of_response_timeout() -> Result<()> {
    // The old name is reported under the new one, on the line where it is written.
    expect_problem(
        &broken("request_timeout = \"30s\"", 0, "request_timeout = \"0s\""),
        Some("pools.app.response_timeout"),
        &["greater than zero"],
    )?;
    // Both names at once: serde names the table that has the key twice.
    let dir = TempDir::new("keel-check")?;
    let text = GOOD.replace("request_timeout = \"30s\"", "request_timeout = \"30s\"\nresponse_timeout = \"30s\"");
    let file = dir.write("both.toml", &text)?;
    let c = check(&[&file])?;
    ensure!(c.code == Some(1), "both names were accepted; stderr:\n{}", c.stderr);
    ensure!(c.stderr.contains("duplicate field `response_timeout`"), "stderr:\n{}", c.stderr);
    Ok(())
}

#[test]
fn total_timeout_zero() -> Result<()> {
    expect_problem(
        &broken("retries = 2", 0, "retries = 2\ntotal_timeout = \"0s\""),
        Some("pools.app.total_timeout"),
        &["greater than zero"],
    )
}

#[test]
fn unknown_retry_on_value() -> Result<()> {
    expect_problem(
        &broken("retries = 2", 0, "retries = 2\nretry_on = [\"connect-failure\", \"504\"]"),
        None,
        &["504", "empty-response"],
    )
}

#[test]
fn non_idempotent_alone_widens_nothing() -> Result<()> {
    expect_problem(
        &broken("retries = 2", 0, "retries = 2\nretry_on = [\"connect-failure\", \"non-idempotent\"]"),
        Some("pools.app.retry_on"),
        &["empty-response"],
    )
}

#[test]
fn duplicate_retry_on_value() -> Result<()> {
    expect_problem(
        &broken("retries = 2", 0, "retries = 2\nretry_on = [\"503\", \"503\"]"),
        Some("pools.app.retry_on[1]"),
        &["twice"],
    )
}

#[test]
fn retry_budget_above_100_percent() -> Result<()> {
    expect_problem(&broken("retries = 2", 0, "retries = 2\nretry_budget = \"120%\""), None, &["percentage", "120%"])
}

#[test]
fn request_buffer_too_large() -> Result<()> {
    expect_problem(
        &broken("protocol = \"http\"", 0, "protocol = \"http\"\nlimits = { request_buffer = 1073741824 }"),
        Some("listeners.web.limits.request_buffer"),
        &["16 MiB"],
    )
}

#[test]
fn every_problem_is_reported_at_once() -> Result<()> {
    let text = GOOD
        .replace("default_pool = \"app\"", "default_pool = \"nope\"")
        .replacen("weight = 1", "weight = 0", 1)
        .replace("name = \"b\"", "name = \"a\"");
    let dir = TempDir::new("keel-check")?;
    let file = dir.write("multi.toml", &text)?;
    let c = check(&[&file])?;
    ensure!(c.code == Some(1), "exit {:?}", c.code);
    for key in ["listeners.web.default_pool", "pools.app.servers[0].weight", "pools.app.servers[1].name"] {
        ensure!(
            c.stderr.lines().any(|l| l.contains(&format!(": {key}: "))),
            "{key} not reported; stderr:\n{}",
            c.stderr
        );
    }
    Ok(())
}

#[test]
fn several_files_are_each_reported() -> Result<()> {
    let dir = TempDir::new("keel-check")?;
    let good = dir.write("good.toml", GOOD)?;
    let bad = dir.write("bad.toml", &broken("weight = 1", 0, "weight = 0"))?;
    let good2 = dir.write("good2.toml", GOOD)?;
    let c = check(&[&good, &bad, &good2])?;
    ensure!(c.code == Some(1), "one bad file must make the exit code 1, got {:?}", c.code);
    for f in [&good, &good2] {
        ensure!(c.stdout.lines().any(|l| l == format!("{}: ok", f.display())), "{} not ok:\n{}", f.display(), c.stdout);
    }
    ensure!(c.stderr.contains(&format!("{}:", bad.display())), "bad file not reported:\n{}", c.stderr);
    ensure!(!c.stderr.contains(&format!("{}:", good.display())), "good file reported on stderr:\n{}", c.stderr);
    Ok(())
}

#[test]
fn a_missing_file_cannot_be_read() -> Result<()> {
    let dir = TempDir::new("keel-check")?;
    let missing = dir.path().join("missing.toml");
    let c = check(&[&missing])?;
    ensure!(c.code == Some(1), "exit {:?}", c.code);
    let want = format!("{}: cannot read:", missing.display());
    ensure!(c.stderr.lines().any(|l| l.starts_with(&want)), "no {want:?} line; stderr:\n{}", c.stderr);
    Ok(())
}

#[test]
fn header_rules_refuse_framing_headers() -> Result<()> {
    expect_problem(
        &broken(
            "default_pool = \"app\"",
            0,
            "default_pool = \"app\"\nheaders = { response_set = { \"Content-Length\" = \"0\" } }",
        ),
        Some("listeners.web.headers.response_set.Content-Length"),
        &["framing", "keel writes itself"],
    )
}

#[test]
fn header_rules_refuse_unknown_variables() -> Result<()> {
    expect_problem(
        &broken("\npool = \"app\"", 0, "\npool = \"app\"\nheaders = { request_set = { \"X-Who\" = \"${user}\" } }"),
        Some("listeners.web.routes[0].headers.request_set.X-Who"),
        &["unknown variable", "${user}", "${client_ip}"],
    )
}

#[test]
fn header_rules_refuse_bad_names_and_server_on_requests() -> Result<()> {
    expect_problem(
        &broken("default_pool = \"app\"", 0, "default_pool = \"app\"\nheaders = { request_remove = [\"Bad Name\"] }"),
        Some("listeners.web.headers.request_remove[0]"),
        &["not a valid header name"],
    )?;
    expect_problem(
        &broken(
            "default_pool = \"app\"",
            0,
            "default_pool = \"app\"\nheaders = { request_add = { \"Host\" = \"x\" } }",
        ),
        Some("listeners.web.headers.request_add.Host"),
        &["host header"],
    )?;
    expect_problem(
        &broken(
            "default_pool = \"app\"",
            0,
            "default_pool = \"app\"\nheaders = { request_set = { \"X-S\" = \"${server}\" } }",
        ),
        Some("listeners.web.headers.request_set.X-S"),
        &["only on responses"],
    )
}

#[test]
fn slow_start_zero() -> Result<()> {
    expect_problem(
        &broken("retries = 2", 0, "retries = 2\nslow_start = \"0s\""),
        Some("pools.app.slow_start"),
        &["greater than zero"],
    )
}

#[test]
fn unknown_access_log_template_field() -> Result<()> {
    expect_problem(
        &broken(
            "default_pool = \"app\"",
            0,
            "default_pool = \"app\"\naccess_log = { destination = \"stdout\", format = \"template\", template = \"$client $foo\" }",
        ),
        Some("listeners.web.access_log.template"),
        &["unknown field \"$foo\"", "known: time, listener, client,", "request_id"],
    )
}

#[test]
fn syslog_facility_on_a_file() -> Result<()> {
    expect_problem(
        &broken(
            "default_pool = \"app\"",
            0,
            "default_pool = \"app\"\naccess_log = { destination = \"/tmp/a.log\", facility = \"local1\" }",
        ),
        Some("listeners.web.access_log.facility"),
        &["syslog destinations"],
    )
}
