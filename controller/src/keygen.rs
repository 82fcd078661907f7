//! Generated API keys: `pcl_` + 27 base62 digits of 160 random bits + `_` + 6 base62 digits of the CRC32 of the
//! random part's digits. Recognisable (secret scanners can match `pcl_[0-9A-Za-z]{27}_[0-9A-Za-z]{6}`) and
//! checksummed (a typo is detected offline, without a lookup).

use rand::Rng;
use thiserror::Error;

pub const KEY_PREFIX: &str = "pcl_";
/// Random bytes per key (160 bits).
pub const RANDOM_BYTES: usize = 20;
/// 62^27 > 2^160, so 27 digits hold any 160-bit value.
pub const RANDOM_DIGITS: usize = 27;
/// 62^6 > 2^32.
pub const CHECKSUM_DIGITS: usize = 6;
/// Total length: 4 + 27 + 1 + 6.
pub const KEY_LEN: usize = KEY_PREFIX.len() + RANDOM_DIGITS + 1 + CHECKSUM_DIGITS;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyFormatError {
    #[error("key does not start with {KEY_PREFIX:?}")]
    Prefix,
    #[error("key has {0} characters, expected {KEY_LEN}")]
    Length(usize),
    #[error("key contains a character outside [0-9A-Za-z_]")]
    Alphabet,
    #[error("key checksum does not match (mistyped or truncated key)")]
    Checksum,
}

/// A fresh key from the thread-local CSPRNG.
pub fn generate_key() -> String {
    let mut random = [0u8; RANDOM_BYTES];
    rand::rng().fill_bytes(&mut random);
    key_from_random(&random)
}

/// The key for given random bytes (deterministic; exposed for tests).
pub fn key_from_random(random: &[u8; RANDOM_BYTES]) -> String {
    let body = base62(random, RANDOM_DIGITS);
    let crc = crc32fast::hash(body.as_bytes());
    let check = base62(&crc.to_be_bytes(), CHECKSUM_DIGITS);
    format!("{KEY_PREFIX}{body}_{check}")
}

/// Checks prefix, length, alphabet and checksum. Says nothing about whether the key is known.
pub fn validate_key_format(key: &str) -> Result<(), KeyFormatError> {
    let rest = key.strip_prefix(KEY_PREFIX).ok_or(KeyFormatError::Prefix)?;
    if key.len() != KEY_LEN {
        return Err(KeyFormatError::Length(key.len()));
    }
    let (body, check) = rest.split_at(RANDOM_DIGITS);
    let check = check.strip_prefix('_').ok_or(KeyFormatError::Alphabet)?;
    if !body.bytes().chain(check.bytes()).all(|b| b.is_ascii_alphanumeric()) {
        return Err(KeyFormatError::Alphabet);
    }
    let crc = crc32fast::hash(body.as_bytes());
    if base62(&crc.to_be_bytes(), CHECKSUM_DIGITS) != check {
        return Err(KeyFormatError::Checksum);
    }
    Ok(())
}

/// Big-endian bytes → exactly `digits` base62 digits (most significant first, zero padded).
fn base62(bytes: &[u8], digits: usize) -> String {
    let mut num: Vec<u8> = bytes.to_vec();
    let mut out = vec![b'0'; digits];
    for slot in out.iter_mut().rev() {
        // num /= 62, collecting the remainder.
        let mut rem: u32 = 0;
        for b in num.iter_mut() {
            let cur = (rem << 8) | u32::from(*b);
            *b = (cur / 62) as u8;
            rem = cur % 62;
        }
        *slot = ALPHABET[rem as usize];
    }
    debug_assert!(num.iter().all(|&b| b == 0), "value does not fit in {digits} digits");
    String::from_utf8(out).expect("ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), KEY_LEN);
        assert!(a.starts_with("pcl_"));
        validate_key_format(&a).unwrap();
        validate_key_format(&b).unwrap();
    }

    #[test]
    fn extreme_values_fit() {
        let max = key_from_random(&[0xff; RANDOM_BYTES]);
        let min = key_from_random(&[0; RANDOM_BYTES]);
        validate_key_format(&max).unwrap();
        validate_key_format(&min).unwrap();
        assert_eq!(&min[4..31], "000000000000000000000000000");
    }

    #[test]
    fn base62_known_values() {
        assert_eq!(base62(&[0, 61], 2), "0z");
        assert_eq!(base62(&[0, 62], 2), "10");
        assert_eq!(base62(&[1, 0], 3), "048"); // 256 = 4 * 62 + 8
    }

    #[test]
    fn typos_and_garbage_are_detected() {
        let k = key_from_random(&[7; RANDOM_BYTES]);
        let mut typo = k.clone().into_bytes();
        typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
        assert_eq!(validate_key_format(std::str::from_utf8(&typo).unwrap()), Err(KeyFormatError::Checksum));
        assert_eq!(validate_key_format("abc"), Err(KeyFormatError::Prefix));
        assert_eq!(validate_key_format("pcl_short"), Err(KeyFormatError::Length(9)));
        let bad = format!("pcl_{}-{}", &k[4..31], &k[32..]);
        assert_eq!(validate_key_format(&bad), Err(KeyFormatError::Alphabet));
    }
}
