//! Binary encoding shared by the log store, the snapshots and the Raft wire: bincode 2 (serde
//! mode, standard config), plus the one adapter that makes [`Config`] travel through it.
//!
//! Why the adapter: [`Config`] contains [`crate::model::StatusRange`], whose `Deserialize` accepts
//! either a number or a string (`#[serde(untagged)]`), and untagged enums need a self-describing
//! format. bincode is not self-describing. So every field holding a `Config` is annotated with
//! `#[serde(with = "crate::codec::config_field")]`: in human-readable formats (JSON for the admin
//! API) the config is written as itself; in binary formats it is written as a JSON string. Config
//! changes are rare and small, so the cost is irrelevant, and everything else (sticky tables, log
//! metadata) stays compact bincode.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Encoding failed (a value serde could not express in bincode).
    #[error("encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// Decoding failed: truncated, garbage or from an incompatible version.
    #[error("decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// Bytes were left over after the value: the frame is not what it claims to be.
    #[error("decode: {0} trailing bytes after the value")]
    Trailing(usize),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` with bincode (serde mode).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(value, config())?)
}

/// Decodes a whole buffer; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// `#[serde(with = ...)]` adapter for [`Config`] fields: itself in JSON, a JSON string in bincode.
///
/// [`Config`]: crate::model::Config
pub mod config_field {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::model::Config;

    /// Serializes a config (see the module doc for why it differs by format).
    pub fn serialize<S: Serializer>(config: &Config, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            config.serialize(serializer)
        } else {
            let text = serde_json::to_string(config).map_err(serde::ser::Error::custom)?;
            serializer.serialize_str(&text)
        }
    }

    /// Deserializes a config written by [`serialize`].
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Config, D::Error> {
        if deserializer.is_human_readable() {
            Config::deserialize(deserializer)
        } else {
            let text = String::deserialize(deserializer)?;
            serde_json::from_str(&text).map_err(serde::de::Error::custom)
        }
    }
}
