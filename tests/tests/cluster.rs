//! Cluster mode: several `keel` processes replicate config, health verdicts and sticky sessions
//! through Raft; the CLI forms, inspects and changes the cluster.
//!
//! Every test starts its own processes on free loopback ports with temp data dirs (see
//! [`keel_tests::cluster`]); every wait has a deadline; every process is killed on drop. Nodes
//! are SIGKILLed (not stopped) wherever the contract speaks of losing one: that is a crash, with
//! no chance to hand over leadership or flush anything.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use keel_tests::client::{empty, get, raw_exchange, raw_transcript, RawOutcome};
use keel_tests::cluster::{
    describe, ensure_success, keel, output_text, voters_of, Cluster, CATCH_UP, FAILOVER, GARBAGE_CLOSE, LEADER,
    REPLICATION,
};
use keel_tests::keel::find_server;
use keel_tests::redis::Redis;
use keel_tests::wait::{wait_until, HEALTH_CHANGE};
use keel_tests::{tally, Backend, Keel, KeelBuilder, PoolSpec, Reply};

/// The seed most tests use: `web` → pool `app` (round robin over `bs`).
fn seed(bs: &[Backend]) -> KeelBuilder {
    Keel::builder().default_pool("app").pool(PoolSpec::new("app", "round_robin").backends(bs))
}

/// The names of `bs`.
fn names(bs: &[Backend]) -> BTreeSet<String> {
    bs.iter().map(|b| b.name().to_owned()).collect()
}

/// Who answered `n` GETs of `path` through node `id`'s listener (each must be a 2xx).
async fn who(c: &Cluster, id: u64, path: &str, n: usize) -> Result<Vec<String>> {
    c.client().backends(c.proxy(id), path, n).await.with_context(|| format!("through node {id}"))
}

/// GET `path` through node `id` with `Cookie: cookie`.
async fn get_with_cookie(c: &Cluster, id: u64, path: &str, cookie: &str) -> Result<Reply> {
    c.client().send(empty(get(c.proxy(id), path).header("cookie", cookie))?).await
}

/// Who answered `n` GETs of `/` through node `id` carrying `cookie` (each must be a 2xx).
async fn who_with_cookie(c: &Cluster, id: u64, cookie: &str, n: usize) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for i in 0..n {
        let r = get_with_cookie(c, id, "/", cookie).await.with_context(|| format!("request {i} through node {id}"))?;
        ensure!(r.status.is_success(), "request {i} through node {id}: {} {}", r.status, r.text());
        out.push(r.backend().ok_or_else(|| anyhow!("no x-backend header"))?.to_owned());
    }
    Ok(out)
}

/// `GET /login` through node `id`: the backend that answered and the `NAME=VALUE` of the
/// session cookie it set.
async fn login(c: &Cluster, id: u64) -> Result<(String, String)> {
    let r = c.client().get(c.proxy(id), "/login").await?;
    ensure!(r.status.is_success(), "login through node {id}: {} {}", r.status, r.text());
    let backend = r.backend().ok_or_else(|| anyhow!("login: no x-backend header"))?.to_owned();
    let cookie = r
        .header("set-cookie")
        .and_then(|v| v.split(';').next())
        .filter(|kv| kv.starts_with("JSESSIONID="))
        .ok_or_else(|| anyhow!("login through node {id}: no JSESSIONID cookie in {:?}", r.headers))?
        .to_owned();
    Ok((backend, cookie))
}

/// Sum of the samples of metric `name` whose labels contain every `label="value"` in `labels`
/// (0 when there is none).
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|kv| l.contains(kv)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `n` requests through node `id` to `path` are all answered by one of `allowed`.
async fn wait_routed(c: &Cluster, id: u64, path: &str, allowed: &BTreeSet<String>) -> Result<()> {
    wait_until(REPLICATION, &format!("{path} through node {id} served by {allowed:?}"), || async move {
        who(c, id, path, 4).await.is_ok_and(|w| w.iter().all(|b| allowed.contains(b)))
    })
    .await
}

/// SIGKILLs the current leader and waits for the others to agree on a new one; returns
/// `(old, new, how long it took)`. The time runs from the kill to the moment every survivor names
/// the new leader and it says it leads.
async fn kill_leader(c: &mut Cluster) -> Result<(u64, u64, Duration)> {
    let old = c.leader(LEADER).await?;
    let survivors: Vec<u64> = c.live_ids().into_iter().filter(|&i| i != old).collect();
    let t0 = Instant::now();
    c.kill(old)?;
    let new = c.leader_among(&survivors, LEADER).await?;
    let took = t0.elapsed();
    ensure!(new != old, "the killed leader {old} is still named leader");
    Ok((old, new, took))
}

/// 1. Three nodes: init, join, status, a replicated config change served by every node,
/// failover after SIGKILL of the leader, changes through a survivor, catch-up of the restarted
/// node, and a cold restart of the whole cluster from its data dirs.
#[tokio::test]
async fn three_nodes_replicate_fail_over_and_survive_a_full_restart() -> Result<()> {
    let app = Backend::start_many("app-", 2)?;
    let api = Backend::start_many("api-", 2)?;
    let v1 = seed(&app);
    let mut c = Cluster::builder(v1.clone(), 3).start().await?;

    // init + join (each exits 0 and prints a verdict; each joiner is a voter when join returns).
    ensure_success("keel cluster init", &c.init(1)?)?;
    for id in [2, 3] {
        let out = c.join(id, 1)?;
        ensure_success(&format!("keel cluster join (node {id})"), &out)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let verdict = stdout.lines().rev().find(|l| !l.trim().is_empty());
        ensure!(verdict.is_some(), "join of node {id} printed no verdict: {}", describe(&out));
        eprintln!("join node {id} verdict: {}", verdict.unwrap_or_default());
        let voters = c.voters(1).await?;
        ensure!(voters.contains(&id), "join of node {id} returned but node 1 lists voters {voters:?}");
    }
    let leader = c.leader(LEADER).await?;

    // `keel cluster status --json`: 3 voters, one leader; the table form works too.
    let out = c.cli(2, &["cluster", "status", "--json"])?;
    ensure_success("keel cluster status --json", &out)?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("cluster status --json is not JSON: {}", describe(&out)))?;
    ensure!(voters_of(&doc)? == BTreeSet::from([1, 2, 3]), "voters in {doc}");
    ensure!(doc["leader_id"].as_u64() == Some(leader), "leader {leader} expected in {doc}");
    let out = c.cli(3, &["cluster", "status"])?;
    ensure_success("keel cluster status", &out)?;
    ensure!(!out.stdout.is_empty(), "keel cluster status printed nothing: {}", describe(&out));

    // Every node serves the seed.
    for id in c.data_ids() {
        c.wait_serving(id, REPLICATION).await?;
        wait_routed(&c, id, "/", &names(&app)).await?;
    }

    // config apply (via a follower: the CLI follows the leader) → every node serves the new pool.
    let follower = if leader == 2 { 3 } else { 2 };
    let v2 = v1
        .clone()
        .route("path_prefix = \"/api\"\npool = \"api\"")
        .pool(PoolSpec::new("api", "round_robin").backends(&api));
    ensure_success("keel config apply v2", &c.apply(follower, &v2)?)?;
    for id in c.data_ids() {
        c.wait_pool(id, "api", REPLICATION).await?;
        wait_routed(&c, id, "/api/x", &names(&api)).await?;
        let t = tally(who(&c, id, "/api/x", 8).await?.iter().map(String::as_str));
        ensure!(t.len() == 2, "node {id}: /api/x should round-robin over both api backends: {t:?}");
    }

    // `keel config show` prints the live config, new pool included, from any node.
    let out = c.cli(3, &["config", "show"])?;
    ensure_success("keel config show", &out)?;
    let shown = String::from_utf8_lossy(&out.stdout);
    ensure!(
        shown.contains("[pools.api]") && shown.contains(&api[1].addr().to_string()),
        "config show lacks the applied pool: {}",
        describe(&out)
    );

    // SIGKILL the leader → a new leader within the failover bound.
    let (old, new, took) = kill_leader(&mut c).await?;
    eprintln!("FAILOVER: leader {old} SIGKILLed, node {new} leads after {took:?} (bound {FAILOVER:?})");
    ensure!(took <= FAILOVER, "new leader after {took:?}, above the {FAILOVER:?} bound");
    let survivors: Vec<u64> = c.live_ids();
    let other = *survivors.iter().find(|&&i| i != new).ok_or_else(|| anyhow!("no second survivor"))?;

    // config apply and backend drain succeed through survivors (the non-leader, to be followed).
    let v3 = v2
        .clone()
        .route("path_prefix = \"/v3\"\npool = \"v3\"")
        .pool(PoolSpec::new("v3", "round_robin").backends(&app[..1]));
    ensure_success("keel config apply v3 after failover", &c.apply(other, &v3)?)?;
    ensure_success("keel backend drain after failover", &c.cli(other, &["backend", "drain", "app", "app-b"])?)?;
    ensure_success("keel backend weight after failover", &c.cli(new, &["backend", "weight", "app", "app-a", "7"])?)?;
    for &id in &survivors {
        wait_until(REPLICATION, &format!("node {id}: app-a weight 7"), || async {
            c.status(id).await.is_ok_and(|st| find_server(&st, "app", "app-a").is_ok_and(|s| s["weight"] == 7))
        })
        .await?;
        c.wait_pool(id, "v3", REPLICATION).await?;
        c.wait_state(id, "app", "app-b", "drain", REPLICATION).await?;
        let w = who(&c, id, "/", 10).await?;
        ensure!(w.iter().all(|b| b == "app-a"), "node {id}: drained app-b still gets requests: {w:?}");
    }

    // The killed node restarts from its data dir and catches up.
    c.restart(old).await?;
    c.wait_state(old, "app", "app-b", "drain", CATCH_UP).await?;
    c.wait_pool(old, "v3", CATCH_UP).await?;
    c.wait_serving(old, CATCH_UP).await?;
    wait_routed(&c, old, "/v3/x", &BTreeSet::from(["app-a".to_owned()])).await?;
    c.wait_voters(&[1, 2, 3], CATCH_UP).await?;

    // SIGKILL all three, restart all three: config and drain intact, a leader elected.
    for id in c.ids() {
        c.kill(id)?;
    }
    for id in c.ids() {
        c.restart(id).await?;
    }
    let leader = c.leader(LEADER).await?;
    eprintln!("after a cold restart node {leader} leads");
    for id in c.data_ids() {
        c.wait_pool(id, "v3", CATCH_UP).await?;
        c.wait_pool(id, "api", CATCH_UP).await?;
        c.wait_state(id, "app", "app-b", "drain", CATCH_UP).await?;
        c.wait_serving(id, CATCH_UP).await?;
        wait_routed(&c, id, "/api/x", &names(&api)).await?;
        let st = c.status(id).await?;
        ensure!(find_server(&st, "app", "app-a")?["weight"] == 7, "node {id} lost the weight override: {st}");
    }
    // And it still commits.
    ensure_success("keel backend enable after the cold restart", &c.cli(1, &["backend", "enable", "app", "app-b"])?)?;
    for id in c.data_ids() {
        c.wait_state(id, "app", "app-b", "up", REPLICATION).await?;
    }
    Ok(())
}

/// 2. A down verdict committed before the leader dies is in force on the new leader at once:
/// its `/status` says down and its first requests never reach the server.
///
/// The server's health endpoint fails (503) while the server itself keeps answering requests,
/// so a request keel wrongly sends to it is seen in the server's own counter instead of being
/// hidden by a connect-failure retry.
#[tokio::test]
async fn a_committed_down_verdict_holds_on_the_new_leader_at_once() -> Result<()> {
    let bs = Backend::start_many("", 2)?;
    let pool = PoolSpec::new("app", "round_robin").backends(&bs).health_http("100ms", 2, 2).no_outlier();
    let mut c = Cluster::builder(Keel::builder().default_pool("app").pool(pool), 3).start().await?;
    c.form().await?;
    for id in c.data_ids() {
        for b in &bs {
            c.wait_state(id, "app", b.name(), "up", HEALTH_CHANGE).await?;
        }
    }
    wait_until(HEALTH_CHANGE, "a few passed checks on both backends", || async {
        bs.iter().all(|b| b.health_checks() >= 6)
    })
    .await?;

    bs[1].set_healthy(false);
    for id in c.data_ids() {
        c.wait_state(id, "app", "b", "down", HEALTH_CHANGE + REPLICATION).await?;
    }
    let leader = c.leader(LEADER).await?;
    let state = c.cluster_state(leader).await?;
    ensure!(state["health"]["app"]["b"]["up"] == false, "verdict for app/b not committed as down: {}", state["health"]);

    let (old, new, took) = kill_leader(&mut c).await?;
    eprintln!("leader {old} SIGKILLed; node {new} leads after {took:?}");
    bs[1].reset_counts();
    let first = c.server_state(new, "app", "b").await?;
    ensure!(first == "down", "new leader {new} shows app/b {first:?} right after failover");
    let w = who(&c, new, "/", 20).await?;
    ensure!(bs[1].requests() == 0 && w.iter().all(|b| b == "a"), "new leader sent requests to b: {w:?}");
    for id in c.live_ids() {
        let w = who(&c, id, "/", 10).await?;
        ensure!(w.iter().all(|b| b == "a"), "node {id} sent requests to b: {w:?}");
    }

    // The old leader, restarted, serves the committed verdict from its first request.
    c.restart(old).await?;
    c.wait_serving(old, CATCH_UP).await?;
    let first = c.server_state(old, "app", "b").await?;
    let w = who(&c, old, "/", 10).await?;
    ensure!(first == "down", "restarted node {old} shows app/b {first:?} once it serves");
    ensure!(bs[1].requests() == 0 && w.iter().all(|b| b == "a"), "restarted node {old} sent requests to b: {w:?}");

    // b recovers: up again everywhere, and in rotation.
    bs[1].set_healthy(true);
    for id in c.data_ids() {
        c.wait_state(id, "app", "b", "up", HEALTH_CHANGE + REPLICATION).await?;
        wait_until(REPLICATION, &format!("node {id} sending requests to b again"), || async {
            who(&c, id, "/", 4).await.is_ok_and(|w| w.iter().any(|b| b == "b"))
        })
        .await?;
    }
    Ok(())
}

/// The sticky `learn` table of pool `app` on `JSESSIONID`, kept in `store`.
fn learn_sticky(store: &str, extra: &str) -> String {
    format!("[pools.app.sticky]\nmode = \"learn\"\nlearn_cookie = \"JSESSIONID\"\nstore = \"{store}\"\n{extra}")
}

/// 3. A session learned through node 1 (store raft) is honoured by node 2 after node 1 is
/// SIGKILLed, and sessions can still be learned after the failover.
#[tokio::test]
async fn a_learned_session_survives_the_node_that_learned_it() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let mut c = Cluster::builder(seed(&bs).raw(&learn_sticky("raft", "")), 3).start().await?;
    c.form().await?;

    let (owner, cookie) = login(&c, 1).await?;
    eprintln!("session {cookie} learned on {owner} through node 1");
    wait_until(REPLICATION, "the binding replicated to node 2", || async {
        c.cluster_state(2).await.is_ok_and(|s| s["sticky_entries"].as_u64().unwrap_or(0) >= 1)
    })
    .await?;
    // Without the cookie node 2 rotates; with it, it sticks.
    let t = tally(who(&c, 2, "/", 9).await?.iter().map(String::as_str));
    ensure!(t.len() == 3, "round robin expected without a cookie: {t:?}");
    let w = who_with_cookie(&c, 2, &cookie, 9).await?;
    ensure!(w.iter().all(|b| *b == owner), "node 2 did not honour {cookie} → {owner}: {w:?}");

    c.kill(1)?;
    let leader = c.leader_among(&[2, 3], LEADER).await?;
    eprintln!("node 1 SIGKILLed; node {leader} leads");
    for id in [2, 3] {
        let w = who_with_cookie(&c, id, &cookie, 9).await?;
        ensure!(w.iter().all(|b| *b == owner), "after node 1 died, node {id} broke {cookie} → {owner}: {w:?}");
    }

    // New sessions are still learned and shared after the failover.
    let (owner2, cookie2) = login(&c, 2).await?;
    wait_until(REPLICATION, "a session learned after failover honoured by node 3", || async {
        who_with_cookie(&c, 3, &cookie2, 6).await.is_ok_and(|w| w.iter().all(|b| *b == owner2))
    })
    .await?;
    Ok(())
}

/// Sticky `source_ip`: every node sends the same client (127.0.0.1) to the same server.
#[tokio::test]
async fn a_source_ip_binding_is_shared_by_every_node() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let sticky = "[pools.app.sticky]\nmode = \"source_ip\"\nstore = \"raft\"";
    let mut c = Cluster::builder(seed(&bs).raw(sticky), 3).start().await?;
    c.form().await?;
    let first = who(&c, 1, "/", 1).await?.remove(0);
    wait_until(REPLICATION, "node 2 and 3 sending 127.0.0.1 to the same server", || async {
        let mut ok = true;
        for id in [2, 3] {
            ok &= who(&c, id, "/", 6).await.is_ok_and(|w| w.iter().all(|b| *b == first));
        }
        ok
    })
    .await?;
    for id in c.data_ids() {
        let w = who(&c, id, "/", 9).await?;
        ensure!(w.iter().all(|b| *b == first), "node {id} moved 127.0.0.1 off {first}: {w:?}");
    }
    Ok(())
}

/// 4. Two data nodes and a witness: losing either data node keeps a leader, and the other data
/// node keeps serving and accepts `config apply`; losing the witness keeps the pair serving.
#[tokio::test]
async fn a_witness_keeps_a_pair_of_data_nodes_available() -> Result<()> {
    let app = Backend::start_many("app-", 2)?;
    let extra = Backend::start_many("x-", 1)?;
    let v1 = seed(&app);
    let mut c = Cluster::builder(v1.clone(), 2).witnesses(1).start().await?;
    c.form().await?;
    let st = c.cluster_status(1).await?;
    let members = st["members"].as_array().ok_or_else(|| anyhow!("no members: {st}"))?;
    let witness = members.iter().find(|m| m["id"] == 3).ok_or_else(|| anyhow!("node 3 not a member: {st}"))?;
    ensure!(
        witness["node"]["witness"] == true && witness["voter"] == true,
        "node 3 should be a voting witness: {witness}"
    );
    for id in [1, 2] {
        wait_routed(&c, id, "/", &names(&app)).await?;
    }

    let mut config = v1.clone();
    for (n, (lost, kept)) in [(1u64, 2u64), (2, 1)].into_iter().enumerate() {
        let t0 = Instant::now();
        c.kill(lost)?;
        let leader = c.leader_among(&[kept, 3], LEADER).await?;
        eprintln!("data node {lost} SIGKILLed: node {leader} leads after {:?}", t0.elapsed());
        wait_routed(&c, kept, "/", &names(&app)).await?;
        let pool = format!("p{n}");
        config = config
            .route(&format!("path_prefix = \"/{pool}\"\npool = \"{pool}\""))
            .pool(PoolSpec::new(&pool, "round_robin").backends(&extra));
        ensure_success(&format!("config apply with node {lost} down"), &c.apply(kept, &config)?)?;
        c.wait_pool(kept, &pool, REPLICATION).await?;
        wait_routed(&c, kept, &format!("/{pool}/x"), &names(&extra)).await?;

        c.restart(lost).await?;
        c.wait_pool(lost, &pool, CATCH_UP).await?;
        c.wait_serving(lost, CATCH_UP).await?;
    }

    let t0 = Instant::now();
    c.kill(3)?;
    let leader = c.leader_among(&[1, 2], LEADER).await?;
    eprintln!("witness SIGKILLed: node {leader} leads ({:?})", t0.elapsed());
    for id in [1, 2] {
        wait_routed(&c, id, "/", &names(&app)).await?;
    }
    config = config.pool(PoolSpec::new("after_witness", "round_robin").backends(&extra));
    ensure_success("config apply with the witness down", &c.apply(1, &config)?)?;
    for id in [1, 2] {
        c.wait_pool(id, "after_witness", REPLICATION).await?;
    }
    Ok(())
}

/// A witness (`keel run --witness`) runs a Raft voter only: no data-plane listener, and an
/// admin API with `/healthz` and `/cluster/*` only.
#[tokio::test]
async fn a_witness_serves_no_data_plane() -> Result<()> {
    let app = Backend::start_many("app-", 2)?;
    let mut c = Cluster::builder(seed(&app), 2).witnesses(1).start().await?;
    c.form().await?;
    let r = c.client().get(c.admin(3), "/healthz").await?;
    ensure!(r.status == 200, "witness /healthz answered {}", r.status);
    let st = c.cluster_status(3).await?;
    ensure!(st["id"] == 3, "witness /cluster/status: {st}");
    // The seed's listener is served by the data nodes on their own addresses; a witness has
    // none, and its admin API has no data-plane endpoints.
    for path in ["/status", "/metrics", "/"] {
        let r = c.client().get(c.admin(3), path).await?;
        ensure!(r.status == 404, "a witness serves no data plane, yet GET {path} answered {}: {}", r.status, r.text());
    }
    let r = c.client().post(c.admin(3), "/pools/app/servers/app-a/drain", "").await?;
    ensure!(r.status == 404, "a witness has no pools, yet a drain answered {}: {}", r.status, r.text());
    Ok(())
}

/// 5. Sticky sessions in Redis: shared by two nodes; with Redis dead every request is still
/// served (by the balancing algorithm) and `keel_sticky_store_errors_total{pool="app"}` counts
/// the failures; with Redis back, stickiness resumes.
#[tokio::test]
async fn redis_sticky_sessions_degrade_without_errors_and_resume() -> Result<()> {
    let mut redis = Redis::start().await?;
    let bs = Backend::start_many("", 3)?;
    let sticky = learn_sticky("redis", &format!("redis = \"{}\"\n", redis.url()));
    let mut c = Cluster::builder(seed(&bs).raw(&sticky), 2).start().await?;
    c.form().await?;

    let (owner, cookie) = login(&c, 1).await?;
    wait_until(REPLICATION, "node 2 honouring the session learned by node 1", || async {
        who_with_cookie(&c, 2, &cookie, 6).await.is_ok_and(|w| w.iter().all(|b| *b == owner))
    })
    .await?;
    for id in [1, 2] {
        let w = who_with_cookie(&c, id, &cookie, 9).await?;
        ensure!(w.iter().all(|b| *b == owner), "node {id} broke {cookie} → {owner}: {w:?}");
    }
    let mut before = Vec::new();
    for id in [1, 2] {
        before.push(metric_sum(&c.metrics(id).await?, "keel_sticky_store_errors_total", &["pool=\"app\""]));
    }

    // Redis dies: no client error, requests balanced, the error counter moves on both nodes.
    redis.stop();
    for id in [1, 2] {
        let w = who_with_cookie(&c, id, &cookie, 12).await?;
        eprintln!("node {id} with Redis down: {:?}", tally(w.iter().map(String::as_str)));
        let (_, _) = login(&c, id).await?;
    }
    for (i, id) in [1u64, 2].into_iter().enumerate() {
        let was = before[i];
        let c = &c;
        wait_until(
            REPLICATION,
            &format!("node {id}: keel_sticky_store_errors_total{{pool=\"app\"}} above {was}"),
            || async move {
                c.metrics(id)
                    .await
                    .is_ok_and(|m| metric_sum(&m, "keel_sticky_store_errors_total", &["pool=\"app\""]) > was)
            },
        )
        .await?;
    }

    // Redis is back (empty): sessions are learned and shared again.
    redis.restart().await?;
    let resumed = Instant::now();
    let shared = keel_tests::wait::wait_for(Duration::from_secs(15), "stickiness through Redis again", || async {
        let (owner, cookie) = login(&c, 1).await.ok()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let w = who_with_cookie(&c, 2, &cookie, 6).await.ok()?;
        w.iter().all(|b| *b == owner).then_some((owner, cookie))
    })
    .await?;
    eprintln!("stickiness resumed {:?} after Redis came back", resumed.elapsed());
    let (owner, cookie) = shared;
    for id in [1, 2] {
        let w = who_with_cookie(&c, id, &cookie, 9).await?;
        ensure!(w.iter().all(|b| *b == owner), "node {id} broke {cookie} → {owner} after Redis returned: {w:?}");
    }
    Ok(())
}

/// Deterministic noise for the Raft port (xorshift64).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// 6. Garbage on the Raft port and on the cluster admin API is refused; the node keeps running
/// and the cluster keeps committing.
#[tokio::test]
async fn garbage_on_the_raft_port_and_admin_api_is_refused() -> Result<()> {
    let bs = Backend::start_many("", 2)?;
    let mut c = Cluster::builder(seed(&bs), 3).start().await?;
    c.form().await?;
    let leader = c.leader(LEADER).await?;
    let follower = if leader == 2 { 3 } else { 2 };

    for target in [follower, leader] {
        let raft = c.raft(target);
        // Held open, idle, while everything else happens.
        let mut idle = Vec::new();
        for _ in 0..20 {
            idle.push(tokio::net::TcpStream::connect(raft).await?);
        }
        let inputs: Vec<(&str, Vec<u8>)> = vec![
            ("random bytes", noise(64 * 1024, 0x9e37_79b9_7f4a_7c15 ^ target)),
            ("an HTTP request", b"GET / HTTP/1.1\r\nHost: keel\r\n\r\n".to_vec()),
            ("a huge RPC length prefix", vec![2, 0xff, 0xff, 0xff, 0xff]),
            ("a huge hello length prefix", vec![1, 0x7f, 0xff, 0xff, 0xff]),
            ("a huge snapshot length prefix", vec![3, 0xff, 0xff, 0xff, 0xff, 0, 0, 0]),
            ("an unknown frame kind", vec![0x42, 0, 0, 0, 4, 1, 2, 3, 4]),
            ("a hello that never finishes", vec![1, 0, 0, 0, 100, 1, 2, 3]),
            ("a hello of garbage", {
                let mut v = vec![1, 0, 0, 1, 0];
                v.extend(noise(256, 7));
                v
            }),
        ];
        for (what, bytes) in inputs {
            let t0 = Instant::now();
            let got = raw_transcript(raft, bytes, GARBAGE_CLOSE)
                .await
                .with_context(|| format!("node {target}'s Raft port kept a connection open after {what}"))?;
            eprintln!("node {target} raft port: {what} → closed after {:?} ({} bytes back)", t0.elapsed(), got.len());
            ensure!(!got.starts_with(b"HTTP/1.1 2"), "node {target}'s Raft port answered {what} like HTTP");
            ensure!(c.is_running(target), "node {target} died after {what} on its Raft port; log:\n{}", c.log(target));
        }

        // The admin API.
        let admin = c.admin(target);
        let posts: [(&str, &str); 6] = [
            ("/cluster/propose", "{not json"),
            ("/cluster/propose", r#"{"drain_server": {"pool": 5}}"#),
            ("/cluster/propose", r#"{"launch_missiles": {}}"#),
            ("/cluster/propose", "\u{0}\u{1}\u{2}"),
            ("/cluster/add-node", r#"{"id": "one", "raft_addr": "nowhere"}"#),
            ("/cluster/remove", "[]"),
        ];
        for (path, body) in posts {
            let r = c.client().post(admin, path, body).await?;
            ensure!(r.status == 400, "node {target}: POST {path} {body:?} answered {} {}", r.status, r.text());
        }
        let r = c.client().post(admin, "/cluster/init", r#"{"listeners": {}, "pools": {}}"#).await?;
        ensure!(r.status.is_client_error(), "node {target}: a second init answered {} {}", r.status, r.text());
        for (method, path) in [
            ("GET", "/cluster/propose"),
            ("PUT", "/cluster/status"),
            ("DELETE", "/cluster/init"),
            ("GET", "/cluster/add-node"),
        ] {
            let req = http::Request::builder()
                .method(method)
                .uri(format!("http://{admin}{path}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))?;
            let r = c.client().send(req).await?;
            ensure!(r.status == 405, "node {target}: {method} {path} answered {} {}", r.status, r.text());
        }
        let r = c.client().get(admin, "/cluster/nope").await?;
        ensure!(r.status == 404, "node {target}: GET /cluster/nope answered {}", r.status);
        // A 9 MiB body: refused (413/400) or cut off, never applied.
        let huge = 9 * 1024 * 1024;
        let mut req = format!(
            "POST /cluster/propose HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\nContent-Length: {huge}\r\n\r\n"
        )
        .into_bytes();
        req.extend(std::iter::repeat_n(b'[', huge));
        match raw_exchange(admin, req, GARBAGE_CLOSE).await? {
            RawOutcome::Status(s) if (400..500).contains(&s) => {}
            RawOutcome::Closed => {}
            other => bail!("node {target}: a 9 MiB propose got {other:?}"),
        }
        let garbage = raw_exchange(admin, noise(2048, 11), GARBAGE_CLOSE).await?;
        ensure!(
            matches!(garbage, RawOutcome::Closed | RawOutcome::Status(400..=499)),
            "node {target}: binary garbage on the admin port got {garbage:?}"
        );
        ensure!(c.is_running(target), "node {target} died; log:\n{}", c.log(target));
        let r = c.client().get(admin, "/healthz").await?;
        ensure!(r.status == 200, "node {target} /healthz after garbage: {}", r.status);

        // The cluster still commits, with the idle connections still open.
        for (action, state) in [("drain", "drain"), ("enable", "up")] {
            ensure_success(
                &format!("backend {action} after garbage"),
                &c.cli(target, &["backend", action, "app", "b"])?,
            )?;
            for id in c.data_ids() {
                c.wait_state(id, "app", "b", state, REPLICATION).await?;
            }
        }
        drop(idle);
    }
    let new_leader = c.leader(LEADER).await?;
    c.wait_voters(&[1, 2, 3], REPLICATION).await?;
    eprintln!("after the garbage node {new_leader} leads (was {leader})");
    Ok(())
}

/// 7. CLI errors: an unreachable or malformed address, an unknown node id, an invalid config
/// (FILE:LINE, cluster unchanged). No quorum is in the two tests after this one.
#[tokio::test]
async fn cli_errors_are_clear_bounded_and_change_nothing() -> Result<()> {
    // Nothing listens on 127.0.0.1:1.
    let t0 = Instant::now();
    let out = keel(&["cluster", "status", "--admin", "127.0.0.1:1"])?;
    let took = t0.elapsed();
    ensure!(!out.status.success(), "status against a dead address succeeded: {}", describe(&out));
    ensure!(took < Duration::from_secs(5), "status against a dead address took {took:?}");
    ensure!(output_text(&out).contains("127.0.0.1:1"), "the message should name the address: {}", describe(&out));
    let out = keel(&["cluster", "status", "--admin", "not-an-address"])?;
    ensure!(!out.status.success(), "a malformed --admin was accepted: {}", describe(&out));
    ensure!(output_text(&out).contains("not-an-address"), "the message should name the bad value: {}", describe(&out));

    let bs = Backend::start_many("", 2)?;
    let mut c = Cluster::builder(seed(&bs), 3).start().await?;
    c.form().await?;

    // Unknown node id.
    let out = c.cli(1, &["cluster", "remove", "99"])?;
    ensure!(!out.status.success(), "remove 99 succeeded: {}", describe(&out));
    ensure!(!output_text(&out).trim().is_empty(), "remove 99 failed silently");
    c.wait_voters(&[1, 2, 3], REPLICATION).await?;

    // An invalid config: FILE:LINE, non-zero, nothing changes anywhere.
    let before: Vec<serde_json::Value> = {
        let mut v = Vec::new();
        for id in c.data_ids() {
            v.push(c.cluster_state(id).await?["config"].clone());
        }
        v
    };
    let broken = "[listeners.web]\nbind = \"127.0.0.1:1\"\ndefault_pool = \"nope\"\n\n\
                  [pools.app]\nalgorithm = \"round_robin\"\n[[pools.app.servers]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\nweight = 0\n";
    let path = c.write("broken.toml", broken)?;
    let file = path.to_str().ok_or_else(|| anyhow!("path"))?.to_owned();
    let out = c.cli(1, &["config", "apply", &file])?;
    let text = output_text(&out);
    ensure!(!out.status.success(), "apply of a broken config succeeded: {}", describe(&out));
    ensure!(text.contains("broken.toml:3"), "expected broken.toml:3 (default_pool): {}", describe(&out));
    ensure!(text.contains("broken.toml:10"), "expected broken.toml:10 (weight 0): {}", describe(&out));
    let syntax = c.write("syntax.toml", "[listeners.web]\nbind = 12\n")?;
    let out = c.cli(2, &["config", "apply", syntax.to_str().ok_or_else(|| anyhow!("path"))?])?;
    ensure!(!out.status.success(), "apply of a mistyped config succeeded: {}", describe(&out));
    ensure!(output_text(&out).contains("syntax.toml:2"), "expected syntax.toml:2: {}", describe(&out));
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, id) in c.data_ids().into_iter().enumerate() {
        let now = c.cluster_state(id).await?["config"].clone();
        ensure!(now == before[i], "node {id}'s config changed after a refused apply: {now}");
        ensure!(c.pools(id).await? == BTreeSet::from(["app".to_owned()]), "node {id} serves other pools now");
        wait_routed(&c, id, "/", &names(&bs)).await?;
    }

    Ok(())
}

/// Kills every node but `survivor` of a formed 3-node cluster, then checks that `config apply`
/// and `backend drain` through `survivor` fail within 10 s with a message about quorum, and
/// that nothing was applied.
async fn changes_without_quorum_fail(c: &mut Cluster, survivor: u64, bs: &[Backend]) -> Result<()> {
    let extra = Backend::start_many("x-", 1)?;
    for id in c.ids() {
        if id != survivor {
            c.kill(id)?;
        }
    }
    let good = seed(bs).pool(PoolSpec::new("never", "round_robin").backends(&extra));
    let t0 = Instant::now();
    let out = c.apply(survivor, &good)?;
    let took = t0.elapsed();
    eprintln!("apply without quorum via node {survivor}: {took:?}: {}", describe(&out));
    ensure!(!out.status.success(), "apply without quorum succeeded: {}", describe(&out));
    ensure!(took < Duration::from_secs(10), "apply without quorum took {took:?}, above the 10 s bound");
    ensure!(
        output_text(&out).to_lowercase().contains("quorum"),
        "the message should speak of quorum: {}",
        describe(&out)
    );
    let t0 = Instant::now();
    let out = c.cli(survivor, &["backend", "drain", "app", "a"])?;
    let took = t0.elapsed();
    eprintln!("drain without quorum via node {survivor}: {took:?}: {}", describe(&out));
    ensure!(!out.status.success(), "drain without quorum succeeded: {}", describe(&out));
    ensure!(took < Duration::from_secs(10), "drain without quorum took {took:?}");
    ensure!(
        output_text(&out).to_lowercase().contains("quorum"),
        "the message should speak of quorum: {}",
        describe(&out)
    );
    ensure!(!c.pools(survivor).await?.contains("never"), "the survivor serves a config that never committed");
    ensure!(c.server_state(survivor, "app", "a").await? == "up", "the survivor applied a drain that never committed");
    Ok(())
}

/// No quorum, seen from the leader: both followers SIGKILLed; changes through the leader fail
/// within 10 s, say why, and change nothing.
#[tokio::test]
async fn without_quorum_a_leader_refuses_changes_in_bounded_time() -> Result<()> {
    let bs = Backend::start_many("", 2)?;
    let mut c = Cluster::builder(seed(&bs), 3).start().await?;
    c.form().await?;
    let leader = c.leader(LEADER).await?;
    changes_without_quorum_fail(&mut c, leader, &bs).await
}

/// No quorum, seen from a follower: the leader and the other follower SIGKILLed; changes through
/// the survivor fail within 10 s, say why, and change nothing.
#[tokio::test]
async fn without_quorum_a_follower_refuses_changes_in_bounded_time() -> Result<()> {
    let bs = Backend::start_many("", 2)?;
    let mut c = Cluster::builder(seed(&bs), 3).start().await?;
    c.form().await?;
    let leader = c.leader(LEADER).await?;
    let survivor = c.ids().into_iter().find(|&i| i != leader).ok_or_else(|| anyhow!("no follower"))?;
    changes_without_quorum_fail(&mut c, survivor, &bs).await
}

/// `keel config apply` adds a listener (every node binds its address) and removes it again
/// (every node closes it), while the `web` listener keeps serving.
#[tokio::test]
async fn applied_listeners_are_bound_and_closed_on_every_node() -> Result<()> {
    let bs = Backend::start_many("", 2)?;
    let mut c = Cluster::builder(seed(&bs), 3).spare_listeners(&["extra"]).start().await?;
    c.form().await?;
    let shared = c.shared_addr("extra")?;
    let with_extra =
        seed(&bs).raw(&format!("[listeners.extra]\nbind = \"{shared}\"\nprotocol = \"http\"\ndefault_pool = \"app\""));
    ensure_success("config apply with a new listener", &c.apply(1, &with_extra)?)?;
    let client = c.client();
    for id in c.data_ids() {
        let addr = c.listener_addr(id, "extra")?;
        wait_until(REPLICATION, &format!("node {id} serving the new listener on {addr}"), || async move {
            client.backends(addr, "/", 2).await.is_ok()
        })
        .await?;
    }
    ensure_success("config apply without the listener", &c.apply(2, &seed(&bs))?)?;
    for id in c.data_ids() {
        let addr = c.listener_addr(id, "extra")?;
        wait_until(REPLICATION, &format!("node {id} closing {addr}"), || async move {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await?;
        wait_routed(&c, id, "/", &names(&bs)).await?;
    }
    Ok(())
}

/// `keel cluster add-node` adds a running, uninitialized node by id and addresses; it then
/// serves the cluster's config. `keel cluster remove` takes it out again; the rest keeps
/// committing.
#[tokio::test]
async fn add_node_and_remove_change_the_membership() -> Result<()> {
    let bs = Backend::start_many("", 2)?;
    let extra = Backend::start_many("x-", 1)?;
    let mut c = Cluster::builder(seed(&bs), 3).start().await?;
    ensure_success("keel cluster init", &c.init(1)?)?;
    ensure_success("keel cluster join (node 2)", &c.join(2, 1)?)?;
    let (raft, admin) = (c.raft(3).to_string(), c.admin(3).to_string());
    let out = c.cli(2, &["cluster", "add-node", "3", &raft, &admin])?;
    ensure_success("keel cluster add-node 3", &out)?;
    c.wait_voters(&[1, 2, 3], CATCH_UP).await?;
    c.wait_serving(3, CATCH_UP).await?;
    wait_routed(&c, 3, "/", &names(&bs)).await?;

    let out = c.cli(3, &["cluster", "remove", "3"])?;
    ensure_success("keel cluster remove 3", &out)?;
    let voters = c.voters(1).await?;
    ensure!(voters == BTreeSet::from([1, 2]), "after remove 3 node 1 lists voters {voters:?}");
    c.leader_among(&[1, 2], LEADER).await?;
    let v2 = seed(&bs).pool(PoolSpec::new("later", "round_robin").backends(&extra));
    ensure_success("config apply after remove", &c.apply(1, &v2)?)?;
    for id in [1, 2] {
        c.wait_pool(id, "later", REPLICATION).await?;
    }
    // Two voters now: losing node 3 for good costs nothing.
    c.kill(3)?;
    ensure_success("backend drain without node 3", &c.cli(2, &["backend", "drain", "app", "a"])?)?;
    for id in [1, 2] {
        c.wait_state(id, "app", "a", "drain", REPLICATION).await?;
    }
    Ok(())
}

/// With an admin token, the CLI needs `--token` or `KEEL_ADMIN_TOKEN`, and `/cluster/*` refuses
/// requests without it (a proposal without the token changes nothing).
#[tokio::test]
async fn the_admin_token_guards_the_cluster_api_and_cli() -> Result<()> {
    let bs = Backend::start_many("", 2)?;
    let token = "cluster-test-token-0123456789";
    let mut c = Cluster::builder(seed(&bs), 3).admin_token(token).start().await?;
    c.form().await?;

    let out = c.cli_env(2, &["cluster", "status", "--json"], &[])?;
    ensure!(!out.status.success(), "cluster status without a token succeeded: {}", describe(&out));
    ensure!(!output_text(&out).contains(token), "the token leaked into the output");
    let out = c.cli_env(2, &["cluster", "status", "--json"], &[("KEEL_ADMIN_TOKEN", token)])?;
    ensure_success("cluster status with KEEL_ADMIN_TOKEN", &out)?;
    let out = c.cli_env(2, &["backend", "drain", "app", "a"], &[("KEEL_ADMIN_TOKEN", "wrong")])?;
    ensure!(!out.status.success(), "drain with a wrong token succeeded: {}", describe(&out));

    let leader = c.leader(LEADER).await?;
    for (path, body) in [
        ("/cluster/propose", r#"{"drain_server": {"pool": "app", "server": "a", "drain": true}}"#),
        ("/cluster/remove", r#"{"id": 2}"#),
    ] {
        let r = c.client().post(c.admin(leader), path, body).await?;
        ensure!(r.status == 401, "POST {path} without a token answered {} {}", r.status, r.text());
    }
    let r = c.client().get(c.admin(leader), "/cluster/state").await?;
    ensure!(r.status == 401, "GET /cluster/state without a token answered {}", r.status);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in c.data_ids() {
        let state = c.server_state(id, "app", "a").await?;
        ensure!(state == "up", "node {id}: an unauthenticated proposal drained a ({state})");
    }
    c.wait_voters(&[1, 2, 3], REPLICATION).await?;
    Ok(())
}

/// A formed 3-node cluster: the leader, its followers, and the leader's term.
struct Formed {
    c: Cluster,
    leader: u64,
    followers: Vec<u64>,
    term: u64,
}

/// A node's term from its `/cluster/status`.
fn term_of(status: &serde_json::Value) -> u64 {
    status["term"].as_u64().unwrap_or(0)
}

async fn formed(bs: &[Backend]) -> Result<Formed> {
    let mut c = Cluster::builder(seed(bs), 3).start().await?;
    c.form().await?;
    let leader = c.leader(LEADER).await?;
    let term = term_of(&c.cluster_status(leader).await?);
    let followers = c.data_ids().into_iter().filter(|&id| id != leader).collect();
    Ok(Formed { c, leader, followers, term })
}

/// `keel cluster transfer` hands leadership to the named data node in one election (the term
/// moves by one) and answers once it leads; through a follower the CLI follows the leader. A
/// node that is not a member, or the leader itself, is refused with a clear message and
/// changes nothing.
#[tokio::test]
async fn cluster_transfer_hands_leadership_over_and_refuses_bad_targets() -> Result<()> {
    let bs = Backend::start_many("", 2)?;
    let Formed { mut c, leader, followers, term: before } = formed(&bs).await?;
    let term = term_of;
    let (target, via) = (followers[0], followers[1]);
    let out = c.cli(via, &["cluster", "transfer", "--to", &target.to_string()])?;
    ensure_success("keel cluster transfer", &out)?;
    ensure!(
        output_text(&out).contains(&format!("node {target}")),
        "the answer should name the successor: {}",
        describe(&out)
    );
    let now = c.leader(LEADER).await?;
    ensure!(now == target, "leader after the transfer is {now}, not {target}");
    let after = term(&c.cluster_status(now).await?);
    ensure!(after == before + 1, "one election expected: term {before} -> {after}");
    wait_routed(&c, now, "/", &names(&bs)).await?;

    for bad in ["99".to_owned(), target.to_string()] {
        let out = c.cli(leader, &["cluster", "transfer", "--to", &bad])?;
        ensure!(!out.status.success(), "transfer to {bad} succeeded: {}", describe(&out));
        ensure!(
            output_text(&out).contains(&format!("node {bad}")),
            "the refusal should name node {bad}: {}",
            describe(&out)
        );
    }
    ensure!(c.leader(LEADER).await? == target, "a refused transfer moved the leader");
    ensure!(term(&c.cluster_status(target).await?) == after, "a refused transfer changed the term");
    Ok(())
}

/// `keel cluster remove 3`: node 3 learns it (its status says so, it stops serving the
/// cluster's listener and stands for nothing: the term stays), refuses to start as a member
/// again, and after `keel cluster leave --reset` joins as new — without moving the leader or
/// the term.
#[tokio::test]
async fn a_removed_node_knows_it_and_rejoins_only_after_a_reset() -> Result<()> {
    let bs = Backend::start_many("", 2)?;
    let Formed { mut c, leader, followers, term: before } = formed(&bs).await?;
    let term = term_of;
    let removed = followers[0];

    ensure_success("keel cluster remove", &c.cli(leader, &["cluster", "remove", &removed.to_string()])?)?;
    wait_until(REPLICATION, &format!("node {removed} reporting its removal"), || async {
        c.cluster_status(removed).await.is_ok_and(|s| s["removed"]["node_id"].as_u64() == Some(removed))
    })
    .await?;
    let proxy = c.proxy(removed);
    wait_until(REPLICATION, &format!("node {removed} closing the cluster's listener {proxy}"), || async move {
        tokio::net::TcpStream::connect(proxy).await.is_err()
    })
    .await?;
    // Long enough for a node that still believed it was a voter to stand (several leases).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let survivors: Vec<u64> = c.data_ids().into_iter().filter(|&id| id != removed).collect();
    ensure!(c.leader_among(&survivors, LEADER).await? == leader, "the removal moved the leader");
    ensure!(term(&c.cluster_status(leader).await?) == before, "the removed node disturbed the term");
    ensure!(term(&c.cluster_status(removed).await?) <= before, "the removed node raised its own term");

    // A restart keeps it out, with a message saying what to do.
    c.kill(removed)?;
    let file = c.spec(removed).file.to_str().ok_or_else(|| anyhow!("path"))?.to_owned();
    let out = keel(&["run", "--config", &file])?;
    ensure!(!out.status.success(), "a removed node started as a member: {}", describe(&out));
    let text = output_text(&out);
    ensure!(
        text.contains("was removed from cluster") && text.contains("leave --reset"),
        "unclear refusal: {}",
        describe(&out)
    );

    let out = keel(&["cluster", "leave", "--config", &file])?;
    ensure!(
        !out.status.success() && output_text(&out).contains("--reset"),
        "leave without --reset: {}",
        describe(&out)
    );
    ensure_success("keel cluster leave --reset", &keel(&["cluster", "leave", "--reset", "--config", &file])?)?;
    c.restart(removed).await?;
    ensure_success("keel cluster join after the reset", &c.join(removed, leader)?)?;
    c.wait_voters(&[1, 2, 3], CATCH_UP).await?;
    c.wait_serving(removed, CATCH_UP).await?;
    wait_routed(&c, removed, "/", &names(&bs)).await?;
    ensure!(c.leader(LEADER).await? == leader, "the re-join moved the leader");
    ensure!(term(&c.cluster_status(leader).await?) == before, "the re-join changed the term");
    Ok(())
}

/// A node removed while it was down (so the leader could not tell it) learns it on its next
/// contact: when it looks for a leader, a voter whose membership no longer lists it says so.
/// It then reports the removal and disturbs nothing.
#[tokio::test]
async fn a_node_removed_while_down_learns_it_when_it_comes_back() -> Result<()> {
    let bs = Backend::start_many("", 2)?;
    let Formed { mut c, leader, followers, term: before } = formed(&bs).await?;
    let term = term_of;
    let removed = followers[0];
    c.kill(removed)?;
    ensure_success("keel cluster remove (node down)", &c.cli(leader, &["cluster", "remove", &removed.to_string()])?)?;
    c.restart(removed).await?;
    let c = &c;
    wait_until(CATCH_UP, &format!("node {removed} learning its removal"), || async move {
        c.cluster_status(removed).await.is_ok_and(|s| s["removed"].is_object())
    })
    .await?;
    let status = c.cluster_status(removed).await?;
    let learned = status["removed"]["learned_from"].as_str().unwrap_or_default();
    ensure!(learned.starts_with("node "), "expected a peer to say so, got {learned:?}");
    let survivors: Vec<u64> = c.data_ids().into_iter().filter(|&id| id != removed).collect();
    ensure!(c.leader_among(&survivors, LEADER).await? == leader, "the removed node moved the leader");
    ensure!(term(&c.cluster_status(leader).await?) == before, "the removed node disturbed the term");
    Ok(())
}
