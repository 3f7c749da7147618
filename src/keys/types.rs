//! Distinct types for private, public and pre-shared keys.
//!
//! Private and pre-shared keys are zeroized on drop and never print their bytes:
//! `Debug` and `Display` show only the fingerprint (private) or a redaction marker
//! (pre-shared). Encodings that expose the secret return [`Zeroizing`] buffers so the
//! caller's copy is wiped too.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// Length in bytes of every WireGuard key.
pub const KEY_LEN: usize = 32;
/// Length of a key in standard padded base64 (`wg genkey` output without newline).
pub const KEY_B64_LEN: usize = 44;

/// Why a key could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64 ({0})")]
    Base64(String),
    #[error("decodes to {0} bytes; a WireGuard key is 32 bytes (44 base64 characters)")]
    Length(usize),
    #[error("is the all-zero key, which no real key can be")]
    AllZero,
    #[error("is a low-order x25519 point, which would make the shared secret predictable")]
    LowOrder,
}

/// Decodes standard padded base64 into exactly 32 bytes.
fn decode_32(text: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let bytes = Zeroizing::new(
        STANDARD
            .decode(text.trim())
            .map_err(|e| KeyError::Base64(e.to_string()))?,
    );
    if bytes.len() != KEY_LEN {
        return Err(KeyError::Length(bytes.len()));
    }
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    out.copy_from_slice(&bytes);
    Ok(out)
}

/// An x25519 public key. Safe to print: `Display` is its base64 form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// Wraps raw bytes without validation; use [`PublicKey::from_base64`] or
    /// [`PublicKey::validate`] for untrusted input.
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Decodes and validates a base64 public key from an untrusted source: it must
    /// be 32 bytes and not the all-zero or another low-order point.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = decode_32(text)?;
        let key = Self(*bytes);
        key.validate()?;
        Ok(key)
    }

    /// Rejects the all-zero key and every other low-order point (on the curve or its
    /// twist). A Diffie-Hellman with such a point yields the all-zero shared secret
    /// for every private key, so `was_contributory` is exactly the test.
    pub fn validate(&self) -> Result<(), KeyError> {
        if self.0 == [0u8; KEY_LEN] {
            return Err(KeyError::AllZero);
        }
        // Any fixed scalar works: clamping makes it a multiple of the cofactor.
        let probe = x25519_dalek::StaticSecret::from([0x5au8; KEY_LEN]);
        let shared = probe.diffie_hellman(&x25519_dalek::PublicKey::from(self.0));
        if shared.was_contributory() {
            Ok(())
        } else {
            Err(KeyError::LowOrder)
        }
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Lowercase hex, the encoding of the WireGuard UAPI.
    pub fn to_hex(&self) -> String {
        crate::text::hex(&self.0)
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(self)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::from_base64(&text).map_err(|e| serde::de::Error::custom(format!("public key {e}")))
    }
}

impl From<&PrivateKey> for PublicKey {
    fn from(private: &PrivateKey) -> Self {
        private.public_key()
    }
}

/// The short, stable id of a key: the first 8 bytes of SHA-256 over the 32 raw
/// public-key bytes, as 16 lowercase hex characters. Anyone can recompute it from
/// the public key (`base64 -d | sha256sum | cut -c1-16`), and it names the key in
/// logs, the audit log and `keys show` without exposing anything.
///
/// ```
/// use wgmesh::keys::PublicKey;
/// let key: PublicKey = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=".parse().unwrap();
/// assert_eq!(key.fingerprint().to_string(), "300c9c9603b92a4b");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Fingerprint([u8; 8]);

impl Fingerprint {
    pub fn of(key: &PublicKey) -> Self {
        let digest = Sha256::digest(key.as_bytes());
        let mut out = [0u8; 8];
        out.copy_from_slice(&digest[..8]);
        Self(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::text::hex(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl From<Fingerprint> for String {
    fn from(fp: Fingerprint) -> Self {
        fp.to_string()
    }
}

impl TryFrom<String> for Fingerprint {
    type Error = String;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        let bad = || format!("fingerprint {text:?} is not 16 lowercase hex characters");
        if text.len() != 16 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        let mut out = [0u8; 8];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

/// An x25519 static private key. Zeroized on drop; never printed.
#[derive(Clone)]
pub struct PrivateKey(x25519_dalek::StaticSecret);

impl PrivateKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self(x25519_dalek::StaticSecret::random())
    }

    /// Decodes a private key in `wg genkey` form (base64, surrounding whitespace
    /// ignored). The error never contains the input.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = decode_32(text)?;
        if *bytes == [0u8; KEY_LEN] {
            return Err(KeyError::AllZero);
        }
        Ok(Self(x25519_dalek::StaticSecret::from(*bytes)))
    }

    /// From raw bytes (the UAPI carries keys in hex). The all-zero key, which
    /// the UAPI uses to mean "no key", is refused.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(bytes);
        if *bytes == [0u8; KEY_LEN] {
            return Err(KeyError::AllZero);
        }
        Ok(Self(x25519_dalek::StaticSecret::from(*bytes)))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.public_key().fingerprint()
    }

    /// The secret in `wg genkey` form, for writing the key file.
    pub fn to_base64(&self) -> Zeroizing<String> {
        let bytes = Zeroizing::new(self.0.to_bytes());
        Zeroizing::new(STANDARD.encode(*bytes))
    }

    /// The secret in lowercase hex, the encoding of the WireGuard UAPI.
    pub fn to_hex(&self) -> Zeroizing<String> {
        let bytes = Zeroizing::new(self.0.to_bytes());
        Zeroizing::new(crate::text::hex(&*bytes))
    }

    /// The underlying x25519 secret, for handing to the Noise implementation.
    pub fn as_x25519(&self) -> &x25519_dalek::StaticSecret {
        &self.0
    }
}

/// Constant time (subtle, whose comparison the optimizer cannot turn into an
/// early exit): comparing secrets must not leak where they differ.
fn ct_eq(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.ct_eq(b).into()
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        let a = Zeroizing::new(self.0.to_bytes());
        let b = Zeroizing::new(other.0.to_bytes());
        ct_eq(&a, &b)
    }
}

impl Eq for PrivateKey {}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(fingerprint {})", self.fingerprint())
    }
}

impl fmt::Display for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<private key {}>", self.fingerprint())
    }
}

/// A WireGuard pre-shared key. Zeroized on drop; never printed.
#[derive(Clone, Zeroize, zeroize::ZeroizeOnDrop)]
pub struct PresharedKey([u8; KEY_LEN]);

impl PresharedKey {
    pub fn generate() -> Self {
        // A PSK is 32 uniformly random bytes; reuse the x25519 CSPRNG path rather
        // than adding a second RNG dependency.
        Self(x25519_dalek::StaticSecret::random().to_bytes())
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        Ok(Self(*decode_32(text)?))
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.0))
    }

    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(crate::text::hex(&self.0))
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl PartialEq for PresharedKey {
    fn eq(&self, other: &Self) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

impl Eq for PresharedKey {}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

impl fmt::Display for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<pre-shared key>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Low-order points in little-endian u-coordinate form, including the
    /// non-canonical encodings p - 1, p and p + 1. (Encodings with bit 255 set
    /// are not listed: RFC 7748 masks that bit, so they denote other points.)
    const LOW_ORDER_HEX: &[&str] = &[
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ];

    fn from_hex(text: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn public_key_round_trips_through_base64() {
        let key = PrivateKey::generate().public_key();
        let text = key.to_base64();
        assert_eq!(text.len(), KEY_B64_LEN);
        assert_eq!(PublicKey::from_base64(&text).unwrap(), key);
        assert_eq!(text.parse::<PublicKey>().unwrap(), key);
    }

    #[test]
    fn rejects_bad_base64_and_wrong_length() {
        assert!(matches!(
            PublicKey::from_base64("not base64!"),
            Err(KeyError::Base64(_))
        ));
        assert_eq!(
            PublicKey::from_base64(&STANDARD.encode([7u8; 31])),
            Err(KeyError::Length(31))
        );
        assert_eq!(
            PublicKey::from_base64(&STANDARD.encode([7u8; 33])),
            Err(KeyError::Length(33))
        );
    }

    #[test]
    fn rejects_all_zero_and_low_order_points() {
        assert_eq!(
            PublicKey::from_base64(&STANDARD.encode([0u8; 32])),
            Err(KeyError::AllZero)
        );
        for hex in LOW_ORDER_HEX {
            let text = STANDARD.encode(from_hex(hex));
            assert_eq!(
                PublicKey::from_base64(&text),
                Err(KeyError::LowOrder),
                "{hex}"
            );
        }
    }

    #[test]
    fn matches_wireguard_tools_derivation() {
        // `echo "$priv" | wg pubkey` for this private key (RFC 7748 test vector,
        // Alice's secret) gives this public key.
        let private =
            PrivateKey::from_base64("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=").unwrap();
        assert_eq!(
            private.public_key().to_base64(),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
    }

    #[test]
    fn secrets_never_print_their_bytes() {
        let private = PrivateKey::generate();
        let secret = private.to_base64();
        let shown = format!("{private:?} {private} {:?}", PresharedKey::generate());
        assert!(!shown.contains(secret.as_str()));
        assert!(shown.contains(&private.fingerprint().to_string()));
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn fingerprint_is_stable_and_round_trips() {
        let key = PublicKey::from_base64("hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=").unwrap();
        let fp = key.fingerprint();
        // echo hSDw...= | base64 -d | sha256sum | cut -c1-16
        assert_eq!(fp.to_string(), "300c9c9603b92a4b");
        assert_eq!(Fingerprint::try_from(fp.to_string()).unwrap(), fp);
        assert!(Fingerprint::try_from("XYZ".to_string()).is_err());
    }

    #[test]
    fn secrets_compare_by_value() {
        let k = PrivateKey::generate();
        assert_eq!(k, k.clone());
        assert_ne!(k, PrivateKey::generate());
        let p = PresharedKey::generate();
        assert_eq!(p, p.clone());
        assert_ne!(p, PresharedKey::generate());
    }

    #[test]
    fn private_key_errors_do_not_echo_input() {
        let err = PrivateKey::from_base64("c2VjcmV0LXNlY3JldA==").unwrap_err();
        assert!(!err.to_string().contains("c2VjcmV0"));
    }
}
