//! Header rules, compiled: what a listener's and a route's `headers` tables
//! ([`keel_cluster::header_rules`]) do to the request keel sends and the response the client
//! gets.
//!
//! Rules are compiled once per config, when the listener's [`crate::routing::Router`] is
//! built: names parsed into [`HeaderName`]s, values that need no per-request variable (plain
//! text, `${node}`, `${listener}`) turned into ready [`HeaderValue`]s, so applying a rule is a
//! map operation and a clone of shared bytes. A request on a listener with no rules carries two
//! `None`s and does nothing else.
//!
//! Order: the listener's rules, then the route's; within one rule set remove, then set, then
//! add. A value whose expansion is not a valid header value (a server name with a control
//! character, say) leaves the header untouched rather than failing the request.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use keel_cluster::header_rules::{parse_value, Piece, Variable};
use keel_cluster::model::HeaderRules;

/// This node's name for `${node}`, set once at start-up.
static NODE_NAME: OnceLock<String> = OnceLock::new();

/// Names this node for `${node}` (its cluster `node_id`); the first call wins. Without it the
/// host name is used.
pub fn set_node_name(name: String) {
    let _ = NODE_NAME.set(name);
}

/// This node's name: what [`set_node_name`] was given, else the host name.
pub fn node_name() -> &'static str {
    NODE_NAME.get_or_init(host_name)
}

fn host_name() -> String {
    // Linux's own record of the host name; no unsafe `gethostname` call needed.
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keel".into())
}

/// What the per-request variables expand to.
pub struct Vars<'a> {
    /// The client's IP as text (keel already holds it for `X-Forwarded-For`).
    pub client_ip: &'a HeaderValue,
    /// The pool's name.
    pub pool: &'a str,
    /// The chosen server's name; `None` on requests.
    pub server: Option<&'a str>,
    /// The request's id, when the listener gives requests one.
    pub request_id: Option<&'a HeaderValue>,
}

/// A rule's value.
#[derive(Debug)]
enum Value {
    /// Known when the config was compiled.
    Fixed(HeaderValue),
    /// Needs the request: literals (with `${node}` and `${listener}` already folded in) and
    /// variables.
    Template(Vec<Part>),
}

#[derive(Debug)]
enum Part {
    Text(String),
    ClientIp,
    Pool,
    Server,
    RequestId,
}

impl Value {
    fn compile(raw: &str, listener: &str) -> Option<Value> {
        // Validation refused anything that does not parse; a replicated config is validated
        // before it is applied.
        let pieces = parse_value(raw).ok()?;
        let mut parts: Vec<Part> = Vec::new();
        for piece in pieces {
            let text = match piece {
                Piece::Literal(t) => t,
                Piece::Variable(Variable::Node) => node_name().to_owned(),
                Piece::Variable(Variable::Listener) => listener.to_owned(),
                Piece::Variable(Variable::ClientIp) => {
                    parts.push(Part::ClientIp);
                    continue;
                }
                Piece::Variable(Variable::Pool) => {
                    parts.push(Part::Pool);
                    continue;
                }
                Piece::Variable(Variable::Server) => {
                    parts.push(Part::Server);
                    continue;
                }
                Piece::Variable(Variable::RequestId) => {
                    parts.push(Part::RequestId);
                    continue;
                }
            };
            match parts.last_mut() {
                Some(Part::Text(prev)) => prev.push_str(&text),
                _ => parts.push(Part::Text(text)),
            }
        }
        match parts.as_slice() {
            [] => Some(Value::Fixed(HeaderValue::from_static(""))),
            [Part::Text(t)] => HeaderValue::from_str(t).ok().map(Value::Fixed),
            _ => Some(Value::Template(parts)),
        }
    }

    fn expand(&self, vars: &Vars<'_>) -> Option<HeaderValue> {
        match self {
            Value::Fixed(v) => Some(v.clone()),
            Value::Template(parts) => {
                if let [Part::ClientIp] = parts.as_slice() {
                    return Some(vars.client_ip.clone());
                }
                let mut out = Vec::with_capacity(64);
                for part in parts {
                    match part {
                        Part::Text(t) => out.extend_from_slice(t.as_bytes()),
                        Part::ClientIp => out.extend_from_slice(vars.client_ip.as_bytes()),
                        Part::Pool => out.extend_from_slice(vars.pool.as_bytes()),
                        Part::Server => out.extend_from_slice(vars.server.unwrap_or("").as_bytes()),
                        Part::RequestId => out.extend_from_slice(vars.request_id.map_or(&b""[..], |v| v.as_bytes())),
                    }
                }
                HeaderValue::from_maybe_shared(Bytes::from(out)).ok()
            }
        }
    }
}

/// The rules for one direction.
#[derive(Debug, Default)]
pub struct Edits {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, Value)>,
    add: Vec<(HeaderName, Value)>,
}

impl Edits {
    fn compile(
        remove: &[String],
        set: &std::collections::BTreeMap<String, String>,
        add: &std::collections::BTreeMap<String, String>,
        listener: &str,
    ) -> Edits {
        let name = |n: &str| HeaderName::from_bytes(n.as_bytes()).ok();
        let pairs = |m: &std::collections::BTreeMap<String, String>| {
            m.iter().filter_map(|(n, v)| Some((name(n)?, Value::compile(v, listener)?))).collect()
        };
        Edits { remove: remove.iter().filter_map(|n| name(n)).collect(), set: pairs(set), add: pairs(add) }
    }

    fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Removes, sets, then adds.
    pub fn apply(&self, headers: &mut HeaderMap, vars: &Vars<'_>) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            if let Some(v) = value.expand(vars) {
                headers.insert(name.clone(), v);
            }
        }
        for (name, value) in &self.add {
            if let Some(v) = value.expand(vars) {
                headers.append(name.clone(), v);
            }
        }
    }
}

/// One listener's or route's rules, both directions.
#[derive(Debug)]
pub struct CompiledRules {
    /// On the request to the server.
    pub request: Edits,
    /// On the response to the client.
    pub response: Edits,
}

impl CompiledRules {
    /// Compiles `rules` of a table on `listener`; `None` when they do nothing.
    pub fn compile(rules: Option<&HeaderRules>, listener: &str) -> Option<Arc<CompiledRules>> {
        let r = rules?;
        let compiled = CompiledRules {
            request: Edits::compile(&r.request_remove, &r.request_set, &r.request_add, listener),
            response: Edits::compile(&r.response_remove, &r.response_set, &r.response_add, listener),
        };
        (!(compiled.request.is_empty() && compiled.response.is_empty())).then(|| Arc::new(compiled))
    }
}

/// The rules a request is under: its listener's, then its route's.
#[derive(Clone, Default)]
pub struct RuleChain {
    /// The listener's rules.
    pub listener: Option<Arc<CompiledRules>>,
    /// The matched route's rules.
    pub route: Option<Arc<CompiledRules>>,
}

impl RuleChain {
    /// Whether no rule applies (the common case: nothing to do per request).
    pub fn is_empty(&self) -> bool {
        self.listener.is_none() && self.route.is_none()
    }

    /// Applies the request rules to the headers about to be sent.
    pub fn on_request(&self, headers: &mut HeaderMap, vars: &Vars<'_>) {
        for rules in [&self.listener, &self.route].into_iter().flatten() {
            rules.request.apply(headers, vars);
        }
    }

    /// Applies the response rules to the headers about to reach the client.
    pub fn on_response(&self, headers: &mut HeaderMap, vars: &Vars<'_>) {
        for rules in [&self.listener, &self.route].into_iter().flatten() {
            rules.response.apply(headers, vars);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml_text: &str) -> Arc<CompiledRules> {
        let r: HeaderRules = toml::from_str(toml_text).expect("rules parse");
        CompiledRules::compile(Some(&r), "web").expect("rules do something")
    }

    #[test]
    fn listener_then_route_remove_set_add_with_variables() {
        let chain = RuleChain {
            listener: Some(rules(
                r#"
                request_set = { "X-Via" = "${listener}/${pool}", "X-Client" = "${client_ip}" }
                request_remove = ["X-Secret"]
                response_set = { "X-Tier" = "listener" }
                response_remove = ["Server"]
                "#,
            )),
            route: Some(rules(
                r#"
                response_set = { "X-Tier" = "route", "X-Server" = "${server}" }
                response_add = { "X-Extra" = "two" }
                "#,
            )),
        };
        let ip = crate::proxy::headers::client_value("10.1.2.3".parse().expect("ip"));
        let mut req = HeaderMap::new();
        req.insert("x-secret", HeaderValue::from_static("s"));
        req.insert("x-client", HeaderValue::from_static("spoofed"));
        chain.on_request(&mut req, &Vars { client_ip: &ip, pool: "api", server: None, request_id: None });
        assert!(req.get("x-secret").is_none());
        assert_eq!(req["x-via"], "web/api");
        assert_eq!(req["x-client"], "10.1.2.3");

        let mut resp = HeaderMap::new();
        resp.insert("server", HeaderValue::from_static("nginx"));
        resp.insert("x-extra", HeaderValue::from_static("one"));
        chain.on_response(&mut resp, &Vars { client_ip: &ip, pool: "api", server: Some("a1"), request_id: None });
        assert!(resp.get("server").is_none());
        assert_eq!(resp["x-tier"], "route");
        assert_eq!(resp["x-server"], "a1");
        let extra: Vec<_> = resp.get_all("x-extra").iter().collect();
        assert_eq!(extra, ["one", "two"]);
    }

    #[test]
    fn empty_rules_compile_to_nothing() {
        assert!(CompiledRules::compile(Some(&HeaderRules::default()), "web").is_none());
        assert!(CompiledRules::compile(None, "web").is_none());
    }

    #[test]
    fn node_and_literals_fold_at_compile_time() {
        let r = rules(r#"response_set = { "X-Served-By" = "${node}:${listener}" }"#);
        match &r.response.set[0].1 {
            Value::Fixed(v) => assert_eq!(v, &format!("{}:web", node_name())),
            other => panic!("expected a fixed value, got {other:?}"),
        }
    }
}
