//! How a pool may send a request again: which failures allow it (`retry_on`, HAProxy's
//! vocabulary) and how many retries may be in flight at once (`retry_budget`, Envoy's retry
//! budget), so that retries can never multiply the load on a pool that is already failing.
//!
//! Kept apart from [`crate::model`] because the rules are the subtle part: RFC 9110 §9.2.2 says
//! a proxy must not automatically retry a non-idempotent request, and only the operator can
//! vouch that an application's `POST` is safe to replay (`non-idempotent`, nginx's name).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A failure after which another server may be tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RetryOn {
    /// No connection could be made (refused, unreachable, connect timeout): nothing of the
    /// request reached any server, so any request may go elsewhere.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The server closed or reset the connection before sending any byte of a response. The
    /// server may have acted on the request: only a request that can be replayed (no body, or
    /// a body buffered whole) with an idempotent method is retried, unless `non-idempotent`.
    #[serde(rename = "empty-response")]
    EmptyResponse,
    /// The server answered 502 (same replay rules as `empty-response`).
    #[serde(rename = "502")]
    Status502,
    /// The server answered 503 (same replay rules as `empty-response`).
    #[serde(rename = "503")]
    Status503,
    /// Lift the idempotency rule for `empty-response`, `502` and `503`: the operator vouches
    /// that the pool's `POST`/`PATCH` requests are safe to apply twice.
    #[serde(rename = "non-idempotent")]
    NonIdempotent,
}

impl RetryOn {
    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::EmptyResponse => "empty-response",
            RetryOn::Status502 => "502",
            RetryOn::Status503 => "503",
            RetryOn::NonIdempotent => "non-idempotent",
        }
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A share of something, written `"20%"` (or the bare number `20`), 0–100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Percent(u8);

impl Percent {
    /// `p` percent; `None` above 100.
    pub const fn new(p: u8) -> Option<Self> {
        if p <= 100 {
            Some(Percent(p))
        } else {
            None
        }
    }

    /// `p` percent, 100 at most.
    pub const fn saturating(p: u8) -> Self {
        if p <= 100 {
            Percent(p)
        } else {
            Percent(100)
        }
    }

    /// The percentage, 0–100.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// This share of `n`, rounded down.
    pub fn of(self, n: usize) -> usize {
        n.saturating_mul(usize::from(self.0)) / 100
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl std::str::FromStr for Percent {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid percentage {s:?}; write it like \"20%\" (0-100)");
        let digits = s.trim().strip_suffix('%').unwrap_or(s.trim()).trim();
        let n: u8 = digits.parse().map_err(|_| bad())?;
        Percent::new(n).ok_or_else(bad)
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Int(v) => v.to_string().parse().map_err(serde::de::Error::custom),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_parse_and_reject() {
        assert_eq!("20%".parse::<Percent>(), Ok(Percent(20)));
        assert_eq!(" 100 ".parse::<Percent>(), Ok(Percent(100)));
        assert!("101%".parse::<Percent>().is_err());
        assert!("-1%".parse::<Percent>().is_err());
        assert!("0.2".parse::<Percent>().is_err());
        assert_eq!(Percent(20).of(19), 3);
        assert_eq!(Percent(20).to_string(), "20%");
    }
}
