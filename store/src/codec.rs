//! Encodings for what crosses the wire between members and what is written to disk.
//!
//! Raft messages and log entries are serde types encoded with bincode. etcd's protobuf
//! messages inside them are carried as their protobuf bytes ([`prost_message`]): prost's
//! decoder limits nesting depth, so a hostile deeply nested Txn from a peer is refused instead
//! of exhausting the stack.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest bincode message a member decodes (a batch of log entries, a snapshot chunk).
pub const MAX_DECODE_BYTES: usize = 256 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODE_BYTES>()
}

/// Encodes a value; infallible for the types the store defines.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| e.to_string())
}

/// Decodes a value, refusing trailing bytes and anything over [`MAX_DECODE_BYTES`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, read) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| e.to_string())?;
    if read != bytes.len() {
        return Err(format!(
            "{} trailing bytes after the message",
            bytes.len() - read
        ));
    }
    Ok(value)
}

/// Decodes a value from the start of `bytes`, returning it and the bytes it took (a message
/// whose first field is all that is wanted, such as a log entry's id).
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), String> {
    bincode::serde::decode_from_slice(bytes, config()).map_err(|e| e.to_string())
}

/// `#[serde(with = "prost_message")]`: a protobuf message as its encoded bytes.
pub mod prost_message {
    use serde::de;
    use serde::{Deserializer, Serializer};

    pub fn serialize<M: prost::Message, S: Serializer>(msg: &M, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&msg.encode_to_vec())
    }

    pub fn deserialize<'de, M: prost::Message + Default, D: Deserializer<'de>>(
        d: D,
    ) -> Result<M, D::Error> {
        let bytes = super::bytes::deserialize(d)?;
        M::decode(bytes.as_slice()).map_err(de::Error::custom)
    }
}

/// `#[serde(with = "bytes")]`: a byte vector as one length-prefixed blob, not a sequence of
/// separately encoded numbers.
pub mod bytes {
    use std::fmt;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("protobuf bytes")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}
