//! Durations written the way operators write them in HAProxy/nginx configs: "500ms", "2s", "1m".

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A [`Duration`] that reads and writes as a human string ("250ms", "2s", "1m 30s").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    /// A duration of `s` seconds.
    pub const fn from_secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }

    /// The wrapped duration.
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Self {
        d.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| format!("invalid duration {s:?} ({e}); write it like \"500ms\", \"2s\" or \"1m\""))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operator_spellings() {
        assert_eq!("500ms".parse::<HumanDuration>(), Ok(HumanDuration::from_millis(500)));
        assert_eq!("2s".parse::<HumanDuration>(), Ok(HumanDuration::from_secs(2)));
        assert_eq!("1m".parse::<HumanDuration>(), Ok(HumanDuration::from_secs(60)));
    }

    #[test]
    fn rejects_bare_numbers_with_a_hint() {
        let err = "5".parse::<HumanDuration>().unwrap_err();
        assert!(err.contains("500ms"), "{err}");
    }

    #[test]
    fn round_trips_through_display() {
        let d = HumanDuration::from_millis(1500);
        assert_eq!(d.to_string().parse::<HumanDuration>(), Ok(d));
    }
}
