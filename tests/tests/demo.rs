//! `keel demo`: three named backends behind a balancer, one command.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use keel_tests::keel::Demo;
use keel_tests::{wait_until, Client};

/// Time for the demo's access log lines to reach its output.
const ACCESS_LINE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn demo_balances_over_three_named_backends() -> Result<()> {
    let demo = Demo::start().await?;
    let client = Client::new();
    let mut bodies = BTreeSet::new();
    for i in 0..30 {
        let r = client.get(demo.listen_addr(), "/").await?;
        ensure!(r.status == 200, "request {i}: {}", r.status);
        bodies.insert(r.text().trim().to_owned());
    }
    ensure!(bodies.len() == 3, "expected 3 distinct backend names, got {bodies:?}; log:\n{}", demo.log());
    let out = demo.log();
    ensure!(out.contains(&demo.listen_addr().to_string()), "the demo does not print its URL:\n{out}");
    // The demo turns its access log on, to stdout: the requests show as they are served (its
    // own start-up probe may add one).
    wait_until(ACCESS_LINE, "access log lines in the demo's output", || async {
        demo.log().lines().filter(|l| l.ends_with("\"GET / HTTP/1.1\"")).count() >= 30
    })
    .await?;
    Ok(())
}
