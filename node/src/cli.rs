//! The operations CLI: `keel cluster …`, `keel config apply|show`, `keel backend …`.
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
    #[error("{0}")]
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

/// A write that could not reach a leader: say what that most likely means.
fn no_leader(e: ClientError) -> CliError {
    if e.is_application() && !matches!(e, ClientError::NoLeader { .. }) {
        return e.into();
    }
    CliError::Other(format!(
        "{e}\nno leader could commit the change: the cluster may have lost quorum (a majority of voters must be up); \
         nothing was changed"
    ))
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

/// `keel cluster status [--json]`.
pub async fn cluster_status(target: &Target, json: bool) -> Result<(), CliError> {
    let status = target.client().status().await?;
    // Who holds the VIP is each node's own fact: ask every member (bounded by the client's
    // deadline; an unreachable member shows "?").
    let mut vip = std::collections::BTreeMap::new();
    for m in &status.members {
        let client = ClusterClient::new(m.node.admin_addr).with_token(target.token.clone());
        let holding = if m.node.witness {
            Some("false".to_owned()) // a witness never holds it (and serves no /status)
        } else {
            match tokio::time::timeout(Duration::from_secs(2), client.get_json("/status")).await {
                Ok(Ok(doc)) => Some(
                    doc.get("vip")
                        .and_then(|v| v.get("holding"))
                        .and_then(|h| h.as_bool())
                        .unwrap_or(false)
                        .to_string(),
                ),
                _ => None,
            }
        };
        vip.insert(m.id, holding);
    }
    if json {
        let mut doc = serde_json::to_value(&status).map_err(|e| CliError::Other(e.to_string()))?;
        if let Some(obj) = doc.as_object_mut() {
            let holders: Vec<NodeId> =
                vip.iter().filter(|(_, h)| h.as_deref() == Some("true")).map(|(id, _)| *id).collect();
            obj.insert("vip_holders".into(), serde_json::json!(holders));
        }
        println!("{}", serde_json::to_string_pretty(&doc).map_err(|e| CliError::Other(e.to_string()))?);
        return Ok(());
    }
    print!("{}", render_status(&status, &vip));
    Ok(())
}

fn render_status(s: &ClusterStatus, vip: &std::collections::BTreeMap<NodeId, Option<String>>) -> String {
    let mut out = format!(
        "node {} ({:?}), term {}, leader {}, last log {}, commit {}\n\n",
        s.id,
        s.role,
        s.term,
        s.leader_id.map_or("none".to_owned(), |l| l.to_string()),
        s.last_log_index.map_or("-".to_owned(), |i| i.to_string()),
        s.commit_index.map_or("-".to_owned(), |i| i.to_string()),
    );
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
        let holds = match vip.get(&m.id).cloned().flatten().as_deref() {
            Some("true") => "holds",
            Some(_) => "-",
            None => "?",
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
    out
}

/// `keel config apply FILE`: validates locally, then proposes the new config.
pub async fn config_apply(target: &Target, path: &Path) -> Result<(), CliError> {
    let file = config::load(path)?;
    let started = Instant::now();
    match target.client().propose(&Command::ApplyConfig(file.config.clone())).await.map_err(no_leader)? {
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

/// `keel config show`: the live config as TOML.
pub async fn config_show(target: &Target) -> Result<(), CliError> {
    let config = target.client().state().await?.config;
    print!("{}", toml::to_string(&config).map_err(|e| CliError::Other(e.to_string()))?);
    Ok(())
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
    target.client().post_json(&path, &body).await.map_err(no_leader)?;
    match action {
        "drain" => println!("{pool}/{server} drained: no new requests; in-flight ones finish"),
        "enable" => println!("{pool}/{server} enabled"),
        _ => println!("{pool}/{server} weight set to {}", weight.unwrap_or_default()),
    }
    Ok(())
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
}
