//! Header rules of a listener or a route (`[listeners.NAME.headers]`, a route's `headers`):
//! headers set, added or removed on the request keel sends to a server and on the response the
//! client gets, with values that may name a few variables (`${client_ip}`, `${request_id}`, `${node}`,
//! `${listener}`, `${pool}`, `${server}`).
//!
//! Kept apart from [`crate::model`] because the value syntax and the headers no rule may touch
//! are the subtle part: framing and connection headers (`Content-Length`, `Transfer-Encoding`,
//! `Connection`, …) and `Host` are keel's to write — a rule that changed them could desynchronise
//! the two sides of a connection (request smuggling) or walk around host routing — so they are
//! refused when the config is validated, never discovered per request.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::KeyPath;

/// One listener's or one route's header rules. In each direction keel removes, then sets
/// (replacing any value), then adds (appending a value); a route's rules run after its
/// listener's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRules {
    /// Headers set on the request to the server, replacing the client's.
    #[serde(default)]
    pub request_set: BTreeMap<String, String>,
    /// Headers appended to the request to the server, beside the client's.
    #[serde(default)]
    pub request_add: BTreeMap<String, String>,
    /// Headers removed from the request before it is sent.
    #[serde(default)]
    pub request_remove: Vec<String>,
    /// Headers set on the response to the client, replacing the server's.
    #[serde(default)]
    pub response_set: BTreeMap<String, String>,
    /// Headers appended to the response to the client.
    #[serde(default)]
    pub response_add: BTreeMap<String, String>,
    /// Headers removed from the response (e.g. `Server`).
    #[serde(default)]
    pub response_remove: Vec<String>,
}

impl HeaderRules {
    /// Whether the rules do nothing.
    pub fn is_empty(&self) -> bool {
        self.request_set.is_empty()
            && self.request_add.is_empty()
            && self.request_remove.is_empty()
            && self.response_set.is_empty()
            && self.response_add.is_empty()
            && self.response_remove.is_empty()
    }
}

/// A value's variable, expanded per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variable {
    /// The client's IP address, as keel saw it (the TCP peer).
    ClientIp,
    /// This node: its cluster `node_id`, or the host name when standalone.
    Node,
    /// The listener's name.
    Listener,
    /// The pool's name.
    Pool,
    /// The chosen server's name (responses only: the server is chosen after the request
    /// headers are written).
    Server,
    /// The request's id (the listener's `request_id_header`; empty when ids are off).
    RequestId,
}

impl Variable {
    const ALL: [(&'static str, Variable); 6] = [
        ("client_ip", Variable::ClientIp),
        ("node", Variable::Node),
        ("listener", Variable::Listener),
        ("pool", Variable::Pool),
        ("server", Variable::Server),
        ("request_id", Variable::RequestId),
    ];

    /// The name written between `${` and `}`.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, v)| *v == self).map_or("", |(n, _)| n)
    }
}

/// A piece of a parsed value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Text copied as is.
    Literal(String),
    /// A variable expanded per request.
    Variable(Variable),
}

/// Parses a rule value: text with `${name}` variables. Every literal byte must be allowed in a
/// header value (visible ASCII, space, tab; no CR/LF).
pub fn parse_value(value: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        if start > 0 {
            pieces.push(Piece::Literal(rest[..start].to_owned()));
        }
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("unclosed \"${{\" in {value:?}"));
        };
        let name = &after[..end];
        let Some((_, var)) = Variable::ALL.iter().find(|(n, _)| *n == name) else {
            let known: Vec<String> = Variable::ALL.iter().map(|(n, _)| format!("${{{n}}}")).collect();
            return Err(format!("unknown variable \"${{{name}}}\" (known: {})", known.join(", ")));
        };
        pieces.push(Piece::Variable(*var));
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Literal(rest.to_owned()));
    }
    for piece in &pieces {
        if let Piece::Literal(text) = piece {
            if let Some(bad) = text.bytes().find(|&b| !(b == b'\t' || (0x20..0x7f).contains(&b))) {
                return Err(format!("byte 0x{bad:02x} is not allowed in a header value"));
            }
        }
    }
    Ok(pieces)
}

/// Headers keel writes itself: framing, connection management and the request's authority.
/// A rule that changed them could make keel and a server disagree on where a message ends.
pub const RESERVED: [&str; 10] = [
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
];

/// Why a header name cannot be used in a rule, if it cannot.
fn name_problem(name: &str) -> Option<String> {
    if crate::model::http_token(name).is_err() {
        return Some(format!("{name:?} is not a valid header name"));
    }
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Some(format!(
            "{name:?} is a framing, connection or host header that keel writes itself; rules cannot change it"
        ));
    }
    None
}

/// Reports every problem of `rules`, at `at` (the `headers` table).
pub(crate) fn check(rules: &HeaderRules, at: &KeyPath, report: &mut impl FnMut(KeyPath, String)) {
    let maps = [
        ("request_set", &rules.request_set, true),
        ("request_add", &rules.request_add, true),
        ("response_set", &rules.response_set, false),
        ("response_add", &rules.response_add, false),
    ];
    for (key, map, request) in maps {
        for (name, value) in map {
            let at = at.key(key).key(name);
            if let Some(why) = name_problem(name) {
                report(at.clone(), why);
            }
            match parse_value(value) {
                Err(why) => report(at, why),
                Ok(pieces) if request && pieces.contains(&Piece::Variable(Variable::Server)) => report(
                    at,
                    "${server} is known only on responses: the server is chosen after the request headers are written"
                        .into(),
                ),
                Ok(_) => {}
            }
        }
    }
    for (key, list) in [("request_remove", &rules.request_remove), ("response_remove", &rules.response_remove)] {
        for (i, name) in list.iter().enumerate() {
            if let Some(why) = name_problem(name) {
                report(at.key(key).index(i), why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_into_literals_and_variables() {
        assert_eq!(
            parse_value("by ${node} for ${client_ip}").expect("valid"),
            vec![
                Piece::Literal("by ".into()),
                Piece::Variable(Variable::Node),
                Piece::Literal(" for ".into()),
                Piece::Variable(Variable::ClientIp),
            ]
        );
        assert_eq!(parse_value("max-age=63072000").expect("valid"), vec![Piece::Literal("max-age=63072000".into())]);
        assert_eq!(parse_value("").expect("valid"), vec![]);
        assert!(parse_value("${nope}").expect_err("unknown").contains("unknown variable"));
        assert!(parse_value("${node").expect_err("unclosed").contains("unclosed"));
        assert!(parse_value("a\r\nb").is_err());
    }

    #[test]
    fn reserved_and_invalid_names_are_refused() {
        let mut rules = HeaderRules::default();
        rules.response_set.insert("Content-Length".into(), "1".into());
        rules.request_remove.push("bad name".into());
        rules.request_set.insert("X-Server".into(), "${server}".into());
        rules.response_set.insert("X-Server".into(), "${server}".into());
        let mut found = Vec::new();
        check(&rules, &KeyPath::of(&["headers"]), &mut |p, why| found.push(format!("{p}: {why}")));
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].starts_with("headers.request_set.X-Server"), "{found:?}");
        assert!(found[1].starts_with("headers.response_set.Content-Length"), "{found:?}");
        assert!(found[2].starts_with("headers.request_remove[0]"), "{found:?}");
    }
}
