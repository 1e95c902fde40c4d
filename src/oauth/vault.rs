//! Tokens at rest: sealed with a key that is not in the store
//! (`ESCALATOR_TOKEN_KEY`, or a key file), so a database dump or a copied
//! sled folder gives no mailbox access. ChaCha20-Poly1305 from ring (in
//! the tree already through rustls), a fresh random nonce per seal, and
//! the identity's name as associated data: a sealed token moved to
//! another identity's record does not open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};

/// The format of a sealed token: this byte, the nonce, the ciphertext
/// with its tag.
const VERSION: u8 = 1;

/// A token key: 32 bytes.
pub struct TokenKey(LessSafeKey);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.write_str("TokenKey(..)")
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VaultError {
    /// The key as given is not one; `origin` names where it came from.
    #[error("{origin}: a token key is 32 bytes, written as 64 hexadecimal digits ({why})")]
    BadKey { origin: String, why: String },
    #[error("cannot make a random nonce: {0}")]
    Random(String),
    /// Wrong key, another identity's record, or changed bytes: the same
    /// answer for each, as a token must not say which.
    #[error("the sealed token of {identity:?} does not open with this token key (another key sealed it, or it was changed)")]
    Open { identity: String },
}

impl TokenKey {
    /// A key from its text form (64 hex digits; surrounding whitespace,
    /// as a file ends with a newline, is ignored). `source` names the
    /// environment variable or file for the error.
    pub fn parse(text: &str, source: &str) -> Result<TokenKey, VaultError> {
        let bad = |why: &str| VaultError::BadKey {
            origin: source.to_string(),
            why: why.to_string(),
        };
        let text = text.trim();
        if text.len() != 64 {
            return Err(bad(&format!("it has {} characters", text.chars().count())));
        }
        let mut bytes = [0u8; 32];
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let digits = std::str::from_utf8(pair).map_err(|_| bad("not hexadecimal"))?;
            bytes[i] = u8::from_str_radix(digits, 16).map_err(|_| bad("not hexadecimal"))?;
        }
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| bad("refused"))?;
        Ok(TokenKey(LessSafeKey::new(key)))
    }

    /// `secret` sealed for `identity`.
    pub fn seal(&self, identity: &str, secret: &[u8]) -> Result<Vec<u8>, VaultError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| VaultError::Random(e.to_string()))?;
        let mut data = secret.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(identity)),
                &mut data,
            )
            .map_err(|_| VaultError::Random("sealing failed".into()))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + data.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// The secret `sealed` holds for `identity`.
    pub fn open(&self, identity: &str, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        let fail = || VaultError::Open {
            identity: identity.to_string(),
        };
        let (&version, rest) = sealed.split_first().ok_or_else(fail)?;
        if version != VERSION || rest.len() < NONCE_LEN {
            return Err(fail());
        }
        let (nonce, data) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail())?;
        let mut data = data.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad(identity)), &mut data)
            .map_err(|_| fail())?;
        Ok(plain.to_vec())
    }
}

fn aad(identity: &str) -> Vec<u8> {
    [b"escalator token v1\0".as_slice(), identity.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn key(text: &str) -> TokenKey {
        TokenKey::parse(text, "ESCALATOR_TOKEN_KEY").unwrap()
    }

    #[test]
    fn a_sealed_token_opens_only_with_its_key_and_identity() {
        let k = key(KEY);
        let sealed = k.seal("m365", b"refresh-token-secret").unwrap();
        assert_eq!(k.open("m365", &sealed).unwrap(), b"refresh-token-secret");
        // The secret is not in the sealed bytes, and two seals differ.
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_ne!(sealed, k.seal("m365", b"refresh-token-secret").unwrap());
        let other = key(&KEY.replace('0', "1"));
        let refused = VaultError::Open {
            identity: "m365".into(),
        };
        assert_eq!(other.open("m365", &sealed), Err(refused.clone()));
        assert!(matches!(
            k.open("gmail", &sealed),
            Err(VaultError::Open { .. })
        ));
        let mut changed = sealed.clone();
        let last = changed.len() - 1;
        changed[last] ^= 1;
        assert_eq!(k.open("m365", &changed), Err(refused.clone()));
        for cut in [0, 1, 5, sealed.len() - 1] {
            assert_eq!(
                k.open("m365", &sealed[..cut]),
                Err(refused.clone()),
                "{cut}"
            );
        }
    }

    #[test]
    fn a_key_that_is_not_one_is_refused_naming_where_it_came_from() {
        // A file's trailing newline is fine.
        assert!(TokenKey::parse(&format!("{KEY}\n"), "/etc/escalator/token.key").is_ok());
        for (text, why) in [
            ("", "0 characters"),
            ("abc", "3 characters"),
            (&KEY[..63], "63 characters"),
            (&KEY.replace('a', "g"), "not hexadecimal"),
            // 64 bytes, one of them not an ASCII digit.
            (&format!("{}é", &KEY[..62]), "not hexadecimal"),
        ] {
            let e = TokenKey::parse(text, "/etc/escalator/token.key").unwrap_err();
            let shown = e.to_string();
            assert!(
                shown.starts_with("/etc/escalator/token.key:") && shown.contains(why),
                "{shown}"
            );
            // The key's text is never in the error.
            assert!(text.len() < 8 || !shown.contains(&text[..8]), "{shown}");
        }
        assert_eq!(format!("{:?}", key(KEY)), "TokenKey(..)");
    }
}
