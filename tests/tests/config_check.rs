//! `keel config check FILE...`: `FILE: ok` on stdout for a good file; for a bad one, one
//! `FILE:LINE: KEY: REASON` line per problem on stderr (`FILE:LINE: REASON` for TOML
//! syntax/type errors) and exit 1.
//!
//! Each broken config is the good one with one line changed; the changed line carries a
//! `# <-` comment, so the expected line number is computed, not counted by hand. The asserts
//! are on stable fragments: the `FILE:LINE:` prefix, the key path, a key word of the reason.
//!
//! The check also opens every file `keel run` would (certificates and keys, CA bundles, the
//! admin token, access log files) and reports every problem of a file in one run; `keel run`
//! refuses such a file with the same lines, before binding anything.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keel_tests::keel::{run_keel, run_keel_env};
use keel_tests::tempdir::TempDir;
use keel_tests::tls::TestCa;

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
        &broken("address = \"127.0.0.1:9001\"", 0, "address = \"127.0.0.1:80x\""),
        Some("pools.app.servers[0].address"),
        &["\"127.0.0.1:80x\" is not HOST:PORT"],
    )
}

#[test]
fn a_dns_name_is_an_address() -> Result<()> {
    let dir = TempDir::new("keel-check")?;
    let text = GOOD
        .replace("127.0.0.1:9002", "app.internal:9002")
        .replace("retries = 2", "retries = 2\nresolve_interval = \"5s\"");
    let file = dir.write("named.toml", &text)?;
    let c = check(&[&file])?;
    ensure!(c.code == Some(0), "exit {:?}; stderr:\n{}", c.code, c.stderr);
    Ok(())
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
    ensure!(c.stderr.contains("duplicate field \"response_timeout\""), "stderr:\n{}", c.stderr);
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

/// Time `keel run` may take to refuse a file: it checks it and exits before binding anything.
const REFUSE: Duration = Duration::from_secs(20);

/// `GOOD` plus an https listener `sec` on `cert`/`key`, an access log and an admin token file.
fn with_files(cert: &Path, key: &Path, token: &Path, log: &Path) -> String {
    GOOD.replace("workers = 1\n", &format!("workers = 1\nadmin_token_file = {token:?}\n")).replace(
        "default_pool = \"app\"\n",
        &format!(
            "default_pool = \"app\"\naccess_log = {{ destination = {log:?} }}\n\n\
             [listeners.sec]\nbind = \"127.0.0.1:8443\"\nprotocol = \"https\"\ndefault_pool = \"app\"\n\
             tls = {{ certificates = [{{ cert = {cert:?}, key = {key:?} }}] }}\n"
        ),
    )
}

/// A directory with a good certificate pair, a CA bundle, a token and a log directory.
struct Files {
    dir: TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    other_key: std::path::PathBuf,
    ca: std::path::PathBuf,
    token: std::path::PathBuf,
    log: std::path::PathBuf,
}

fn files() -> Result<Files> {
    let dir = TempDir::new("keel-check-files")?;
    let ca = TestCa::new()?;
    let (cert, key) = ca.leaf(&["web.test"])?.write(&dir, "web")?;
    let (_, other_key) = ca.leaf(&["other.test"])?.write(&dir, "other")?;
    let ca = ca.write(&dir, "ca.pem")?;
    let token = dir.write("admin.token", "0123456789abcdef0123\n")?;
    let log = dir.path().join("access.log");
    Ok(Files { dir, cert, key, other_key, ca, token, log })
}

/// Checks `text`: exit 1, and for each `(key, words)` a stderr line `FILE:LINE: KEY: ...`
/// containing the words. Returns the problem lines.
fn expect_problems(dir: &TempDir, text: &str, wanted: &[(&str, &[&str])]) -> Result<Vec<String>> {
    let file = dir.write("keel.toml", text)?;
    let c = check(&[&file])?;
    ensure!(c.code == Some(1), "exit {:?} for a broken config; stdout:\n{}\nstderr:\n{}", c.code, c.stdout, c.stderr);
    let f = format!("{}:", file.display());
    let lines: Vec<String> = c.stderr.lines().filter(|l| l.starts_with(&f)).map(str::to_owned).collect();
    for (key, words) in wanted {
        let hit = lines.iter().any(|l| l.contains(&format!(": {key}: ")) && words.iter().all(|w| l.contains(w)));
        ensure!(hit, "no line for {key} containing {words:?}; stderr:\n{}", c.stderr);
    }
    Ok(lines)
}

#[test]
fn a_config_whose_files_all_load_is_ok() -> Result<()> {
    let f = files()?;
    let text = with_files(&f.cert, &f.key, &f.token, &f.log);
    let file = f.dir.write("keel.toml", &text)?;
    let c = check(&[&file])?;
    ensure!(c.code == Some(0), "exit {:?}; stderr:\n{}", c.code, c.stderr);
    ensure!(!f.log.exists(), "the check left the access log it probed behind");
    Ok(())
}

#[test]
fn a_missing_certificate_file() -> Result<()> {
    let f = files()?;
    let missing = f.dir.path().join("gone.pem");
    let text = with_files(&missing, &f.key, &f.token, &f.log);
    let shown = format!("{missing:?}");
    expect_problems(&f.dir, &text, &[("listeners.sec.tls.certificates[0].cert", &[&shown, "no such file"])])?;
    Ok(())
}

#[test]
fn a_key_that_does_not_match_its_certificate() -> Result<()> {
    let f = files()?;
    let text = with_files(&f.cert, &f.other_key, &f.token, &f.log);
    let shown = format!("{:?}", f.other_key);
    expect_problems(&f.dir, &text, &[("listeners.sec.tls.certificates[0].key", &[&shown, "does not match"])])?;
    Ok(())
}

#[test]
fn a_ca_bundle_that_does_not_load() -> Result<()> {
    let f = files()?;
    let junk = f.dir.write("junk-ca.pem", "not a certificate\n")?;
    let text = with_files(&f.cert, &f.key, &f.token, &f.log)
        .replace("retries = 2\n", &format!("retries = 2\ntls = {{ ca = {junk:?} }}\n"));
    expect_problems(&f.dir, &text, &[("pools.app.tls.ca", &[&format!("{junk:?}"), "no certificate"])])?;
    // The good bundle loads.
    let text = with_files(&f.cert, &f.key, &f.token, &f.log)
        .replace("retries = 2\n", &format!("retries = 2\ntls = {{ ca = {:?} }}\n", f.ca));
    let file = f.dir.write("good-ca.toml", &text)?;
    let c = check(&[&file])?;
    ensure!(c.code == Some(0), "a valid CA bundle was refused: {}", c.stderr);
    Ok(())
}

#[test]
fn a_missing_or_short_admin_token_file() -> Result<()> {
    let f = files()?;
    let missing = f.dir.path().join("no.token");
    let text = with_files(&f.cert, &f.key, &missing, &f.log);
    expect_problems(&f.dir, &text, &[("node.admin_token_file", &[&format!("{missing:?}"), "no such file"])])?;
    let short = f.dir.write("short.token", "fifteen-chars!!\n")?;
    let text = with_files(&f.cert, &f.key, &short, &f.log);
    expect_problems(&f.dir, &text, &[("node.admin_token_file", &[&format!("{short:?}"), "shorter than 16"])])?;
    Ok(())
}

#[test]
fn a_missing_admin_token_variable() -> Result<()> {
    let f = files()?;
    let text = with_files(&f.cert, &f.key, &f.token, &f.log)
        .replace(&format!("admin_token_file = {:?}", f.token), "admin_token_env = \"KEEL_TEST_NO_SUCH_VAR\"");
    expect_problems(&f.dir, &text, &[("node.admin_token_env", &["KEEL_TEST_NO_SUCH_VAR", "not set"])])?;
    let file = f.dir.write("env.toml", &text)?;
    let out = run_keel_env(
        &["config", "check", file.to_str().context("utf-8")?],
        &[("KEEL_TEST_NO_SUCH_VAR", "0123456789abcdef")],
        CHECK,
    )?;
    ensure!(out.status.success(), "with the variable set: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[test]
fn an_access_log_in_a_directory_that_does_not_exist() -> Result<()> {
    let f = files()?;
    let log = f.dir.path().join("no-dir").join("access.log");
    let text = with_files(&f.cert, &f.key, &f.token, &log);
    expect_problems(&f.dir, &text, &[("listeners.web.access_log.destination", &["no-dir", "does not exist"])])?;
    // A path below a regular file cannot be created either (and root cannot override that).
    let log = f.token.join("access.log");
    let text = with_files(&f.cert, &f.key, &f.token, &log);
    expect_problems(&f.dir, &text, &[("listeners.web.access_log.destination", &["not a directory"])])?;
    Ok(())
}

#[test]
fn an_existing_access_log_is_not_truncated() -> Result<()> {
    let f = files()?;
    std::fs::write(&f.log, "earlier line\n")?;
    let text = with_files(&f.cert, &f.key, &f.token, &f.log);
    let file = f.dir.write("keel.toml", &text)?;
    let c = check(&[&file])?;
    ensure!(c.code == Some(0), "exit {:?}; stderr:\n{}", c.code, c.stderr);
    ensure!(std::fs::read_to_string(&f.log)? == "earlier line\n", "the check changed the access log");
    Ok(())
}

/// The file of the two tests below: a parse error, a validation error and file problems.
fn many_problems(f: &Files) -> String {
    with_files(
        &f.dir.path().join("gone.pem"),
        &f.other_key,
        &f.dir.path().join("no.token"),
        &f.dir.path().join("x/a.log"),
    )
    .replace("address = \"127.0.0.1:9002\"", "address = \"127.0.0.1:90x2\"")
    .replacen("[pools.app]\n", "[pools.spare]\nalgorithm = \"random\"\n\n[pools.app]\n", 1)
    .replace("path_prefix = \"/api\"", "path_prefix = \"api\"")
}

const MANY: &[(&str, &[&str])] = &[
    ("node.admin_token_file", &["no.token", "no such file"]),
    ("listeners.web.access_log.destination", &["does not exist"]),
    ("listeners.web.routes[0].path_prefix", &["'/'"]),
    ("listeners.sec.tls.certificates[0].cert", &["gone.pem", "no such file"]),
    ("pools.app.servers[1].address", &["\"127.0.0.1:90x2\"", "HOST:PORT"]),
    ("pools.spare", &["missing field \"servers\""]),
];

#[test]
fn every_problem_of_a_file_is_reported_in_one_run_with_key_and_value() -> Result<()> {
    let f = files()?;
    let lines = expect_problems(&f.dir, &many_problems(&f), MANY)?;
    // A pool that did not read is not also reported as undefined where it is used.
    ensure!(!lines.iter().any(|l| l.contains("not defined")), "echoed problems: {lines:#?}");
    Ok(())
}

#[test]
fn run_refuses_what_check_refuses_with_the_same_lines() -> Result<()> {
    let f = files()?;
    let file = f.dir.write("keel.toml", &many_problems(&f))?;
    let path = file.to_str().context("utf-8 path")?;
    let checked = run_keel(&["config", "check", path], CHECK)?;
    let ran = run_keel(&["run", "--config", path], REFUSE)?;
    ensure!(!ran.status.success(), "keel run started with a file that does not check");
    let problems = |out: &std::process::Output| -> Vec<String> {
        String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.starts_with(path)).map(str::to_owned).collect()
    };
    let (checked, ran) = (problems(&checked), problems(&ran));
    ensure!(checked.len() >= MANY.len(), "check found too little: {checked:#?}");
    ensure!(checked == ran, "check and run disagree:\ncheck: {checked:#?}\nrun: {ran:#?}");
    Ok(())
}

/// The deploy examples check ok once the files they name exist: each path they name under
/// /etc/keel, /run/keel-lab or /var/log/keel is pointed at a file or directory of a temp dir.
#[test]
fn the_deploy_examples_check_ok_when_their_files_exist() -> Result<()> {
    let dir = TempDir::new("keel-check-deploy")?;
    let token = dir.write("admin.token", "0123456789abcdef0123\n")?;
    let logs = dir.path().join("log");
    std::fs::create_dir_all(&logs)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy");
    let examples = [
        "keel.toml",
        "pair/lb1.toml",
        "pair/lb2.toml",
        "pair/witness.toml",
        "three-node/node1.toml",
        "three-node/node2.toml",
        "three-node/node3.toml",
        "lab/node.toml.example",
        "lab/witness.toml.example",
    ];
    for name in examples {
        let text = std::fs::read_to_string(root.join(name)).with_context(|| format!("reading deploy/{name}"))?;
        let text = text
            .replace("/etc/keel/admin.token", token.to_str().context("utf-8")?)
            .replace("/run/keel-lab/token", token.to_str().context("utf-8")?)
            .replace("/var/log/keel", logs.to_str().context("utf-8")?);
        let file = dir.write(&name.replace('/', "-"), &text)?;
        let c = check(&[&file])?;
        ensure!(c.code == Some(0), "deploy/{name} does not check: {}", c.stderr);
    }
    Ok(())
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
