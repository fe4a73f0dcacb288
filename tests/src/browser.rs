//! A real headless Chromium, driven over the DevTools protocol, for what a person looks at.
//!
//! [`Browser::launch`] starts `chromium --headless` with a fresh profile in a temp dir and
//! speaks DevTools over `--remote-debugging-pipe`: NUL-separated JSON on the browser's fds 3
//! (commands) and 4 (answers), which a `sh` wrapper maps to the child's stdin and stdout. No
//! port, so the same code drives a browser started inside a network namespace
//! ([`Browser::launch_in`]), where a lab's addresses are reachable. One page is opened and
//! attached to (flat sessions: every command tagged with the page's session id). The handful
//! of commands the tests need — navigate, evaluate a script, wait for a condition, take a
//! screenshot — are a few lines each; a CDP client crate would bring a large generated API for
//! four methods.
//!
//! The binary is `$KEEL_CHROMIUM`, else `chromium`, else `chromium-browser`. `.ci/run` installs
//! Debian's `chromium`; [`Browser::required`] says whether a missing browser fails the test (in
//! CI) or skips it (on a workstation without one). The process is killed on drop.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::tempdir::TempDir;
use crate::wait::POLL;

/// Time for the browser to start and answer its first command.
pub const LAUNCH: Duration = Duration::from_secs(30);
/// Time for one DevTools command.
pub const COMMAND: Duration = Duration::from_secs(20);

/// A headless Chromium with one page.
pub struct Browser {
    child: Child,
    commands: ChildStdin,
    answers: BufReader<ChildStdout>,
    session: String,
    next_id: u64,
    _profile: TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The Chromium binary to run, if one is installed.
pub fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KEEL_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    ["chromium", "chromium-browser", "google-chrome"].into_iter().find_map(|name| {
        std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(name)).find(|p| p.is_file())
    })
}

impl Browser {
    /// Whether a missing browser must fail the test: in CI (`CI` or `KEEL_NETNS_TESTS` set).
    pub fn required() -> bool {
        std::env::var_os("CI").is_some() || std::env::var_os("KEEL_NETNS_TESTS").is_some()
    }

    /// Starts the browser and opens a blank page; `Ok(None)` when no browser is installed and
    /// none is [`required`](Browser::required).
    pub async fn launch() -> Result<Option<Browser>> {
        Browser::launch_in(None).await
    }

    /// [`launch`](Browser::launch), inside network namespace `netns` when given (as root).
    pub async fn launch_in(netns: Option<&str>) -> Result<Option<Browser>> {
        let Some(binary) = chromium() else {
            if Browser::required() {
                bail!("no chromium installed (set KEEL_CHROMIUM or install Debian's chromium; .ci/run does)");
            }
            eprintln!("skipping: no chromium installed");
            return Ok(None);
        };
        let profile = TempDir::new("keel-chromium")?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "sh"]);
                c
            }
            None => Command::new("sh"),
        };
        // fd 3 ← our stdin (commands), fd 4 → our stdout (answers); the browser's own stdout
        // and stdin go nowhere, so nothing else can land in the DevTools stream.
        cmd.arg("-c").arg(r#"exec "$0" "$@" 3<&0 4>&1 1>/dev/null 0</dev/null"#).arg(&binary);
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--window-size=1400,1000",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", binary.display()))?;
        let commands = child.stdin.take().ok_or_else(|| anyhow!("no stdin pipe"))?;
        let answers = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout pipe"))?);
        let mut browser = Browser { child, commands, answers, session: String::new(), next_id: 1, _profile: profile };
        let target =
            tokio::time::timeout(LAUNCH, browser.call("Target.createTarget", json!({ "url": "about:blank" }), false))
                .await
                .map_err(|_| anyhow!("chromium did not answer within {LAUNCH:?}"))??;
        let target_id = target["targetId"].as_str().ok_or_else(|| anyhow!("no targetId in {target}"))?.to_owned();
        let attached =
            browser.call("Target.attachToTarget", json!({ "targetId": target_id, "flatten": true }), false).await?;
        browser.session =
            attached["sessionId"].as_str().ok_or_else(|| anyhow!("no sessionId in {attached}"))?.to_owned();
        browser.call("Page.enable", json!({}), true).await?;
        Ok(Some(browser))
    }

    /// Sends one command (to the page when `page`, else to the browser) and returns its result.
    async fn call(&mut self, method: &str, params: Value, page: bool) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if page {
            msg["sessionId"] = json!(self.session);
        }
        let mut frame = msg.to_string().into_bytes();
        frame.push(0);
        self.commands.write_all(&frame).await.with_context(|| format!("sending {method}: the browser is gone"))?;
        let wait = async {
            let mut buf = Vec::new();
            loop {
                buf.clear();
                if self.answers.read_until(0, &mut buf).await? == 0 {
                    bail!("the browser closed its DevTools pipe during {method}");
                }
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                let reply: Value = serde_json::from_slice(&buf)?;
                if reply["id"].as_u64() != Some(id) {
                    continue; // an event, or another command's answer
                }
                if let Some(err) = reply.get("error") {
                    bail!("{method}: {err}");
                }
                return Ok(reply["result"].clone());
            }
        };
        tokio::time::timeout(COMMAND, wait).await.map_err(|_| anyhow!("{method}: no answer within {COMMAND:?}"))?
    }

    /// Opens `url` in the page and waits until its document has loaded.
    pub async fn goto(&mut self, url: &str) -> Result<()> {
        let nav = self.call("Page.navigate", json!({ "url": url }), true).await?;
        if let Some(err) = nav.get("errorText").and_then(Value::as_str) {
            bail!("navigating to {url}: {err}");
        }
        self.wait_for("document.readyState === 'complete'", COMMAND, &format!("{url} to load")).await
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value as JSON.
    pub async fn eval(&mut self, expression: &str) -> Result<Value> {
        let params = json!({ "expression": expression, "returnByValue": true, "awaitPromise": true });
        let r = self.call("Runtime.evaluate", params, true).await?;
        if let Some(ex) = r.get("exceptionDetails") {
            bail!("script {expression:?} threw: {ex}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `condition` (a script yielding a boolean) until it is true, failing after
    /// `deadline` with `what` and the page's text.
    pub async fn wait_for(&mut self, condition: &str, deadline: Duration, what: &str) -> Result<()> {
        let start = Instant::now();
        loop {
            // A navigation in progress can destroy the context mid-evaluation: try again.
            if let Ok(Value::Bool(true)) = self.eval(condition).await {
                return Ok(());
            }
            if start.elapsed() >= deadline {
                let text = self.eval("document.body ? document.body.innerText : ''").await.unwrap_or_default();
                bail!(
                    "timed out after {deadline:?} waiting for {what}; the page shows:\n{}",
                    text.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(POLL.max(Duration::from_millis(50))).await;
        }
    }

    /// The text of the first element matching `selector`, if any.
    pub async fn text(&mut self, selector: &str) -> Result<Option<String>> {
        let expr = format!(
            "(() => {{ const e = document.querySelector({}); return e ? e.textContent : null; }})()",
            json!(selector)
        );
        Ok(self.eval(&expr).await?.as_str().map(str::to_owned))
    }

    /// Saves a PNG of the page at `path` (directories created).
    pub async fn screenshot(&mut self, path: &Path) -> Result<()> {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true }), true)
            .await?;
        let data = shot["data"].as_str().ok_or_else(|| anyhow!("no screenshot data"))?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}

/// Where tests leave artifacts a person may want to look at: `target/test-artifacts/`.
pub fn artifact(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"));
    target.join("test-artifacts").join(name)
}
