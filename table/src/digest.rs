//! Key digests: the only form in which an API key leaves the controller.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::fmt;

/// SHA-256 of an API key. `Debug`/`Display` print the digest's short fingerprint only.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyDigest(pub [u8; 32]);

/// Digest of a raw key as sent by a client (the header value's bytes, exactly).
pub fn key_digest(key: &[u8]) -> KeyDigest {
    KeyDigest(Sha256::digest(key).into())
}

/// Short, non-reversible label for a key, safe for status, logs and Events: `sha256:` + 12 hex digits.
pub fn fingerprint(d: &KeyDigest) -> String {
    let mut buf = [0u8; 64];
    format!("sha256:{}", &d.hex_into(&mut buf)[..12])
}

impl KeyDigest {
    pub fn to_hex(&self) -> String {
        let mut buf = [0u8; 64];
        self.hex_into(&mut buf).to_string()
    }

    /// The 64 hex digits, written into `buf` (no allocation: tables serialise 100 000 of these per render).
    fn hex_into<'b>(&self, buf: &'b mut [u8; 64]) -> &'b str {
        hex::encode_to_slice(self.0, buf).expect("64 bytes hold 32 bytes' hex");
        std::str::from_utf8(buf).expect("hex digits are ASCII")
    }

    pub fn from_hex(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| format!("key digest {s:?} is not 64 hex digits: {e}"))?;
        Ok(Self(out))
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&fingerprint(self))
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&fingerprint(self))
    }
}

impl Serialize for KeyDigest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 64];
        s.serialize_str(self.hex_into(&mut buf))
    }
}

impl<'de> Deserialize<'de> for KeyDigest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_sha256_of_key_bytes() {
        // sha256("abc"), FIPS 180-2 test vector.
        assert_eq!(key_digest(b"abc").to_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn fingerprint_and_debug_never_show_the_whole_digest() {
        let d = key_digest(b"secret");
        let hex = d.to_hex();
        assert_eq!(fingerprint(&d), format!("sha256:{}", &hex[..12]));
        assert!(!format!("{d:?}").contains(&hex));
    }

    #[test]
    fn hex_round_trip_and_rejects_bad_lengths() {
        let d = key_digest(b"k");
        assert_eq!(KeyDigest::from_hex(&d.to_hex()).unwrap(), d);
        assert!(KeyDigest::from_hex("abcd").is_err());
        assert!(KeyDigest::from_hex(&"zz".repeat(32)).is_err());
    }
}
