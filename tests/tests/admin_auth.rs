//! Admin API authentication: with `admin_token_file` or `admin_token_env`, every endpoint but
//! `GET /healthz` needs `Authorization: Bearer TOKEN` (401 without it or with a wrong one); and a
//! non-loopback admin address without a token is a config error.

use std::time::Duration;

use anyhow::{ensure, Result};
use keel_tests::keel::run_keel;
use keel_tests::tempdir::TempDir;
use keel_tests::{Backend, Keel, KeelBuilder, PoolSpec};

/// Time `config check` may take.
const CHECK: Duration = Duration::from_secs(10);

const TOKEN: &str = "s3cret-Token_for.tests";

fn app_keel(app: &Backend) -> KeelBuilder {
    Keel::builder().default_pool("app").pool(PoolSpec::new("app", "round_robin").backends([app]))
}

async fn check_guarded(keel: &Keel) -> Result<()> {
    let r = keel.admin_request("GET", "/healthz", None, None).await?;
    ensure!(r.status == 200, "GET /healthz without a token: {}", r.status);
    for (method, path, body) in [
        ("GET", "/status", None),
        ("GET", "/metrics", None),
        ("POST", "/pools/app/servers/app/drain", None),
        ("POST", "/pools/app/servers/app/weight", Some("{\"weight\":2}")),
        ("POST", "/reload-certs", None),
    ] {
        let r = keel.admin_request(method, path, None, body).await?;
        ensure!(r.status == 401, "{method} {path} without a token: {} {}", r.status, r.text());
        let r = keel.admin_request(method, path, Some("wrong-token"), body).await?;
        ensure!(r.status == 401, "{method} {path} with a wrong token: {} {}", r.status, r.text());
        let r = keel.admin_request(method, path, Some(&format!("{TOKEN}x")), body).await?;
        ensure!(r.status == 401, "{method} {path} with the token plus a character: {}", r.status);
    }
    // Not a bearer token: the bare token, or Basic.
    let req = http::Request::get(format!("http://{}/status", keel.admin_addr()))
        .header("authorization", TOKEN)
        .body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let r = keel_tests::client::send_fresh(keel.admin_addr(), req).await?;
    ensure!(r.status == 401, "GET /status with the token but no Bearer scheme: {}", r.status);

    for (method, path, body) in [("GET", "/status", None), ("GET", "/metrics", None)] {
        let r = keel.admin_request(method, path, Some(TOKEN), body).await?;
        ensure!(r.status == 200, "{method} {path} with the right token: {} {}", r.status, r.text());
    }
    let r = keel.admin_request("POST", "/pools/app/servers/app/drain", Some(TOKEN), None).await?;
    ensure!(r.status.is_success(), "drain with the right token: {} {}", r.status, r.text());
    let r = keel.admin_request("POST", "/pools/app/servers/app/enable", Some(TOKEN), None).await?;
    ensure!(r.status.is_success(), "enable with the right token: {} {}", r.status, r.text());
    // The proxy is not affected by admin auth.
    let r = keel.get("/").await?;
    ensure!(r.status == 200, "proxy request: {}", r.status);
    Ok(())
}

#[tokio::test]
async fn admin_token_file_guards_every_endpoint_but_healthz() -> Result<()> {
    let dir = TempDir::new("keel-admin-token")?;
    let file = dir.write("token", TOKEN)?;
    let app = Backend::start("app")?;
    let keel = app_keel(&app).node_line(&format!("admin_token_file = \"{}\"", file.display())).start().await?;
    check_guarded(&keel).await
}

#[tokio::test]
async fn admin_token_env_guards_every_endpoint_but_healthz() -> Result<()> {
    let app = Backend::start("app")?;
    let keel = app_keel(&app)
        .node_line("admin_token_env = \"KEEL_TEST_ADMIN_TOKEN\"")
        .env("KEEL_TEST_ADMIN_TOKEN", TOKEN)
        .start()
        .await?;
    check_guarded(&keel).await
}

fn config(admin: &str, node_extra: &str) -> String {
    format!(
        "[node]\nadmin = \"{admin}\"\n{node_extra}\n\n[listeners.web]\nbind = \"127.0.0.1:8080\"\nprotocol = \"http\"\n\
         default_pool = \"app\"\n\n[pools.app]\n\n[[pools.app.servers]]\nname = \"a\"\naddress = \"127.0.0.1:9001\"\n"
    )
}

#[test]
fn config_check_rejects_a_public_admin_address_without_a_token() -> Result<()> {
    let dir = TempDir::new("keel-admin-check")?;
    let token = dir.write("token", TOKEN)?;
    let check = |name: &str, text: String| -> Result<(bool, String)> {
        let path = dir.write(name, &text)?;
        let out = run_keel(&["config", "check", path.to_str().unwrap_or_default()], CHECK)?;
        let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success(), all))
    };
    let (ok, out) = check("loopback.toml", config("127.0.0.1:9090", ""))?;
    ensure!(ok, "a loopback admin without a token must be fine: {out}");
    let (ok, out) = check("public.toml", config("0.0.0.0:9090", ""))?;
    ensure!(!ok, "a 0.0.0.0 admin address without a token passed config check: {out}");
    ensure!(out.contains("admin"), "the error does not mention the admin setting: {out}");
    let (ok, out) = check("public-ip.toml", config("192.0.2.10:9090", ""))?;
    ensure!(!ok, "a non-loopback admin address without a token passed config check: {out}");
    let (ok, out) =
        check("public-token.toml", config("0.0.0.0:9090", &format!("admin_token_file = \"{}\"", token.display())))?;
    ensure!(ok, "a 0.0.0.0 admin address with a token file must be fine: {out}");
    // The variable is set for keel, in case config check looks it up.
    std::env::set_var("KEEL_ADMIN_TOKEN", TOKEN);
    let (ok, out) = check("public-env.toml", config("0.0.0.0:9090", "admin_token_env = \"KEEL_ADMIN_TOKEN\""))?;
    ensure!(ok, "a 0.0.0.0 admin address with a token env var must be fine: {out}");
    Ok(())
}
