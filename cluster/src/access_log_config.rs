//! A listener's `access_log` table: where its lines go ([`Destination`]: stdout, a file, or
//! syslog over the local socket or UDP), how they look ([`AccessLogFormat`], and for
//! `template` the pieces of the operator's line, [`parse_template`]), and the names of the
//! fields a line carries ([`AccessLogField`], the JSON keys and the template's `$names` alike).
//! Plain serde data plus [`check`], which [`crate::model::Config::validate`] calls for every
//! listener that has the table.
//!
//! The field list lives here, next to validation, so an unknown `$name` is refused when the
//! config is checked, not when a line is written; the data plane renders each field with an
//! exhaustive `match` over [`AccessLogField`], so a field cannot be named here and missing there.
//!
//! A setting that does not apply to the destination or format given (a `facility` for a file, a
//! `template` with `format = "json"`) is an error, never silently ignored.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::KeyPath;

/// The local syslog socket `destination = "syslog"` sends to.
pub const DEV_LOG: &str = "/dev/log";

/// A listener's access log: where its lines go and how they look.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// `"stdout"`, a file path (appended to, reopened on SIGUSR1), `"syslog"` (the local socket
    /// [`DEV_LOG`]), `"unix:/path"` (another local datagram socket) or `"udp://IP:PORT"`.
    pub destination: String,
    /// Line format.
    #[serde(default)]
    pub format: AccessLogFormat,
    /// The line for `format = "template"`: text with `$field` / `${field}` in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Syslog facility (syslog destinations only); `local0` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facility: Option<Facility>,
}

impl AccessLog {
    /// Where the lines go, or why `destination` names nothing usable.
    pub fn target(&self) -> Result<Destination, String> {
        Destination::parse(&self.destination)
    }

    /// The syslog facility in force.
    pub fn facility(&self) -> Facility {
        self.facility.unwrap_or_default()
    }
}

/// How access log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// One human line per request, in the spirit of HAProxy's `httplog`.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
    /// The operator's `template`, its `$field`s filled in.
    Template,
}

/// Where an access log's lines go, parsed from `destination`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// The process's standard output (`"stdout"` or `"-"`).
    Stdout,
    /// A file, opened for appending.
    File(PathBuf),
    /// A syslog receiver, one RFC 5424 message per line.
    Syslog(SyslogTarget),
}

/// Which syslog receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyslogTarget {
    /// A local datagram socket: [`DEV_LOG`] for `"syslog"`, or a `"unix:/path"`.
    Unix(PathBuf),
    /// A UDP receiver (`"udp://IP:PORT"`).
    Udp(SocketAddr),
}

impl Destination {
    /// Parses a `destination` value. A `scheme://` other than `udp://` is refused rather than
    /// taken for a relative file path.
    pub fn parse(s: &str) -> Result<Destination, String> {
        if s.trim().is_empty() {
            return Err("must be \"stdout\", a file path, \"syslog\", \"unix:/path\" or \"udp://IP:PORT\"".into());
        }
        if s == "stdout" || s == "-" {
            return Ok(Destination::Stdout);
        }
        if s == "syslog" {
            return Ok(Destination::Syslog(SyslogTarget::Unix(PathBuf::from(DEV_LOG))));
        }
        if let Some(addr) = s.strip_prefix("udp://") {
            return addr
                .parse()
                .map(|a| Destination::Syslog(SyslogTarget::Udp(a)))
                .map_err(|_| format!("{s:?}: udp:// needs an IP address and a port, e.g. \"udp://127.0.0.1:514\""));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("{s:?}: unix: needs an absolute socket path, e.g. \"unix:/dev/log\""));
            }
            return Ok(Destination::Syslog(SyslogTarget::Unix(PathBuf::from(path))));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!("{s:?}: unknown scheme {scheme:?} (udp:// is the only network destination)"));
        }
        Ok(Destination::File(PathBuf::from(s)))
    }
}

/// A syslog facility (RFC 5424 §6.2.1), by its usual name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum Facility {
    Kern,
    User,
    Mail,
    Daemon,
    Auth,
    Syslog,
    Lpr,
    News,
    Uucp,
    Cron,
    Authpriv,
    Ftp,
    #[default]
    Local0,
    Local1,
    Local2,
    Local3,
    Local4,
    Local5,
    Local6,
    Local7,
}

impl Facility {
    /// The facility's number: PRI is `code * 8 + severity`.
    pub fn code(self) -> u8 {
        match self {
            Facility::Kern => 0,
            Facility::User => 1,
            Facility::Mail => 2,
            Facility::Daemon => 3,
            Facility::Auth => 4,
            Facility::Syslog => 5,
            Facility::Lpr => 6,
            Facility::News => 7,
            Facility::Uucp => 8,
            Facility::Cron => 9,
            Facility::Authpriv => 10,
            Facility::Ftp => 11,
            Facility::Local0 => 16,
            Facility::Local1 => 17,
            Facility::Local2 => 18,
            Facility::Local3 => 19,
            Facility::Local4 => 20,
            Facility::Local5 => 21,
            Facility::Local6 => 22,
            Facility::Local7 => 23,
        }
    }
}

/// One field of an access log line: a key of the `json` format and a `$name` of `template`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum AccessLogField {
    Time,
    Listener,
    Client,
    Method,
    Path,
    Version,
    Authority,
    Status,
    BytesIn,
    BytesOut,
    Pool,
    Server,
    Retries,
    WaitMs,
    ConnectMs,
    ServerMs,
    TotalMs,
    Termination,
    ClosedBy,
    RequestId,
    /// gRPC's `grpc-status` (trailers, or the head of a trailers-only answer).
    GrpcStatus,
}

impl AccessLogField {
    /// Every field, in the order the `json` format writes them.
    pub const ALL: [AccessLogField; 21] = [
        AccessLogField::Time,
        AccessLogField::Listener,
        AccessLogField::Client,
        AccessLogField::Method,
        AccessLogField::Path,
        AccessLogField::Version,
        AccessLogField::Authority,
        AccessLogField::Status,
        AccessLogField::BytesIn,
        AccessLogField::BytesOut,
        AccessLogField::Pool,
        AccessLogField::Server,
        AccessLogField::Retries,
        AccessLogField::WaitMs,
        AccessLogField::ConnectMs,
        AccessLogField::ServerMs,
        AccessLogField::TotalMs,
        AccessLogField::Termination,
        AccessLogField::ClosedBy,
        AccessLogField::RequestId,
        AccessLogField::GrpcStatus,
    ];

    /// The field's name: its JSON key and, after a `$`, its name in a template.
    pub fn name(self) -> &'static str {
        match self {
            AccessLogField::Time => "time",
            AccessLogField::Listener => "listener",
            AccessLogField::Client => "client",
            AccessLogField::Method => "method",
            AccessLogField::Path => "path",
            AccessLogField::Version => "version",
            AccessLogField::Authority => "authority",
            AccessLogField::Status => "status",
            AccessLogField::BytesIn => "bytes_in",
            AccessLogField::BytesOut => "bytes_out",
            AccessLogField::Pool => "pool",
            AccessLogField::Server => "server",
            AccessLogField::Retries => "retries",
            AccessLogField::WaitMs => "wait_ms",
            AccessLogField::ConnectMs => "connect_ms",
            AccessLogField::ServerMs => "server_ms",
            AccessLogField::TotalMs => "total_ms",
            AccessLogField::Termination => "termination",
            AccessLogField::ClosedBy => "closed_by",
            AccessLogField::RequestId => "request_id",
            AccessLogField::GrpcStatus => "grpc_status",
        }
    }

    /// The field called `name`.
    pub fn from_name(name: &str) -> Option<AccessLogField> {
        AccessLogField::ALL.into_iter().find(|f| f.name() == name)
    }
}

impl fmt::Display for AccessLogField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed template: text to copy, and fields to fill in, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplatePiece {
    /// Copied as it is.
    Literal(String),
    /// Replaced by the field's value (`-` when it has none).
    Field(AccessLogField),
}

/// Parses a template in nginx's `log_format` syntax: `$name` (the longest run of letters,
/// digits and `_`), `${name}` (when a letter follows at once), `$$` for a `$`. Everything else
/// is copied. Line breaks are refused: a template is one line.
pub fn parse_template(template: &str) -> Result<Vec<TemplatePiece>, String> {
    if template.is_empty() {
        return Err("is empty; e.g. \"$client $method $path $status $bytes_out $total_ms\"".into());
    }
    if template.contains(['\n', '\r']) {
        return Err("contains a line break; each access log entry is one line".into());
    }
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        literal.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, tail) = if let Some(braced) = after.strip_prefix('{') {
            match braced.split_once('}') {
                Some((name, tail)) => (name, tail),
                None => return Err(format!("\"${{{braced}\" has no closing brace")),
            }
        } else if let Some(tail) = after.strip_prefix('$') {
            literal.push('$');
            rest = tail;
            continue;
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            after.split_at(end)
        };
        if name.is_empty() {
            return Err("a \"$\" that names no field; write \"$$\" for a dollar sign".into());
        }
        let Some(field) = AccessLogField::from_name(name) else {
            let known: Vec<&str> = AccessLogField::ALL.iter().map(|f| f.name()).collect();
            return Err(format!("unknown field \"${name}\"; known: {}", known.join(", ")));
        };
        if !literal.is_empty() {
            pieces.push(TemplatePiece::Literal(std::mem::take(&mut literal)));
        }
        pieces.push(TemplatePiece::Field(field));
        rest = tail;
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(TemplatePiece::Literal(literal));
    }
    Ok(pieces)
}

/// Reports what is wrong with the `access_log` table at `at`.
pub(crate) fn check(log: &AccessLog, at: &KeyPath, report: &mut impl FnMut(KeyPath, String)) {
    let target = log.target();
    if let Err(why) = &target {
        report(at.key("destination"), why.clone());
    }
    let syslog = matches!(target, Ok(Destination::Syslog(_)));
    if log.facility.is_some() && !syslog && target.is_ok() {
        report(
            at.key("facility"),
            format!("applies to syslog destinations (\"syslog\", \"unix:…\", \"udp://…\"), not {:?}", log.destination),
        );
    }
    match (log.format, &log.template) {
        (AccessLogFormat::Template, None) => {
            report(at.key("template"), "format = \"template\" needs a template, e.g. \"$client $status\"".into())
        }
        (AccessLogFormat::Template, Some(t)) => {
            if let Err(why) = parse_template(t) {
                report(at.key("template"), why);
            }
        }
        (_, Some(_)) => report(at.key("template"), "applies only to format = \"template\"".into()),
        (_, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use AccessLogField as F;

    #[test]
    fn templates_parse_into_literals_and_fields() {
        let pieces = parse_template("$client [${time}] \"$method $path\" $status ${total_ms}ms $$5").unwrap();
        let lit = |s: &str| TemplatePiece::Literal(s.into());
        assert_eq!(
            pieces,
            [
                TemplatePiece::Field(F::Client),
                lit(" ["),
                TemplatePiece::Field(F::Time),
                lit("] \""),
                TemplatePiece::Field(F::Method),
                lit(" "),
                TemplatePiece::Field(F::Path),
                lit("\" "),
                TemplatePiece::Field(F::Status),
                lit(" "),
                TemplatePiece::Field(F::TotalMs),
                lit("ms $5"),
            ]
        );
        // The longest name: `$bytes_in_x` is not `$bytes_in` followed by `_x`.
        assert!(parse_template("$bytes_in_x").unwrap_err().contains("unknown field \"$bytes_in_x\""));
    }

    #[test]
    fn bad_templates_say_why() {
        let e = parse_template("$client $foo").unwrap_err();
        assert!(e.starts_with("unknown field \"$foo\"; known: time, listener, client,"), "{e}");
        assert!(e.ends_with("closed_by, request_id, grpc_status"), "{e}");
        assert!(parse_template("cost: $").unwrap_err().contains("$$"));
        assert!(parse_template("$ {status}").unwrap_err().contains("$$"));
        assert!(parse_template("${status").unwrap_err().contains("closing brace"));
        assert!(parse_template("$status\n$client").unwrap_err().contains("line break"));
        assert!(parse_template("").unwrap_err().contains("empty"));
    }

    #[test]
    fn every_field_name_round_trips() {
        for f in AccessLogField::ALL {
            assert_eq!(AccessLogField::from_name(f.name()), Some(f));
        }
    }

    #[test]
    fn destinations_parse_and_reject() {
        assert_eq!(Destination::parse("stdout"), Ok(Destination::Stdout));
        assert_eq!(Destination::parse("/var/log/a.log"), Ok(Destination::File("/var/log/a.log".into())));
        assert_eq!(Destination::parse("syslog"), Ok(Destination::Syslog(SyslogTarget::Unix(DEV_LOG.into()))));
        assert_eq!(
            Destination::parse("unix:/run/log.sock"),
            Ok(Destination::Syslog(SyslogTarget::Unix("/run/log.sock".into())))
        );
        assert_eq!(
            Destination::parse("udp://127.0.0.1:514"),
            Ok(Destination::Syslog(SyslogTarget::Udp("127.0.0.1:514".parse().unwrap())))
        );
        assert!(Destination::parse("udp://loghost:514").unwrap_err().contains("IP address and a port"));
        assert!(Destination::parse("udp://127.0.0.1").is_err());
        assert!(Destination::parse("unix:relative").unwrap_err().contains("absolute"));
        assert!(Destination::parse("tcp://127.0.0.1:514").unwrap_err().contains("unknown scheme \"tcp\""));
        assert!(Destination::parse(" ").is_err());
    }

    fn arb_piece() -> impl Strategy<Value = TemplatePiece> {
        prop_oneof![
            "[a-z0-9 :\\[\\]\"/_{}$-]{1,8}".prop_map(TemplatePiece::Literal),
            prop::sample::select(AccessLogField::ALL.to_vec()).prop_map(TemplatePiece::Field),
        ]
    }

    proptest! {
        #[test]
        fn parsing_any_text_never_panics(text in "\\PC{0,40}") {
            let _ = parse_template(&text);
        }

        #[test]
        fn a_written_template_parses_back_to_its_pieces(pieces in prop::collection::vec(arb_piece(), 1..12)) {
            // Written with braces (a literal may start with a name character), `$` doubled.
            let text: String = pieces
                .iter()
                .map(|p| match p {
                    TemplatePiece::Literal(l) => l.replace('$', "$$"),
                    TemplatePiece::Field(f) => format!("${{{}}}", f.name()),
                })
                .collect();
            let mut expected: Vec<TemplatePiece> = Vec::new();
            for p in pieces {
                match (expected.last_mut(), p) {
                    (Some(TemplatePiece::Literal(prev)), TemplatePiece::Literal(l)) => prev.push_str(&l),
                    (_, p) => expected.push(p),
                }
            }
            prop_assert_eq!(parse_template(&text), Ok(expected));
        }
    }

    #[test]
    fn facilities_have_their_rfc_5424_codes() {
        assert_eq!(Facility::default().code(), 16);
        assert_eq!(Facility::Local7.code(), 23);
        assert_eq!(Facility::Daemon.code(), 3);
    }
}
