//! The operations CLI: `keel cluster …`, `keel config apply|show`, `keel backend …`.
//!
//! Read commands (`keel status`, `keel backend list`, `keel cluster status`, `keel config
//! show`) print a table for a person, or with `--json` one JSON document on stdout for a
//! program; warnings go to stderr so they never corrupt that document.
//!
//! Every command talks to a node's admin API (`--admin`, with `--token` / `KEEL_ADMIN_TOKEN`
//! when the API requires one) through [`ClusterClient`], which follows the leader when a
//! follower answers 421. Each command either succeeds and says so in one line, or fails with a
//! message and a non-zero exit, having changed nothing: validation happens before anything is
//! proposed, and every call has a deadline so a cluster without quorum yields an error, not a
//! hang.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use http::StatusCode;
use keel_cluster::api::client::{ClientError, ClusterClient};
use keel_cluster::api::AddNode;
use keel_cluster::{ClusterStatus, Command, NodeId, Outcome};

use crate::config::{self, NodeFile};

/// Why a CLI command failed; printed as is.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The config file was refused.
    #[error("{0}")]
    Config(Box<config::ConfigError>),
    /// The node could not be reached or refused the request.
    #[error("{}", explain(.0))]
    Client(Box<ClientError>),
    /// Anything else, already phrased for the operator.
    #[error("{0}")]
    Other(String),
}

impl From<config::ConfigError> for CliError {
    fn from(e: config::ConfigError) -> Self {
        CliError::Config(Box::new(e))
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Client(Box::new(e))
    }
}

/// A client error in the operator's terms: what most likely went wrong and what to try.
fn explain(e: &ClientError) -> String {
    match e {
        ClientError::Unreachable { addr, reason } => {
            format!("nothing answers at {addr} (is keel running? is --admin right?): {reason}")
        }
        ClientError::Timeout { addr, timeout } => format!(
            "{addr} accepted the connection but did not answer within {}s (timed out): the node may be overloaded, \
             or waiting for a cluster that lost quorum",
            timeout.as_secs()
        ),
        ClientError::Api { addr, status, .. } if *status == http::StatusCode::UNAUTHORIZED => format!(
            "{addr} refused the request (401): the admin token is missing or wrong; pass it with --token TOKEN \
             or the KEEL_ADMIN_TOKEN environment variable"
        ),
        other => other.to_string(),
    }
}

/// A write asked of `asked` that could not reach a leader: say what that most likely means.
/// Quorum is suspected only when a node answered (no leader known, no quorum, a commit that
/// timed out) or when the leader it redirected to is gone; when `asked` itself does not answer,
/// the error says that nothing answers there instead.
fn no_leader(asked: SocketAddr) -> impl Fn(ClientError) -> CliError {
    move |e| {
        let leaderless = match &e {
            ClientError::NoLeader(_) | ClientError::Timeout { .. } => true,
            ClientError::Api { status, .. } => {
                *status == http::StatusCode::SERVICE_UNAVAILABLE || *status == http::StatusCode::GATEWAY_TIMEOUT
            }
            ClientError::Unreachable { addr, .. } | ClientError::Transport { addr, .. } => *addr != asked,
            _ => false,
        };
        if !leaderless {
            return e.into();
        }
        CliError::Other(format!(
            "{}\nno leader could commit the change: the cluster may have lost quorum (a majority of voters must be \
             up); nothing was changed",
            explain(&e)
        ))
    }
}

/// Parses `--admin`: `IP:PORT`, or `HOST:PORT` resolved once with the system resolver (the
/// first address it gives), so `--admin localhost:9090` works. A CLI call is one-shot, so a
/// name is looked up here, not followed.
pub fn admin_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    let mut found = text.to_socket_addrs().map_err(|e| format!("{text:?} is not HOST:PORT that resolves: {e}"))?;
    found.next().ok_or_else(|| format!("{text:?} resolves to no address"))
}

/// Where and how to reach the admin API.
#[derive(Clone, Debug)]
pub struct Target {
    /// Admin address.
    pub admin: SocketAddr,
    /// Bearer token.
    pub token: Option<String>,
}

impl Target {
    fn client(&self) -> ClusterClient {
        ClusterClient::new(self.admin).with_token(self.token.clone())
    }
}

fn cluster_file(path: &Path) -> Result<(NodeFile, config::ClusterSection), CliError> {
    let file = config::load(path)?;
    let section = file.cluster.clone().ok_or_else(|| {
        CliError::Other(format!("{}: no [cluster] section; this node is not configured for a cluster", path.display()))
    })?;
    Ok((file, section))
}

fn file_target(file: &NodeFile, token: Option<String>) -> Result<Target, CliError> {
    let token = match token {
        Some(t) => Some(t),
        None => file.node.admin_token().map_err(CliError::Other)?,
    };
    Ok(Target { admin: file.node.admin, token })
}

/// `keel cluster init --config FILE`: makes the node of FILE the first member, seeded with
/// FILE's listeners and pools.
pub async fn cluster_init(path: &Path, token: Option<String>) -> Result<(), CliError> {
    let (file, section) = cluster_file(path)?;
    if file.config.listeners.is_empty() {
        return Err(CliError::Other(format!("{}: no listeners to seed the cluster with", path.display())));
    }
    let target = file_target(&file, token)?;
    let outcome = target.client().init(&file.config).await?;
    if let Outcome::Rejected { reason } = outcome {
        return Err(CliError::Other(format!("the seed config was rejected: {reason}")));
    }
    println!(
        "cluster initialized: node {} is the first member, serving {} listener(s) and {} pool(s)",
        section.node_id,
        file.config.listeners.len(),
        file.config.pools.len()
    );
    Ok(())
}

/// `keel cluster join --via ADDR --config FILE`: asks a member to add the node of FILE, with
/// progress while the new node catches up.
pub async fn cluster_join(via: SocketAddr, path: &Path, witness: bool, token: Option<String>) -> Result<(), CliError> {
    let (file, section) = cluster_file(path)?;
    let token = file_target(&file, token)?.token;
    let node = AddNode {
        id: section.node_id,
        raft_addr: section.raft,
        admin_addr: file.node.admin,
        witness: witness || section.witness,
    };
    add(Target { admin: via, token }, node).await
}

/// `keel cluster add-node ID RAFT ADMIN`.
pub async fn cluster_add(target: &Target, node: AddNode) -> Result<(), CliError> {
    add(target.clone(), node).await
}

async fn add(target: Target, node: AddNode) -> Result<(), CliError> {
    let client = target.client();
    let role = if node.witness { "witness" } else { "voter" };
    println!(
        "asking {} to add node {} (raft {}, admin {}) as a {role}",
        target.admin, node.id, node.raft_addr, node.admin_addr
    );
    let started = Instant::now();
    let call = client.add_node(&node);
    tokio::pin!(call);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let result = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = ticker.tick() => println!("  … catching up ({}s)", started.elapsed().as_secs()),
        }
    };
    result?;
    let status = client.status().await?;
    println!(
        "node {} joined as a {role} in {:.1}s; leader is node {}, {} member(s)",
        node.id,
        started.elapsed().as_secs_f64(),
        status.leader_id.map_or("?".to_owned(), |l| l.to_string()),
        status.members.len()
    );
    Ok(())
}

/// `keel cluster remove ID`.
pub async fn cluster_remove(target: &Target, id: NodeId) -> Result<(), CliError> {
    let client = target.client();
    let status = client.status().await?;
    if !status.members.iter().any(|m| m.id == id) {
        let known: Vec<String> = status.members.iter().map(|m| m.id.to_string()).collect();
        return Err(CliError::Other(format!("node {id} is not a member (members: {})", known.join(", "))));
    }
    client.remove(id).await?;
    println!("node {id} removed from the cluster");
    Ok(())
}

/// `keel cluster leave --reset --config FILE`: deletes a *stopped* node's Raft state (log,
/// vote, state machine, removal record) so it can join again as a new member. Refused while
/// the node's admin API answers: a running node's state is not deleted under it.
pub async fn cluster_leave(path: &Path, reset: bool) -> Result<(), CliError> {
    let (file, section) = cluster_file(path)?;
    if !reset {
        return Err(CliError::Other(
            "`keel cluster leave` needs --reset: it deletes this stopped node's cluster state so it can join again              (to take a running node out, run `keel cluster remove ID` against any member)"
                .into(),
        ));
    }
    let admin = file.node.admin;
    if tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(admin))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        return Err(CliError::Other(format!(
            "something answers at {admin}, this node's admin address: stop keel before resetting its state"
        )));
    }
    let deleted = keel_cluster::removal::reset(&section.data_dir)
        .map_err(|e| CliError::Other(format!("cannot reset {}: {e}", section.data_dir.display())))?;
    if deleted.is_empty() {
        println!("{}: no cluster state to delete", section.data_dir.display());
    } else {
        for p in &deleted {
            println!("deleted {}", p.display());
        }
        println!("node {} can join again: keel cluster join --via ADMIN --config {}", section.node_id, path.display());
    }
    Ok(())
}

/// `keel cluster transfer [--to ID]`.
pub async fn cluster_transfer(target: &Target, to: Option<NodeId>) -> Result<(), CliError> {
    let answer = target.client().transfer(to).await?;
    match answer.get("leader").and_then(serde_json::Value::as_u64) {
        Some(id) => println!("leadership and the VIP handed over to node {id}"),
        None => println!("{answer}"),
    }
    Ok(())
}

/// `keel cluster vip move ADDRESS --to ID`.
pub async fn cluster_vip_move(target: &Target, vip: std::net::IpAddr, to: NodeId) -> Result<(), CliError> {
    target.client().move_vip(vip, to).await?;
    println!("VIP {vip} moved to node {to}");
    Ok(())
}

/// `keel cluster status [--json]`.
pub async fn cluster_status(target: &Target, json: bool) -> Result<(), CliError> {
    let status = target.client().status().await?;
    // Who holds the VIP is each node's own fact: ask every member (bounded by the client's
    // deadline; an unreachable member shows "?").
    let mut vip = std::collections::BTreeMap::new();
    for m in &status.members {
        let client = ClusterClient::new(m.node.admin_addr).with_token(target.token.clone());
        let holding = if m.node.witness {
            Some(Held::default()) // a witness never holds one (and serves no /status)
        } else {
            match tokio::time::timeout(Duration::from_secs(2), client.get_json("/status")).await {
                Ok(Ok(doc)) => Some(Held::from_status(&doc)),
                _ => None,
            }
        };
        vip.insert(m.id, holding);
    }
    if json {
        let mut doc = serde_json::to_value(&status).map_err(|e| CliError::Other(e.to_string()))?;
        if let Some(obj) = doc.as_object_mut() {
            let holders: Vec<NodeId> =
                vip.iter().filter(|(_, h)| h.as_ref().is_some_and(|h| h.leader_vip)).map(|(id, _)| *id).collect();
            obj.insert("vip_holders".into(), serde_json::json!(holders));
            let spread: std::collections::BTreeMap<String, Vec<String>> = vip
                .iter()
                .filter_map(|(id, h)| {
                    h.as_ref().filter(|h| !h.spread.is_empty()).map(|h| (id.to_string(), h.spread.clone()))
                })
                .collect();
            obj.insert("vips_on_interface".into(), serde_json::json!(spread));
        }
        println!("{}", serde_json::to_string_pretty(&doc).map_err(|e| CliError::Other(e.to_string()))?);
        return Ok(());
    }
    print!("{}", render_status(&status, &vip));
    Ok(())
}

/// What one member's `/status` says it has on its interface.
#[derive(Clone, Debug, Default)]
struct Held {
    /// The leader's single VIP.
    leader_vip: bool,
    /// Spread VIPs.
    spread: Vec<String>,
}

impl Held {
    fn from_status(doc: &serde_json::Value) -> Self {
        let leader_vip =
            doc.get("vip").and_then(|v| v.get("holding")).and_then(serde_json::Value::as_bool).unwrap_or(false);
        let spread = doc
            .get("vips")
            .and_then(serde_json::Value::as_array)
            .map(|list| {
                list.iter()
                    .filter(|v| v.get("holding").and_then(serde_json::Value::as_bool) == Some(true))
                    .filter_map(|v| v.get("address").and_then(serde_json::Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Held { leader_vip, spread }
    }
}

fn render_status(s: &ClusterStatus, vip: &std::collections::BTreeMap<NodeId, Option<Held>>) -> String {
    let mut out = format!(
        "node {} ({:?}), term {}, leader {}, last log {}, commit {}\n\n",
        s.id,
        s.role,
        s.term,
        s.leader_id.map_or("none".to_owned(), |l| l.to_string()),
        s.last_log_index.map_or("-".to_owned(), |i| i.to_string()),
        s.commit_index.map_or("-".to_owned(), |i| i.to_string()),
    );
    if let Some(removed) = &s.removed {
        out.push_str(&format!(
            "REMOVED: {}; it serves nothing and stands for nothing (`keel cluster leave --reset` to join again)\n\n",
            removed.describe()
        ));
    }
    out.push_str(&format!(
        "{:<6} {:<8} {:<8} {:<22} {:<22} {:>8}  {}\n",
        "ID", "ROLE", "KIND", "RAFT", "ADMIN", "LAG", "VIP"
    ));
    for m in &s.members {
        let role = if Some(m.id) == s.leader_id {
            "leader"
        } else if m.voter {
            "voter"
        } else {
            "learner"
        };
        let kind = if m.node.witness { "witness" } else { "data" };
        let holds = match vip.get(&m.id).cloned().flatten() {
            Some(h) if h.leader_vip => "holds".to_owned(),
            Some(h) if !h.spread.is_empty() => h.spread.join(","),
            Some(_) => "-".to_owned(),
            None => "?".to_owned(),
        };
        out.push_str(&format!(
            "{:<6} {:<8} {:<8} {:<22} {:<22} {:>8}  {}\n",
            m.id,
            role,
            kind,
            m.node.raft_addr.to_string(),
            m.node.admin_addr.to_string(),
            m.lag.map_or("-".to_owned(), |l| l.to_string()),
            holds
        ));
    }
    if !s.vips.is_empty() {
        out.push_str(&format!("\n{:<40} {:<8} {}\n", "VIP", "HOLDER", "STATE"));
        for (address, slot) in &s.vips {
            let (holder, state) = match (slot.holder, slot.move_to, slot.released_by) {
                (Some(h), _, _) => {
                    let on = vip.get(&h).cloned().flatten().map(|held| held.spread.contains(&address.to_string()));
                    (
                        h.to_string(),
                        match on {
                            Some(true) => "held",
                            Some(false) => "named, not on its interface yet",
                            None => "named (node unreachable from here)",
                        }
                        .to_owned(),
                    )
                }
                (None, Some(to), Some(from)) => ("-".to_owned(), format!("moving from node {from} to node {to}")),
                (None, _, Some(from)) => ("-".to_owned(), format!("moving: waiting out node {from}'s lease")),
                (None, _, None) => ("-".to_owned(), "unassigned: no live node lists it".to_owned()),
            };
            out.push_str(&format!("{:<40} {:<8} {}\n", address.to_string(), holder, state));
        }
    }
    out
}

/// `keel config apply FILE`: validates locally, then proposes the new config to the cluster; a
/// standalone node (no cluster to propose to) is sent the file's text and reloads from it as
/// on SIGHUP.
pub async fn config_apply(target: &Target, path: &Path) -> Result<(), CliError> {
    let file = config::load(path)?;
    let started = Instant::now();
    let proposed = target.client().propose(&Command::ApplyConfig(file.config.clone())).await;
    if let Err(ClientError::Api { status: StatusCode::NOT_FOUND, .. }) = &proposed {
        return standalone_apply(target, path).await;
    }
    match proposed.map_err(no_leader(target.admin))? {
        Outcome::Rejected { reason } => Err(CliError::Other(format!("the cluster rejected the config: {reason}"))),
        _ => {
            println!(
                "config applied in {} ms: {} listener(s), {} pool(s)",
                started.elapsed().as_millis(),
                file.config.listeners.len(),
                file.config.pools.len()
            );
            Ok(())
        }
    }
}

/// `keel config apply` on a standalone node: `POST /config` with the file's text.
async fn standalone_apply(target: &Target, path: &Path) -> Result<(), CliError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| CliError::Other(format!("{}: cannot read: {e}", path.display())))?;
    let body = serde_json::json!({ "file": text, "origin": path.display().to_string() });
    let outcome = match target.client().post_json("/config", &body).await {
        Ok(outcome) => outcome,
        Err(ClientError::Api { body, .. }) if body.error == "rejected" => {
            return Err(CliError::Other(format!("the node refused the config; nothing changed:\n{}", body.message)))
        }
        Err(e) => return Err(e.into()),
    };
    let list = |v: &serde_json::Value| -> String {
        v.as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default()
    };
    let change = &outcome["change"];
    if outcome["result"] == "unchanged" {
        println!("config unchanged (certificates read again)");
    } else {
        println!("config applied");
        for (what, key) in [
            ("listeners started", &change["listeners"]["started"]),
            ("listeners stopped", &change["listeners"]["stopped"]),
            ("listeners restarted", &change["listeners"]["restarted"]),
            ("pools added", &change["pools"]["added"]),
            ("pools removed", &change["pools"]["removed"]),
            ("pools changed", &change["pools"]["changed"]),
        ] {
            let names = list(key);
            if !names.is_empty() {
                println!("  {what}: {names}");
            }
        }
    }
    let restart = list(&outcome["needs_restart"]);
    if !restart.is_empty() {
        eprintln!("warning: these node settings changed and take effect at the next restart: {restart}");
    }
    Ok(())
}

/// `keel config show [--json]`: the config the node serves, as TOML (or JSON). A data node
/// serves it at `/config` in both modes; a witness, which has no data plane, answers with the
/// replicated one.
pub async fn config_show(target: &Target, json: bool) -> Result<(), CliError> {
    let client = target.client();
    let config: keel_cluster::Config = match client.get_text("/config").await {
        Ok(text) => toml::from_str(&text).map_err(|e| CliError::Other(format!("unexpected /config answer: {e}")))?,
        Err(ClientError::Api { status, .. }) if status == http::StatusCode::NOT_FOUND => client.state().await?.config,
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&config).map_err(|e| CliError::Other(e.to_string()))?);
    } else {
        print!("{}", toml::to_string(&config).map_err(|e| CliError::Other(e.to_string()))?);
    }
    Ok(())
}

/// `keel status [--json]`: the node's listeners and every pool's servers with their state and
/// counters (the admin API's `/status`).
pub async fn status(target: &Target, json: bool) -> Result<(), CliError> {
    let doc = target.client().get_json("/status").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&doc).map_err(|e| CliError::Other(e.to_string()))?);
        return Ok(());
    }
    let mut out = format!("{:<16} {:<8} {}\n", "LISTENER", "PROTOCOL", "BIND");
    for l in doc.get("listeners").and_then(|v| v.as_array()).into_iter().flatten() {
        out.push_str(&format!("{:<16} {:<8} {}\n", field(l, "name"), field(l, "protocol"), field(l, "bind")));
    }
    out.push('\n');
    out.push_str(&servers_table(&doc, true));
    print!("{out}");
    Ok(())
}

/// `keel backend list [--json]`: every pool's servers, their state and weight.
pub async fn backend_list(target: &Target, json: bool) -> Result<(), CliError> {
    let doc = target.client().get_json("/status").await?;
    if json {
        let pools: Vec<serde_json::Value> = doc
            .get("pools")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .map(|p| {
                let servers: Vec<serde_json::Value> = p
                    .get("servers")
                    .and_then(|v| v.as_array())
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        serde_json::json!({
                            "name": s.get("name"), "address": s.get("address"), "state": s.get("state"),
                            "weight": s.get("weight"), "effective_weight": s.get("effective_weight"),
                            "active": s.get("active"),
                        })
                    })
                    .collect();
                serde_json::json!({ "name": p.get("name"), "algorithm": p.get("algorithm"), "servers": servers })
            })
            .collect();
        let out = serde_json::json!({ "pools": pools });
        println!("{}", serde_json::to_string_pretty(&out).map_err(|e| CliError::Other(e.to_string()))?);
        return Ok(());
    }
    print!("{}", servers_table(&doc, false));
    Ok(())
}

/// A string or number field of a JSON object, for a table cell ("-" when absent).
fn field(v: &serde_json::Value, key: &str) -> String {
    match v.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".to_owned(),
        Some(other) => other.to_string(),
    }
}

/// One line per server of every pool in a `/status` document; `counters` adds the traffic.
fn servers_table(doc: &serde_json::Value, counters: bool) -> String {
    let mut out = format!("{:<12} {:<12} {:<22} {:<8} {:>6}", "POOL", "SERVER", "ADDRESS", "STATE", "WEIGHT");
    if counters {
        out.push_str(&format!(" {:>6} {:>10} {:>8}", "ACTIVE", "REQUESTS", "ERRORS"));
    }
    out.push_str("  ALGORITHM\n");
    for p in doc.get("pools").and_then(|v| v.as_array()).into_iter().flatten() {
        for s in p.get("servers").and_then(|v| v.as_array()).into_iter().flatten() {
            out.push_str(&format!(
                "{:<12} {:<12} {:<22} {:<8} {:>6}",
                field(p, "name"),
                field(s, "name"),
                field(s, "address"),
                field(s, "state"),
                field(s, "weight")
            ));
            if counters {
                let errors: u64 = ["connect_errors", "timeouts", "broken"]
                    .iter()
                    .filter_map(|k| s.get(*k).and_then(|v| v.as_u64()))
                    .sum();
                out.push_str(&format!(" {:>6} {:>10} {:>8}", field(s, "active"), field(s, "requests"), errors));
            }
            out.push_str(&format!("  {}\n", field(p, "algorithm")));
        }
    }
    out
}

/// `keel backend drain|enable|weight POOL SERVER [N]`.
pub async fn backend(
    target: &Target,
    action: &str,
    pool: &str,
    server: &str,
    weight: Option<u32>,
) -> Result<(), CliError> {
    let path = format!("/pools/{pool}/servers/{server}/{action}");
    let body = match weight {
        Some(w) => serde_json::json!({ "weight": w }),
        None => serde_json::json!({}),
    };
    target.client().post_json(&path, &body).await.map_err(no_leader(target.admin))?;
    match action {
        "drain" => println!("{pool}/{server} drained: no new requests; in-flight ones finish"),
        "enable" => println!("{pool}/{server} enabled"),
        _ => {
            println!("{pool}/{server} weight set to {}", weight.unwrap_or_default());
            if let Some(algorithm) = weightless_algorithm(target, pool).await {
                eprintln!(
                    "warning: pool {pool:?} balances with {algorithm}, which ignores weights: the new weight takes \
                     effect only under a weighted algorithm (weighted_round_robin, least_connections, \
                     least_request_p2c, ip_hash, random)"
                );
            }
        }
    }
    Ok(())
}

/// The algorithm of `pool` when it ignores weights; `None` when it uses them or cannot be
/// learnt (the weight was set either way, so a failed look-up only loses the warning).
async fn weightless_algorithm(target: &Target, pool: &str) -> Option<keel_cluster::model::Algorithm> {
    let doc = target.client().get_json("/status").await.ok()?;
    let entry = doc.get("pools")?.as_array()?.iter().find(|p| p.get("name").and_then(|n| n.as_str()) == Some(pool))?;
    let algorithm: keel_cluster::model::Algorithm = serde_json::from_value(entry.get("algorithm")?.clone()).ok()?;
    (!crate::balance::uses_weights(algorithm)).then_some(algorithm)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Only inputs that need no lookup: tests never use the host's resolver.
    #[test]
    fn admin_addresses_take_ip_literals_and_refuse_what_is_no_host_port() {
        assert_eq!(admin_addr("127.0.0.1:9090"), Ok(SocketAddr::from(([127, 0, 0, 1], 9090))));
        let e = admin_addr("admin-without-port").unwrap_err();
        assert!(e.contains("\"admin-without-port\" is not HOST:PORT"), "{e}");
    }

    #[test]
    fn status_lists_each_spread_vip_with_its_holder_and_what_each_member_carries() {
        let doc = serde_json::json!({
            "id": 1, "role": "leader", "leader_id": 1, "term": 3, "last_log_index": 9, "commit_index": 9,
            "applied_index": 9, "snapshot_index": null, "millis_since_quorum_ack": 5, "lease_ms": 150,
            "quorum_acked_within_lease": true,
            "members": [
                {"id": 1, "node": {"raft_addr": "10.0.0.11:7000", "admin_addr": "10.0.0.11:9090"}, "voter": true, "matched_index": 9, "lag": 0},
                {"id": 2, "node": {"raft_addr": "10.0.0.12:7000", "admin_addr": "10.0.0.12:9090"}, "voter": true, "matched_index": 9, "lag": 0}
            ],
            "vips": {
                "10.0.0.101": {"holder": 1, "released_by": null, "suspended_at": 0, "move_to": null},
                "10.0.0.102": {"holder": null, "released_by": 2, "suspended_at": 8, "move_to": 1},
                "fd00::103": {"holder": 2, "released_by": null, "suspended_at": 0, "move_to": null}
            }
        });
        let status: ClusterStatus = serde_json::from_value(doc).unwrap();
        let held =
            |list: &[&str]| Some(Held { leader_vip: false, spread: list.iter().map(|s| s.to_string()).collect() });
        let members = std::collections::BTreeMap::from([(1, held(&["10.0.0.101"])), (2, None)]);
        let text = render_status(&status, &members);
        let line = |start: &str| text.lines().find(|l| l.starts_with(start)).unwrap_or_default().to_owned();
        assert!(line("1 ").ends_with("10.0.0.101"), "{text}");
        assert!(line("2 ").ends_with('?'), "{text}");
        assert!(line("10.0.0.101 ").contains(" 1 ") && line("10.0.0.101 ").ends_with("held"), "{text}");
        assert!(line("10.0.0.102 ").ends_with("moving from node 2 to node 1"), "{text}");
        assert!(line("fd00::103 ").ends_with("named (node unreachable from here)"), "{text}");
    }
}
