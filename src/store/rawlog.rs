//! Raw messages above `INLINE_MAX` bytes, appended to one file. sled
//! rewrites whole tree nodes as they change, so big values inside it cost
//! several times their size in writes and disk; here each is written once.
//! Values in the raw tree are tagged: `INLINE` + bytes, or `POINTER` +
//! offset + length (untagged ones come from stores older than the log).

use std::path::Path;
use std::sync::Mutex;

use super::StoreError;

pub(super) struct RawLog {
    file: std::fs::File,
    len: Mutex<u64>,
}

const INLINE_MAX: usize = 4096;
const INLINE: u8 = 0xFE;
const POINTER: u8 = 0xFF;

fn io(e: std::io::Error) -> StoreError {
    StoreError::RawLog(e)
}

impl RawLog {
    pub(super) fn open(path: &Path) -> std::io::Result<RawLog> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let len = file.metadata()?.len();
        Ok(RawLog {
            file,
            len: Mutex::new(len),
        })
    }

    /// The stored form of `value`, appending it to the log if big.
    pub(super) fn encode(&self, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        use std::io::Write;
        if value.len() <= INLINE_MAX {
            let mut v = Vec::with_capacity(value.len() + 1);
            v.push(INLINE);
            v.extend_from_slice(value);
            return Ok(v);
        }
        let mut len = self.len.lock().unwrap_or_else(|p| p.into_inner());
        let offset = *len;
        if let Err(e) = (&self.file).write_all(value) {
            // A partial append: the end is wherever the file ends now.
            *len = self.file.metadata().map(|m| m.len()).unwrap_or(offset);
            return Err(io(e));
        }
        *len = offset + value.len() as u64;
        let mut v = vec![POINTER];
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&(value.len() as u64).to_be_bytes());
        Ok(v)
    }

    pub(super) fn decode(&self, stored: &[u8]) -> Result<Vec<u8>, StoreError> {
        use std::os::unix::fs::FileExt;
        match stored.split_first() {
            Some((&INLINE, rest)) => Ok(rest.to_vec()),
            Some((&POINTER, rest)) if rest.len() == 16 => {
                let n = |b: &[u8]| u64::from_be_bytes(<[u8; 8]>::try_from(b).unwrap_or([0; 8]));
                let (offset, len) = (n(&rest[..8]), n(&rest[8..]));
                let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
                self.file.read_exact_at(&mut buf, offset).map_err(io)?;
                Ok(buf)
            }
            _ => Ok(stored.to_vec()),
        }
    }

    pub(super) fn sync(&self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(io)
    }
}
