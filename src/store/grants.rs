//! OAuth 2 grants: one JSON record per identity under `oauth2/` in the
//! meta space (small, rare writes; its tokens sealed by the caller, so
//! the store never holds a usable token).

use super::codec::Tree;
use super::{Result, Store, StoreError, Tx};
use crate::record::OAuthGrant;

const GRANT: &[u8] = b"oauth2/";

fn key(identity: &str) -> Vec<u8> {
    [GRANT, identity.as_bytes()].concat()
}

fn decode(k: &[u8], v: &[u8]) -> Result<OAuthGrant> {
    serde_json::from_slice(v).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(k).into_owned(),
        source,
    })
}

impl Store {
    /// `identity`'s grant (None: never logged in, or logged out).
    pub fn oauth_grant(&self, identity: &str) -> Result<Option<OAuthGrant>> {
        let k = key(identity);
        self.db
            .get(Tree::Meta, &k)?
            .map(|v| decode(&k, &v))
            .transpose()
    }

    /// Every identity's grant.
    pub fn oauth_grants(&self) -> Result<Vec<OAuthGrant>> {
        let mut out = Vec::new();
        for r in self.db.prefix(Tree::Meta, GRANT) {
            let (k, v) = r?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }
}

impl Tx<'_> {
    /// `identity`'s grant, as this transaction sees it.
    pub fn oauth_grant(&self, identity: &str) -> Result<Option<OAuthGrant>> {
        let k = key(identity);
        self.get_bytes(Tree::Meta, &k)?
            .map(|v| decode(&k, &v))
            .transpose()
    }

    pub fn set_oauth_grant(&mut self, grant: &OAuthGrant) -> Result<()> {
        let v = serde_json::to_vec(grant).map_err(StoreError::Encode)?;
        self.put(Tree::Meta, key(&grant.identity), v);
        Ok(())
    }
}
