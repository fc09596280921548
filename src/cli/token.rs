//! Token files (`DIR/auth.token`, `DIR/admin.token`). (The data directory's lock is the node's:
//! `DIR/LOCK`, see `node`.)
//!
//! A token file holds one line: the token. The server creates it once (mode 0600, 32 random bytes
//! from `/dev/urandom` as 64 hex digits) when no token is configured, and reuses it on every
//! start; clients on the same machine read it through `--data-dir`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::protocol::TOKEN_LEN_MAX;

/// File name of the client token in the data directory.
pub const CLIENT_TOKEN_FILE: &str = "auth.token";
/// File name of the admin token in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Checks a token is usable on the wire: 1..=120 bytes of printable ASCII.
pub fn validate(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if token.len() > TOKEN_LEN_MAX {
        return Err(format!("the token is {} bytes long; at most {TOKEN_LEN_MAX} are allowed", token.len()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// Reads a token file. `Ok(None)` if it does not exist.
pub fn read(path: &Path) -> Result<Option<String>, String> {
    let mut text = String::new();
    match File::open(path) {
        Ok(mut file) => {
            file.read_to_string(&mut text).map_err(|e| format!("cannot read token file {}: {e}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read token file {}: {e}", path.display())),
    };
    let token = text.trim().to_string();
    validate(&token).map_err(|e| format!("token file {}: {e}", path.display()))?;
    Ok(Some(token))
}

/// Reads the token file at `path`, creating it with a fresh random token if it does not exist.
/// Warns (stderr) when an existing file is readable by other users.
pub fn load_or_create(path: &Path) -> Result<String, String> {
    if let Some(token) = read(path)? {
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.mode() & 0o077 != 0 {
                eprintln!(
                    "stormledger: warning: token file {} is accessible by other users (mode {:o}); run chmod 600 on it",
                    path.display(),
                    meta.mode() & 0o777
                );
            }
        }
        return Ok(token);
    }
    let token = generate().map_err(|e| format!("cannot generate a token from /dev/urandom: {e}"))?;
    // Write a private temporary file, then link it into place: the token file appears complete
    // or not at all, and an existing one is never overwritten.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        file.write_all(format!("{token}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, path)
    };
    let result = write();
    let _ = std::fs::remove_file(&tmp);
    match result {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                if let Ok(dir) = File::open(dir) {
                    let _ = dir.sync_all();
                }
            }
            eprintln!("stormledger: created {} (mode 0600)", path.display());
            Ok(token)
        }
        // Someone else created it in the meantime: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read(path)?.ok_or_else(|| format!("token file {} vanished while being created", path.display()))
        }
        Err(e) => Err(format!("cannot create token file {}: {e}", path.display())),
    }
}

/// 32 random bytes from the kernel, as 64 lowercase hex digits.
fn generate() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CLIENT_TOKEN_FILE);
        let first = load_or_create(&path).unwrap();
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), first);
        assert_eq!(read(&path).unwrap(), Some(first));
        assert_eq!(read(&dir.path().join("missing")).unwrap(), None);
    }

    #[test]
    fn refuses_bad_tokens() {
        assert!(validate("").is_err());
        assert!(validate("a b").is_err());
        assert!(validate(&"x".repeat(121)).is_err());
        assert!(validate("good-token").is_ok());
    }
}
