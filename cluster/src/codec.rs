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

/// The length [`encode`] would give `value`, counted without building the buffer.
pub fn encoded_len<T: Serialize>(value: &T) -> Result<usize, CodecError> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, config())?;
    Ok(size.bytes_written)
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

/// `#[serde(with = ...)]` adapter for large byte buffers (a snapshot in a Raft frame).
///
/// Why: serde writes a plain `Vec<u8>` as a sequence, and bincode then visits it one byte at a
/// time — ≈ 0.1–0.5 s for a 25 MB snapshot, on the Raft runtime that also sends heartbeats.
/// As bytes it is one length and one copy. The encoding is the same (bincode writes a sequence
/// of `u8` as its length then the raw bytes), so peers of either kind read each other's frames.
pub mod bytes_field {
    use std::fmt;

    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    /// Serializes the buffer as bytes.
    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    /// Deserializes a buffer written as bytes or as a sequence of `u8`.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte buffer")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // The size hint comes from the peer: cap the pre-allocation, let the data grow it.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct AsSeq {
        data: Vec<u8>,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct AsBytes {
        #[serde(with = "super::bytes_field")]
        data: Vec<u8>,
    }

    /// A peer that still writes snapshots as a sequence and one that writes bytes read each
    /// other's frames: the encoding is the same.
    #[test]
    fn bytes_field_encodes_like_a_sequence_of_u8() -> Result<(), super::CodecError> {
        let data: Vec<u8> = (0..=255).cycle().take(1000).collect();
        let seq = super::encode(&AsSeq { data: data.clone() })?;
        let bytes = super::encode(&AsBytes { data: data.clone() })?;
        assert_eq!(seq, bytes);
        assert_eq!(super::decode::<AsBytes>(&seq)?.data, data);
        assert_eq!(super::decode::<AsSeq>(&bytes)?.data, data);
        Ok(())
    }
}
