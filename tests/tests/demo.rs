//! `keel demo`: three named backends behind a balancer, one command.

use std::collections::BTreeSet;

use anyhow::{ensure, Result};
use keel_tests::keel::Demo;
use keel_tests::Client;

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
    Ok(())
}
